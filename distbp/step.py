"""One optimizer step over this rank's shard of the global batch, as data flows through it:

    rows -> inputs (preprocessing) -> forward -> δ_L -> backward, layer by layer, each layer's
    gradient SUMS into one flat buffer [gradient | loss sum, rows, correct, stop], a bucket's
    allreduce started as soon as backward has written it (distbp.overlap; without overlap: ONE
    Allreduce(SUM) after backward) -> divide by the global count -> clip -> update (plain SGD:
    the divide folded into the update, w − (α/N)·ΣΔw)

    step = Step(session, comm, stop, tracer)
    lr = step(x, y, 41)       # optimizer step 41 (0-based) on this rank's rows x, y
    step.tail[LOSS_SUM]       # the global loss sum of the step, identical on every rank

Every rank holds the same reduced buffer afterwards, so every decision taken from it (a
non-finite loss, the stop flag) is the same on every rank, at the same step.
"""

from __future__ import annotations

import math
import time

import numpy as np

from distbp import preprocess
from distbp.data import shard_bounds
from distbp.errors import NonFiniteError
from distbp.network import DW_BLOCK_ELEMS
from distbp.optim import clip_grad_norm
from distbp.ordered_sum import OrderedSum
from distbp.overlap import Buckets, bucket_bytes
from distbp.session import Session
from distbp.stopflag import StopFlag
from distbp.trace import Tracer

__all__ = ["CORRECT", "LOSS_SUM", "ROWS", "STOP", "TAIL", "Step"]

TAIL = 4
LOSS_SUM, ROWS, CORRECT, STOP = range(TAIL)  # the step's scalars, after the gradient


