"""Training rows from the data source to the step: this rank's shard of every global batch, from
memory, or read one step ahead from a file by a background thread.

    plan = BatchPlan(seed, steps_per_epoch, batch_size, rank, size)
    with open_loader(train_ds, plan, start_step, total_steps) as loader:
        for step in range(start_step, total_steps):
            x, y = loader.get(step)        # from a file: read while step - 1 computed

Contract: a step's rows are exactly data.shard_indices(epoch_permutation(seed, epoch, n),
step_in_epoch, batch_size, rank, size), increasing; in reproducible mode (BatchPlan.parts) the
rank's run of micro-batches, each increasing (data.micro_cuts). The thread only reads (no MPI, no
preprocessing). Buffers are reused all run long, so a step allocates no rows; the arrays `get`
returns are valid until the next `get` (copy what you keep).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from distbp import data
from distbp.errors import UsageError

__all__ = ["BatchPlan", "MemoryLoader", "ReaderError", "ShardLoader", "open_loader"]

_POLL_S = 0.05                 # how often a waiting thread checks for close()
_JOIN_S = 10.0                 # close() waits this long for a read in progress to finish
_RING_SPARE = 2                # ring slots beyond the queue's depth: in use + being read
_open_loaders: weakref.WeakSet[ShardLoader] = weakref.WeakSet()


class ReaderError(RuntimeError):
    """A read in the background thread failed with an unexpected error; raised in the main
    thread at the step the rows belonged to, naming the data source (the cause is chained)."""


@dataclass(frozen=True)
class BatchPlan:
    """Which rows rank `rank` of `size` reads at each global step (docs/design.md's batch plan).
    `parts` > 0 (reproducible mode): each global batch is cut into that many micro-batches by
    position and the rank takes a contiguous run of them (data.micro_cuts)."""

    seed: int
    steps_per_epoch: int
    batch_size: int
    rank: int
    size: int
    parts: int = 0

    def shard_rows(self, n: int, start: int, stop: int
                   ) -> Iterator[tuple[int, np.ndarray, tuple[int, ...] | None]]:
        """(step, rows, cuts) for start <= step < stop: rows (k,) int64, views of the epoch's
        permutation whose shards are sorted when the epoch begins (no per-step array);
        cuts: the micro-batches' bounds in rows (each sorted alone), None without parts."""
        perm_epoch, perm = -1, np.empty(0, np.int64)
        for step in range(start, stop):
            epoch, in_epoch = data.step_cursor(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._sorted_shards(n, epoch), epoch
            lo, hi, cuts = self._shard_span(n, in_epoch)
            yield step, perm[lo:hi], cuts

    def cuts(self, n: int, step: int) -> tuple[int, ...] | None:
        """The micro-batches' bounds in this rank's rows of global `step` (None without parts)."""
        return self._shard_span(n, data.step_cursor(step, self.steps_per_epoch)[1])[2]

    def _shard_span(self, n: int, in_epoch: int) -> tuple[int, int, tuple[int, ...] | None]:
        """[lo, hi) of this rank's shard of step `in_epoch` in the epoch's permutation, and its
        micro-batches' bounds within it (None without parts)."""
        lo, hi = data.batch_bounds(in_epoch, n, self.batch_size)
        if self.parts:
            base, cuts = data.micro_cuts(hi - lo, self.parts, self.rank, self.size)
            return lo + base, lo + base + cuts[-1], cuts
        a, b = data.shard_bounds(hi - lo, self.rank, self.size)
        return lo + a, lo + b, None

    def _sorted_shards(self, n: int, epoch: int) -> np.ndarray:
        """The epoch's permutation, this rank's shards (each micro-batch, with parts) sorted in
        place (HDF5 wants increasing rows; the SUM ignores order): data.shard_indices' rows."""
        perm = data.epoch_permutation(self.seed, epoch, n)
        for in_epoch in range(self.steps_per_epoch):
            lo, hi, cuts = self._shard_span(n, in_epoch)
            for a, b in pairwise(cuts or (0, hi - lo)):
                perm[lo + a:lo + b].sort()
        return perm

    def most_rows(self, n: int) -> int:
        """The most rows this rank reads at one step: its share of an epoch's first batch,
        min(batch_size, n) rows (a later batch is that size or the smaller last one)."""
        lo, hi, _ = self._shard_span(n, 0)
        return hi - lo


class _BatchRing:
    """`slots` (x, y) buffer pairs of `rows` rows each, made at first use; step t is read into
    the first k rows (k <= rows, a C-contiguous prefix) of slot t % slots. A reader queueing up
    to `depth` batches needs depth + 2 slots: it fills t only after queueing t - 1, when the
    consumer (done with step s once it asks for s + 1) may still hold t - depth - 1, so the
    live batches t - depth - 1 .. t - 1 never include slot t % (depth + 2)."""

    def __init__(self, ds: data.Dataset, rows: int, slots: int):
        self.ds, self.rows = ds, rows
        self.slots: list[tuple[np.ndarray, np.ndarray] | None] = [None] * slots

    def buffers(self, step: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x (k, n_features) and y (k, ...) of step's slot, to be filled by `read_into`."""
        i = step % len(self.slots)
        slot = self.slots[i]
        if slot is None or len(slot[0]) < k:   # k > rows only for a plan that contradicts n
            slot = self.slots[i] = data.row_buffers(self.ds, max(k, self.rows))
        return slot[0][:k], slot[1][:k]


class ShardLoader:
    """This rank's (x, y) rows for steps start..stop-1, read by one daemon thread while the
    previous step computes (h5py releases the GIL inside HDF5's read, so the read overlaps the
    step's NumPy/BLAS work). x is (k, n_features) in the on-disk dtype, y (k,) or (k, outputs);
    both are views of the loader's ring buffers, valid until the next `get` (see _BatchRing).

    `get(step)` must be called for consecutive steps from `start`. An error in the thread is
    raised by the `get` of the step whose rows failed: a UsageError (e.g. DataError for a corrupt
    chunk) as it is, it names the file already; anything else as ReaderError naming the source.
    `close()` (also by `with`, and at interpreter exit) stops the thread; it is idempotent.
    """

    def __init__(self, ds: data.Dataset, plan: BatchPlan, start: int, stop: int, depth: int = 1):
        if not 0 <= start <= stop or depth < 1:
            raise ValueError(f"need 0 <= start <= stop and depth >= 1, got {start}, {stop}, "
                             f"{depth}")
        self.ds, self.plan, self.next_step, self.stop = ds, plan, start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._ring = _BatchRing(ds, plan.most_rows(ds.n), depth + _RING_SPARE)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"distbp-reader-{plan.rank}",
                                        daemon=True)
        _open_loaders.add(self)
        self._thread.start()

    # ------------------------------------------------------------------ the reader thread

    def _run(self) -> None:
        for step, rows, cuts in self.plan.shard_rows(self.ds.n, self.next_step, self.stop):
            if self._closing.is_set():
                return
            try:
                x, y = self._ring.buffers(step, len(rows))
                read_rows(self.ds, rows, cuts, x, y)
                item = (step, x, y, None)
            except BaseException as err:  # noqa: BLE001 -- handed to the main thread
                item = (step, None, None, err)
            if not self._put(item) or item[3] is not None:
                return

    def _put(self, item: tuple) -> bool:
        """Queue `item`, waiting while the queue is full; False when closed meanwhile."""
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    # ------------------------------------------------------------------ the main thread

    def get(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of global `step`: x (k, n_features), y (k, ...); k may be 0. Valid until
        the next `get`: the thread then reads a later step into the same buffers."""
        if step != self.next_step or step >= self.stop or self._closing.is_set():
            state = "closed" if self._closing.is_set() else f"next is {self.next_step}"
            raise RuntimeError(f"ShardLoader.get({step}): steps run {self.next_step}.."
                               f"{self.stop - 1} in order ({state})")
        got, x, y, err = self._take()
        assert got == step, (got, step)  # one producer, one consumer, in order
        self.next_step += 1
        if err is not None:
            self.close()
            if isinstance(err, UsageError):
                raise err
            raise ReaderError(f"data file {self.ds.source!r}: reading this rank's rows of step "
                              f"{step + 1} failed: {type(err).__name__}: {err}") from err
        return x, y

    def _take(self) -> tuple:
        # Wait in slices, so that a reader thread that died without a word cannot hang us.
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise ReaderError(f"data file {self.ds.source!r}: the background "
                                          f"reader stopped before step {self.next_step + 1}"
                                          ) from None

    def close(self) -> None:
        """Stop the thread: drop queued batches, wait for a read in progress (up to _JOIN_S)."""
        self._closing.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_S)
        _open_loaders.discard(self)

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryLoader:
    """ShardLoader's interface for rows in memory: `get` gathers the step's rows into one reused
    buffer pair itself (a thread's hand-off cost a third of a small network's step, in locks)."""

    def __init__(self, ds: data.Dataset, plan: BatchPlan, start: int, stop: int):
        self.ds, self.next_step, self.stop = ds, start, stop
        self._rows = plan.shard_rows(ds.n, start, stop)
        self._ring = _BatchRing(ds, plan.most_rows(ds.n), 1)

    def get(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of global `step`, as ShardLoader.get gives them (valid until the next)."""
        if step != self.next_step or step >= self.stop:
            raise RuntimeError(f"MemoryLoader.get({step}): steps run {self.next_step}.."
                               f"{self.stop - 1} in order")
        _, rows, cuts = next(self._rows)
        x, y = self._ring.buffers(step, len(rows))
        read_rows(self.ds, rows, cuts, x, y)
        self.next_step += 1
        return x, y

    def close(self) -> None:  # nothing to stop: ShardLoader's interface
        pass

    def __enter__(self) -> MemoryLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(ds: data.Dataset, rows: np.ndarray, cuts: tuple[int, ...] | None,
              x: np.ndarray, y: np.ndarray) -> None:
    """`rows` into x and y: in one read, or one per micro-batch (each increasing alone)."""
    if cuts is None:
        ds.read_into(rows, x, y)
        return
    for a, b in pairwise(cuts):
        ds.read_into(rows[a:b], x[a:b], y[a:b])


def open_loader(ds: data.Dataset, plan: BatchPlan, start: int, stop: int
                ) -> ShardLoader | MemoryLoader:
    """The loader for `ds`: MemoryLoader for rows in memory (arrays, --in-memory, subsets of
    them), else ShardLoader, whose thread reads the next step's rows from the file."""
    base = getattr(ds, "base", ds)  # a validation split's rows come from its base
    if isinstance(base, data.ArrayDataset):
        return MemoryLoader(ds, plan, start, stop)
    return ShardLoader(ds, plan, start, stop)


@atexit.register
def _close_open_loaders() -> None:
    # Registered after h5py's exit handler (h5py is imported first), so it runs before it: no
    # read is in flight while h5py shuts down. Daemon threads never block the exit itself.
    for loader in list(_open_loaders):
        loader.close()
