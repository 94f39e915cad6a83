"""Allreduce in buckets while backward still runs: the communication of a step hidden behind its
computation, as Horovod and DDP do, for ranks whose links are slow (several nodes).

The step's one reduced buffer is [W_1 b_1 … W_L b_L | loss sum, rows, correct, stop]. Backward
produces the gradient from the END of the buffer down: layer L first, and within a layer Δb_j,
then ΔW_j, whole or (when the ranks span nodes: distbp.step) in blocks of rows, the last block
first (`Network.use_row_blocks`); after each it reports the offset from which the buffer is
complete (`Network.ready_offsets`). The buffer is cut into buckets at those offsets from its
end: bucket 0 holds the top of layer L (and the scalars, known after the forward pass), each
bucket at least `bucket_bytes` unless it reaches the buffer's start. As soon as backward has
reported a bucket's lowest offset, the bucket's in-place Iallreduce starts (before the layer's δ
goes down to the next); each report also tests the pending ones, which is what moves them on
(MPICH progresses a nonblocking collective only inside MPI calls; the blocks make those calls
frequent). `wait` returns when all
are done, before the update. (A progress thread entering MPI every 0.2 ms during the GEMMs was
tried and measured: no faster at 1 Gbit/s than these tests, 1.4 ms a step slower on one-core
nodes, and it needs MPI_THREAD_MULTIPLE; MPICH's own, MPIR_CVAR_ASYNC_PROGRESS=1, spins and was
slower still.)

    buckets = Buckets(trainer.buf, net, bucket_bytes=1 << 20, comm=comm)
    loss = net.forward_loss(x, y, grad)          # then the scalars into the buffer's tail
    for j in range(net.depth, 0, -1):
        net.backward_layer(j, grad, buckets.ready)   # starts each bucket as it completes
    buckets.wait()                               # the buffer holds the sums, as one allreduce's

Each element is summed across the same ranks as by one allreduce of the whole buffer: on two
ranks bitwise the same (a + b), on more within summation order (the MPI library may pick another
algorithm for another message size).
"""

from __future__ import annotations

import time

import numpy as np

from distbp.trace import ALLREDUCE, Tracer

__all__ = ["Buckets", "bucket_bounds", "bucket_bytes", "bucket_name"]


def bucket_bytes(cfg, comm) -> int | None:
    """The smallest bucket for a run (--bucket-mb), or None: one allreduce after backward.
    --overlap auto considers overlapping only when the ranks span several nodes (on one node
    shared memory makes one blocking allreduce as fast) and then measures both (`Buckets`)."""
    on = cfg.overlap == "on" or (cfg.overlap == "auto" and comm.size > comm.local_size)
    return max(1, int(cfg.bucket_mb * (1 << 20))) if on else None


# --overlap auto across nodes: after TRIAL_WARMUP steps, TRIAL_STEPS steps alternate with and
# without overlap; overlap stays if its median step (the slowest rank's) was at least
# TRIAL_MARGIN shorter: a near tie goes to the one blocking allreduce (on unshaped links the
# trial's medians came within 1 % while overlap's steady steps were 8 % slower). Whether
# hiding the communication pays depends on the link and on spare CPU: measured on emulated
# nodes of one core, overlap won 8-12 % on 1 Gbit/s links and lost 19-20 % on unshaped ones,
# where moving the bytes takes the core the computation needs.
TRIAL_WARMUP, TRIAL_STEPS, TRIAL_MARGIN = 2, 8, 0.05


def bucket_bounds(offsets, itemsize: int, bucket_bytes: int, size: int) -> dict[int, slice]:
    """{offset: the slice of the buffer (`size` elements, the scalars after the gradient) that
    is complete once backward has reported `offset`}, for the decreasing ready `offsets` (the
    last is 0): buckets cut at them from the end, each of at least `bucket_bytes` unless it
    reaches the buffer's start."""
    bounds, stop, gathered, above = {}, size, 0, size
    for at in offsets:
        gathered += (above - at) * itemsize
        above = at
        if gathered >= bucket_bytes or at == 0:
            bounds[at] = slice(at, stop)
            stop, gathered = at, 0
    return bounds


