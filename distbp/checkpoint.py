"""HDF5 checkpoints: save atomically, load with verification, rotate, pick the newest valid one.

    path = save("ck", step=10, epoch=0, step_in_epoch=10, seed=0, layers=[784, 128, 10], ...)
    ckpt = load(path)                       # whole file, then every dataset, SHA-256 verified
    path, skipped = latest_valid("ck")      # `--resume auto`: the newest file that loads

Format (format_version 1): an HDF5 file with a 512-byte userblock, readable with plain h5py (HDF5
skips the userblock). The userblock holds one ASCII line padded with NUL bytes to 512 bytes:
    distbp-checkpoint sha256 <64 lowercase hex> size <file size in bytes>\n
where the SHA-256 covers bytes 512..end of the file, i.e. everything HDF5 parses, with one
exception: the 4 bytes at offsets 532..535 (the version-0 superblock's "file consistency flags")
are hashed as zeros, and must be 0 or 1. HDF5 itself sets them to 1 while any process holds the
file open for writing (and leaves 1 if that process dies), without changing any content; a
checkpoint someone opened with h5py "r+" stays loadable. load() checks the line, the file size
and this hash BEFORE the HDF5 library reads a byte: a damaged superblock or B-tree can crash or
hang libhdf5, and a flipped attribute (step, loss, ...) would load with a wrong value, so damage
anywhere must be caught outside HDF5. Inside the HDF5 part:
  /            attrs format="distbp-checkpoint", format_version=1, step, epoch, distbp_version,
               world_size (informational), created (ISO 8601, UTC)
  /model       W1..WL (n_out, n_in), b1..bL (n_out,) in the params dtype; attrs layers (int64),
               activation, output, loss, dtype ("float32"/"float64")
  /optimizer   attr name; one dataset per state buffer (0-d for scalars such as Adam's t)
  /config      json: the resolved run configuration (UTF-8 text)
  /rng         seed, epoch, step_in_epoch (0-d int64): the batch plan is a pure function of
               (seed, epoch), so with the cursor they are all an exact resume needs
  /preprocess  optional arrays (mean, std, ...)
  /metrics     jsonl: the metrics history, one JSON object per line
Every dataset also has attr sha256 = hex SHA-256 of its bytes (C order, stored dtype; UTF-8 bytes
for text), so a reader using plain h5py can verify what it reads. Editing a checkpoint with h5py
keeps the userblock but invalidates the file hash: load() then refuses the file. Nothing is
pickled; load reads numbers and strings only. Only rank 0 calls this module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from distbp.errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "check_compatible", "checkpoint_path",
           "latest_valid", "list_checkpoints", "load", "param_shapes", "save", "set_aside_newer"]

FORMAT = "distbp-checkpoint"
FORMAT_VERSION = 1

_NAME = re.compile(r"ckpt-(\d{8})\.h5")
_TEMP = re.compile(r"\.tmp-ckpt-\d{8}\.h5\.\d+")  # never matches _NAME: a crash leaves no ckpt-*
_TEXT = h5py.string_dtype("utf-8")
_NUMERIC = "biuf"  # dtype kinds allowed; object, compound, opaque and references are refused
_USERBLOCK = 512  # bytes before the HDF5 superblock; HDF5 looks for it at 0, 512, 1024, ...
_MAGIC = FORMAT.encode() + b" sha256 "
_HEADER = re.compile(rb"distbp-checkpoint sha256 ([0-9a-f]{64}) size ([1-9][0-9]{0,18})\n\x00*")
_CHUNK = 1 << 20  # hashing reads the file in 1 MiB pieces: no whole-file copy in memory
# superblock v0 (what libver="earliest" writes): version byte at +8, consistency flags at +20..+23
_SB_VERSION, _FLAGS = 8, slice(20, 24)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint. `params` is flat: W_j (row-major) then b_j, layer by layer."""

    path: Path
    step: int
    epoch: int
    step_in_epoch: int
    seed: int
    layers: tuple[int, ...]
    activation: str
    output: str
    loss: str
    dtype: str
    params: np.ndarray
    optimizer_name: str
    optimizer_state: dict[str, np.ndarray]
    config: dict
    preprocess: dict[str, np.ndarray]
    metrics: list[dict]
    world_size: int
    distbp_version: str


