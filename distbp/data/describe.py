"""Describe a data file as `distbp data info` and `distbp info` show it: datasets (shape, dtype,
chunking, filters), attributes and class counts, of an HDF5 file or an NPZ archive.

    info = describe("data/fashion-mnist-train.h5")     # a JSON-ready dict; DataError if unusable
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np

from distbp.data.files import check_npy_size
from distbp.data.hdf5 import check_links, check_storage
from distbp.data.sources import check_file
from distbp.errors import DataError, one_line

__all__ = ["describe"]


def _filters(ds: h5py.Dataset) -> str:
    parts = [f"{ds.compression} level {ds.compression_opts}" if ds.compression_opts is not None
             else ds.compression] if ds.compression else []
    parts += ["shuffle"] if ds.shuffle else []
    return " + ".join(parts) or "uncompressed"


def _class_counts(ds: h5py.Dataset | np.ndarray) -> dict[int, int] | None:
    """Counts per label (1-D integer y) or per argmax (2-D targets), read in bounded blocks."""
    if ds.dtype.kind not in "iuf" or ds.ndim not in (1, 2) or ds.shape[0] == 0:
        return None
    if ds.ndim == 1 and ds.dtype.kind == "f":
        return None
    counts: dict[int, int] = {}
    step = max(1, (16 << 20) // max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize))
    for lo in range(0, ds.shape[0], step):
        block = ds[lo:lo + step]
        labels = block if ds.ndim == 1 else np.argmax(block, axis=1)
        values, n = np.unique(labels, return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
    return dict(sorted(counts.items()))


def _attr(v):
    v = v.decode() if isinstance(v, bytes) else v
    return v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) \
        else v


def describe(path: str | Path, y_name: str = "y") -> dict:
    """Datasets (shape, dtype, chunks, filters), attributes and class counts of `y_name`, of an
    HDF5 file or (format "npz", recognised as training recognises it: by the suffix .npz or a
    zip signature) an NPZ archive's arrays. DataError (one line) for anything else."""
    path = str(path)
    check_file(path, path)
    if h5py.is_hdf5(path):
        try:
            return _describe_hdf5(path, y_name)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:  # corrupt
            raise DataError(f"data file {path!r}: not a valid HDF5 file (truncated or corrupt?): "
                            f"{one_line(err)}") from None
    if path.lower().endswith(".npz") or zipfile.is_zipfile(path):
        return _describe_npz(path, y_name)
    raise DataError(f"data file {path!r}: not an HDF5 or NPZ file")


def _describe_hdf5(path: str, y_name: str) -> dict:
    """describe() of an HDF5 file: every dataset, the file's attributes, class counts."""
    info: dict = {"file": path, "format": "hdf5", "bytes": os.path.getsize(path),
                  "datasets": {}}
    with h5py.File(path, "r", locking=False) as f:
        # Every link, none followed: a soft or external one is refused as training refuses it
        # (after the visit: h5py turns an exception raised inside it into a SystemError).
        links: list[str] = []
        f.visititems_links(lambda name, link: None if isinstance(link, h5py.HardLink)
                           else links.append(name))
        for name in links:
            check_links(f, name, path)
        info["attributes"] = {k: _attr(v) for k, v in f.attrs.items()}

        def visit(name, obj):  # reached by hard links only; storage refused as training does
            if isinstance(obj, h5py.Dataset):
                check_storage(obj, info["bytes"], path)
                info["datasets"][name] = {
                    "shape": list(obj.shape), "dtype": str(obj.dtype),
                    "chunks": list(obj.chunks) if obj.chunks else None,
                    "filters": _filters(obj),
                    "attributes": {k: _attr(v) for k, v in obj.attrs.items()}}
        f.visititems(visit)
        if isinstance(f.get(y_name), h5py.Dataset):
            check_storage(f[y_name], info["bytes"], path)  # before reading every row
            counts = _class_counts(f[y_name])
            if counts is not None:
                info["class_counts"] = {str(k): v for k, v in counts.items()}
    return info


def _describe_npz(path: str, y_name: str) -> dict:
    """describe() of an NPZ archive: each array's shape and dtype from its .npy header (x is
    not loaded), its zip compression; class counts of `y_name` (loaded whole, as training
    loads the archive). NPZ has no attributes."""
    info: dict = {"file": path, "format": "npz", "bytes": os.path.getsize(path),
                  "datasets": {}, "attributes": {}}
    kinds = {}  # array name -> dtype kind
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.filename.endswith(".npy"):  # np.savez stores key k as k.npy
                    name = member.filename[:-4]
                    info["datasets"][name], kinds[name] = _npy_entry(archive, member, path)
        if kinds.get(y_name, "O") in "iuf":  # not object arrays: they would need pickle
            with np.load(path, allow_pickle=False) as arrays:
                counts = _class_counts(arrays[y_name])
            if counts is not None:
                info["class_counts"] = {str(k): v for k, v in counts.items()}
    except DataError:
        raise  # already one line naming the file
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"data file {path!r}: not a valid NPZ archive ({one_line(err)})"
                        ) from None
    return info


def _npy_entry(archive: zipfile.ZipFile, member: zipfile.ZipInfo, path: str
               ) -> tuple[dict, str]:
    """An archive member's description and dtype kind, from its .npy header alone (its size
    refused as training refuses it)."""
    shape, dtype = check_npy_size(archive, member.filename, path)
    compressed = member.compress_type != zipfile.ZIP_STORED
    return {"shape": list(shape), "dtype": str(dtype), "chunks": None,
            "filters": "zip deflate" if compressed else "uncompressed", "attributes": {}
            }, dtype.kind
