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
import math
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
    layers = _layers(attr(model, "layers", path), path)
    dtype = text_attr(model, "dtype", path)
    epoch = int_value(attr(f, "epoch", path), "/epoch", path)
    if int_value(verified_array(rng, "epoch", path), "/rng/epoch", path) != epoch:
        raise error(path, "/rng/epoch disagrees with the root attribute epoch (file corrupt)")
    prep = member(f, "preprocess", path, h5py.Group)
    metrics_group = member(f, "metrics", path, h5py.Group)
    metrics = verified_text(metrics_group, "jsonl", path)
    params = _read_params_checked(model, layers, dtype, path)
    return dict(  # in Checkpoint's order, which is also the order the checks run in
        step=int_value(attr(f, "step", path), "/step", path, 10**8 - 1), epoch=epoch,
        step_in_epoch=int_value(verified_array(rng, "step_in_epoch", path), "/rng/step_in_epoch",
                                path),
        seed=int_value(verified_array(rng, "seed", path), "/rng/seed", path), layers=layers,
        activation=text_attr(model, "activation", path),
        output=text_attr(model, "output", path), loss=text_attr(model, "loss", path),
        dtype=dtype, params=params, optimizer_name=text_attr(opt, "name", path),
        optimizer_state=_optimizer_state(opt, params.size, path),
        config=_config(verified_text(member(f, "config", path, h5py.Group), "json", path), path),
        preprocess={k: verified_array(prep, k, path) for k in prep},
        metrics=_records(metrics, path),
        world_size=int_value(attr(f, "world_size", path), "/world_size", path),
        distbp_version=text_attr(f, "distbp_version", path),
        interval=_read_interval(metrics_group, path))


# ------------------------------------------------------------------ the schema of each field
# A file whose digests match is intact, not necessarily distbp's: anyone can write one. Every
# field is checked for type, shape and size before it is used, so a forged file is a
# CheckpointError, never an AttributeError, a TypeError or a terabyte allocation.

def int_value(value, name: str, path: Path, most: int = 2**63 - 1) -> int:
    """A 0-d integer (attribute or dataset) in 0..most."""
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iu" or not 0 <= int(arr) <= most:
        raise error(path, f"{name} must be an integer in 0..{most}, got {_show(value)}")
    return int(arr)


def text_attr(obj, name: str, path: Path) -> str:
    """A string attribute."""
    value = attr(obj, name, path)
    if not isinstance(value, str):
        raise error(path, f"attribute {name!r} on {obj.name} must be text, got {_show(value)}")
    return value


def _show(value) -> str:
    return repr(value)[:60]


def _layers(value, path: Path) -> tuple[int, ...]:
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or not 2 <= len(arr) <= 1000 \
            or arr.min() < 1 or arr.max() > 2**31:
        raise error(path, f"/model attribute layers must be 2 to 1000 widths in 1..2**31, got "
                          f"{_show(value)}")
    return tuple(int(n) for n in arr)


def _optimizer_state(opt: h5py.Group, n: int, path: Path) -> dict[str, np.ndarray]:
    """Each state buffer: one value per parameter (n,) or a 0-d scalar (Adam's t), finite and,
    for counts (integers) and second moments ("v"), never negative: what an optimizer writes."""
    state = {k: verified_array(opt, k, path) for k in opt}
    for k, a in state.items():
        if a.shape not in ((), (n,)):
            raise error(path, f"/optimizer/{k} has shape {a.shape}; state buffers are () or "
                              f"({n},), one value per parameter")
        nonneg = a.dtype.kind in "iu" or k == "v"  # a step count, a second moment
        if a.size and (not np.isfinite(a).all() or (nonneg and a.min() < 0)):
            what = "non-finite or negative" if nonneg else "non-finite"
            raise error(path, f"/optimizer/{k} holds {what} values, which no optimizer writes")
    return state


def _read_params_checked(model: h5py.Group, layers, dtype: str, path: Path) -> np.ndarray:
    """The flat parameters, which a checkpoint only ever holds finite (save refuses others)."""
    params = _read_params(model, layers, dtype, path)
    if not np.isfinite(params).all():
        raise error(path, "/model holds non-finite parameters (distbp never saves them)")
    return params


