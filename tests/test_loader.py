"""The shard loader (background reads of this rank's rows) and `--in-memory`: the same rows as
the batch plan, read ahead while the step computes, errors at the right step, and memory bounded
by the batch rather than the data set (real files, real `mpiexec` processes). Its reused batch
buffers (reads into them, and no batch overwritten while held): tests/test_loader_buffers.py."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_mpi, run_py

from distbp import checkpoint, data, in_memory
from distbp.data import ArrayDataset, HDF5Dataset
from distbp.errors import DataError
from distbp.in_memory import place_in_memory
from distbp.loader import BatchPlan, ReaderError, ShardLoader

N_ROWS, N_FEATURES, BATCH, SEED = 600, 12, 37, 3
STEPS_PER_EPOCH = -(-N_ROWS // BATCH)          # 17: the last batch holds 8 rows
TRAIN_STEPS = STEPS_PER_EPOCH + 8              # into the second epoch


def write_chunked(path: Path, x: np.ndarray, y: np.ndarray, chunk_rows: int = 50) -> Path:
    """x and y in gzip-compressed chunks of `chunk_rows` rows, as `distbp data` writes them."""
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(chunk_rows, *x.shape[1:]), compression="gzip")
        f.create_dataset("y", data=y, chunks=(chunk_rows,), compression="gzip")
    return path


def teacher_file(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    ds = data.synthetic_teacher(N_ROWS, N_FEATURES, 4, seed=1)
    return write_chunked(path, ds.x, ds.y), ds.x, ds.y


def plan_rows(step: int, n: int, batch: int, rank: int, size: int, seed: int = SEED):
    """The rows docs/design.md's batch plan gives `rank` at global `step` (plan functions)."""
    epoch, in_epoch = divmod(step, -(-n // batch))
    return data.shard_indices(data.epoch_permutation(seed, epoch, n), in_epoch, batch, rank, size)


# ----------------------------------------------------------------------------- in process

class RowIds:
    """A data set whose row i is [i]: what a loader returns shows which rows it read."""

    n_features, x_dtype, y_dtype = 1, np.dtype(np.float64), np.dtype(np.int64)

    def __init__(self, n: int, read_s: float = 0.0, fail_on_call: int | None = None,
                 error: BaseException | None = None):
        self.n, self.source, self.read_s, self.y_shape = n, f"row-ids ({n} rows)", read_s, (n,)
        self.fail_on_call, self.error, self.calls, self.threads = fail_on_call, error, 0, set()

    def read_into(self, indices: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls += 1
        time.sleep(self.read_s)
        if self.calls == self.fail_on_call:
            raise self.error
        x[:, 0], y[:] = indices, indices


def test_loader_yields_the_batch_plan_rows_from_any_start_step_across_epochs():
    n, batch, size = 103, 10, 3
    for rank in range(size):
        plan = BatchPlan(SEED, -(-n // batch), batch, rank, size)
        ds = RowIds(n)
        with ShardLoader(ds, plan, start=7, stop=30) as shards:   # a resume mid-epoch 0
            got = [shards.get(step)[1].copy() for step in range(7, 30)]   # valid until next
        assert len(got) == 23
        for step, rows in zip(range(7, 30), got):
            np.testing.assert_array_equal(rows, plan_rows(step, n, batch, rank, size))
        assert ds.threads == {f"distbp-reader-{rank}"}       # never read on the main thread


def test_prefetch_overlaps_the_read_of_the_next_step_with_the_current_one():
    # Reads and "compute" take 50 ms each: in sequence 10 steps take 1.0 s, overlapped ~0.55 s.
    ds = RowIds(1000, read_s=0.05)
    started = time.perf_counter()
    with ShardLoader(ds, BatchPlan(0, 100, 10, 0, 1), start=0, stop=10) as shards:
        for step in range(10):
            shards.get(step)
            time.sleep(0.05)
    took = time.perf_counter() - started
    assert took < 0.85, f"10 steps took {took:.2f} s: reads did not overlap the steps"


def test_a_reader_error_surfaces_at_its_own_step_naming_the_source_and_the_thread_ends():
    ds = RowIds(1000, fail_on_call=4, error=KeyError("chunk 17"))   # the read of step index 3
    shards = ShardLoader(ds, BatchPlan(0, 100, 10, 0, 1), start=0, stop=10)
    for step in range(3):
        assert len(shards.get(step)[1]) == 10
    with pytest.raises(ReaderError, match=r"data file 'row-ids \(1000 rows\)'.* step 4 .*"
                                          r"KeyError: 'chunk 17'") as caught:
        shards.get(3)                                # progress lines count steps from 1
    assert isinstance(caught.value.__cause__, KeyError)
    shards._thread.join(2)
    assert not shards._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        shards.get(4)


def test_a_data_error_in_the_reader_is_raised_as_it_is():
    bad = DataError("data file 'd.h5': cannot read rows 5..9 (5 rows) of '/x': corrupt")
    shards = ShardLoader(RowIds(100, fail_on_call=1, error=bad), BatchPlan(0, 10, 10, 0, 1), 0, 5)
    with pytest.raises(DataError) as caught:
        shards.get(0)
    assert caught.value is bad


def test_close_stops_a_reader_waiting_on_a_full_queue_promptly():
    ds = RowIds(10_000)
    shards = ShardLoader(ds, BatchPlan(0, 1000, 10, 0, 1), start=0, stop=1000)
    shards.get(0)
    time.sleep(0.1)                                  # the reader fills the queue and waits
    started = time.perf_counter()
    shards.close()
    shards.close()                                   # idempotent
    assert not shards._thread.is_alive()
    assert time.perf_counter() - started < 1.0
    assert ds.calls <= 3                             # one consumed, one queued, one waiting


def test_an_unclosed_loader_does_not_hang_interpreter_exit(tmp_path):
    script = textwrap.dedent("""
        import numpy as np
        from distbp.loader import BatchPlan, ShardLoader

        class Rows:
            n, source, n_features, y_shape = 10_000, "rows", 2, (10_000,)
            x_dtype, y_dtype = np.dtype(float), np.dtype(int)
            def read_into(self, idx, x, y):
                x[:], y[:] = 0, idx

        loader = ShardLoader(Rows(), BatchPlan(0, 1000, 10, 0, 1), 0, 1000)
        loader.get(0)
        print("leaving")
    """)
    (tmp_path / "leave.py").write_text(script)
    done = run_py([str(tmp_path / "leave.py")], timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "leaving"


def test_in_memory_yes_auto_and_no_choose_the_source_and_auto_says_why(tmp_path, monkeypatch):
    path, x, y = teacher_file(tmp_path / "t.h5")
    rows = np.array([0, 5, 6, 599])
    loaded, note = place_in_memory(HDF5Dataset(path), "yes")
    assert isinstance(loaded, ArrayDataset) and note is None
    np.testing.assert_array_equal(loaded.read(rows)[0], x[rows])
    auto, note = place_in_memory(HDF5Dataset(path), "auto", local_size=2)
    assert isinstance(auto, ArrayDataset)
    assert note.startswith(f"--in-memory auto: '{path}' (x+y ") and "loaded into memory" in note
    monkeypatch.setattr(in_memory, "IN_MEMORY_MAX_BYTES", x.nbytes)   # x+y no longer fits
    on_disk, note = place_in_memory(HDF5Dataset(path), "auto")
    assert isinstance(on_disk, HDF5Dataset) and "read from disk batch by batch" in note
    np.testing.assert_array_equal(on_disk.read(rows)[1], y[rows])
    on_disk.close()
    kept, note = place_in_memory(HDF5Dataset(path), "no")
    assert isinstance(kept, HDF5Dataset) and note is None
    kept.close()


# ----------------------------------------------------------------------------- real runs

# Counts what is read from the data file on EVERY thread (start-up checks on the main thread,
# batches on the reader thread): each h5py read of x or y, at the h5py call distbp makes
# (Dataset.__getitem__ for rows, read_direct for whole loads), as (dataset, thread, rows).
RECORD_READS = """
import json, os, sys, threading
import h5py
import numpy as np
from distbp import cli

reads = []

def rows_of(n, sel):
    if isinstance(sel, tuple):          # (rows, columns...): the row selector comes first
        sel = sel[0] if sel else Ellipsis
    if sel is None or sel is Ellipsis:
        return np.arange(n)
    if isinstance(sel, slice):
        return np.arange(*sel.indices(n))
    return np.atleast_1d(np.asarray(sel, dtype=np.int64))

def record(ds, sel):
    if ds.name in ("/x", "/y"):
        reads.append((ds.name, threading.current_thread().name, rows_of(ds.shape[0], sel)))

getitem, read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

def counted_getitem(self, args, new_dtype=None):
    record(self, args)
    return getitem(self, args, new_dtype=new_dtype)

def counted_read_direct(self, dest, source_sel=None, dest_sel=None):
    record(self, source_sel)
    return read_direct(self, dest, source_sel, dest_sel)

h5py.Dataset.__getitem__, h5py.Dataset.read_direct = counted_getitem, counted_read_direct
code = cli.main(sys.argv[2:])
rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
np.savez(f"{sys.argv[1]}/reads-rank{rank}.npz", *[rows for _, _, rows in reads])
with open(f"{sys.argv[1]}/reads-rank{rank}.json", "w") as fh:
    json.dump([[name, thread] for name, thread, _ in reads], fh)
sys.exit(code)
"""


def write_contiguous(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """x and y stored contiguously: h5py reads exactly the rows asked for, no more (chunked
    data is read in whole chunks and, by distbp, in spans of nearby rows)."""
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
    return path


def train_args(path: Path, run_dir: Path, in_memory: str) -> list[str]:
    return ["train", "--data", str(path), "--in-memory", in_memory, "--dtype", "float64",
            "--steps", str(TRAIN_STEPS), "--batch-size", str(BATCH), "--seed", str(SEED),
            "--layers", f"{N_FEATURES},16,4", "--run-dir", str(run_dir), "--log-every", "100"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The same 2-rank run on float32 x: read out of core from a contiguous file (recording
    every read of the file), loaded into memory, and read out of core from a chunked file."""
    tmp = tmp_path_factory.mktemp("runs")
    chunked, x, y = teacher_file(tmp / "t.h5")
    assert x.dtype == np.float32                       # float x: start-up scans it for NaN/inf
    flat = write_contiguous(tmp / "flat.h5", x, y)
    (tmp / "record.py").write_text(RECORD_READS)
    runs = {"no": run_mpi(2, [str(tmp / "record.py"), str(tmp),
                              *train_args(flat, tmp / "no", "no")], timeout=120),
            "yes": run_mpi(2, ["-m", "distbp", *train_args(flat, tmp / "yes", "yes")],
                           timeout=120),
            "chunked": run_mpi(2, ["-m", "distbp", *train_args(chunked, tmp / "chunked", "no")],
                               timeout=120)}
    for mode, done in runs.items():
        assert done.returncode == 0, f"--in-memory {mode}:\n{done.stdout}\n{done.stderr}"
    return tmp


def test_out_of_core_and_in_memory_runs_end_in_bitwise_equal_checkpoints(two_rank_runs):
    name = checkpoint.checkpoint_path(".", TRAIN_STEPS).name
    no = checkpoint.load(two_rank_runs / "no" / "checkpoints" / name)
    assert no.params.dtype == np.float64 and no.step == TRAIN_STEPS
    for other in ("yes", "chunked"):
        got = checkpoint.load(two_rank_runs / other / "checkpoints" / name)
        assert no.params.tobytes() == got.params.tobytes(), other
        assert sorted(no.optimizer_state) == sorted(got.optimizer_state)
        for key, value in no.optimizer_state.items():
            assert value.tobytes() == got.optimizer_state[key].tobytes(), (other, key)
        assert [r["loss"] for r in no.metrics] == [r["loss"] for r in got.metrics], other


def recorded_reads(tmp: Path, rank: int) -> list[tuple[str, str, np.ndarray]]:
    names = json.loads((tmp / f"reads-rank{rank}.json").read_text())
    with np.load(tmp / f"reads-rank{rank}.npz") as f:
        return [(ds, thread, f[f"arr_{i}"]) for i, (ds, thread) in enumerate(names)]


def test_each_rank_reads_only_its_rows_of_the_file_on_any_thread_and_an_epoch_reads_all_once(
        two_rank_runs):
    epoch_rows = []
    for rank in range(2):
        reads = recorded_reads(two_rank_runs, rank)
        assert {thread for _, thread, _ in reads} == {"MainThread", f"distbp-reader-{rank}"}
        lo, hi = data.shard_bounds(N_ROWS, rank, 2)       # its contiguous share: rows lo..hi-1
        for name in ("/x", "/y"):
            start_up = [r for ds, t, r in reads if ds == name and t == "MainThread"]
            batches = [r for ds, t, r in reads if ds == name and t != "MainThread"]
            # start-up checks (x: NaN/inf, y: labels) read the share, never the whole file
            np.testing.assert_array_equal(np.unique(np.concatenate(start_up)), np.arange(lo, hi))
            if name == "/x":                                   # ... and x only once
                assert sum(map(len, start_up)) == hi - lo
            # training: one read per step, exactly the batch plan's rows, none ahead of the run
            assert len(batches) == TRAIN_STEPS, name
            for step, rows in enumerate(batches):
                np.testing.assert_array_equal(rows, plan_rows(step, N_ROWS, BATCH, rank, 2))
            if name == "/x":
                epoch_rows += batches[:STEPS_PER_EPOCH]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch_rows)), np.arange(N_ROWS))


CAPPED = """
import os, resource, sys
import h5py, numpy, threadpoolctl
from distbp import cli, comm, loader, session, trainer   # all a run imports, before the cap

margin = int(sys.argv[1])
vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (vm + margin, vm + margin))
print(f"address space capped at {(vm + margin) >> 20} MiB", flush=True)
sys.exit(cli.main(sys.argv[2:]))
"""


def test_training_out_of_core_stays_within_a_memory_cap_smaller_than_the_data(tmp_path):
    # RLIMIT_AS caps each rank's address space at (its VM after importing distbp) + MARGIN: the
    # ~810 MiB of x do not fit under it; MPI, the reader thread (stack, malloc arena), HDF5's
    # chunk cache (data.CHUNK_CACHE_BYTES) and a few batches do. Each rank reads 600 steps of
    # 128 rows of 16 KiB, 1.2 GiB, over 3x the margin: a loader that kept its batches (or a
    # step that kept its inputs) would run out of address space long before the end.
    margin, rows, features, batch, steps = 384 << 20, 52_000, 16_384, 256, 600
    path = tmp_path / "big.h5"
    block = np.random.default_rng(0).integers(0, 256, size=(512, features), dtype=np.uint8)
    with h5py.File(path, "w") as f:              # block by block: the test stays small too
        x = f.create_dataset("x", (rows, features), np.uint8, chunks=(1, features))
        f.create_dataset("y", data=np.arange(rows) % 10)
        for lo in range(0, rows, len(block)):
            x[lo:lo + len(block)] = block[:rows - lo]
    assert rows * features > 2 * margin
    assert steps * (batch // 2) * features > 3 * margin     # bytes of x each rank reads
    (tmp_path / "capped.py").write_text(CAPPED)
    args = [str(tmp_path / "capped.py"), str(margin), "train", "--data", str(path),
            "--steps", str(steps), "--batch-size", str(batch), "--layers", f"{features},2,10",
            "--scale", str(1 / 255), "--log-every", str(steps)]
    try:
        auto = run_mpi(2, [*args, "--in-memory", "auto", "--run-dir", str(tmp_path / "a")],
                       timeout=120)
        yes = run_mpi(2, [*args, "--in-memory", "yes", "--run-dir", str(tmp_path / "y")],
                      timeout=60)
    finally:
        path.unlink()                            # pytest keeps old tmp dirs: free the disk
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "is read from disk batch by batch" in auto.stdout
    assert (tmp_path / "a" / "checkpoints" / checkpoint.checkpoint_path(".", steps).name).exists()
    assert yes.returncode == 2, yes.stdout + yes.stderr
    need = (rows * features + rows * np.dtype(np.int64).itemsize) / 2**20   # x uint8, y int64
    assert (f"data file '{path}': --in-memory yes: x and y need {need:.1f} MiB, more than this "
            f"process can allocate; use --in-memory no (or auto)") in yes.stderr
