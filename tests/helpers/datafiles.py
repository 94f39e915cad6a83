"""Shared by tests/test_data_sources.py and tests/test_data_validation.py: a small HDF5 file
written from arrays, and a stand-in for an h5py.Dataset that records what it was asked to read.

    ds = HDF5Dataset(write_h5(tmp_path / "d.h5", x=x, y=y))
    ds._x = RecordingDataset(ds._x)      # then ds._x.selections lists each read's selection
"""

from __future__ import annotations

import h5py

__all__ = ["RecordingDataset", "write_h5"]


def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f[name] = value
    return str(path)


class RecordingDataset:
    """Stands in for an h5py.Dataset: records each selection, delegates the read."""

    def __init__(self, inner):
        self.inner, self.selections, self.name = inner, [], inner.name

    def __getitem__(self, selection):
        self.selections.append(selection)
        return self.inner[selection]