def param_shapes(layers) -> list[tuple[tuple[int, int], tuple[int]]]:
    """[(W_j shape (n_j, n_k), b_j shape (n_j,)), ...] for layers [n0, n1, ..., nL]."""
    return [((n_j, n_k), (n_j,)) for n_k, n_j in itertools.pairwise(int(n) for n in layers)]


def checkpoint_path(directory, step: int) -> Path:
    """directory / "ckpt-<step, 8 digits>.h5"."""
    return Path(directory) / f"ckpt-{step:08d}.h5"


def list_checkpoints(directory) -> list[Path]:
    """Files named exactly ckpt-<8 digits>.h5 in `directory`, by step ascending ([] if absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_valid(directory) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads and verifies, and the (path, reason) of each newer one
    skipped, newest first. A missing or empty directory gives (None, [])."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            load(path)
            return path, skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, skipped


# ------------------------------------------------------------------------------------ save

def save(directory, *, step: int, epoch: int, step_in_epoch: int, seed: int, layers,
         activation: str, output: str, loss: str, params: np.ndarray, optimizer_name: str,
         optimizer_state: dict[str, np.ndarray], config: dict, metrics: list[dict],
         world_size: int, preprocess: dict[str, np.ndarray] | None = None,
         keep: int | None = 3) -> Path:
    """Write directory/ckpt-<step:08d>.h5 atomically and return its path.

    Written under a temporary name that no ckpt-* pattern matches, fsynced, renamed over the final
    name, then the directory fsynced: a crash at any instant leaves every ckpt-*.h5 complete. The
    file-hash header is written into the userblock after HDF5 closes the file, before the fsync.
    Then
    all but the newest `keep` checkpoints (None: keep all; the file just written always stays) and
    stale temporary files are removed. `optimizer_state` keys starting with "_" are scratch and
    not saved. `config` and `metrics` must be JSON-serializable.
    """
    if not 0 <= step < 10**8:
        raise ValueError(f"checkpoint step {step} is outside 0..99999999")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    params = _check_params(params, layers)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' exists and is not a directory")
    final = checkpoint_path(directory, step)
    tmp = directory / f".tmp-{final.name}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK, libver="earliest") as f:
            _write_root(f, step, epoch, world_size)
            _write_model(f.create_group("model"), layers, activation, output, loss, params)
            opt = f.create_group("optimizer")
            opt.attrs["name"] = optimizer_name
            # "_" keys are scratch buffers the optimizer rebuilds; they are not state
            _put_arrays(opt, {k: v for k, v in optimizer_state.items() if not k.startswith("_")})
            _put_text(f.create_group("config"), "json", json.dumps(config, sort_keys=True))
            _put_arrays(f.create_group("rng"), {"seed": seed, "epoch": epoch,
                                                "step_in_epoch": step_in_epoch}, np.int64)
            _put_arrays(f.create_group("preprocess"), preprocess or {})
            _put_text(f.create_group("metrics"), "jsonl",
                      "".join(json.dumps(m) + "\n" for m in metrics))
        _seal(tmp)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(directory)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint '{final}': {_line(e)}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _rotate(directory, keep, final)
    return final


def _check_params(params, layers) -> np.ndarray:
    params = np.asarray(params)
    total = sum(w[0] * w[1] + b[0] for w, b in param_shapes(layers))
    if len(layers) < 2 or params.ndim != 1 or params.size != total:
        raise ValueError(f"params of shape {params.shape} do not fit layers {_csv(layers)} "
                         f"({total} parameters)")
    if params.dtype not in (np.float32, np.float64):
        raise ValueError(f"params dtype {params.dtype} is not float32 or float64")
    return params


def _write_root(f: h5py.File, step: int, epoch: int, world_size: int) -> None:
    from distbp import __version__  # lazily: distbp/__init__ imports the engine

    f.attrs.update({"format": FORMAT, "format_version": np.int64(FORMAT_VERSION),
                    "step": np.int64(step), "epoch": np.int64(epoch),
                    "distbp_version": __version__, "world_size": np.int64(world_size),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _write_model(g: h5py.Group, layers, activation, output, loss, params: np.ndarray) -> None:
    g.attrs.update({"layers": np.asarray(layers, dtype=np.int64), "activation": activation,
                    "output": output, "loss": loss, "dtype": params.dtype.name})
    offset = 0
    for j, (w_shape, b_shape) in enumerate(param_shapes(layers), start=1):
        for name, shape in ((f"W{j}", w_shape), (f"b{j}", b_shape)):
            size = int(np.prod(shape))
            _put_arrays(g, {name: params[offset:offset + size].reshape(shape)})
            offset += size


def _put_arrays(g: h5py.Group, arrays: dict, dtype=None) -> None:
    """One contiguous dataset per numeric array, each with its sha256 attribute."""
    for name, value in arrays.items():
        arr = np.asarray(value, dtype=dtype, order="C")
        if arr.dtype.kind not in _NUMERIC:
            raise ValueError(f"{g.name}/{name} has dtype {arr.dtype}; checkpoints hold numbers")
        if not name or "/" in name or name == ".":  # h5py would make "a/b" a nested path
            raise ValueError(f"{name!r} cannot be an HDF5 dataset name")
        g.create_dataset(name, data=arr).attrs["sha256"] = hashlib.sha256(arr).hexdigest()


def _put_text(g: h5py.Group, name: str, text: str) -> None:
    data = text.encode("utf-8")
    g.create_dataset(name, data=data, dtype=_TEXT).attrs["sha256"] = \
        hashlib.sha256(data).hexdigest()


def _seal(path: Path) -> None:
    """Write the file-hash header into the userblock of the closed HDF5 file at `path`."""
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest, version, flags = _digest(fh, size)
        if (version, flags) != (0, 0):  # the flag offsets below are those of superblock v0
            raise CheckpointError(f"cannot write checkpoint '{path}': HDF5 wrote superblock "
                                  f"version {version} with flags {flags} (distbp needs 0, 0)")
        line = _MAGIC + f"{digest} size {size}\n".encode("ascii")
        fh.seek(0)
        fh.write(line.ljust(_USERBLOCK, b"\0"))


def _digest(fh, size: int) -> tuple[str, int, int]:
    """(hex SHA-256 of bytes 512..size of `fh` with the superblock consistency flags hashed as
    zeros, superblock version byte, flags as little-endian int; -1 for each if absent).

    Reads in _CHUNK pieces; the first piece always holds the superblock's first 24 bytes."""
    h = hashlib.sha256()
    fh.seek(_USERBLOCK)
    head = bytearray(fh.read(min(_CHUNK, size - _USERBLOCK)))
    whole = len(head) >= _FLAGS.stop
    version = head[_SB_VERSION] if whole else -1
    flags = int.from_bytes(head[_FLAGS], "little") if whole else -1
    head[_FLAGS] = bytes(len(head[_FLAGS]))
    h.update(head)
    count = size - _USERBLOCK - len(head)
    while count > 0 and (chunk := fh.read(min(_CHUNK, count))):
        h.update(chunk)
        count -= len(chunk)
    return h.hexdigest(), version, flags


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rotate(directory: Path, keep: int | None, written: Path) -> None:
    """Remove checkpoints beyond the newest `keep` (never `written`) and stale temp files."""
    old = list_checkpoints(directory)[:-keep] if keep is not None else []
    stale = [p for p in directory.iterdir() if _TEMP.fullmatch(p.name)]
    for path in old + stale:
        if path != written:
            path.unlink(missing_ok=True)


