"""What every data source is and shares: the `Dataset` protocol, the checks and the one-line
`DataError` every source raises, and the sources that hold rows in memory or select them.

`ArrayDataset` (NPZ, the bundled digits, synthetic data, tests) and `SubsetDataset` (a
validation split, a subset) sit here with the shared checks because the file readers
(`hdf5.HDF5Dataset`, `files.open_dataset`) build on them; nothing here opens a file format.
Bad data raises `DataError` with one line starting "data file '<source>': ".

Every source reads rows two ways: `read` returns new arrays (start-up checks, evaluation), and
`read_into` fills the caller's buffers from `row_buffers` (the training loader's reused ring,
so a step allocates no rows). Both give the same values, bit for bit.

A source opened without labels (y_name=None: `distbp predict` on a file of inputs only) has
y_dtype = y_shape = None; its `read_x` works as any source's, and reading y raises
`no_labels` (every command that needs y opens its data with a y_name).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np

from distbp.errors import ConfigError, DataError, one_line
from distbp.paths import check_regular

__all__ = ["ArrayDataset", "Dataset", "SubsetDataset", "check_file", "check_layout",
           "data_error", "no_labels", "row_buffers", "split_validation", "subset"]

_VALIDATION_STREAM = 0x7661    # spawn keys: streams that never coincide with epoch permutations


class Dataset(Protocol):
    """Rows of x (n, n_features) and y (n,) integer labels or (n, k) targets; y is None
    (y_dtype, y_shape) for a source opened without labels, which reads x only."""

    n: int
    n_features: int
    x_dtype: np.dtype          # on-disk dtype: uint8 stays uint8; the trainer converts
    y_dtype: np.dtype | None
    y_shape: tuple[int, ...] | None
    source: str                # path, or e.g. "bundled digits (train)"
    scale: float | None        # multiply x by this for network inputs (HDF5 attribute 'scale')

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x rows (len, n_features) and y rows for strictly increasing int64 `indices`."""

    def read_x(self, indices: np.ndarray) -> np.ndarray:
        """x rows only (len, n_features), the same as read's (prediction needs no y)."""

    def read_into(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """The rows of strictly increasing int64 `indices` written into x and y, C-contiguous
        buffers shaped like `row_buffers(self, len(indices))`; allocates no rows."""

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        """y rows only (label checks need not read x)."""


def row_buffers(ds: Dataset, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Uninitialized x (k, n_features) of ds.x_dtype and y (k, *y_shape[1:]) of ds.y_dtype:
    what `read` returns for k rows, and what `read_into` fills."""
    return (np.empty((k, ds.n_features), ds.x_dtype),
            np.empty((k, *ds.y_shape[1:]), ds.y_dtype))


def _check_rows(ds: Dataset, indices: np.ndarray) -> None:
    """IndexError unless every index of read_into's strictly increasing `indices` is a row of
    `ds`: the first and the last bound them all (O(1): two reductions over the batch took
    about 2 % of a small network's step)."""
    if len(indices) and (indices[0] < 0 or indices[-1] >= ds.n):
        raise IndexError(f"{ds.source}: row indices must be in [0, {ds.n}), got "
                         f"{indices[0]}..{indices[-1]}")


def data_error(source: str, problem: str) -> DataError:
    """The one-line error every data source raises: "data file '<source>': <problem>"."""
    return DataError(f"data file {source!r}: {problem}")


def check_layout(source: str, x, y=None) -> int:
    """Shape and dtype checks every source shares, on arrays or h5py datasets x and y (None: a
    source without labels, whose x is checked alone); returns n_features (trailing dims of x
    multiplied, so (n, 28, 28) images are read as (n, 784))."""
    if len(x.shape) < 2:
        raise data_error(source, f"x must be 2-D (rows, features), got shape {x.shape}")
    if y is not None and len(y.shape) not in (1, 2):
        raise data_error(source, f"y must be 1-D labels (rows,) or 2-D targets (rows, outputs), "
                                 f"got shape {y.shape}")
    if y is not None and x.shape[0] != y.shape[0]:
        raise data_error(source, f"length mismatch: x has {x.shape[0]} rows, y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise data_error(source, "empty data (0 rows)")
    for name, a in (("x", x), ("y", y)):
        if a is not None and a.dtype.kind not in "iuf":
            raise data_error(source, f"{name} has dtype {a.dtype}; expected a float or integer "
                                     f"dtype")
    n_features = math.prod(x.shape[1:])
    if n_features == 0:
        raise data_error(source, f"x has 0 features (shape {x.shape})")
    return n_features


def no_labels(source: str) -> ValueError:
    """The error of a y read from a source opened without labels: a caller's mistake, since
    everything that needs y opens its data with a y_name (and so gets a DataError if y is
    missing from the file)."""
    return ValueError(f"{source}: opened without labels (y_name=None); only x can be read")


def _missing_hint(path: Path) -> str:
    """How to create a missing file that a bundled preset names (e.g. fashion-mnist)."""
    if path.name in ("fashion-mnist-train.h5", "fashion-mnist-test.h5"):
        return f"; create it with: distbp data fashion-mnist --out {path.parent}"
    return ""


def check_file(path: str | Path, source: str) -> None:
    """DataError unless `path` is an existing, readable regular file (named `source` in the
    message); a missing file that a bundled preset names gets a hint on how to create it."""
    if not Path(path).exists():
        raise data_error(source, "not found" + _missing_hint(Path(path)))
    if Path(path).is_dir():
        raise data_error(source, "is a directory, not a data file")
    # a FIFO, socket or device: open() could block forever
    check_regular(path, f"data file {source!r}", DataError)
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise data_error(source, f"not readable ({err.strerror or one_line(err)})") from None


class ArrayDataset:
    """Rows held in memory (NPZ, the bundled digits, synthetic data, tests). Not copied.
    y None: inputs only (`y` then raises `no_labels`)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None, source: str = "in-memory arrays",
                 scale: float | None = None):
        x, y = np.asarray(x), None if y is None else np.asarray(y)
        self.n_features = check_layout(source, x, y)
        self.x = x.reshape(x.shape[0], self.n_features)
        self._y = y
        self.n, self.x_dtype, self.source, self.scale = len(x), x.dtype, source, scale
        self.y_dtype, self.y_shape = (None, None) if y is None else (y.dtype, y.shape)

    @property
    def y(self) -> np.ndarray:
        if self._y is None:
            raise no_labels(self.source)
        return self._y

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[indices], self.y[indices]

    def read_x(self, indices: np.ndarray) -> np.ndarray:
        return self.x[indices]

    def read_into(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        _check_rows(self, indices)
        # mode="wrap" (indices are checked above): take's default mode="raise" copies `out`
        # first, so that an error leaves it untouched, which is a batch-sized allocation.
        # (the methods: np.take's Python wrapper costs a small network's step a micro-second)
        self.x.take(indices, axis=0, out=x, mode="wrap")
        self.y.take(indices, axis=0, out=y, mode="wrap")

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        return self.y[indices]


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
        self.y_shape = None if base.y_shape is None else (self.n, *base.y_shape[1:])

    def _base_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Increasing base rows to read, and where row i of the answer is among them."""
        rows = self.rows[indices]
        return (rows, None) if self._increasing else np.unique(rows, return_inverse=True)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, inverse = self._base_rows(indices)
        x, y = self.base.read(rows)
        return (x, y) if inverse is None else (x[inverse], y[inverse])

    def read_x(self, indices: np.ndarray) -> np.ndarray:
        rows, inverse = self._base_rows(indices)
        x = self.base.read_x(rows)
        return x if inverse is None else x[inverse]

    def read_into(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Straight into x and y when the base rows increase (a split, a sorted subset);
        otherwise through one base read of the distinct rows (allocates)."""
        rows, inverse = self._base_rows(indices)
        if inverse is None:
            self.base.read_into(rows, x, y)
            return
        bx, by = self.base.read(rows)
        np.take(bx, inverse, axis=0, out=x, mode="wrap")   # inverse < len(rows) by construction
        np.take(by, inverse, axis=0, out=y, mode="wrap")

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
        raise data_error(ds.source, f"validation fraction {fraction} of {ds.n} rows leaves "
                                    f"an empty {empty} set")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_VALIDATION_STREAM,)))
    perm = rng.permutation(ds.n)
    return subset(ds, np.sort(perm[n_val:])), subset(ds, np.sort(perm[:n_val]))

