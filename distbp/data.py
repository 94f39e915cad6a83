"""The batch plan and the data sources; nothing here knows of MPI (rank and size are passed in).

Batch plan: every rank computes the same permutation of the n rows for an epoch, cuts it into
global batches and reads its own contiguous slice of each. A cursor (epoch, step_in_epoch) is
divmod(global_step, steps_per_epoch): an exact resume needs no RNG state beyond the seed.
Sources (`Dataset`): HDF5 read by rows, NPZ and bundled digits in memory, synthetic data, subsets.
Bad data raises `DataError` with one line starting "data file '<source>': ".
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from distbp.errors import ConfigError, DataError

__all__ = ["BUNDLED_DIR", "HDF5_SUFFIXES", "SCAN_BYTES", "SYNTHETIC_BLOCK_BYTES", "ArrayDataset",
           "Dataset", "HDF5Dataset", "SubsetDataset", "batch_bounds", "epoch_permutation",
           "global_batch_count", "open_dataset", "shard_bounds", "shard_indices",
           "split_validation", "step_cursor", "steps_per_epoch", "subset", "synthetic_blocks",
           "synthetic_source", "synthetic_spiral", "synthetic_teacher", "validate_dataset"]

BUNDLED_DIR = Path(__file__).parent / "datasets"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
SCAN_BYTES = 16 << 20          # validation reads at most ~this many bytes of rows at a time
CHUNK_CACHE_BYTES = 64 << 20   # HDF5 chunk cache per dataset (h5py's default is 1-8 MiB)
_CHUNK_CACHE_SLOTS = 100_003   # hash slots: a prime, as HDF5 advises, ~100x the chunks that fit
SPAN_BYTES = 4 << 20           # a chunked read fetches at most ~this many bytes in one slice
_GAP_BYTES = 64 << 10          # ... and bridges gaps up to this size: cheaper than another call
_VALIDATION_STREAM = 0x7661    # spawn keys: streams that never coincide with epoch permutations
_TEACHER_STREAM = 0x7465
_SPIRAL_STREAM = 0x7370
_TEACHER_HIDDEN = 32
SYNTHETIC_BLOCK_BYTES = 8 << 20  # synthetic rows are made in blocks of ~this much x
_LABEL_ROWS = 1024              # ... and teacher labels this many rows at a time


# ----------------------------------------------------------------------------- the batch plan

def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Row order for `epoch`: (n,) int64, identical on every rank and machine for one NumPy."""
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n: int, batch: int, drop_last: bool) -> int:
    """ceil(n / batch) steps, or floor with `drop_last` (which drops the last partial batch)."""
    if batch < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch}")
    steps = n // batch if drop_last else -(-n // batch)
    if steps == 0:
        why = f"exceeds the {n} rows with drop_last" if n else "has no data (0 rows)"
        raise ConfigError(f"batch size {batch} {why}: an epoch would have no step")
    return steps


def step_cursor(global_step: int, steps: int) -> tuple[int, int]:
    """(epoch, step_in_epoch) of a global step, with `steps` = steps_per_epoch(...)."""
    return divmod(global_step, steps)


def batch_bounds(step_in_epoch: int, n: int, batch: int) -> tuple[int, int]:
    """[lo, hi) positions in the epoch's permutation; the last batch may be partial."""
    lo = step_in_epoch * batch
    if not 0 <= lo < n:
        raise ValueError(f"step {step_in_epoch} is outside an epoch of {n} rows in batches "
                         f"of {batch}")
    return lo, min(lo + batch, n)


def global_batch_count(step_in_epoch: int, n: int, batch: int) -> int:
    """Rows in this step's global batch: the divisor of the summed gradient."""
    lo, hi = batch_bounds(step_in_epoch, n, batch)
    return hi - lo


