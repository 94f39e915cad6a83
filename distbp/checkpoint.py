"""HDF5 checkpoints: save atomically, load with verification, rotate, pick the newest valid one.

    path = save("ck", step=10, epoch=0, step_in_epoch=10, seed=0, layers=[784, 128, 10], ...)
    ckpt = load(path)                       # whole file, then every dataset, SHA-256 verified
    path, skipped = latest_valid("ck")      # `--resume auto`: the newest file that loads

Checkpoint files are written, renamed and removed only from here: save() (atomically, through
distbp.durable), _rotate() and set_aside_newer(). distbp.ckpt_integrity computes and checks the
hashes and reads the fields, but writes nothing. The format (format_version 1) is specified in
docs/checkpoint-format.md: an HDF5 file behind a 512-byte userblock holding the SHA-256 of the
rest, checked before the HDF5 library reads a byte; groups /model (W_j, b_j), /optimizer,
/config, /rng, /preprocess (may be empty) and /metrics (with /metrics/interval), every dataset
with its own sha256 attribute. Nothing is pickled; load reads numbers and strings only. Every
rank loads (resume, evaluate, inspect); only rank 0 calls save, _rotate and set_aside_newer.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from distbp.ckpt_integrity import (
    FORMAT,
    FORMAT_VERSION,
    INTERVAL_KEYS,
    NUMERIC,
    USERBLOCK,
    check_file,
    digest,
    error,
    join_ints,
    read_fields,
    userblock,
)
from distbp.durable import fsync_path, replace_durably, umask
from distbp.errors import CheckpointError, one_line
from distbp.network import n_params, param_views
from distbp.version import __version__

__all__ = ["Checkpoint", "check_compatible", "checkpoint_path", "is_checkpoint_name",
           "latest_valid", "list_checkpoints", "load", "save", "set_aside_newer"]

_NAME = re.compile(r"ckpt-(\d{8})\.h5")
_TEMP = re.compile(r"\.tmp-ckpt-\d{8}\.h5\.\w+")  # never matches _NAME: a crash leaves no ckpt-*
_TEXT = h5py.string_dtype("utf-8")


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
    interval: dict[str, float]  # /metrics/interval: INTERVAL_KEYS -> the open record's sums


def is_checkpoint_name(name: str) -> bool:
    """Whether a file or folder name is one this module makes in a checkpoint directory: a
    checkpoint, a checkpoint's temporary file, a folder of set-aside checkpoints."""
    return bool(_NAME.fullmatch(name) or name.startswith((".tmp-ckpt-", "superseded-")))


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
         interval: dict[str, float], world_size: int,
         preprocess: dict[str, np.ndarray] | None = None, keep: int | None = 3) -> Path:
    """Write directory/ckpt-<step:08d>.h5 atomically and return its path.

    Written under a temporary name that no ckpt-* pattern matches, fsynced, renamed over the final
    name, then the directory fsynced: a crash at any instant leaves every ckpt-*.h5 complete. The
    file-hash header is written into the userblock after HDF5 closes the file, before the fsync.
    Then all but the newest `keep` checkpoints (None: keep all; the file just written always
    stays) and stale temporary files are removed. `optimizer_state` keys starting with "_" are
    scratch and not saved. `config` and `metrics` must be JSON-serializable. `interval`: the
    sums of the train record in progress, keys INTERVAL_KEYS (metrics.Interval.state()).
    """
    params = _check_save_args(step, keep, params, layers)
    interval_arrays = _interval_arrays(interval)  # refused before any file is created
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' exists and is not a directory")

    def contents(f: h5py.File) -> None:  # the layout in the module docstring, in file order
        _write_root(f, step, epoch, world_size)
        _write_model(f.create_group("model"), layers, activation, output, loss, params)
        _write_optimizer(f.create_group("optimizer"), optimizer_name, optimizer_state)
        _put_text(f.create_group("config"), "json", json.dumps(config, sort_keys=True))
        _put_arrays(f.create_group("rng"), {"seed": seed, "epoch": epoch,
                                            "step_in_epoch": step_in_epoch}, np.int64)
        _put_arrays(f.create_group("preprocess"), preprocess or {})
        _put_text(f.create_group("metrics"), "jsonl",
                  "".join(json.dumps(m) + "\n" for m in metrics))
        _put_arrays(f.create_group("metrics/interval"), interval_arrays)

    final = _write_atomically(checkpoint_path(directory, step), contents)
    _rotate(directory, keep, final)
    return final