class Step:
    """The buffers of a run's steps (allocated once) and the step itself."""

    def __init__(self, session: Session, comm, stop: StopFlag, tracer: Tracer, log=None):
        self.s, self.comm, self.stop, self.trace = session, comm, stop, tracer
        net = session.net
        # One flat buffer: the gradient, then the step's scalars; reduced by ONE allreduce.
        self.buf = np.zeros(net.params.size + TAIL, net.dtype)
        self.grad, self.tail = self.buf[:net.params.size], self.buf[net.params.size:]
        # reduced in buckets while backward runs (distbp.overlap), or all at once
        cfg = session.cfg
        # ΔW in blocks of rows only across nodes, whatever --overlap says (so on and off give
        # the same bits): blocks cost a little compute and change a GEMM's bits; never in
        # reproducible mode, whose bits must not depend on where the ranks run
        across = comm.size > comm.local_size and not cfg.reproducible
        net.use_row_blocks(DW_BLOCK_ELEMS if across else None)
        self.buckets = Buckets(self.buf, net, bucket_bytes(cfg, comm), comm, tracer,
                               trial=cfg.overlap == "auto" and not cfg.reproducible, log=log)
        # reproducible mode: micro-batches summed along one tree whatever the rank count
        self.ordered = OrderedSum(comm, self.buf.size, cfg.micro_batches, net.dtype) \
            if cfg.reproducible else None
        self.pieces = cfg.accumulate  # without it: pieces of this rank's shard, one by one
        self._at_piece = 0  # the piece backward is in
        self._piece = np.empty_like(self.grad) if self.pieces > 1 else None  # a piece's sums
        self._complete_from = net.params.size  # in a piece's backward: grad[this:] is written
        self._sq = np.empty_like(self.grad) if cfg.clip_grad_norm else None  # scratch
        # plain SGD (w − α·Δw, no momentum, decay or clipping) takes the mean in its multiply
        self._fold_mean = (cfg.optimizer == "sgd" and not cfg.momentum and not cfg.weight_decay
                           and not cfg.clip_grad_norm)
        self.grad_norm: float | None = None  # the last step's, before clipping
        self.inputs = preprocess.Inputs(session.preprocess, net.n_inputs, net.dtype)
        self.phase_s = (0.0, 0.0, 0.0)  # the last step's forward+backward, allreduce, update

    def __call__(self, x: np.ndarray, y: np.ndarray, step: int,
                 cuts: tuple[int, ...] | None = None) -> float:
        """Optimizer step `step` (0-based, global) on this rank's rows: returns its learning
        rate; `phase_s` holds its forward+backward, allreduce and update seconds. `cuts`: the
        bounds of the rows' micro-batches (reproducible mode: BatchPlan.cuts)."""
        s = self.s
        t0 = time.perf_counter()
        if self.ordered is not None:
            self._ordered_sums(self.inputs(x), y, cuts)
            t1 = t0 + self.ordered.compute_s
        else:
            self.buckets.begin_step()
            self._forward_backward(self.inputs(x), y)  # buckets start as layers finish
            t1 = time.perf_counter()
            self.buckets.wait()  # the step's sums: ONE allreduce, or the last buckets' ends
            self.buckets.end_step(time.perf_counter() - t0)
        t2 = time.perf_counter()
        self._check_finite(step)
        count = float(self.tail[ROWS])
        lr = s.schedule.lr_at(step)
        if self._fold_mean:  # w − (α/N)·ΣΔw: the mean's divide folded into the update's multiply
            s.optimizer.step(s.net.params, self.grad, s.opt_state, lr / count, spend_grad=True)
        else:
            self.grad /= count  # the exact mean over the global batch
            if self._sq is not None:  # the same bits on every rank: the mean is the same
                self.grad_norm = clip_grad_norm(self.grad, s.cfg.clip_grad_norm, self._sq)
            s.optimizer.step(s.net.params, self.grad, s.opt_state, lr)
        t3 = time.perf_counter()
        self.phase_s = (t1 - t0, t2 - t1, t3 - t2)
        self.trace.span("wait for the allreduce", t1, t2)
        self.trace.span("update", t2, t3)
        return lr

    def _forward_backward(self, x: np.ndarray, y: np.ndarray) -> None:
        """x (B, n_in), y (B,) or (B, n_out): this rank's shard -> gradient SUMS into self.grad,
        loss sum, rows, correct rows and the stop flag into self.tail (one buffer to reduce),
        each layer handed to the buckets as soon as backward has produced it (in the last of
        --accumulate's pieces, each piece's sums added as its backward produces them)."""
        net, trace, tail = self.s.net, self.trace, self.tail
        loss_sum = correct = 0.0
        for k in range(self.pieces):
            a, b = shard_bounds(len(y), k, self.pieces) if self.pieces > 1 else (0, len(y))
            xk, yk = x[a:b], y[a:b]
            self._at_piece, self._complete_from = k, net.params.size
            into = self.grad if k == 0 else self._piece
            t = time.perf_counter()
            loss_sum += net.forward_loss(xk, yk, into)
            correct += net.count_correct(net.last_output, yk) if len(yk) else 0
            t = trace.span("forward", t, time.perf_counter())
            if k == self.pieces - 1:  # element by element: no temporary array per step
                tail[LOSS_SUM], tail[ROWS], tail[CORRECT] = loss_sum, len(y), correct
                tail[STOP] = self.stop.signum is not None
            for j in range(net.depth, 0, -1):
                net.backward_layer(j, into, self._layer_ready)
                t = trace.span(trace.layer_names[j], t, time.perf_counter())

    def _layer_ready(self, at: int) -> None:
        """Backward wrote piece `_at_piece`'s gradient from offset `at` on: add a later piece's
        new part into the step's sums; in the last piece, hand it to the buckets (which may
        start an allreduce while backward goes on)."""
        k = self._at_piece
        if k:
            done = slice(at, self._complete_from)
            self.grad[done] += self._piece[done]
        self._complete_from = at
        if k == self.pieces - 1:
            self.buckets.ready(at)

    def _ordered_sums(self, x: np.ndarray, y: np.ndarray, cuts: tuple[int, ...]) -> None:
        """Reproducible mode: the rank's micro-batches, one forward/backward each, into the
        step's buffer as sums along distbp.ordered_sum's tree (the same bits on any number of
        ranks); the stop flag rides in the rank's first micro-batch."""
        net, trace, first = self.s.net, self.trace, self.ordered.first
        size = net.params.size

        def micro_batch(m: int, buf: np.ndarray) -> None:
            a, b = cuts[m - first], cuts[m - first + 1]
            grad = buf[:size]
            t = time.perf_counter()
            buf[size + LOSS_SUM] = net.forward_loss(x[a:b], y[a:b], grad)
            buf[size + CORRECT] = net.count_correct(net.last_output, y[a:b]) if b > a else 0
            buf[size + ROWS] = b - a
            buf[size + STOP] = m == first and self.stop.signum is not None
            t = trace.span("forward", t, time.perf_counter())
            for j in range(net.depth, 0, -1):
                net.backward_layer(j, grad)
                t = trace.span(trace.layer_names[j], t, time.perf_counter())

        self.ordered.reduce(micro_batch, self.buf)

    def _check_finite(self, step: int) -> None:
        """Stop every rank at the step whose loss is NaN or infinite (all hold the same reduced
        sum, so all agree). The gradient is not scanned: a non-finite gradient makes non-finite
        parameters, whose next loss is non-finite, and a checkpoint refuses them (Trainer._save)."""
        if not math.isfinite(float(self.tail[LOSS_SUM])):
            raise NonFiniteError(f"non-finite loss at step {step + 1}: the run diverged (try a "
                                 f"smaller --lr); the last good checkpoint is kept")
