"""HDF5 data read by rows: `HDF5Dataset` and the readers that make its row reads fast.

A rank reads only the rows of its shard, so a file larger than one process's memory trains
as well as a small one. Chunked datasets get a large chunk cache and are read as a few slices
(`_SpanReader`) rather than h5py's per-index selection; the tuning constants live here with
the reader they tune. `read_into` writes rows into the caller's buffers (h5py's `read_direct`,
or HDF5 reads into reused dataspaces and a scratch slice), so training allocates no rows.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import h5py
import numpy as np
from h5py import h5s, h5t

from distbp.data.plan import row_blocks
from distbp.data.sources import ArrayDataset, check_file, check_layout, data_error, no_labels
from distbp.errors import UsageError, one_line

__all__ = ["CHUNK_CACHE_BYTES", "SPAN_BYTES", "HDF5Dataset", "check_storage"]

CHUNK_CACHE_BYTES = 64 << 20   # HDF5 chunk cache per dataset (h5py's default is 1-8 MiB)
_CHUNK_CACHE_SLOTS = 100_003   # hash slots: a prime, as HDF5 advises, ~100x the chunks that fit
# Eviction: plain LRU. HDF5's default w0 = 0.75 first walks 75% of the cached chunks looking
# for one read whole, which shuffled row reads seldom leave: with ~4000 cached 16 KiB chunks
# that walk, once per miss, took 25-50% of the read time (the share depending on heap layout).
_CHUNK_CACHE_W0 = 0.0
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


def check_links(file: h5py.File, name: str, source: str) -> None:
    """Refuse a soft or external link on the way to `name`, before following any: an external
    link may name a missing file or form a cycle, and either makes the data another file's."""
    parts = [p for p in name.split("/") if p]
    for i in range(len(parts)):
        link = file.get("/".join(parts[:i + 1]), getlink=True)
        kind = {h5py.SoftLink: "a soft link", h5py.ExternalLink: "an external link"}.get(
            type(link))
        if kind is not None:
            raise data_error(source, f"{'/'.join(parts[:i + 1])!r} is {kind}; distbp reads "
                                     "plain datasets only (contiguous, chunked or compressed)")


def check_storage(ds: h5py.Dataset, file_bytes: int, source: str) -> None:
    """Refuse storage that is not plain data in this file: a virtual dataset or external raw
    storage (a missing source reads as zeros), or storage that is not all written or claims
    more bytes than the file holds (unwritten data reads as fill values: a header that claims
    2**40 rows must not be trained on, nor allocated)."""
    what = f"dataset {ds.name!r}"
    if ds.is_virtual:
        raise data_error(source, f"{what} is a virtual dataset; distbp reads plain datasets only")
    if ds.external:
        raise data_error(source, f"{what} uses external raw storage (in other files); distbp "
                                 "reads plain datasets only")
    stored, need = ds.id.get_storage_size(), math.prod(ds.shape) * ds.dtype.itemsize
    if stored > file_bytes:
        raise data_error(source, f"{what} claims {stored} stored bytes, more than the file's "
                                 f"{file_bytes}")
    if ds.chunks is None:
        written = stored >= need and (ds.id.get_offset() or 0) + stored <= file_bytes
    else:
        chunks = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        written = ds.id.get_num_chunks() == chunks
    if need and not written:
        raise data_error(source, f"{what} declares shape {ds.shape} ({need} bytes) but the file "
                                 f"holds {stored} bytes of it (a damaged or forged header?)")


def _h5_dataset(file: h5py.File, name: str, source: str) -> h5py.Dataset:
    """`name` opened with a CHUNK_CACHE_BYTES chunk cache. The cache is set per dataset at its
    first open (a file-wide setting would need h5py.File arguments), so open it low-level."""
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):  # HDF5 has no such path components
        raise data_error(source, f"dataset {name!r} is not a dataset name "
                                 f"(datasets: {_dataset_names(file)})")
    check_links(file, name, source)
    if file.get(name, getclass=True) is h5py.Dataset:   # class only: nothing opened yet
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_chunk_cache(_CHUNK_CACHE_SLOTS, CHUNK_CACHE_BYTES, _CHUNK_CACHE_W0)
        # readonly, as h5py's own File[name] says it: lets h5py cache its selection readers
        return h5py.Dataset(h5py.h5d.open(file.id, name.encode(), dapl),
                            readonly=file.mode == "r")
    what = "not found" if file.get(name) is None else "is not a dataset"
    raise data_error(source, f"dataset {name!r} {what} (datasets: {_dataset_names(file)})")


