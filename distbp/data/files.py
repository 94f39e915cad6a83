"""Opening a data source by name: `open_dataset` picks HDF5, NPZ or the bundled digits.

Separate from the readers because it is the one place that knows every format: it dispatches
on the file's suffix (or signature) to `HDF5Dataset` or an in-memory `ArrayDataset`, and finds
the digits bundled with the package.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np

from distbp.data.hdf5 import HDF5Dataset
from distbp.data.sources import ArrayDataset, Dataset, check_file, data_error
from distbp.errors import ConfigError, DataError, one_line

__all__ = ["BUNDLED_DIR", "HDF5_SUFFIXES", "check_npy_size", "open_dataset"]

BUNDLED_DIR = Path(__file__).parent.parent / "datasets"   # distbp/datasets, beside this package
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _load_npz(path: str, x_name: str, y_name: str | None, local_size: int) -> ArrayDataset:
    """An NPZ archive's x and y (y_name None: x only), loaded whole (NPZ cannot be read by rows;
    use HDF5 for large data), by every one of the node's `local_size` ranks: together they must
    fit in the machine's memory shared by those ranks."""
    names = [x_name] if y_name is None else [x_name, y_name]
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise data_error(path, "not an NPZ archive (a single .npy array?)")
        with archive:
            need = 0
            for name in names:
                if name not in archive.files:
                    raise data_error(path, f"array {name!r} not found "
                                           f"(arrays: {', '.join(archive.files) or 'none'})")
                shape, dtype = check_npy_size(archive.zip, f"{name}.npy", path)
                need += math.prod(shape) * dtype.itemsize
            share = _memory() // max(1, local_size)
            if need > share:
                raise data_error(path, f"its arrays need {need} bytes on each of the {local_size} "
                                       f"rank(s) of this node, more than their share of its "
                                       f"memory ({share}); store large data as HDF5")
            x, y = archive[x_name], None if y_name is None else archive[y_name]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError,
            RuntimeError, KeyError) as err:
        raise data_error(path, f"not a valid NPZ archive: {one_line(err)}") from None
    return ArrayDataset(x, y, source=path)


def check_npy_size(archive: zipfile.ZipFile, member: str, path: str
                   ) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in a member's .npy header, read before NumPy allocates the array;
    refused if it claims more bytes than the zip member can hold (deflate expands at most
    ~1032-fold) or than this machine's memory."""
    info = archive.getinfo(member)
    with archive.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version not in _NPY_HEADERS:
            raise ValueError(f"{member}: .npy format version {version} not supported")
        shape, _, dtype = _NPY_HEADERS[version](fh)
    need = math.prod(shape) * dtype.itemsize
    most = info.compress_size * (1100 if info.compress_type != zipfile.ZIP_STORED else 1)
    if need > min(info.file_size, most):
        raise data_error(path, f"array {member[:-4]!r} claims shape {shape} ({need} bytes) but "
                               f"the archive holds {info.file_size} bytes of it (damaged or "
                               "forged header?)")
    memory = _memory()
    if need > memory:
        raise data_error(path, f"array {member[:-4]!r} needs {need} bytes, more than this "
                               f"machine's memory ({memory}); store large data as HDF5")
    return shape, dtype


def _memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _bundled_digits(split: str, labels: bool) -> ArrayDataset:
    """The bundled UCI digits (8x8 uint8 images, 0..16, scale 1/16), read whole: they are tiny."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    h5 = HDF5Dataset(BUNDLED_DIR / f"digits-{split}.h5", y_name="y" if labels else None,
                     source=f"bundled digits ({split})")
    try:
        return h5.load()
    finally:
        h5.close()


def open_dataset(path: str | Path | None, x_name: str = "x", y_name: str | None = "y",
                 split: str = "train", local_size: int = 1) -> Dataset:
    """The data source for `path`: None -> bundled digits `split` ("train"/"test"); .h5, .hdf5,
    .hdf -> HDF5Dataset; .npz -> ArrayDataset; other names are recognised by signature.

    `y_name` None opens the inputs alone (prediction): the file need hold no y, and x is checked
    and read exactly as with labels. Otherwise a missing y is a DataError naming it.
    `local_size`: the ranks on this node that each open it (an NPZ is loaded whole by each)."""
    if path is None:
        return _bundled_digits(split, labels=y_name is not None)
    path = str(path)
    check_file(path, path)
    suffix = Path(path).suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return HDF5Dataset(path, x_name, y_name)
    if suffix == ".npz" or zipfile.is_zipfile(path):
        return _load_npz(path, x_name, y_name, local_size)
    if h5py.is_hdf5(path):
        return HDF5Dataset(path, x_name, y_name)
    raise data_error(path, "not an HDF5 or NPZ file (expected .h5/.hdf5/.hdf or .npz)")