def set_aside_newer(directory, step: int) -> list[Path]:
    """Move checkpoints with a step above `step` into directory/superseded-<UTC time>/.

    A run that starts fresh (or from an older checkpoint) in a directory that holds a later
    run's checkpoints would otherwise have them picked by the next `--resume auto`, or rotated
    away by `--keep`. Nothing is deleted. Returns the new paths."""
    newer = [p for p in list_checkpoints(directory) if int(p.name[5:13]) > step]
    if not newer:
        return []
    target = Path(directory) / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(exist_ok=True)
    moved = []
    for path in newer:
        os.replace(path, target / path.name)
        moved.append(target / path.name)
    _fsync(Path(directory))
    return moved


# ------------------------------------------------------------------------------------ load

def load(path) -> Checkpoint:
    """Read and verify a checkpoint; any problem raises CheckpointError naming file and problem.

    The file's size and SHA-256 are checked against its userblock header first, so HDF5 only ever
    parses bytes exactly as save() wrote them; then each dataset is checked against its sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "not found" if not path.exists() else "is not a file")
    _check_file(path)
    try:
        # no HDF5 file locking, like data files: it fails on NFS/Lustre, and a reader needs none
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise _error(path, f"not a readable HDF5 file (truncated or not HDF5): {_line(e)}") from e
    try:
        with f:
            return _read(f, path)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise _error(path, f"unreadable, truncated or corrupt: {_line(e)}") from e


def _check_file(path: Path) -> None:
    """Check the userblock header, the file size and the SHA-256 of bytes 512..end."""
    mismatch = "file checksum mismatch (corrupt or truncated)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(_USERBLOCK)
            if not head.startswith(_MAGIC):
                raise _error(path, "no distbp checksum header (not a distbp checkpoint, or "
                                   "written by a foreign tool)")
            if len(head) < _USERBLOCK or not (m := _HEADER.fullmatch(head)):
                raise _error(path, f"{mismatch}: damaged checksum header")
            size, want = os.fstat(fh.fileno()).st_size, int(m.group(2))
            if size != want:  # before hashing: a truncated file is refused without reading it
                raise _error(path, f"{mismatch}: {size} bytes but its header says {want}")
            digest, _, flags = _digest(fh, size)
            if digest != m.group(1).decode("ascii"):
                raise _error(path, f"{mismatch}: SHA-256 of the file differs from its header")
            if flags not in (0, 1):  # 1: HDF5 marks a file open for writing; anything else: rot
                raise _error(path, f"{mismatch}: HDF5 superblock flags are {flags:#x}, not 0 or 1")
    except OSError as e:
        raise _error(path, f"cannot read: {_line(e)}") from e


def _read(f: h5py.File, path: Path) -> Checkpoint:
    from distbp import __version__

    if (fmt := _attr(f, "format", path)) != FORMAT:
        raise _error(path, f"not a distbp checkpoint (format attribute is {fmt!r})")
    if (version := int(_attr(f, "format_version", path))) != FORMAT_VERSION:
        raise _error(path, f"format_version {version} is not supported by distbp {__version__} "
                           f"(it reads format_version {FORMAT_VERSION})")
    model, opt, rng = (_member(f, name, path, h5py.Group) for name in ("model", "optimizer", "rng"))
    layers = tuple(int(n) for n in _attr(model, "layers", path))
    dtype = str(_attr(model, "dtype", path))
    epoch = int(_attr(f, "epoch", path))
    if int(_dataset(rng, "epoch", path)) != epoch:
        raise _error(path, "/rng/epoch disagrees with the root attribute epoch (file corrupt)")
    prep = f.get("preprocess", {})
    metrics = _text(_member(f, "metrics", path, h5py.Group), "jsonl", path)
    return Checkpoint(
        path=path, step=int(_attr(f, "step", path)), epoch=epoch,
        step_in_epoch=int(_dataset(rng, "step_in_epoch", path)),
        seed=int(_dataset(rng, "seed", path)), layers=layers,
        activation=str(_attr(model, "activation", path)),
        output=str(_attr(model, "output", path)), loss=str(_attr(model, "loss", path)),
        dtype=dtype, params=_read_params(model, layers, dtype, path),
        optimizer_name=str(_attr(opt, "name", path)),
        optimizer_state={k: _dataset(opt, k, path) for k in opt},
        config=json.loads(_text(_member(f, "config", path, h5py.Group), "json", path)),
        preprocess={k: _dataset(prep, k, path) for k in prep},
        metrics=[json.loads(line) for line in metrics.splitlines() if line.strip()],
        world_size=int(_attr(f, "world_size", path)),
        distbp_version=str(_attr(f, "distbp_version", path)))


def _read_params(model: h5py.Group, layers: tuple[int, ...], dtype: str, path: Path) -> np.ndarray:
    if len(layers) < 2 or min(layers) < 1 or dtype not in ("float32", "float64"):
        raise _error(path, f"/model has invalid layers {_csv(layers)} or dtype {dtype!r}")
    if f"W{len(layers)}" in model:
        raise _error(path, f"/model has more weight datasets than layers {_csv(layers)} allow")
    parts = []
    for j, shapes in enumerate(param_shapes(layers), start=1):
        for name, shape in zip((f"W{j}", f"b{j}"), shapes):
            arr = _dataset(model, name, path)
            if arr.shape != shape or arr.dtype != dtype:
                raise _error(path, f"dataset /model/{name} is {arr.dtype} {arr.shape} but layers "
                                   f"{_csv(layers)} and dtype {dtype} need {shape}")
            parts.append(arr.ravel())
    return np.concatenate(parts)


def _dataset(g: h5py.Group, name: str, path: Path) -> np.ndarray:
    """A numeric dataset, read and checked against its sha256 attribute."""
    ds = _member(g, name, path)
    if ds.dtype.kind not in _NUMERIC:
        raise _error(path, f"dataset {ds.name} has non-numeric dtype {ds.dtype}")
    arr = np.asarray(ds[()], order="C")
    _verify(ds, hashlib.sha256(arr).hexdigest(), path)
    return arr


def _text(g: h5py.Group, name: str, path: Path) -> str:
    """A scalar UTF-8 string dataset, checked against its sha256 attribute."""
    ds = _member(g, name, path)
    if h5py.check_string_dtype(ds.dtype) is None or ds.shape != ():
        raise _error(path, f"dataset {ds.name} is not a text dataset")
    data = ds[()]
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    _verify(ds, hashlib.sha256(data).hexdigest(), path)
    return data.decode("utf-8")


def _member(g: h5py.Group, name: str, path: Path, kind: type = h5py.Dataset):
    if not isinstance(g.get(name), kind):
        what = "group" if kind is h5py.Group else "dataset"
        raise _error(path, f"missing {what} {g.name.rstrip('/')}/{name}")
    return g[name]


def _verify(ds: h5py.Dataset, digest: str, path: Path) -> None:
    if "sha256" not in ds.attrs:
        raise _error(path, f"dataset {ds.name} has no sha256 attribute")
    if ds.attrs["sha256"] != digest:
        raise _error(path, f"dataset {ds.name} fails its SHA-256 check (file corrupt)")


def _attr(obj, name: str, path: Path):
    if name not in obj.attrs:
        raise _error(path, f"missing attribute {name!r} on {obj.name}")
    return obj.attrs[name]


def _error(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}': {problem}")


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _csv(values) -> str:
    return ",".join(str(int(v)) for v in values)


# --------------------------------------------------------------------------- compatibility

def check_compatible(ckpt: Checkpoint, *, layers, activation: str, output: str, loss: str,
                     dtype: str) -> None:
    """Raise CheckpointError naming every way `ckpt` differs from the configured model."""
    diffs = [f"{key} {have} but the configuration asks for {want}" for key, have, want in (
        ("layers", _csv(ckpt.layers), _csv(layers)), ("activation", ckpt.activation, activation),
        ("output", ckpt.output, output), ("loss", ckpt.loss, loss), ("dtype", ckpt.dtype, dtype))
        if have != want]
    if diffs:
        raise CheckpointError(f"checkpoint '{ckpt.path}' has " + "; ".join(diffs))