def _check_save_args(step: int, keep: int | None, params, layers) -> np.ndarray:
    """Refuse a step outside the 8-digit file name, a bad `keep`, or params that do not fit
    `layers`; return params as an array."""
    if not 0 <= step < 10**8:
        raise ValueError(f"checkpoint step {step} is outside 0..99999999")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    params = np.asarray(params)
    total = n_params(layers)
    if len(layers) < 2 or params.ndim != 1 or params.size != total:
        raise ValueError(f"params of shape {params.shape} do not fit layers {join_ints(layers)} "
                         f"({total} parameters)")
    if params.dtype not in (np.float32, np.float64):
        raise ValueError(f"params dtype {params.dtype} is not float32 or float64")
    return params


def _write_atomically(final: Path, contents: Callable[[h5py.File], None]) -> Path:
    """Create `final` holding what `contents` writes into an HDF5 file, sealed with its
    userblock header: built in memory, then written to a new temporary file, fsync, os.replace,
    directory fsync. On any failure the temporary file is removed; an OSError (a full disk)
    becomes a one-line CheckpointError.

    The file is built in memory so that HDF5 never writes to disk: a full disk then fails one
    os.write, not the HDF5 library in the middle of its own bookkeeping. The temporary file is
    made by mkstemp (O_CREAT | O_EXCL, an unpredictable name): a symlink planted in a shared
    directory is never followed, and os.replace puts the file itself at `final`, never writing
    through a symlink there."""
    directory = final.parent
    image = _image(contents, final)
    tmp: Path | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=directory)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())  # mkstemp's 0600: as any new file
            fh.write(image)
        replace_durably(tmp, final)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint '{final}': {one_line(e)}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return final