def bucket_name(bucket: slice, starts: list[int], grad_size: int) -> str:
    """"allreduce of layers 2-3" for a bucket, from the layers' start offsets in the gradient
    (Network.layer_starts); "(part)" when it begins inside its lowest layer's ΔW."""
    low = max(j for j, at in enumerate(starts, 1) if at <= bucket.start)
    top = max(j for j, at in enumerate(starts, 1) if at < min(bucket.stop, grad_size))
    name = f"allreduce of layer {low}" if low == top else f"allreduce of layers {low}-{top}"
    return name + (" (part)" if bucket.start != starts[low - 1] else "")


class Buckets:
    """The pending bucket allreduces of one step over `buf` (C-contiguous, 1-D; `net`'s gradient
    then the scalars). With one bucket (`bucket_bytes` None: no overlap) nothing starts early
    and `wait` is one blocking allreduce of the whole buffer, the step's one collective as
    without buckets. Each bucket's allreduce goes into `tracer` from its start to when this
    rank saw it complete."""

    def __init__(self, buf: np.ndarray, net, bucket_bytes: int | None, comm,
                 tracer: Tracer | None = None, trial: bool = False, log=None):
        self.buf, self.comm, self.trace = buf, comm, tracer or Tracer(False)
        self.bounds = bucket_bounds(net.ready_offsets(), buf.itemsize,
                                    bucket_bytes or buf.nbytes, buf.size)
        self.overlap = len(self.bounds) > 1  # this step's mode
        # --overlap auto across nodes: the modes of the trial's steps, then the choice
        self.trial = ([True] * TRIAL_WARMUP + [True, False] * (TRIAL_STEPS // 2)
                      if trial and self.overlap else [])
        self._trial_s: dict[bool, list[float]] = {True: [], False: []}
        self._log = log or (lambda _: None)
        self.names = {at: bucket_name(b, net.layer_starts, net.params.size)
                      for at, b in self.bounds.items()}
        self._views = {at: buf[b] for at, b in self.bounds.items()}  # made once, not per step
        self.pending: list = []  # [request, name, started, completed or None]

    def begin_step(self) -> None:
        """Before a step's backward: in --overlap auto's trial, its mode."""
        if self.trial:
            self.overlap = self.trial[0]

    def end_step(self, seconds: float) -> None:
        """After a step's allreduce (`seconds`: its forward, backward and allreduce): in the
        trial, record it; after the trial's last step, every rank takes the same mode (the
        slowest rank's medians, one small allreduce): overlap if TRIAL_MARGIN faster."""
        if not self.trial:
            return
        if len(self.trial) <= TRIAL_STEPS:  # past the warm-up
            self._trial_s[self.trial[0]].append(seconds)
        self.trial.pop(0)
        if not self.trial:
            medians = np.array([np.median(self._trial_s[True]), np.median(self._trial_s[False])])
            self.comm.allreduce_max(medians)
            self.overlap = bool(medians[0] < (1 - TRIAL_MARGIN) * medians[1])
            self._log(f"overlap auto: {'on' if self.overlap else 'off'} (measured "
                      f"{1e3 * medians[0]:.2f} ms a step with buckets during backward, "
                      f"{1e3 * medians[1]:.2f} ms with one allreduce after it)")

    def ready(self, at: int) -> None:
        """Backward has completed the buffer from offset `at` on: start the bucket that makes
        complete, progress the others."""
        if not self.overlap:
            return
        bucket = self.bounds.get(at)
        if bucket is not None:
            request = self.comm.start_allreduce_sum(self._views[at])
            self.pending.append([request, self.names[at], time.perf_counter(), None])
        for p in self.pending:
            if p[3] is None and self.comm.test(p[0]):
                p[3] = time.perf_counter()

    def wait(self) -> None:
        """Until every bucket of the step is summed across the ranks."""
        start = time.perf_counter()
        if not self.overlap:
            self.comm.allreduce_sum(self.buf)  # the step's one collective
            self.trace.span("allreduce", start, time.perf_counter(), ALLREDUCE)
            return
        for p in self.pending:
            if p[3] is None:
                self.comm.wait_all([p[0]])
                p[3] = time.perf_counter()
            self.trace.span(p[1], p[2], p[3], ALLREDUCE)
        self.pending.clear()
