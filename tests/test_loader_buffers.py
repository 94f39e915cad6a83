"""The loader's reused batch buffers: every source reads rows into a caller's buffer exactly as
it reads them into new arrays, the ring of depth + 2 buffers never overwrites a batch the
consumer still holds (and the check would catch a ring one buffer short), and in steady state a
step allocates no rows."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.memory import peak_growth

from distbp import data, loader
from distbp.data import ArrayDataset, HDF5Dataset
from distbp.loader import BatchPlan, ShardLoader

N_ROWS, N_FEATURES, BATCH, SEED = 600, 12, 37, 3
STEPS_PER_EPOCH = -(-N_ROWS // BATCH)          # 17: the last batch holds 8 rows (4 on rank 0)


def write_chunked(path: Path, x: np.ndarray, y: np.ndarray, chunk_rows: int) -> Path:
    """x and y in gzip-compressed chunks of `chunk_rows` rows, as `distbp data` writes them."""
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(chunk_rows, *x.shape[1:]), compression="gzip")
        f.create_dataset("y", data=y, chunks=(chunk_rows, *y.shape[1:]), compression="gzip")
    return path


def write_contiguous(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
    return path


def plan_rows(step: int) -> np.ndarray:
    """Rank 0 of 2's rows at global `step`, from docs/design.md's batch plan functions."""
    epoch, in_epoch = divmod(step, STEPS_PER_EPOCH)
    return data.shard_indices(data.epoch_permutation(SEED, epoch, N_ROWS), in_epoch, BATCH, 0, 2)


@pytest.mark.parametrize("gap_rows, most_rows", [(None, None), (3, 50), ("contiguous", None)])
def test_hdf5_reads_return_exactly_the_rows_asked_for_as_new_arrays_or_into_a_buffer(
        tmp_path, monkeypatch, gap_rows, most_rows):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(1000, 4, 3), dtype=np.uint8)    # images: rows of 4x3
    y = rng.integers(0, 10, size=(1000, 2))                        # 2-D targets
    if gap_rows == "contiguous":  # h5py reads exactly the selection (read_direct for a buffer)
        ds = HDF5Dataset(write_contiguous(tmp_path / "f.h5", x, y))
    else:
        if gap_rows:  # small slices: many cuts, at gaps and at span boundaries (x rows: 12 B)
            monkeypatch.setattr(data.hdf5, "_GAP_BYTES", 12 * gap_rows)
            monkeypatch.setattr(data.hdf5, "SPAN_BYTES", 12 * most_rows)
        ds = HDF5Dataset(write_chunked(tmp_path / "c.h5", x, y, chunk_rows=64))
        assert ds._x.id.get_access_plist().get_chunk_cache()[1] == data.CHUNK_CACHE_BYTES
    xb, yb = data.row_buffers(ds, 1000)                    # a loader's buffer: rows 0..k-1 used
    for idx in (np.sort(rng.permutation(1000)[:k]) for k in (0, 1, 2, 63, 64, 65, 500, 1000)):
        xr, yr = ds.read(idx)
        np.testing.assert_array_equal(xr, x.reshape(1000, 12)[idx])
        np.testing.assert_array_equal(yr, y[idx])
        xb.fill(7)
        ds.read_into(idx, xb[:len(idx)], yb[:len(idx)])
        assert xr.tobytes() == xb[:len(idx)].tobytes() and yr.tobytes() == yb[:len(idx)].tobytes()
        assert np.all(xb[len(idx):] == 7)                  # nothing written past the rows
    ds.close()


def test_in_memory_and_subset_sources_read_into_a_buffer_what_read_returns(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.random((50, 3), dtype=np.float32), rng.integers(0, 4, 50)
    base = ArrayDataset(x, y)
    on_disk = HDF5Dataset(write_chunked(tmp_path / "c.h5", x, y, chunk_rows=4))
    sources = {"memory": base, "sorted subset of a file": data.subset(on_disk, np.arange(3, 50, 2)),
               "shuffled subset": data.subset(base, rng.permutation(50)[:30])}  # base rows jump
    for name, ds in sources.items():
        idx = np.sort(rng.permutation(ds.n)[:11])
        xr, yr = ds.read(idx)
        xb, yb = data.row_buffers(ds, 20)
        ds.read_into(idx, xb[:11], yb[:11])
        assert xb[:11].tobytes() == xr.tobytes() and yb[:11].tobytes() == yr.tobytes(), name
    np.testing.assert_array_equal(xr, x[sources["shuffled subset"].rows[idx]])
    with pytest.raises(IndexError, match=r"row indices must be in \[0, 50\), got 49\.\.50"):
        base.read_into(np.array([49, 50]), xb[:2], yb[:2])     # take(mode="wrap") would wrap
    on_disk.close()


# ----------------------------------------------------------------------------- reused buffers

def every_source(tmp_path: Path, x: np.ndarray, y: np.ndarray, kind: str) -> data.Dataset:
    """x and y as each kind of source the loader reads: in memory, an HDF5 file chunked (span
    reads) or contiguous (read_direct), or the even rows of a chunked file (a subset)."""
    if kind == "memory":
        return ArrayDataset(x, y)
    if kind == "contiguous":
        return HDF5Dataset(write_contiguous(tmp_path / "f.h5", x, y))
    if kind == "chunked":
        return HDF5Dataset(write_chunked(tmp_path / "c.h5", x, y, chunk_rows=8))
    both_x, both_y = np.repeat(x, 2, axis=0), np.repeat(y, 2, axis=0)
    both_x[1::2], both_y[1::2] = -1, -1                # odd rows: not the subset's
    base = HDF5Dataset(write_chunked(tmp_path / "s.h5", both_x, both_y, chunk_rows=8))
    return data.subset(base, np.arange(0, 2 * len(x), 2))


class Counted:
    """A source that counts the batches read into the loader's buffers: how far ahead the
    reader thread is."""

    def __init__(self, ds: data.Dataset):
        self.ds, self.done = ds, 0

    def __getattr__(self, name: str):
        return getattr(self.ds, name)

    def read_into(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        self.ds.read_into(indices, x, y)
        self.done += 1


def held_batches_checked(ds: data.Dataset, x: np.ndarray, y: np.ndarray, depth: int,
                         steps: int) -> tuple[list[int], set[int]]:
    """Rank 0 of 2 takes each step's batch, then holds it (a slow step) until the reader is
    as far ahead as the queue lets it (depth batches queued and one more read, waiting to be
    queued), then compares it with its rows of x and y indexed directly. Returns the steps whose
    batch differed and the addresses of the x buffers the loader handed out."""
    plan, counted = BatchPlan(SEED, STEPS_PER_EPOCH, BATCH, 0, 2), Counted(ds)
    changed, addresses = [], set()
    with ShardLoader(counted, plan, 0, steps, depth=depth) as shards:
        for step in range(steps):
            xb, yb = shards.get(step)
            deadline = time.monotonic() + 5.0
            while counted.done < min(step + depth + 2, steps) and time.monotonic() < deadline:
                time.sleep(0.0005)
            rows = plan_rows(step)
            if xb.tobytes() != x[rows].tobytes() or yb.tobytes() != y[rows].tobytes():
                changed.append(step)
            addresses.add(xb.__array_interface__["data"][0])
    return changed, addresses


@pytest.mark.parametrize("kind", ["memory", "chunked", "contiguous", "subset"])
@pytest.mark.parametrize("depth", [1, 3])
def test_a_held_batch_is_never_overwritten_and_depth_plus_two_buffers_serve_every_step(
        tmp_path, kind, depth):
    ds = data.synthetic_teacher(N_ROWS, N_FEATURES, 4, seed=1)
    steps = 3 * STEPS_PER_EPOCH                          # three epochs, each with a short batch
    changed, addresses = held_batches_checked(every_source(tmp_path, ds.x, ds.y, kind),
                                              ds.x, ds.y, depth, steps)
    assert changed == []
    assert len(addresses) == depth + 2                   # reused all run long, none made anew


@pytest.mark.parametrize("kind", ["memory", "chunked"])
def test_the_held_batch_check_catches_a_ring_one_buffer_short(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(loader, "_RING_SPARE", 1)        # depth + 1 buffers: one too few
    ds = data.synthetic_teacher(N_ROWS, N_FEATURES, 4, seed=1)
    changed, _ = held_batches_checked(every_source(tmp_path, ds.x, ds.y, kind), ds.x, ds.y, 1,
                                      STEPS_PER_EPOCH)
    assert changed == list(range(STEPS_PER_EPOCH - 2))  # all but the last two: nothing after


@pytest.mark.parametrize("kind", ["memory", "chunked", "contiguous", "subset"])
def test_a_loader_in_steady_state_allocates_no_rows(tmp_path, kind):
    # Rows of 16 KiB: a rank's batch (32 rows) is 512 KiB. tracemalloc sees NumPy's buffers on
    # every thread; a read into a new array per step would raise the peak by >= 512 KiB. What
    # remains per step is index arrays of 8 bytes a row and small objects (h5py's registry of
    # HDF5 ids grows to ~40 KiB, then stays): well under a quarter of a batch.
    n, width, batch = 256, 4096, 64
    rng = np.random.default_rng(2)
    x, y = rng.random((n, width), dtype=np.float32), rng.integers(0, 10, n)
    ds = every_source(tmp_path, x, y, kind)
    plan = BatchPlan(SEED, n // batch, batch, 0, 2)
    with ShardLoader(ds, plan, 0, 60) as shards:
        for step in range(12):                           # 3 epochs: ring and span readers made
            shards.get(step)
        grew = peak_growth(shards.get, range(12, 60))
    assert grew < (batch // 2) * width * 4 // 4, f"peak grew by {grew} bytes"
