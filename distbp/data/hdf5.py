"""HDF5 data read by rows: `HDF5Dataset` and the readers that make its row reads fast.

A rank reads only the rows of its shard, so a file larger than one process's memory trains
as well as a small one. Chunked datasets get a large chunk cache and are read as a few slices
(`_read_spans`) rather than h5py's per-index selection; the tuning constants live here with
the reader they tune.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np

from distbp.data.plan import _chunks
from distbp.data.sources import ArrayDataset, _check_file, _check_layout, _fail, _one_line

__all__ = ["CHUNK_CACHE_BYTES", "SPAN_BYTES", "HDF5Dataset"]

CHUNK_CACHE_BYTES = 64 << 20   # HDF5 chunk cache per dataset (h5py's default is 1-8 MiB)
_CHUNK_CACHE_SLOTS = 100_003   # hash slots: a prime, as HDF5 advises, ~100x the chunks that fit
SPAN_BYTES = 4 << 20           # a chunked read fetches at most ~this many bytes in one slice
_GAP_BYTES = 64 << 10          # ... and bridges gaps up to this size: cheaper than another call


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
