"""The batch plan (pure functions, no MPI) and the data sources with their validation."""

from __future__ import annotations

import io
import itertools

import h5py
import numpy as np
import pytest

from distbp import data
from distbp.data import (
    ArrayDataset,
    HDF5Dataset,
    batch_bounds,
    epoch_permutation,
    global_batch_count,
    open_dataset,
    shard_bounds,
    shard_indices,
    split_validation,
    step_cursor,
    steps_per_epoch,
    subset,
    synthetic_teacher,
    validate_dataset,
)
from distbp.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- batch plan

PLAN_NS = [1, 2, 3, 4, 5, 7, 10, 17, 64]
PLAN_BATCHES = [1, 2, 3, 4, 7, 16, 100]


def plan_cases():
    """(n, batch, drop_last) for which an epoch has at least one step."""
    for n, batch, drop_last in itertools.product(PLAN_NS, PLAN_BATCHES, (False, True)):
        if not (drop_last and batch > n):
            yield n, batch, drop_last


def test_steps_per_epoch_is_ceil_or_floor():
    for n, batch, drop_last in plan_cases():
        expected = n // batch if drop_last else (n + batch - 1) // batch
        assert steps_per_epoch(n, batch, drop_last) == expected


def test_steps_per_epoch_rejects_batch_larger_than_data_with_drop_last():
    with pytest.raises(ConfigError, match="exceeds the 5 rows"):
        steps_per_epoch(5, 6, drop_last=True)
    assert steps_per_epoch(5, 6, drop_last=False) == 1
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        steps_per_epoch(5, 0, drop_last=False)


def test_shard_bounds_give_the_first_count_mod_size_ranks_one_more():
    assert [shard_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [shard_bounds(2, r, 5) for r in range(5)] == [(0, 1), (1, 2), (2, 2), (2, 2), (2, 2)]
    assert shard_bounds(0, 0, 3) == (0, 0)
    with pytest.raises(ValueError):
        shard_bounds(4, 3, 3)


def test_batch_bounds_make_the_last_batch_partial():
    assert batch_bounds(0, 10, 4) == (0, 4)
    assert batch_bounds(2, 10, 4) == (8, 10)
    assert global_batch_count(2, 10, 4) == 2
    with pytest.raises(ValueError):
        batch_bounds(3, 10, 4)


def check_one_step(perm, step, batch, size, drop_last):
    """Assert the shard contract for one step; return the rows of all ranks."""
    n = len(perm)
    lo = step * batch
    count = min(batch, n - lo)
    assert global_batch_count(step, n, batch) == count
    where = np.empty(n, dtype=np.int64)
    where[perm] = np.arange(n)          # position of each row in the permutation
    shards = [shard_indices(perm, step, batch, r, size) for r in range(size)]
    sizes = [len(s) for s in shards]
    assert sizes == [count // size + (r < count % size) for r in range(size)]
    assert max(sizes) - min(sizes) <= 1
    next_position = lo
    for shard in shards:
        assert shard.dtype == np.int64
        assert np.all(np.diff(shard) > 0)               # sorted, no repeats
        positions = np.sort(where[shard])
        expected = np.arange(next_position, next_position + len(shard))
        np.testing.assert_array_equal(positions, expected)   # contiguous, in rank order
        next_position += len(shard)
    union = np.sort(np.concatenate(shards))
    np.testing.assert_array_equal(union, np.sort(perm[lo:lo + count]))
    return union


def test_shards_cover_every_sample_exactly_once_per_epoch():
    for (n, batch, drop_last), size in itertools.product(plan_cases(), range(1, 6)):
        perm = epoch_permutation(3, 1, n)
        steps = steps_per_epoch(n, batch, drop_last)
        rows = np.concatenate([check_one_step(perm, s, batch, size, drop_last)
                               for s in range(steps)])
        covered = steps * batch if drop_last else n
        assert len(rows) == covered, (n, batch, drop_last, size)
        np.testing.assert_array_equal(np.sort(rows), np.sort(perm[:covered]))


def test_union_of_shards_is_the_same_global_batch_for_any_number_of_ranks():
    perm = epoch_permutation(0, 0, 23)
    for step in range(steps_per_epoch(23, 5, False)):
        unions = [np.sort(np.concatenate([shard_indices(perm, step, 5, r, size)
                                          for r in range(size)])) for size in range(1, 6)]
        for union in unions[1:]:
            np.testing.assert_array_equal(union, unions[0])


def test_step_cursor_maps_a_global_step_to_epoch_and_step():
    steps = steps_per_epoch(10, 3, False)      # 4
    assert [step_cursor(s, steps) for s in (0, 3, 4, 9)] == [(0, 0), (0, 3), (1, 0), (2, 1)]


def test_epoch_permutation_is_deterministic_and_differs_across_epochs_and_seeds():
    a = epoch_permutation(7, 2, 1000)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, epoch_permutation(7, 2, 1000))
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    np.testing.assert_array_equal(a, np.random.default_rng([7, 2]).permutation(1000))
    assert not np.array_equal(a, epoch_permutation(7, 3, 1000))
    assert not np.array_equal(a, epoch_permutation(8, 2, 1000))
    with pytest.raises(ConfigError):
        epoch_permutation(-1, 0, 10)


# ----------------------------------------------------------------------------- sources

def write_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f[name] = value
    return str(path)


@pytest.fixture
def uint8_arrays():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 6), dtype=np.uint8)
    y = rng.integers(0, 4, size=50).astype(np.int64)
    return x, y


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


class RecordingDataset:
    """Stands in for an h5py.Dataset: records each selection, delegates the read."""

    def __init__(self, inner):
        self.inner, self.selections, self.name = inner, [], inner.name

    def __getitem__(self, selection):
        self.selections.append(selection)
        return self.inner[selection]


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