def _dataset_names(file: h5py.File) -> str:
    """'x, y': the file's datasets, the first 20."""
    names: list[str] = []
    file.visititems(lambda key, o: names.append(key) if isinstance(o, h5py.Dataset) else None)
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") or "none"


def _h5_scale(file: h5py.File, x: h5py.Dataset, source: str) -> float | None:
    """The optional attribute 'scale' (on x, else on the file): x * scale is the network input;
    a finite positive number."""
    owner = x if "scale" in x.attrs else file if "scale" in file.attrs else None
    if owner is None:
        return None
    value = np.asarray(owner.attrs["scale"])
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise data_error(source, f"attribute 'scale' must be one number, got {value!r}")
    scale = float(value.reshape(()))
    if not (math.isfinite(scale) and scale > 0):
        raise data_error(source, f"attribute 'scale' must be a finite positive number, got "
                                 f"{scale!r}")
    return scale


class HDF5Dataset:
    """Rows read on demand from an HDF5 file; only the requested rows are read.

    The file stays open (one handle per process) and is opened with `locking=False`, which
    works on NFS/Lustre where HDF5 file locking fails. Call `close()` when done, or `load()` to
    hold every row in memory instead (`--in-memory`). Chunked datasets get a CHUNK_CACHE_BYTES
    chunk cache and are read as a few slices, one per run of nearby rows (`_SpanReader`, one
    per thread and dataset: the training reader thread and the main thread's validation may
    read the same file at once, and a span reader's dataspaces and scratch are state).
    `y_name` None opens x alone (a file of inputs for prediction): y is neither looked for nor
    read, and y_dtype = y_shape = None.
    """

    def __init__(self, path: str | Path, x_name: str = "x", y_name: str | None = "y",
                 source: str | None = None):
        self.source = source or str(path)
        check_file(path, self.source)
        try:
            self.file = h5py.File(path, "r", locking=False)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise data_error(self.source, f"not a valid HDF5 file (truncated or corrupt?): "
                                          f"{one_line(err)}") from None
        try:
            self._x = _h5_dataset(self.file, x_name, self.source)
            self._y = None if y_name is None else _h5_dataset(self.file, y_name, self.source)
            self.n_features = check_layout(self.source, self._x, self._y)
            for ds in (self._x, self._y):
                if ds is not None:
                    check_storage(ds, os.path.getsize(path), self.source)
            self.scale = _h5_scale(self.file, self._x, self.source)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
            self.file.close()
            if isinstance(err, UsageError):
                raise
            raise data_error(self.source, f"not a valid HDF5 file (corrupt?): "
                                          f"{one_line(err)}") from None
        except BaseException:
            self.file.close()
            raise
        self.n, self.x_dtype = self._x.shape[0], self._x.dtype
        labels = self._y is not None
        self.y_dtype, self.y_shape = (self._y.dtype, self._y.shape) if labels else (None, None)
        self._x_row = self._x.shape[1:]   # x may be stored (n, 28, 28): read_into's view of x
        self._spans = {ds.name: _span_rows(ds) for ds in self._datasets}
        self._local = threading.local()   # this thread's _SpanReader per dataset name

    @property
    def _datasets(self) -> list[h5py.Dataset]:
        """x, and y unless the file was opened without labels."""
        return [ds for ds in (self._x, self._y) if ds is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of x and y (if opened), uncompressed: the memory `load()` needs."""
        return sum(math.prod(ds.shape) * ds.dtype.itemsize for ds in self._datasets)

    def load(self) -> ArrayDataset:
        """Every row in memory (the same values and dtypes `read` gives), read in slices of
        ~SCAN_BYTES straight into one array each; then the file is closed. Raises MemoryError
        when the arrays cannot be allocated (the file stays open then)."""
        arrays = [np.empty(ds.shape, ds.dtype) for ds in self._datasets]
        for rows in row_blocks(self.n, self.nbytes // self.n):
            sel = np.s_[int(rows[0]):int(rows[-1]) + 1]
            try:
                for ds, a in zip(self._datasets, arrays):
                    ds.read_direct(a, sel, sel)
            except (OSError, RuntimeError) as err:
                raise data_error(self.source, f"cannot read rows {sel.start}..{sel.stop - 1}: "
                                              f"{one_line(err)}") from None
        self.close()
        x, y = arrays if self._y is not None else (arrays[0], None)
        return ArrayDataset(x, y, source=self.source, scale=self.scale)

    def _rows(self, ds: h5py.Dataset, indices: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
        """Rows `indices` of `ds` into `out` ((len, *ds.shape[1:]), C-contiguous), or into a
        new array when `out` is None (h5py's own, for a slice or a contiguous dataset)."""
        try:
            sel = _selection(indices)
            reader = None if isinstance(sel, slice) else self._span_reader(ds)
            if out is None and reader is None:
                return ds[sel]
            if out is None:
                out = np.empty((len(indices), *ds.shape[1:]), ds.dtype)
            if len(indices) and reader is not None:
                reader.read_into(sel, out)
            elif len(indices):
                ds.read_direct(out, sel)
            return out
        except (OSError, RuntimeError) as err:  # a corrupt compressed chunk: found mid-run
            span = f" {indices[0]}..{indices[-1]}" if len(indices) else ""
            raise data_error(self.source, f"cannot read rows{span} ({len(indices)} rows) of "
                                          f"{ds.name!r}: {one_line(err)}") from None

    def _span_reader(self, ds: h5py.Dataset) -> _SpanReader | None:
        """This thread's span reader of a chunked `ds` (made at its first read); None when
        `ds` is contiguous."""
        spans = self._spans.get(ds.name)
        if spans is None:
            return None
        readers = self._local.__dict__.setdefault("readers", {})
        if ds.name not in readers:
            readers[ds.name] = _SpanReader(ds, *spans)
        return readers[ds.name]

    @property
    def _labels(self) -> h5py.Dataset:
        """The y dataset; ValueError for a file opened without labels."""
        if self._y is None:
            raise no_labels(self.source)
        return self._y

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.read_x(indices), self.read_y(indices)

    def read_x(self, indices: np.ndarray) -> np.ndarray:
        x = self._rows(self._x, indices)
        return x.reshape(len(x), self.n_features)

    def read_into(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        if not (x.flags.c_contiguous and y.flags.c_contiguous):
            raise ValueError("read_into needs C-contiguous x and y")  # else reshape would copy
        self._rows(self._x, indices, x.reshape(len(x), *self._x_row))
        self._rows(self._labels, indices, y)

    def read_y(self, indices: np.ndarray) -> np.ndarray:
        return self._rows(self._labels, indices)

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


class _SpanReader:
    """Rows of a chunked dataset, read as slices into the caller's buffer: one slice per run
    of rows whose gaps are at most `gap` rows, cut at every `most`-row boundary (so a slice
    holds at most `most` rows). HDF5 reads whole chunks anyway (from its chunk cache after the
    first time); h5py's per-index selection costs far more per row (~50x for 1024 rows from
    1024-row gzip chunks).

    A run without gaps is read straight into the output rows; a run with gaps is read into a
    scratch slice of `most` rows (at most ~SPAN_BYTES, made once) and its wanted rows copied
    out. The file dataspace, memory type and scratch are made once and reused (h5py's
    `ds[a:b]` would allocate the slice it returns), so a read allocates no rows; only small
    index arrays (8 bytes a row). One thread's: the dataspace selections are state.
    """

    def __init__(self, ds: h5py.Dataset, gap: int, most: int):
        self.ds, self.gap, self.most = ds, gap, most
        self.row, self.origin = ds.shape[1:], (0,) * (ds.ndim - 1)
        self.fspace, self.mtype = ds.id.get_space(), h5t.py_create(ds.dtype)
        self.scratch = np.empty((min(most, ds.shape[0]), *self.row), ds.dtype)
        self.scratch_space = h5s.create_simple(self.scratch.shape)

    def read_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        """Rows `idx` (strictly increasing, at least one) into `out` (len(idx), *row)."""
        cuts = np.flatnonzero((np.diff(idx) > self.gap) | (np.diff(idx // self.most) != 0)) + 1
        out_space = h5s.create_simple(out.shape)
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(idx)].tolist()):
            first, last = int(idx[lo]), int(idx[hi - 1])
            if last - first == hi - lo - 1:             # no gaps: the slice is the rows
                self._slice(first, hi - lo, out, out_space, lo)
            else:
                self._slice(first, last - first + 1, self.scratch, self.scratch_space, 0)
                np.take(self.scratch, idx[lo:hi] - first, axis=0, out=out[lo:hi],
                        mode="wrap")   # "raise" would copy out[lo:hi]; these are in range

    def _slice(self, first: int, rows: int, dest: np.ndarray, dest_space: h5s.SpaceID,
               at: int) -> None:
        """File rows first..first+rows-1 into rows at..at+rows-1 of `dest` (described by
        `dest_space`, made for dest's whole shape)."""
        count = (rows, *self.row)
        self.fspace.select_hyperslab((first, *self.origin), count)
        dest_space.select_hyperslab((at, *self.origin), count)
        self.ds.id.read(dest_space, self.fspace, dest, self.mtype)