def _image(contents: Callable[[h5py.File], None], final: Path) -> bytes:
    """The sealed checkpoint file's bytes: the HDF5 file `contents` writes, built in memory,
    with the file-hash header in its userblock."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=USERBLOCK, libver="earliest") as f:
        contents(f)
    image = bytearray(buffer.getvalue())
    image[:USERBLOCK] = userblock(io.BytesIO(bytes(image)), len(image), final)
    return bytes(image)


def _write_root(f: h5py.File, step: int, epoch: int, world_size: int) -> None:
    """The root attributes: format, version, position, provenance."""

    f.attrs.update({"format": FORMAT, "format_version": np.int64(FORMAT_VERSION),
                    "step": np.int64(step), "epoch": np.int64(epoch),
                    "distbp_version": __version__, "world_size": np.int64(world_size),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _write_model(g: h5py.Group, layers, activation, output, loss, params: np.ndarray) -> None:
    """/model: its attributes, then W_j (n_out, n_in) and b_j, the views of the flat `params`
    (network.param_views: the engine owns the layout)."""
    g.attrs.update({"layers": np.asarray(layers, dtype=np.int64), "activation": activation,
                    "output": output, "loss": loss, "dtype": params.dtype.name})
    for j, (w, b) in enumerate(zip(*param_views(params, layers)), start=1):
        _put_arrays(g, {f"W{j}": w, f"b{j}": b})


def _write_optimizer(g: h5py.Group, name: str, state: dict[str, np.ndarray]) -> None:
    """/optimizer: attr name and one dataset per state buffer."""
    g.attrs["name"] = name
    # "_" keys are scratch buffers the optimizer rebuilds; they are not state
    _put_arrays(g, {k: v for k, v in state.items() if not k.startswith("_")})


def _interval_arrays(interval: dict[str, float]) -> dict[str, np.ndarray]:
    """/metrics/interval's 0-d datasets: steps as int64, the sums as float64 (a Python float's
    exact bits, so the resumed record's loss and accuracy are the uninterrupted run's)."""
    if sorted(interval) != sorted(INTERVAL_KEYS):
        raise ValueError(f"interval has keys {sorted(interval)}, expected {list(INTERVAL_KEYS)}")
    return {k: np.int64(interval[k]) if k == "steps" else np.float64(interval[k])
            for k in INTERVAL_KEYS}


def _put_arrays(g: h5py.Group, arrays: dict, dtype=None) -> None:
    """One contiguous dataset per numeric array, each with its sha256 attribute."""
    for name, value in arrays.items():
        arr = np.asarray(value, dtype=dtype, order="C")
        if arr.dtype.kind not in NUMERIC:
            raise ValueError(f"{g.name}/{name} has dtype {arr.dtype}; checkpoints hold numbers")
        if not name or "/" in name or name == ".":  # h5py would make "a/b" a nested path
            raise ValueError(f"{name!r} cannot be an HDF5 dataset name")
        g.create_dataset(name, data=arr).attrs["sha256"] = digest(arr)


def _put_text(g: h5py.Group, name: str, text: str) -> None:
    """One scalar UTF-8 string dataset with the sha256 attribute of its UTF-8 bytes."""
    data = text.encode("utf-8")
    g.create_dataset(name, data=data, dtype=_TEXT).attrs["sha256"] = digest(data)


def _rotate(directory: Path, keep: int | None, written: Path) -> None:
    """Remove checkpoints beyond the newest `keep` (never `written`) and stale temp files."""
    old = list_checkpoints(directory)[:-keep] if keep is not None else []
    stale = [p for p in directory.iterdir() if _TEMP.fullmatch(p.name)]
    for path in old + stale:
        if path != written:
            path.unlink(missing_ok=True)


def set_aside_newer(directory, step: int, files: Sequence[Path] = ()) -> list[Path]:
    """Move checkpoints with a step above `step`, and those of `files` that exist and are not
    empty (a fresh run's old metrics file), into a new folder directory/superseded-<UTC time>-*/.

    A run that starts fresh (or from an older checkpoint) in a directory that holds a later
    run's checkpoints would otherwise have them picked by the next `--resume auto`, or rotated
    away by `--keep`; its metrics file would be overwritten. Nothing is deleted, and two runs
    never share a folder. Returns the new paths."""
    newer = [p for p in list_checkpoints(directory) if int(p.name[5:13]) > step]
    others = [Path(f) for f in files if Path(f).is_file() and Path(f).stat().st_size > 0]
    if not newer and not others:
        return []
    stamp = time.strftime("superseded-%Y%m%dT%H%M%SZ-", time.gmtime())
    target = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    os.chmod(target, 0o777 & ~umask())  # mkdtemp's 0700: as any new directory
    moved = []
    for path in [*newer, *others]:
        shutil.move(path, target / path.name)  # a metrics file may sit on another file system
        moved.append(target / path.name)
    fsync_path(Path(directory))
    return moved




# ------------------------------------------------------------------------------------ load

def load(path) -> Checkpoint:
    """Read and verify a checkpoint; any problem raises CheckpointError naming file and problem.

    The file's size and SHA-256 are checked against its userblock header first, so HDF5 only ever
    parses bytes exactly as save() wrote them; then each dataset is checked against its sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise error(path, "not found" if not path.exists() else "is not a file")
    check_file(path)
    try:
        # no HDF5 file locking, like data files: it fails on NFS/Lustre, and a reader needs none
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        problem = f"not a readable HDF5 file (truncated or not HDF5): {one_line(e)}"
        raise error(path, problem) from e
    try:
        with f:
            return Checkpoint(path=path, **read_fields(f, path))
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise error(path, f"unreadable, truncated or corrupt: {one_line(e)}") from e


# --------------------------------------------------------------------------- compatibility

def check_compatible(ckpt: Checkpoint, *, layers, activation: str, output: str, loss: str,
                     dtype: str) -> None:
    """Raise CheckpointError naming every way `ckpt` differs from the configured model."""
    diffs = [f"{key} {have} but the configuration asks for {want}" for key, have, want in (
        ("layers", join_ints(ckpt.layers), join_ints(layers)),
        ("activation", ckpt.activation, activation), ("output", ckpt.output, output),
        ("loss", ckpt.loss, loss), ("dtype", ckpt.dtype, dtype))
        if have != want]
    if diffs:
        raise CheckpointError(f"checkpoint '{ckpt.path}' has " + "; ".join(diffs))
