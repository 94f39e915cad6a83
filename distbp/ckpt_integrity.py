"""Checkpoint verification: the format's constants, the hashes, and the checked reader.

Contract: check_file() verifies a file's userblock header (its size and the SHA-256 of
everything HDF5 parses) BEFORE the HDF5 library reads a byte, so damage anywhere is caught
outside libhdf5; read_fields() then reads every field of a checkpoint.Checkpoint through
verified_array() / verified_text(), each dataset checked against its sha256 attribute, and checks
the format name and version, every /model shape against the layers, and /rng/epoch against the
root attribute. Any problem raises a one-line CheckpointError naming the file (`error`). This is
the security boundary of checkpoint.load(): it computes and checks, and never writes a file
(userblock() gives checkpoint.save the header bytes). The format itself is specified in
distbp/checkpoint.py's docstring.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from distbp.errors import CheckpointError, one_line
from distbp.network import n_params, param_views
from distbp.version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "INTERVAL_KEYS", "MAGIC", "NUMERIC", "USERBLOCK", "attr",
           "check_file", "digest", "error", "file_digest", "join_ints", "member", "read_fields",
           "userblock", "verified_array", "verified_text"]

FORMAT = "distbp-checkpoint"
FORMAT_VERSION = 1
# /metrics/interval's datasets: the sums behind the train record in progress (metrics.Interval)
INTERVAL_KEYS = ("steps", "loss_sum", "correct", "samples")
USERBLOCK = 512  # bytes before the HDF5 superblock; HDF5 looks for it at 0, 512, 1024, ...
MAGIC = FORMAT.encode() + b" sha256 "
NUMERIC = "biuf"  # dtype kinds allowed; object, compound, opaque and references are refused
_HEADER = re.compile(rb"distbp-checkpoint sha256 ([0-9a-f]{64}) size ([1-9][0-9]{0,18})\n\x00*")
_CHUNK = 1 << 20  # hashing reads the file in 1 MiB pieces: no whole-file copy in memory
# superblock v0 (what libver="earliest" writes): version byte at +8, consistency flags at +20..+23
_SB_VERSION, _FLAGS = 8, slice(20, 24)


def digest(data) -> str:
    """Hex SHA-256 of a buffer: a C-ordered array's bytes, or UTF-8 text's bytes."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------- whole-file hash

def file_digest(fh, size: int) -> tuple[str, int, int]:
    """(hex SHA-256 of bytes 512..size of `fh` with the superblock consistency flags hashed as
    zeros, superblock version byte, flags as little-endian int; -1 for each if absent).

    Reads in _CHUNK pieces; the first piece always holds the superblock's first 24 bytes."""
    h = hashlib.sha256()
    fh.seek(USERBLOCK)
    head = bytearray(fh.read(min(_CHUNK, size - USERBLOCK)))
    whole = len(head) >= _FLAGS.stop
    version = head[_SB_VERSION] if whole else -1
    flags = int.from_bytes(head[_FLAGS], "little") if whole else -1
    head[_FLAGS] = bytes(len(head[_FLAGS]))
    h.update(head)
    count = size - USERBLOCK - len(head)
    while count > 0 and (chunk := fh.read(min(_CHUNK, count))):
        h.update(chunk)
        count -= len(chunk)
    return h.hexdigest(), version, flags


def userblock(fh, size: int, path: Path) -> bytes:
    """The USERBLOCK bytes to write at offset 0 of the closed HDF5 file `fh` (`size` bytes, at
    `path`): the header line, NUL-padded. Refuses a superblock other than version 0 with flags 0,
    because the flag offsets hashed as zeros are those of superblock v0."""
    hexdigest, version, flags = file_digest(fh, size)
    if (version, flags) != (0, 0):
        raise CheckpointError(f"cannot write checkpoint '{path}': HDF5 wrote superblock "
                              f"version {version} with flags {flags} (distbp needs 0, 0)")
    return (MAGIC + f"{hexdigest} size {size}\n".encode("ascii")).ljust(USERBLOCK, b"\0")


def check_file(path: Path) -> None:
    """Check the userblock header, the file size and the SHA-256 of bytes 512..end."""
    mismatch = "file checksum mismatch (corrupt or truncated)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(USERBLOCK)
            if not head.startswith(MAGIC):
                raise error(path, "no distbp checksum header (not a distbp checkpoint, or "
                                  "written by a foreign tool)")
            if len(head) < USERBLOCK or not (m := _HEADER.fullmatch(head)):
                raise error(path, f"{mismatch}: damaged checksum header")
            size, want = os.fstat(fh.fileno()).st_size, int(m.group(2))
            if size != want:  # before hashing: a truncated file is refused without reading it
                raise error(path, f"{mismatch}: {size} bytes but its header says {want}")
            hexdigest, _, flags = file_digest(fh, size)
            if hexdigest != m.group(1).decode("ascii"):
                raise error(path, f"{mismatch}: SHA-256 of the file differs from its header")
            if flags not in (0, 1):  # 1: HDF5 marks a file open for writing; anything else: rot
                raise error(path, f"{mismatch}: HDF5 superblock flags are {flags:#x}, not 0 or 1")
    except OSError as e:
        raise error(path, f"cannot read: {one_line(e)}") from e


# ------------------------------------------------------------------ checked HDF5 readers

