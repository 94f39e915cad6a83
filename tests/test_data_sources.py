"""The data sources: HDF5 and NPZ files read row by row in the disk dtype (only the rows asked
for), subsets and the validation split, the bundled digits and the synthetic teacher.

The batch plan: tests/test_data_plan.py; validation of the data: tests/test_data_validation.py.
Shared helpers: tests/helpers/datafiles.py."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
from helpers.datafiles import RecordingDataset, write_h5

from distbp.data import (
    ArrayDataset,
    HDF5Dataset,
    open_dataset,
    split_validation,
    subset,
    synthetic_teacher,
    validate_dataset,
)
from distbp.errors import ConfigError, DataError


def check_reads(ds, x, y):
    for idx in (np.array([0, 3, 4, 17, 49]), np.arange(10, 20), np.array([], dtype=np.int64)):
        xr, yr = ds.read(idx)
        assert xr.dtype == x.dtype and xr.shape == (len(idx), x.shape[1])
        np.testing.assert_array_equal(xr, x[idx])
        np.testing.assert_array_equal(yr, y[idx])
        np.testing.assert_array_equal(ds.read_y(idx), y[idx])


def test_hdf5_source_returns_exactly_the_rows_asked_for_in_the_disk_dtype(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    ds = open_dataset(write_h5(tmp_path / "d.h5", x=x, y=y))
    assert isinstance(ds, HDF5Dataset)
    assert (ds.n, ds.n_features, ds.x_dtype, ds.y_shape) == (50, 6, np.uint8, (50,))
    assert ds.scale is None          # no 'scale' attribute in the file
    check_reads(ds, x, y)
    ds.close()


def test_npz_source_returns_exactly_the_rows_asked_for_in_the_disk_dtype(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    np.savez(tmp_path / "d.npz", features=x, labels=y)
    ds = open_dataset(tmp_path / "d.npz", x_name="features", y_name="labels")
    assert (ds.n, ds.n_features, ds.x_dtype) == (50, 6, np.uint8)
    check_reads(ds, x, y)


@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_a_source_opened_without_labels_reads_x_as_the_labelled_one_and_refuses_y(
        tmp_path, uint8_arrays, fmt):
    x, y = uint8_arrays
    labelled, inputs = tmp_path / f"xy.{fmt}", tmp_path / f"x.{fmt}"
    write = write_h5 if fmt == "h5" else np.savez
    write(labelled, x=x, y=y)
    write(inputs, x=x)
    with_y = open_dataset(labelled)
    for path in (inputs, labelled):      # a labelled file opened without labels: y not read
        ds = open_dataset(path, y_name=None)
        assert (ds.n, ds.n_features, ds.x_dtype, ds.y_dtype, ds.y_shape) == (50, 6, np.uint8,
                                                                              None, None)
        for idx in (np.array([0, 3, 4, 17, 49]), np.arange(10, 20)):
            np.testing.assert_array_equal(ds.read_x(idx), with_y.read(idx)[0])
            np.testing.assert_array_equal(subset(ds, idx[::-1]).read_x(np.arange(len(idx))),
                                          x[idx[::-1]])
        for read in (ds.read, ds.read_y, lambda idx: ds.read_into(idx, x[:1], y[:1])):
            with pytest.raises(ValueError, match="opened without labels"):
                read(np.array([0]))
        if fmt == "h5":
            loaded = ds.load()           # --in-memory: x alone, then the file is closed
            np.testing.assert_array_equal(loaded.read_x(np.arange(50)), x)
            assert loaded.y_shape is None
    if fmt == "h5":
        with_y.close()


def test_y_is_not_looked_at_when_opened_without_labels(tmp_path, uint8_arrays):
    x, _ = uint8_arrays
    path = write_h5(tmp_path / "d.h5", x=x, y=np.array([b"cat"] * 3))  # y would be refused
    with pytest.raises(DataError, match="length mismatch"):
        open_dataset(path)
    ds = open_dataset(path, y_name=None)
    np.testing.assert_array_equal(ds.read_x(np.arange(50)), x)
    ds.close()
    digits = open_dataset(None, y_name=None, split="test")
    assert (digits.n, digits.n_features, digits.y_shape) == (360, 64, None)


def test_unknown_suffix_is_recognised_by_signature(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    ds = open_dataset(write_h5(tmp_path / "d.data", x=x, y=y))
    assert isinstance(ds, HDF5Dataset)
    ds.close()


def test_image_arrays_are_flattened_to_rows(tmp_path):
    x = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    y = np.arange(5)
    ds = open_dataset(write_h5(tmp_path / "img.h5", x=x, y=y))
    assert ds.n_features == 12
    xr, _ = ds.read(np.array([1, 4]))
    np.testing.assert_array_equal(xr, x.reshape(5, 12)[[1, 4]])
    ds.close()


def test_hdf5_read_passes_only_the_requested_indices_to_h5py(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    ds = HDF5Dataset(write_h5(tmp_path / "d.h5", x=x, y=y))
    ds._x = RecordingDataset(ds._x)
    idx = np.array([2, 9, 30])
    ds.read(idx)
    ds.read(np.arange(5, 8))
    assert len(ds._x.selections) == 2
    np.testing.assert_array_equal(ds._x.selections[0], idx)
    assert ds._x.selections[1] == slice(5, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        ds.read(np.array([3, 3, 4]))
    ds.close()


class CountingFile(io.FileIO):
    """A file whose reads are counted in bytes."""

    bytes_read = 0

    def readinto(self, buffer):
        got = super().readinto(buffer)
        self.bytes_read += got or 0
        return got

    def read(self, size=-1):
        got = super().read(size)
        self.bytes_read += len(got)
        return got


def test_hdf5_read_of_a_few_rows_reads_a_small_part_of_the_file(tmp_path, monkeypatch):
    x = np.random.default_rng(1).random((20000, 50))          # 8 MB, contiguous layout
    path = write_h5(tmp_path / "big.h5", x=x, y=np.arange(20000))
    raw = CountingFile(path, "rb")
    real_file = h5py.File
    monkeypatch.setattr(h5py, "File", lambda name, mode, locking: real_file(raw, mode))
    ds = HDF5Dataset(path)
    try:
        raw.bytes_read = 0
        idx = np.array([3, 5000, 9000, 15000, 19999])
        xr, _ = ds.read(idx)
        np.testing.assert_array_equal(xr, x[idx])
        assert raw.bytes_read < 0.02 * x.nbytes, raw.bytes_read
    finally:
        ds.close()       # the HDF5 file before its file object, or h5py crashes at exit
        raw.close()


def test_subset_and_split_validation_are_disjoint_cover_everything_and_deterministic():
    x = np.arange(200, dtype=np.float64).reshape(100, 2)
    ds = ArrayDataset(x, np.arange(100) % 3)
    train, val = split_validation(ds, 0.2, seed=5)
    assert (train.n, val.n) == (80, 20)
    assert np.intersect1d(train.rows, val.rows).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train.rows, val.rows])), np.arange(100))
    again, _ = split_validation(ds, 0.2, seed=5)
    np.testing.assert_array_equal(again.rows, train.rows)
    other, _ = split_validation(ds, 0.2, seed=6)
    assert not np.array_equal(other.rows, train.rows)
    xr, yr = val.read(np.array([0, 7]))
    np.testing.assert_array_equal(xr, x[val.rows[[0, 7]]])
    np.testing.assert_array_equal(yr, val.rows[[0, 7]] % 3)


def test_subset_with_unsorted_repeated_rows_reads_increasing_rows_from_hdf5(tmp_path,
                                                                            uint8_arrays):
    x, y = uint8_arrays
    base = HDF5Dataset(write_h5(tmp_path / "d.h5", x=x, y=y))
    view = subset(base, np.array([40, 2, 40, 7]))
    xr, yr = view.read(np.arange(4))
    np.testing.assert_array_equal(xr, x[[40, 2, 40, 7]])
    np.testing.assert_array_equal(yr, y[[40, 2, 40, 7]])
    base.close()


def test_split_validation_rejects_bad_fractions():
    ds = ArrayDataset(np.zeros((10, 2)), np.zeros(10, dtype=np.int64))
    for fraction in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="validation fraction"):
            split_validation(ds, fraction, 0)
    with pytest.raises(DataError, match="empty validation set"):
        split_validation(ds, 0.01, 0)


def test_bundled_digits_have_the_documented_shape_and_labels():
    for split, rows in (("train", 1437), ("test", 360)):
        ds = open_dataset(None, split=split)
        x, y = ds.read(np.arange(ds.n))
        assert (ds.n, ds.n_features, x.dtype) == (rows, 64, np.uint8)
        assert ds.source == f"bundled digits ({split})"
        assert set(y.tolist()) == set(range(10))
        assert x.max() <= 16 and ds.scale == 1 / 16
        validate_dataset(ds, 64, 10, int_labels_required=True)
    with pytest.raises(ConfigError):
        open_dataset(None, split="validation")


def test_synthetic_teacher_is_deterministic_and_learnable():
    a, b = synthetic_teacher(2000, 10, 4, seed=3), synthetic_teacher(2000, 10, 4, seed=3)
    assert a.x.dtype == np.float32 and a.y.dtype == np.int64
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.y, synthetic_teacher(2000, 10, 4, seed=4).y)
    assert np.bincount(a.y, minlength=4).min() > 100       # every class is well represented
    short = synthetic_teacher(500, 10, 4, seed=3)          # the teacher does not depend on n
    np.testing.assert_array_equal(short.y, a.y[:500])
    # A least-squares linear fit on half predicts the other half far above chance (0.25).
    design = np.hstack([a.x.astype(np.float64), np.ones((2000, 1))])
    coef, *_ = np.linalg.lstsq(design[:1000], np.eye(4)[a.y[:1000]], rcond=None)
    accuracy = np.mean((design[1000:] @ coef).argmax(axis=1) == a.y[1000:])
    assert accuracy > 0.6, accuracy


def test_an_npz_every_rank_of_a_node_loads_must_fit_their_share_of_memory(tmp_path, monkeypatch):
    """Each rank loads an NPZ whole, x and y together: refused when the node's ranks would
    not fit (the machine's memory made small here), accepted for fewer ranks."""
    from distbp.data import files

    path = tmp_path / "d.npz"
    x, y = np.zeros((1000, 8), np.float32), np.zeros(1000, np.int64)
    np.savez(path, x=x, y=y)
    monkeypatch.setattr(files, "_memory", lambda: int(1.5 * (x.nbytes + y.nbytes)))
    assert files.open_dataset(path, local_size=1).n == 1000
    with pytest.raises(DataError, match=r"its arrays need 40000 bytes on each of the 2 rank\(s\)"):
        files.open_dataset(path, local_size=2)