def _config(text: str, path: Path) -> dict:
    try:
        config = json.loads(text)
    except ValueError as e:
        raise error(path, f"/config/json is not JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise error(path, f"/config/json must be an object of options, got {_show(config)}")
    return config


def _records(text: str, path: Path) -> list[dict]:
    """The metrics history: JSON objects whose step and epoch are integers >= 0, kind text,
    a train record's loss, accuracy and lr and a validation record's loss and accuracy numbers,
    and every other value a number, text, true/false or null."""
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise error(path, f"/metrics/jsonl line {i} is not JSON: {one_line(e)}") from None
        if not isinstance(r, dict) or not _record_ok(r):
            raise error(path, f"/metrics/jsonl line {i} is not a metrics record: {line[:60]!r}")
        records.append(r)
    return records


# The numbers a record of each kind must hold (the summary, early stopping and plots use them).
_RECORD_NUMBERS = {"val": ("loss", "accuracy"), "train": ("loss", "accuracy", "lr")}


def _record_ok(r: dict) -> bool:
    counts = all(type(r[k]) is int and r[k] >= 0 for k in ("step", "epoch") if k in r)
    kind = isinstance(r.get("kind", ""), str)
    scalars = all(v is None or isinstance(v, (str, float)) or _int64(v) for v in r.values())
    numbers = all(_finite(r.get(k)) for k in _RECORD_NUMBERS.get(r.get("kind"), ()))
    return counts and kind and scalars and numbers


def _finite(v) -> bool:
    """A number a float holds, finite (not a bool, not an int beyond int64)."""
    return (type(v) is int and _int64(v)) or (type(v) is float and math.isfinite(v))


def _int64(v) -> bool:
    """An int (or bool) an int64 holds: JSON integers have no bound, floats and NumPy do."""
    return isinstance(v, int) and -2**63 <= v < 2**63


def _read_interval(metrics: h5py.Group, path: Path) -> dict[str, float]:
    """/metrics/interval as {"steps": int, "loss_sum"/"correct"/"samples": float}, each a
    verified 0-d dataset (steps an integer)."""
    g = member(metrics, "interval", path, h5py.Group)
    arrays = {k: verified_array(g, k, path) for k in INTERVAL_KEYS}
    if any(a.shape != () or not np.isfinite(a) or a < 0 for a in arrays.values()) \
            or arrays["steps"].dtype.kind not in "iu":
        raise error(path, "/metrics/interval must hold finite 0-d datasets >= 0, steps an "
                          "integer")
    return {k: int(a) if k == "steps" else float(a) for k, a in arrays.items()}


def _read_params(model: h5py.Group, layers: tuple[int, ...], dtype: str, path: Path) -> np.ndarray:
    """The flat params from /model: each W_j, b_j checked against layers and dtype and copied
    into its view of the flat array (network.param_views: the engine owns the layout)."""
    if len(layers) < 2 or min(layers) < 1 or dtype not in ("float32", "float64"):
        raise error(path, f"/model has invalid layers {join_ints(layers)} or dtype {dtype!r}")
    if f"W{len(layers)}" in model:
        raise error(path, f"/model has more weight datasets than layers {join_ints(layers)} allow")
    need = n_params(layers) * np.dtype(dtype).itemsize
    if need > os.path.getsize(path):  # before allocating what a forged header claims
        raise error(path, f"layers {join_ints(layers)} need {need} bytes of parameters, more "
                          f"than the file's {os.path.getsize(path)}")
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
    _check_plain(ds, path)
    arr = np.asarray(ds[()], order="C")
    _verify(ds, digest(arr), path)
    return arr


def _check_plain(ds: h5py.Dataset, path: Path) -> None:
    """Refuse what save() never writes: chunks, filters, virtual or external storage, and a
    declared size larger than the file (read before anything is allocated)."""
    size = os.path.getsize(path)
    if ds.chunks is not None or ds.is_virtual or ds.external or \
            ds.size * ds.dtype.itemsize > size:
        raise error(path, f"dataset {ds.name} is not stored as save() writes it (contiguous, "
                          f"within the file's {size} bytes): shape {ds.shape}")


def verified_text(g: h5py.Group, name: str, path: Path) -> str:
    """A scalar UTF-8 string dataset, checked against its sha256 attribute."""
    ds = member(g, name, path)
    if h5py.check_string_dtype(ds.dtype) is None or ds.shape != ():
        raise error(path, f"dataset {ds.name} is not a text dataset")
    _check_plain(ds, path)
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