def shard_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous slice of `count` rows: the first count % size ranks get
    one row more; a rank gets 0 rows when count < size."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, {size})")
    base, extra = divmod(count, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard_indices(perm: np.ndarray, step_in_epoch: int, batch: int, rank: int,
                  size: int) -> np.ndarray:
    """Sorted row indices (int64) this rank reads for this step. Sorted because HDF5 reads want
    increasing indices; the gradient SUM over the shard does not depend on row order."""
    lo, hi = batch_bounds(step_in_epoch, len(perm), batch)
    a, b = shard_bounds(hi - lo, rank, size)
    return np.sort(perm[lo + a:lo + b])


# ----------------------------------------------------------------------------- data sources

class Dataset(Protocol):
    """Rows of x (n, n_features) and y (n,) integer labels or (n, k) targets."""

    n: int
    n_features: int
    x_dtype: np.dtype          # on-disk dtype: uint8 stays uint8; the trainer converts
    y_dtype: np.dtype
    y_shape: tuple[int, ...]
    source: str                # path, or e.g. "bundled digits (train)"
    scale: float | None        # multiply x by this for network inputs (HDF5 attribute 'scale')

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x rows (len, n_features) and y rows for strictly increasing int64 `indices`."""

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        """y rows only (label checks need not read x)."""


def _fail(source: str, problem: str) -> DataError:
    return DataError(f"data file {source!r}: {problem}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _check_layout(source: str, x_shape: tuple, x_dtype: np.dtype, y_shape: tuple,
                  y_dtype: np.dtype) -> int:
    """Shape and dtype checks every source shares; returns n_features (trailing dims of x
    multiplied, so (n, 28, 28) images are read as (n, 784))."""
    if len(x_shape) < 2:
        raise _fail(source, f"x must be 2-D (rows, features), got shape {x_shape}")
    if len(y_shape) not in (1, 2):
        raise _fail(source, f"y must be 1-D labels (rows,) or 2-D targets (rows, outputs), "
                            f"got shape {y_shape}")
    if x_shape[0] != y_shape[0]:
        raise _fail(source, f"length mismatch: x has {x_shape[0]} rows, y has {y_shape[0]}")
    if x_shape[0] == 0:
        raise _fail(source, "empty data (0 rows)")
    for name, dtype in (("x", x_dtype), ("y", y_dtype)):
        if dtype.kind not in "iuf":
            raise _fail(source, f"{name} has dtype {dtype}; expected a float or integer dtype")
    n_features = math.prod(x_shape[1:])
    if n_features == 0:
        raise _fail(source, f"x has 0 features (shape {x_shape})")
    return n_features


def _missing_hint(path: Path) -> str:
    """How to create a missing file that a bundled preset names (e.g. fashion-mnist)."""
    if path.name in ("fashion-mnist-train.h5", "fashion-mnist-test.h5"):
        return f"; create it with: distbp data fashion-mnist --out {path.parent}"
    return ""


def _check_file(path: str | Path, source: str) -> None:
    if not Path(path).exists():
        raise _fail(source, "not found" + _missing_hint(Path(path)))
    if Path(path).is_dir():
        raise _fail(source, "is a directory, not a data file")
    if not Path(path).is_file():  # a FIFO, socket or device: open() could block forever
        raise _fail(source, "not a regular file (a FIFO, socket or device?)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise _fail(source, f"not readable ({err.strerror or _one_line(err)})") from None


class ArrayDataset:
    """Rows held in memory (NPZ, the bundled digits, synthetic data, tests). Not copied."""

    def __init__(self, x: np.ndarray, y: np.ndarray, source: str = "in-memory arrays",
                 scale: float | None = None):
        x, y = np.asarray(x), np.asarray(y)
        self.n_features = _check_layout(source, x.shape, x.dtype, y.shape, y.dtype)
        self.x = x.reshape(x.shape[0], self.n_features)
        self.y = y
        self.n, self.x_dtype, self.y_dtype, self.y_shape = len(y), x.dtype, y.dtype, y.shape
        self.source, self.scale = source, scale

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[indices], self.y[indices]

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        return self.y[indices]


def _selection(indices: np.ndarray) -> slice | np.ndarray:
    """An h5py selection for strictly increasing indices: a slice for a contiguous run."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (len(idx) > 1 and not np.all(idx[1:] > idx[:-1])):
        raise ValueError("HDF5 rows must be read with strictly increasing 1-D indices")
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _h5_dataset(file: h5py.File, name: str, source: str) -> h5py.Dataset:
    """`name` opened with a CHUNK_CACHE_BYTES chunk cache. The cache is set per dataset at its
    first open (a file-wide setting would need h5py.File arguments), so open it low-level."""
    if file.get(name, getclass=True) is h5py.Dataset:   # class only: nothing opened yet
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_chunk_cache(_CHUNK_CACHE_SLOTS, CHUNK_CACHE_BYTES, 0.75)
        # readonly, as h5py's own File[name] says it: lets h5py cache its selection readers
        return h5py.Dataset(h5py.h5d.open(file.id, name.encode(), dapl),
                            readonly=file.mode == "r")
    obj = file.get(name)
    names: list[str] = []
    file.visititems(lambda key, o: names.append(key) if isinstance(o, h5py.Dataset) else None)
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") or "none"
    what = "not found" if obj is None else "is not a dataset"
    raise _fail(source, f"dataset {name!r} {what} (datasets: {listed})")


def _h5_scale(file: h5py.File, x: h5py.Dataset, source: str) -> float | None:
    """The optional attribute 'scale' (on x, else on the file): x * scale is the network input."""
    value = np.asarray(x.attrs.get("scale", file.attrs.get("scale", np.nan)))
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise _fail(source, f"attribute 'scale' must be one number, got {value!r}")
    return None if np.isnan(value) else float(value.reshape(()))


class HDF5Dataset:
    """Rows read on demand from an HDF5 file; only the requested rows are read.

    The file stays open (one handle per process) and is opened with `locking=False`, which
    works on NFS/Lustre where HDF5 file locking fails. Call `close()` when done, or `load()` to
    hold every row in memory instead (`--in-memory`). Chunked datasets get a CHUNK_CACHE_BYTES
    chunk cache and are read as a few slices, one per run of nearby rows (`_read_spans`).
    """

    def __init__(self, path: str | Path, x_name: str = "x", y_name: str = "y",
                 source: str | None = None):
        self.source = source or str(path)
        _check_file(path, self.source)
        try:
            self.file = h5py.File(path, "r", locking=False)
        except (OSError, ValueError) as err:
            raise _fail(self.source, f"not a valid HDF5 file (truncated or corrupt?): "
                                     f"{_one_line(err)}") from None
        try:
            self._x = _h5_dataset(self.file, x_name, self.source)
            self._y = _h5_dataset(self.file, y_name, self.source)
            self.n_features = _check_layout(self.source, self._x.shape, self._x.dtype,
                                            self._y.shape, self._y.dtype)
            self.scale = _h5_scale(self.file, self._x, self.source)
        except BaseException:
            self.file.close()
            raise
        self.n, self.x_dtype = self._x.shape[0], self._x.dtype
        self.y_dtype, self.y_shape = self._y.dtype, self._y.shape
        self._spans = {ds.name: _span_rows(ds) for ds in (self._x, self._y)}

    @property
    def nbytes(self) -> int:
        """Bytes of x and y, uncompressed: the memory `load()` needs."""
        return (self.n * self.n_features * self.x_dtype.itemsize
                + math.prod(self.y_shape) * self.y_dtype.itemsize)

    def load(self) -> ArrayDataset:
        """Every row in memory (the same values and dtypes `read` gives), read in slices of
        ~SCAN_BYTES straight into one array each; then the file is closed. Raises MemoryError
        when the arrays cannot be allocated (the file stays open then)."""
        x, y = np.empty(self._x.shape, self.x_dtype), np.empty(self._y.shape, self.y_dtype)
        for rows in _chunks(self.n, self.nbytes // self.n):
            sel = np.s_[int(rows[0]):int(rows[-1]) + 1]
            try:
                self._x.read_direct(x, sel, sel)
                self._y.read_direct(y, sel, sel)
            except OSError as err:
                raise _fail(self.source, f"cannot read rows {sel.start}..{sel.stop - 1}: "
                                         f"{_one_line(err)}") from None
        self.close()
        return ArrayDataset(x, y, source=self.source, scale=self.scale)

    def _rows(self, ds: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
        try:
            sel, spans = _selection(indices), self._spans.get(ds.name)
            if spans is not None and not isinstance(sel, slice):
                return _read_spans(ds, sel, *spans)
            return ds[sel]
        except OSError as err:  # e.g. a corrupt compressed chunk: bad input, found mid-run
            span = f" {indices[0]}..{indices[-1]}" if len(indices) else ""
            raise _fail(self.source, f"cannot read rows{span} ({len(indices)} rows) of "
                                     f"{ds.name!r}: {_one_line(err)}") from None

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._rows(self._x, indices)
        return x.reshape(len(x), self.n_features), self._rows(self._y, indices)

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        return self._rows(self._y, indices)

    def close(self) -> None:
        self.file.close()


def _span_rows(ds: h5py.Dataset) -> tuple[int, int] | None:
    """(gap, most) rows for `_read_spans` on a chunked dataset: bridge gaps of up to ~_GAP_BYTES,
    never read more than ~SPAN_BYTES at once. None for a contiguous dataset, which h5py reads
    exactly as selected (extra rows there would be extra bytes from disk)."""
    if ds.chunks is None:
        return None
    row_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
    return max(1, _GAP_BYTES // row_bytes), max(1, SPAN_BYTES // row_bytes)


def _read_spans(ds: h5py.Dataset, idx: np.ndarray, gap: int, most: int) -> np.ndarray:
    """Rows `idx` (strictly increasing) of a chunked dataset, read as slices: one per run of
    rows whose gaps are at most `gap` rows, cut at every `most`-row boundary (so a slice holds
    at most `most` rows), the wanted rows copied out. HDF5 reads whole chunks anyway (from its
    chunk cache after the first time); h5py's per-index selection costs far more per row
    (~50x for 1024 rows from 1024-row gzip chunks)."""
    out = np.empty((len(idx), *ds.shape[1:]), ds.dtype)
    if len(idx) == 0:
        return out
    cuts = np.flatnonzero((np.diff(idx) > gap) | (np.diff(idx // most) != 0)) + 1
    for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(idx)].tolist()):
        first, last = int(idx[lo]), int(idx[hi - 1])
        out[lo:hi] = ds[first:last + 1][idx[lo:hi] - first]
    return out


def _load_npz(path: str, x_name: str, y_name: str) -> ArrayDataset:
    """An NPZ archive, loaded whole (NPZ cannot be read by rows; use HDF5 for large data)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise _fail(path, "not an NPZ archive (a single .npy array?)")
        with archive:
            for name in (x_name, y_name):
                if name not in archive.files:
                    raise _fail(path, f"array {name!r} not found "
                                      f"(arrays: {', '.join(archive.files) or 'none'})")
            x, y = archive[x_name], archive[y_name]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise _fail(path, f"not a valid NPZ archive: {_one_line(err)}") from None
    return ArrayDataset(x, y, source=path)


def _bundled_digits(split: str) -> ArrayDataset:
    """The bundled UCI digits (8x8 uint8 images, 0..16, scale 1/16), read whole: they are tiny."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    h5 = HDF5Dataset(BUNDLED_DIR / f"digits-{split}.h5", source=f"bundled digits ({split})")
    try:
        x, y = h5.read(np.arange(h5.n))
    finally:
        h5.close()
    return ArrayDataset(x, y, source=h5.source, scale=h5.scale)


def open_dataset(path: str | Path | None, x_name: str = "x", y_name: str = "y",
                 split: str = "train") -> Dataset:
    """The data source for `path`: None -> bundled digits `split` ("train"/"test"); .h5, .hdf5,
    .hdf -> HDF5Dataset; .npz -> ArrayDataset; other names are recognised by signature."""
    if path is None:
        return _bundled_digits(split)
    path = str(path)
    _check_file(path, path)
    suffix = Path(path).suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return HDF5Dataset(path, x_name, y_name)
    if suffix == ".npz" or zipfile.is_zipfile(path):
        return _load_npz(path, x_name, y_name)
    if h5py.is_hdf5(path):
        return HDF5Dataset(path, x_name, y_name)
    raise _fail(path, "not an HDF5 or NPZ file (expected .h5/.hdf5/.hdf or .npz)")


class SubsetDataset:
    """Row i is row `rows[i]` of `base`. Reads pass through with increasing indices."""

    def __init__(self, base: Dataset, rows: np.ndarray):
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"subset rows must be 1-D integers, got {rows.dtype} {rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= base.n):
            raise ValueError(f"subset rows must be in [0, {base.n})")
        self.base, self.rows = base, rows.astype(np.int64, copy=False)
        self._increasing = bool(np.all(self.rows[1:] > self.rows[:-1]))
        self.n, self.n_features, self.source = len(rows), base.n_features, base.source
        self.x_dtype, self.y_dtype, self.scale = base.x_dtype, base.y_dtype, base.scale
        self.y_shape = (self.n, *base.y_shape[1:])

    def _base_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Increasing base rows to read, and where row i of the answer is among them."""
        rows = self.rows[indices]
        return (rows, None) if self._increasing else np.unique(rows, return_inverse=True)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, inverse = self._base_rows(indices)
        x, y = self.base.read(rows)
        return (x, y) if inverse is None else (x[inverse], y[inverse])

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        rows, inverse = self._base_rows(indices)
        y = self.base.read_y(rows)
        return y if inverse is None else y[inverse]


def subset(ds: Dataset, indices: np.ndarray) -> SubsetDataset:
    """A view of `ds` whose row i is ds row indices[i]."""
    return SubsetDataset(ds, indices)


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation) subsets: round(n * fraction) rows, chosen by a seeded stream of
    their own, go to validation. The same on every rank; each part keeps file order."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    n_val = round(ds.n * fraction)
    if not 0 < n_val < ds.n:
        empty = "validation" if n_val == 0 else "training"
        raise _fail(ds.source, f"validation fraction {fraction} of {ds.n} rows leaves "
                               f"an empty {empty} set")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_VALIDATION_STREAM,)))
    perm = rng.permutation(ds.n)
    return subset(ds, np.sort(perm[n_val:])), subset(ds, np.sort(perm[:n_val]))


def synthetic_teacher(n: int, n_features: int, n_classes: int, seed: int) -> ArrayDataset:
    """n random inputs x ~ N(0, 1) (float32) labelled (int64) by a fixed random teacher network
    argmax(tanh(x W1^T) W2^T): a learnable task. The teacher does not depend on n. The rows of
    `synthetic_blocks("teacher", ...)`, held in memory."""
    return _in_memory("teacher", n, n_features, n_classes, seed)


def synthetic_spiral(n: int, n_features: int, n_classes: int, seed: int) -> ArrayDataset:
    """n points on n_classes interleaved spiral arms: a task no linear model solves.

    Row i has class c = i mod n_classes; with t ~ U[0, 1) the first two features are
    t·(cos θ, sin θ) + N(0, 0.02²) noise, θ = 2πc/n_classes + 3πt (1.5 turns); the other
    features are N(0, 0.1²) noise. x float32 (n, n_features), y int64 (n,). The rows of
    `synthetic_blocks("spiral", ...)`, held in memory.
    """
    return _in_memory("spiral", n, n_features, n_classes, seed)


def _in_memory(kind: str, n: int, n_features: int, n_classes: int, seed: int) -> ArrayDataset:
    blocks = synthetic_blocks(kind, n, n_features, n_classes, seed)  # checks the sizes first
    x, y = np.empty((n, n_features), np.float32), np.empty(n, np.int64)
    lo = 0
    for xb, yb in blocks:
        x[lo:lo + len(xb)], y[lo:lo + len(yb)] = xb, yb
        lo += len(xb)
    return ArrayDataset(x, y, source=synthetic_source(kind, n, n_features, n_classes, seed))


def synthetic_source(kind: str, n: int, n_features: int, n_classes: int, seed: int) -> str:
    """How a synthetic data set names itself (the `source` of files and messages)."""
    return (f"synthetic {kind} (n={n}, features={n_features}, classes={n_classes}, "
            f"seed={seed})")


def synthetic_blocks(kind: str, n: int, n_features: int, n_classes: int, seed: int,
                     block_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of a seeded synthetic data set ("teacher" or "spiral") as (x, y) blocks in row
    order: x float32 (k, n_features), y int64 (k,). A block holds `block_rows` rows (default:
    ~SYNTHETIC_BLOCK_BYTES of x; teacher blocks are rounded up to whole _LABEL_ROWS), so memory
    is one block, whatever n.

    The values depend on (kind, n, n_features, n_classes, seed) only, never on the block size:
    every random draw comes from a seeded stream consumed in row order (NumPy's generators give
    the same values drawn in pieces as at once), and teacher labels are computed _LABEL_ROWS
    rows at a time from row 0, so BLAS rounds each row alike. A shorter set is a prefix of a
    longer one (teacher labels: unless the last, partial label unit rounds an exact argmax tie
    another way). Raises ConfigError (bad sizes) at the call, before any row is made.
    """
    if kind == "teacher":
        if n < 1 or n_features < 1 or n_classes < 2:
            raise ConfigError(f"synthetic data needs n >= 1, features >= 1, classes >= 2; "
                              f"got {n}, {n_features}, {n_classes}")
    elif kind == "spiral":
        if n < 1 or n_features < 2 or n_classes < 2:
            raise ConfigError(f"spiral data needs n >= 1, features >= 2, classes >= 2; "
                              f"got {n}, {n_features}, {n_classes}")
    else:
        raise ConfigError(f"synthetic kind must be 'teacher' or 'spiral', got {kind!r}")
    rows = block_rows or max(1, SYNTHETIC_BLOCK_BYTES // (4 * n_features))
    if kind == "teacher":
        return _teacher_blocks(n, n_features, n_classes, seed, -(-rows // _LABEL_ROWS))
    return _spiral_blocks(n, n_features, n_classes, seed, rows)


def _teacher_blocks(n: int, n_features: int, n_classes: int, seed: int, units: int):
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TEACHER_STREAM,)))
    w1 = rng.standard_normal((_TEACHER_HIDDEN, n_features)) / math.sqrt(n_features)
    w2 = rng.standard_normal((n_classes, _TEACHER_HIDDEN)) / math.sqrt(_TEACHER_HIDDEN)
    rows = units * _LABEL_ROWS
    for lo in range(0, n, rows):
        x = rng.standard_normal((min(rows, n - lo), n_features), dtype=np.float32)
        y = np.empty(len(x), np.int64)
        for a in range(0, len(x), _LABEL_ROWS):
            xa = x[a:a + _LABEL_ROWS].astype(np.float64)
            y[a:a + _LABEL_ROWS] = (np.tanh(xa @ w1.T) @ w2.T).argmax(axis=1)
        yield x, y


def _spiral_blocks(n: int, n_features: int, n_classes: int, seed: int, rows: int):
    seeds = np.random.SeedSequence(seed, spawn_key=(_SPIRAL_STREAM,)).spawn(2)
    radii, noise = (np.random.default_rng(s) for s in seeds)   # 1 and n_features draws a row
    for lo in range(0, n, rows):
        k = min(rows, n - lo)
        y = np.arange(lo, lo + k, dtype=np.int64) % n_classes
        t = radii.random(k)
        theta = 2 * np.pi * y / n_classes + 3 * np.pi * t
        z = noise.standard_normal((k, n_features))
        x = 0.1 * z
        x[:, 0] = t * np.cos(theta) + 0.02 * z[:, 0]
        x[:, 1] = t * np.sin(theta) + 0.02 * z[:, 1]
        yield x.astype(np.float32), y


# ----------------------------------------------------------------------------- validation

def _chunks(n: int, row_bytes: int, start: int = 0) -> Iterator[np.ndarray]:
    """Row indices start..n-1 in runs of ~SCAN_BYTES, so a scan's memory is bounded by one
    chunk."""
    step = max(1, SCAN_BYTES // max(1, row_bytes))
    for lo in range(start, n, step):
        yield np.arange(lo, min(lo + step, n), dtype=np.int64)


def _check_labels(ds: Dataset, n_outputs: int | None, share: tuple[int, int]) -> None:
    if ds.y_dtype.kind not in "iu":
        raise _fail(ds.source, f"labels y have dtype {ds.y_dtype}; 1-D y must hold integer "
                               f"class labels (store targets as 2-D (rows, outputs))")
    lo, hi = math.inf, -math.inf          # ints after the first chunk of a non-empty share
    for rows in _chunks(share[1], ds.y_dtype.itemsize, share[0]):
        y = ds.read_y(rows)
        lo, hi = min(lo, int(y.min())), max(hi, int(y.max()))
    # One output (a binary sigmoid unit) takes labels 0 and 1, like Network does.
    classes = None if n_outputs is None else max(n_outputs, 2)
    if lo <= hi and (lo < 0 or (classes is not None and hi >= classes)):
        need = f"0..{classes - 1} for {n_outputs} outputs" if classes is not None else ">= 0"
        raise _fail(ds.source, f"labels y out of range: min {lo}, max {hi}; need {need}")


def _check_finite(ds: Dataset, share: tuple[int, int]) -> None:
    scan_x, scan_y = ds.x_dtype.kind == "f", ds.y_dtype.kind == "f"
    if not (scan_x or scan_y):
        return
    row_bytes = (ds.n_features * ds.x_dtype.itemsize * scan_x
                 + math.prod(ds.y_shape[1:]) * ds.y_dtype.itemsize)
    for rows in _chunks(share[1], row_bytes, share[0]):
        x, y = ds.read(rows) if scan_x else (None, ds.read_y(rows))
        for name, a in (("x", x), ("y", y)):
            if a is None or a.dtype.kind != "f":
                continue
            bad = np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))
            if len(bad):
                raise _fail(ds.source, f"{name} contains NaN or inf (first at row {rows[bad[0]]})")


def validate_dataset(ds: Dataset, n_inputs: int | None, n_outputs: int | None, *,
                     int_labels_required: bool = False, check_values: bool = True,
                     rank: int = 0, size: int = 1) -> None:
    """Raise DataError unless `ds` fits a network with n_inputs inputs and n_outputs outputs.

    1-D y must be an integer dtype with labels in [0, n_outputs) (float labels are rejected,
    even whole numbers: convert them once, in the file). 2-D y must have width n_outputs and is
    refused when `int_labels_required`. The label range is always scanned (y only); with
    `check_values`, float x and y are scanned for NaN/inf, chunk by chunk.

    The layout checks (sizes, dtypes, widths) look at every row count on every rank. The value
    scans read only rank `rank`'s contiguous share of `size`, shard_bounds(n, rank, size): each
    rank reads O(file / size) rows, and the caller combines the ranks' outcomes (`cli.agree`:
    the lowest failing rank's message is printed; the shares are in row order, so for one kind
    of problem it names the first bad row, as a whole scan would). The defaults scan every row.
    """
    if ds.n == 0:
        raise _fail(ds.source, "empty data (0 rows)")
    if n_inputs is not None and ds.n_features != n_inputs:
        raise _fail(ds.source, f"x has {ds.n_features} features but the network's input "
                               f"layer has {n_inputs}")
    share = shard_bounds(ds.n, rank, size)
    if len(ds.y_shape) == 1:
        _check_labels(ds, n_outputs, share)
    elif int_labels_required:
        raise _fail(ds.source, f"y holds targets of shape {ds.y_shape}; integer class labels "
                               f"of shape ({ds.n},) are required")
    elif n_outputs is not None and ds.y_shape[1] != n_outputs:
        raise _fail(ds.source, f"targets y have width {ds.y_shape[1]} but the network's output "
                               f"layer has {n_outputs}")
    if check_values:
        _check_finite(ds, share)