def read_fields(f: h5py.File, path: Path) -> dict:
    """Every Checkpoint field but `path`, read from the open file `f` (already through
    check_file): format and version checked, each dataset verified, the flat params rebuilt."""

    if (fmt := attr(f, "format", path)) != FORMAT:
        raise error(path, f"not a distbp checkpoint (format attribute is {fmt!r})")
    if (version := int(attr(f, "format_version", path))) != FORMAT_VERSION:
        raise error(path, f"format_version {version} is not supported by distbp {__version__} "
                          f"(it reads format_version {FORMAT_VERSION})")
    model, opt, rng = (member(f, name, path, h5py.Group) for name in ("model", "optimizer", "rng"))
    layers = tuple(int(n) for n in attr(model, "layers", path))
    dtype = str(attr(model, "dtype", path))
    epoch = int(attr(f, "epoch", path))
    if int(verified_array(rng, "epoch", path)) != epoch:
        raise error(path, "/rng/epoch disagrees with the root attribute epoch (file corrupt)")
    prep = f.get("preprocess", {})
    metrics_group = member(f, "metrics", path, h5py.Group)
    metrics = verified_text(metrics_group, "jsonl", path)
    return dict(  # in Checkpoint's order, which is also the order the checks run in
        step=int(attr(f, "step", path)), epoch=epoch,
        step_in_epoch=int(verified_array(rng, "step_in_epoch", path)),
        seed=int(verified_array(rng, "seed", path)), layers=layers,
        activation=str(attr(model, "activation", path)),
        output=str(attr(model, "output", path)), loss=str(attr(model, "loss", path)),
        dtype=dtype, params=_read_params(model, layers, dtype, path),
        optimizer_name=str(attr(opt, "name", path)),
        optimizer_state={k: verified_array(opt, k, path) for k in opt},
        config=json.loads(verified_text(member(f, "config", path, h5py.Group), "json", path)),
        preprocess={k: verified_array(prep, k, path) for k in prep},
        metrics=[json.loads(line) for line in metrics.splitlines() if line.strip()],
        world_size=int(attr(f, "world_size", path)),
        distbp_version=str(attr(f, "distbp_version", path)),
        interval=_read_interval(metrics_group, path))


def _read_interval(metrics: h5py.Group, path: Path) -> dict[str, float]:
    """/metrics/interval as {"steps": int, "loss_sum"/"correct"/"samples": float}, each a
    verified 0-d dataset (steps an integer)."""
    g = member(metrics, "interval", path, h5py.Group)
    arrays = {k: verified_array(g, k, path) for k in INTERVAL_KEYS}
    if any(a.shape != () for a in arrays.values()) or arrays["steps"].dtype.kind not in "iu":
        raise error(path, "/metrics/interval must hold 0-d datasets, steps an integer")
    return {k: int(a) if k == "steps" else float(a) for k, a in arrays.items()}


def _read_params(model: h5py.Group, layers: tuple[int, ...], dtype: str, path: Path) -> np.ndarray:
    """The flat params from /model: each W_j, b_j checked against layers and dtype and copied
    into its view of the flat array (network.param_views: the engine owns the layout)."""
    if len(layers) < 2 or min(layers) < 1 or dtype not in ("float32", "float64"):
        raise error(path, f"/model has invalid layers {join_ints(layers)} or dtype {dtype!r}")
    if f"W{len(layers)}" in model:
        raise error(path, f"/model has more weight datasets than layers {join_ints(layers)} allow")
    params = np.empty(n_params(layers), dtype)
    for j, views in enumerate(zip(*param_views(params, layers)), start=1):
        for name, view in zip((f"W{j}", f"b{j}"), views):
            arr = verified_array(model, name, path)
            if arr.shape != view.shape or arr.dtype != dtype:
                raise error(path, f"dataset /model/{name} is {arr.dtype} {arr.shape} but layers "
                                  f"{join_ints(layers)} and dtype {dtype} need {view.shape}")
            view[...] = arr
    return params


def verified_array(g: h5py.Group, name: str, path: Path) -> np.ndarray:
    """A numeric dataset, read and checked against its sha256 attribute."""
    ds = member(g, name, path)
    if ds.dtype.kind not in NUMERIC:
        raise error(path, f"dataset {ds.name} has non-numeric dtype {ds.dtype}")
    arr = np.asarray(ds[()], order="C")
    _verify(ds, digest(arr), path)
    return arr


def verified_text(g: h5py.Group, name: str, path: Path) -> str:
    """A scalar UTF-8 string dataset, checked against its sha256 attribute."""
    ds = member(g, name, path)
    if h5py.check_string_dtype(ds.dtype) is None or ds.shape != ():
        raise error(path, f"dataset {ds.name} is not a text dataset")
    data = ds[()]
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    _verify(ds, digest(data), path)
    return data.decode("utf-8")


def member(g: h5py.Group, name: str, path: Path, kind: type = h5py.Dataset):
    """g[name], which must exist and be a `kind` (h5py.Dataset or h5py.Group)."""
    if not isinstance(g.get(name), kind):
        what = "group" if kind is h5py.Group else "dataset"
        raise error(path, f"missing {what} {g.name.rstrip('/')}/{name}")
    return g[name]


def _verify(ds: h5py.Dataset, hexdigest: str, path: Path) -> None:
    """Refuse `ds` unless its sha256 attribute equals `hexdigest` (of the bytes just read)."""
    if "sha256" not in ds.attrs:
        raise error(path, f"dataset {ds.name} has no sha256 attribute")
    if ds.attrs["sha256"] != hexdigest:
        raise error(path, f"dataset {ds.name} fails its SHA-256 check (file corrupt)")


def attr(obj, name: str, path: Path):
    """The attribute `name` of an HDF5 object, which must exist."""
    if name not in obj.attrs:
        raise error(path, f"missing attribute {name!r} on {obj.name}")
    return obj.attrs[name]


def error(path: Path, problem: str) -> CheckpointError:
    """The one-line error for a checkpoint that cannot be loaded: file, then problem."""
    return CheckpointError(f"checkpoint '{path}': {problem}")


def join_ints(values) -> str:
    """Layer sizes as messages show them: "784,128,10"."""
    return ",".join(str(int(v)) for v in values)

