"""Validation of the data, with one-line messages naming the file: missing, unreadable,
truncated or foreign files, missing datasets, malformed arrays, data that does not fit the
network, and the value scans (bounded chunks, each rank scanning its own share).

The batch plan: tests/test_data_plan.py; the sources: tests/test_data_sources.py. Shared
helpers: tests/helpers/datafiles.py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers.datafiles import RecordingDataset, write_h5

from distbp import data
from distbp.data import ArrayDataset, HDF5Dataset, open_dataset, shard_bounds, validate_dataset
from distbp.errors import DataError

# ----------------------------------------------------------------------------- validation

def assert_data_error(call, file_name, phrase):
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert message.startswith("data file '") and "\n" not in message, message
    assert file_name in message and phrase in message, message
    return message


def test_missing_unreadable_and_non_data_files_are_reported(tmp_path, monkeypatch):
    assert_data_error(lambda: open_dataset(tmp_path / "nope.h5"), "nope.h5", "not found")
    assert_data_error(lambda: open_dataset(tmp_path), tmp_path.name, "is a directory")
    (tmp_path / "text.h5").write_text("hello\n")
    assert_data_error(lambda: open_dataset(tmp_path / "text.h5"), "text.h5",
                      "not a valid HDF5 file")
    (tmp_path / "text.npz").write_text("hello\n")
    assert_data_error(lambda: open_dataset(tmp_path / "text.npz"), "text.npz",
                      "not a valid NPZ archive")
    (tmp_path / "text.dat").write_text("hello\n")
    assert_data_error(lambda: open_dataset(tmp_path / "text.dat"), "text.dat",
                      "not an HDF5 or NPZ file")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.sources, "open", refuse, raising=False)   # works even when run as root
    assert_data_error(lambda: open_dataset(tmp_path / "text.h5"), "text.h5",
                      "not readable (Permission denied)")


def test_truncated_hdf5_file_is_reported(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    path = tmp_path / "cut.h5"
    write_h5(path, x=np.repeat(x, 100, axis=0), y=np.repeat(y, 100))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    assert_data_error(lambda: open_dataset(path), "cut.h5", "not a valid HDF5 file")


def test_missing_datasets_are_reported_with_what_is_there(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    path = write_h5(tmp_path / "names.h5", a=x, b=y)
    message = assert_data_error(lambda: open_dataset(path), "names.h5", "dataset 'x' not found")
    assert "(datasets: a, b)" in message
    with h5py.File(path, "a") as f:
        f.create_group("x")
    assert_data_error(lambda: open_dataset(path), "names.h5", "'x' is not a dataset")
    np.savez(tmp_path / "names.npz", a=x)
    assert_data_error(lambda: open_dataset(tmp_path / "names.npz"), "names.npz",
                      "array 'x' not found (arrays: a)")


@pytest.mark.parametrize("x, y, phrase", [
    (np.zeros(10), np.zeros(10, np.int64), "x must be 2-D (rows, features), got shape (10,)"),
    (np.zeros((10, 3)), np.zeros((10, 2, 2)), "y must be 1-D labels"),
    (np.zeros((10, 3)), np.zeros(9, np.int64), "length mismatch: x has 10 rows, y has 9"),
    (np.zeros((0, 3)), np.zeros(0, np.int64), "empty data (0 rows)"),
    (np.array([["a"]]), np.zeros(1, np.int64), "x has dtype <U1"),
])
def test_malformed_arrays_are_reported(tmp_path, x, y, phrase):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    assert_data_error(lambda: open_dataset(tmp_path / "bad.npz"), "bad.npz", phrase)


def h5_dataset(tmp_path, x, y):
    return open_dataset(write_h5(tmp_path / "v.h5", x=x, y=y))


@pytest.mark.parametrize("x, y, kwargs, phrase", [
    (np.zeros((4, 3)), np.zeros(4, np.int64), {"n_inputs": 5},
     "x has 3 features but the network's input layer has 5"),
    (np.zeros((4, 3)), np.array([0, 1, 10, 2]), {"n_outputs": 10},
     "labels y out of range: min 0, max 10"),
    (np.zeros((4, 3)), np.array([0, -1, 2, 2]), {"n_outputs": 10},
     "labels y out of range: min -1, max 2"),
    (np.zeros((4, 3)), np.zeros((4, 2)), {"n_outputs": 3},
     "targets y have width 2 but the network's output layer has 3"),
    (np.zeros((4, 3)), np.zeros(4), {"n_outputs": 3}, "must hold integer class labels"),
    (np.zeros((4, 3)), np.zeros((4, 3)), {"n_outputs": 3, "int_labels_required": True},
     "integer class labels of shape (4,) are required"),
    (np.array([[0, 1], [2, np.nan]]), np.zeros(2, np.int64), {},
     "x contains NaN or inf (first at row 1)"),
    (np.zeros((2, 2), np.float32), np.array([[0.0], [np.inf]]), {},
     "y contains NaN or inf (first at row 1)"),
])
def test_inconsistent_data_is_reported(tmp_path, strict_numpy, x, y, kwargs, phrase):
    ds = h5_dataset(tmp_path, x, y)
    args = {"n_inputs": None, "n_outputs": None, **kwargs}
    assert_data_error(lambda: validate_dataset(ds, **args), "v.h5", phrase)
    ds.close()


def test_value_scan_reads_bounded_chunks_and_finds_the_first_bad_row(tmp_path, monkeypatch):
    x = np.ones((1000, 4), dtype=np.float32)
    x[[637, 900], 2] = np.inf
    ds = h5_dataset(tmp_path, x, np.zeros(1000, np.int64))
    monkeypatch.setattr(data.plan, "SCAN_BYTES", 100 * (4 * 4 + 8))    # 100 rows a chunk
    ds._x = RecordingDataset(ds._x)
    assert_data_error(lambda: validate_dataset(ds, 4, 1), "v.h5", "first at row 637")
    assert [s for s in ds._x.selections] == [slice(lo, lo + 100) for lo in range(0, 700, 100)]
    ds.close()


def test_integer_data_skips_the_value_scan_of_x(tmp_path, uint8_arrays):
    x, y = uint8_arrays
    ds = h5_dataset(tmp_path, x, y)
    ds._x = RecordingDataset(ds._x)
    validate_dataset(ds, 6, 4)
    assert ds._x.selections == []
    ds.close()


def selected_rows(selections: list, n: int) -> np.ndarray:
    """The rows that h5py was asked for, from recorded slices and index arrays."""
    rows = [np.arange(n)[s] if isinstance(s, slice) else np.asarray(s) for s in selections]
    return np.concatenate(rows) if rows else np.empty(0, np.int64)


def test_value_scans_read_only_the_ranks_share_and_each_rank_finds_its_own_bad_rows(tmp_path):
    n, size = 1000, 3
    x = np.ones((n, 4))
    x[700, 1] = np.nan                     # rank 2's share: 667..999
    y = np.arange(n) % 5
    y[400] = 9                             # rank 1's share: 334..666
    path = write_h5(tmp_path / "v.h5", x=x, y=y)
    found = []
    for rank in range(size):
        ds = HDF5Dataset(path)
        ds._x, ds._y = RecordingDataset(ds._x), RecordingDataset(ds._y)
        try:
            validate_dataset(ds, 4, 5, rank=rank, size=size)
            found.append(None)
        except DataError as e:
            found.append(str(e))
        lo, hi = shard_bounds(n, rank, size)
        for recorded in (ds._x, ds._y):
            rows = selected_rows(recorded.selections, n)
            assert np.all((rows >= lo) & (rows < hi)), (rank, recorded.name)
        if rank == 0:                      # a clean share is scanned whole: x and y
            np.testing.assert_array_equal(selected_rows(ds._x.selections, n), np.arange(lo, hi))
        ds.close()
    assert found[0] is None
    assert "labels y out of range: min 0, max 9; need 0..4 for 5 outputs" in found[1]
    assert "x contains NaN or inf (first at row 700)" in found[2]
    ds = HDF5Dataset(path)                 # one process (the defaults): every row is scanned
    assert_data_error(lambda: validate_dataset(ds, 4, 5), "v.h5", "min 0, max 9")
    ds.close()


def test_layout_checks_run_on_every_rank_even_one_whose_share_is_empty(tmp_path):
    ds = ArrayDataset(np.array([[np.nan, 1.0], [1.0, 1.0]]), np.array([0, 7]), source="v.npz")
    assert shard_bounds(2, 2, 3) == (2, 2)
    validate_dataset(ds, 2, 3, rank=2, size=3)              # no rows: no values to check
    assert_data_error(lambda: validate_dataset(ds, 5, 3, rank=2, size=3), "v.npz",
                      "x has 2 features but the network's input layer has 5")
    assert_data_error(lambda: validate_dataset(ds, 2, 3, rank=1, size=3), "v.npz",
                      "labels y out of range: min 7, max 7")
    assert_data_error(lambda: validate_dataset(ds, 2, 3, rank=0, size=3), "v.npz",
                      "x contains NaN or inf (first at row 0)")
