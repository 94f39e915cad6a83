"""The training loop: one step as data flows through it (docs/design.md),

    this rank's shard of the global batch -> forward/backward: gradient SUMS into one flat buffer
    (plus loss sum, sample count, correct count and a stop flag in the same buffer)
    -> ONE in-place Allreduce(SUM) -> divide by the global count -> optimizer step, same everywhere
    -> rank 0: metrics, progress, checkpoint

    trainer = Trainer(build_session(cfg, ...), comm, stop=catch_stop_signals())
    code = trainer.train()          # EXIT_OK, or EXIT_PREEMPTED after a stop signal's checkpoint

Preemption (SIGTERM, SIGUSR1, a first SIGINT) only sets a flag (distbp.stopflag); the flag rides
in the step's own allreduce, so all ranks see it at the same step, rank 0 writes a checkpoint,
and `train` returns EXIT_PREEMPTED.
"""

from __future__ import annotations

import hashlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distbp import checkpoint, data, preprocess
from distbp.early_stop import stop_reason
from distbp.errors import EXIT_OK, EXIT_PREEMPTED, CollectiveTimeout, NonFiniteError
from distbp.evaluation import loss_sums
from distbp.loader import BatchPlan, ShardLoader
from distbp.metrics import Interval, MetricsLog, Progress, format_train
from distbp.optim import clip_grad_norm
from distbp.session import Session, stored_config
from distbp.stopflag import StopFlag, catch_stop_signals

__all__ = ["Trainer"]

# The step's scalars, after the gradient in the one reduced buffer.
LOSS_SUM, ROWS, CORRECT, STOP = range(4)
TAIL = 4


@dataclass
class _RunLog:
    """Rank 0's metrics file (None elsewhere), progress display, a record every `every` steps."""
    metrics: MetricsLog | None
    progress: Progress
    every: int
    interval: Interval = field(default_factory=Interval)
    started: float = field(default_factory=time.perf_counter)  # the run's clock


class Trainer:
    """Runs a Session on a communicator. Only rank 0 writes checkpoints, metrics and progress."""

    def __init__(self, session: Session, comm, log=print, stop: StopFlag | None = None):
        self.s, self.comm, self.log = session, comm, log
        self.rank0 = comm.rank == 0
        net = session.net
        # One flat buffer: the gradient, then the step's scalars; reduced by ONE allreduce.
        self.buf = np.zeros(net.params.size + TAIL, net.dtype)
        self.grad, self.tail = self.buf[:net.params.size], self.buf[net.params.size:]
        self._sq = np.empty_like(self.grad) if session.cfg.clip_grad_norm else None  # scratch
        self._grad_norm: float | None = None  # the last step's, before clipping
        self._vals = [r for r in session.history if r.get("kind") == "val"]  # on every rank
        self.stop = stop or catch_stop_signals()
        self.loader: ShardLoader | None = None  # open while train() runs
        self.inputs = preprocess.Inputs(session.preprocess, net.n_inputs, net.dtype)
        self.phase_s = (0.0, 0.0, 0.0)  # the last step's forward+backward, allreduce, update
        self.last_checkpoint: Path | None = session.resumed_from
        self._log: _RunLog | None = None
        self._at_step = session.start_step  # 1-based step in progress, for error messages

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run to the end (EXIT_OK) or to a preemption checkpoint (EXIT_PREEMPTED); a collective
        that times out is re-raised as CollectiveTimeout naming the step. Overflow warnings are
        silenced: a diverging run stops with one NonFiniteError, not RuntimeWarnings per rank."""
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
                    self.open_loader():
                return self._train()
        except CollectiveTimeout:
            raise CollectiveTimeout(
                f"collective at step {self._at_step} did not complete within "
                f"{self.s.cfg.collective_timeout:g} s (--collective-timeout): a peer rank may "
                f"have died or hung") from None

    def records(self) -> list[dict]:
        """The run's metrics records so far, as metrics.jsonl holds them (rank 0; [] elsewhere)."""
        return list(self._log.metrics.history) if self._log and self._log.metrics else []

    def _train(self) -> int:
        """One step per pass: plan → forward/backward → allreduce → update (`step`) → metrics →
        validation → checkpoint. EXIT_PREEMPTED after a stop signal's checkpoint, else EXIT_OK."""
        s = self.s
        log = self._log = self._begin()
        step = s.start_step
        if step < s.total_steps and self._early_stop_reason() is not None:  # resumed after it
            return self._finish_early(step, log, saved=True)
        while step < s.total_steps:
            epoch = data.step_cursor(step, s.steps_per_epoch)[0]
            lr = self.step(step)
            step += 1
            tail = self.tail
            log.interval.add(float(tail[LOSS_SUM]), float(tail[CORRECT]), float(tail[ROWS]),
                             *self.phase_s[:2])
            self._report(step, epoch, lr, log)
            end_of_epoch = step % s.steps_per_epoch == 0
            if end_of_epoch and s.val is not None:
                self._validate(step, epoch, log)
                if step < s.total_steps and self._early_stop_reason() is not None:
                    return self._finish_early(step, log)
            if tail[STOP] > 0 and step < s.total_steps:  # at the last step: just finish
                return self._preempt(step, log)
            if self._checkpoint_due(step, end_of_epoch):
                self._save(step, log)  # checks the replicas first: a check step checks once
            elif s.cfg.check_every and step % s.cfg.check_every == 0:
                self.check_replicas(step)
        self._finish(log)
        return EXIT_OK

    def step(self, step: int) -> float:
        """Optimizer step `step` (0-based, global): this rank's shard, forward/backward, the ONE
        allreduce, the exact mean, clipping, the update. Returns its learning rate; `phase_s`
        holds its forward+backward, allreduce and update seconds (what `distbp bench` times)."""
        s = self.s
        self._at_step = step + 1
        x, y = self.loader.get(step)
        t0 = time.perf_counter()
        self._forward_backward(self.inputs(x), y)
        t1 = time.perf_counter()
        self.comm.allreduce_sum(self.buf)  # the one collective of the step
        t2 = time.perf_counter()
        self._check_finite(step)
        count = float(self.tail[ROWS])
        self.grad /= count  # the exact mean over the global batch
        if self._sq is not None:  # the same bits on every rank: the mean is the same
            self._grad_norm = clip_grad_norm(self.grad, s.cfg.clip_grad_norm, self._sq)
        lr = s.schedule.lr_at(step)
        s.optimizer.step(s.net.params, self.grad, s.opt_state, lr)
        self.phase_s = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        return lr

    def _forward_backward(self, x: np.ndarray, y: np.ndarray) -> None:
        """x (B, n_in), y (B,) or (B, n_out): this rank's shard -> gradient SUMS into self.grad,
        loss sum, rows, correct rows and the stop flag into self.tail (one buffer to reduce)."""
        net = self.s.net
        loss_sum = net.loss_grad_sum(x, y, self.grad)
        correct = net.count_correct(net.last_output, y) if len(y) else 0
        tail = self.tail  # element by element: no temporary array per step
        tail[LOSS_SUM], tail[ROWS], tail[CORRECT] = loss_sum, len(y), correct
        tail[STOP] = self.stop.signum is not None

    def _begin(self) -> _RunLog:
        """Before the first step: the preprocessing statistics (a collective), rank 0 moves aside
        checkpoints newer than the start (left by an earlier, longer run) and opens the metrics;
        the record in progress continues from the resumed checkpoint's sums."""
        s, cfg = self.s, self.s.cfg
        self._setup_preprocess()
        if self.rank0:
            moved = checkpoint.set_aside_newer(s.checkpoint_dir, s.start_step)
            if moved:
                self.log(f"moved {len(moved)} checkpoint(s) newer than step {s.start_step} "
                         f"(from an earlier run) to {moved[0].parent}")
        metrics = MetricsLog(s.metrics_path, s.history) if self.rank0 else None
        every = cfg.log_every or max(1, s.total_steps // 20)
        # the sums since the last record, as the resumed checkpoint left them: exact records
        return _RunLog(metrics, Progress(s.total_steps, every, mode=cfg.progress), every,
                       Interval(s.interval))

    def _report(self, step: int, epoch: int, lr: float, log: _RunLog) -> None:
        """Rank 0: a train record every `log.every` steps and at the last; the bar every step."""
        if not self.rank0:
            return
        if log.interval.steps and (step % log.every == 0 or step == self.s.total_steps):
            self._record(step, epoch, lr, log)
        loss = float(self.tail[LOSS_SUM]) / float(self.tail[ROWS])
        log.progress.step(step, f"loss {loss:.4f}")

    def _record(self, step: int, epoch: int, lr: float, log: _RunLog) -> None:
        """Rank 0: the train record of the steps in `log.interval` up to `step`, which restarts;
        with clipping, "grad_norm": `step`'s before clipping, if this process took that step."""
        record = log.interval.record(step, epoch, lr, time.perf_counter() - log.started)
        if self._grad_norm is not None:
            record["grad_norm"] = self._grad_norm
        log.metrics.write(record)
        log.progress.line(format_train(record, self.s.total_steps))
        log.interval.reset()

    def _preempt(self, step: int, log: _RunLog) -> int:
        """All ranks saw the stop flag in the same reduced buffer: checkpoint, EXIT_PREEMPTED."""
        self._save(step, log)
        if self.rank0:
            self.log(f"preempted by a signal: checkpoint at step {step} written; run "
                     f"again with --resume auto to continue ({self._signals_seen()})")
        self.comm.barrier()
        if not self.rank0 and self.stop.count > 1:  # counted while rank 0 saved
            print(f"distbp: warning: rank {self.comm.rank} received the stop signal "
                  f"{self.stop.count} times (last {self._signal_name()}): each rank should get "
                  f"it once; is it sent both directly and forwarded?", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED

    def _early_stop_reason(self) -> str | None:
        """Why to stop after the last validation (distbp.early_stop), or None: go on."""
        c = self.s.cfg
        return stop_reason(self._vals, c.early_stop, c.early_stop_metric, c.early_stop_min_delta)

    def _finish_early(self, step: int, log: _RunLog, saved: bool = False) -> int:
        """Every rank decided alike: the record of the steps since the last one (also those a
        resumed checkpoint carried), the final checkpoint (again if `saved` before it), EXIT_OK."""
        if (carried := log.interval.steps) and self.rank0:  # the loop's epoch, lr of `step`
            self._record(step, data.step_cursor(step - 1, self.s.steps_per_epoch)[0],
                         self.s.schedule.lr_at(step - 1), log)
        if not saved or carried:  # the file at `step` lacks that record: replace it (all ranks)
            self._save(step, log)
        if self.rank0:
            log.progress.line(self._early_stop_reason())
        self._finish(log)
        return EXIT_OK

    def _finish(self, log: _RunLog) -> None:
        """After the last step (or none: already there), close the metrics and meet every rank."""
        s = self.s
        if s.start_step >= s.total_steps and self.rank0:
            log.progress.line(f"nothing to do: already at step {s.start_step} of {s.total_steps}")
        if log.metrics:
            log.metrics.close()
        self.comm.barrier()

    def _signal_name(self) -> str:
        """'USR1', 'TERM': the last stop signal this rank received."""
        return signal.Signals(self.stop.signum).name.removeprefix("SIG")

    def _signals_seen(self) -> str:
        """'USR1 received 1 time(s) on rank 0': what reached this rank (the last signal's name)."""
        if self.stop.signum is None:
            return f"no signal on rank {self.comm.rank}: another rank got it"
        return f"{self._signal_name()} received {self.stop.count} time(s) on rank {self.comm.rank}"

    def _checkpoint_due(self, step: int, end_of_epoch: bool) -> bool:
        """Every --checkpoint-every steps (else at each epoch's end), and at the last step."""
        every = self.s.cfg.checkpoint_every
        return (step % every == 0 if every else end_of_epoch) or step == self.s.total_steps

    # ------------------------------------------------------------------ data

    def open_loader(self) -> ShardLoader:
        """This rank's shards of steps start..total, read one step ahead by a background thread
        (no MPI in it); closed by train() on every way out."""
        s, cfg = self.s, self.s.cfg
        plan = BatchPlan(cfg.seed, s.steps_per_epoch, cfg.batch_size, self.comm.rank,
                         self.comm.size)
        self.loader = ShardLoader(s.train, plan, s.start_step, max(s.start_step, s.total_steps))
        return self.loader

    def _setup_preprocess(self) -> None:
        """Scale: --scale, else the data file's `scale` attribute; mean/std over the training set,
        computed in parallel (or restored from the checkpoint)."""
        s, cfg = self.s, self.s.cfg
        scale = cfg.scale if cfg.scale is not None else getattr(s.train, "scale", None)
        if scale is not None:
            s.preprocess["scale"] = np.asarray(scale, s.net.dtype)
        if cfg.standardize and "mean" not in s.preprocess:
            scale = float(s.preprocess["scale"]) if "scale" in s.preprocess else None
            s.preprocess["mean"], s.preprocess["std"] = preprocess.feature_stats(
                s.train, self.comm, scale, s.net.dtype)

    # ------------------------------------------------------------------ checks and events

    def _check_finite(self, step: int) -> None:
        # All ranks hold the same reduced buffer, so they all agree to stop at this step.
        loss, grad_sum = float(self.tail[LOSS_SUM]), float(self.grad.sum())
        if not (math.isfinite(loss) and math.isfinite(grad_sum)):
            raise NonFiniteError(f"non-finite loss or gradient at step {step + 1}: the run "
                                 f"diverged (try a smaller --lr); the last good checkpoint is kept")

    def check_replicas(self, step: int) -> bool:
        """Compare every rank's parameters with rank 0's by checksum; re-broadcast on mismatch."""
        digest = hashlib.blake2b(self.s.net.params.data, digest_size=8).digest()
        h = int.from_bytes(digest, "little", signed=True) >> 1  # keep −h representable
        pair = np.array([h, -h], np.int64)
        self.comm.allreduce_max(pair)  # [max h, −min h]
        if pair[0] == -pair[1] == h:
            return True
        if self.rank0:
            self.log(f"replica check at step {step}: parameters differ between ranks; "
                     f"re-broadcasting rank 0's parameters and optimizer state")
        self.comm.bcast(self.s.net.params, root=0)
        for key in sorted(self.s.opt_state):
            if not key.startswith("_"):
                self.comm.bcast(self.s.opt_state[key], root=0)
        return False

    def _validate(self, step: int, epoch: int, log: _RunLog) -> None:
        """Exact loss and accuracy over the validation set (distbp.evaluation: each rank takes a
        contiguous share, one allreduce), recorded by rank 0 and kept for early stopping."""
        s, comm = self.s, self.comm
        lo, hi = data.shard_bounds(s.val.n, comm.rank, comm.size)
        totals = loss_sums(s.net, s.val, self.inputs, lo, hi, s.cfg.batch_size)
        comm.allreduce_sum(totals)  # the same totals on every rank
        n = max(totals[2], 1.0)
        record = {"kind": "val", "step": step, "epoch": epoch, "loss": totals[0] / n,
                  "accuracy": totals[1] / n, "samples": int(totals[2])}
        self._vals.append(record)
        if self.rank0:
            log.metrics.write(record)
            log.progress.line(f"validation after epoch {epoch}: loss {record['loss']:.4f} "
                              f"accuracy {record['accuracy']:.4f} ({record['samples']} samples)")

    def _save(self, step: int, log: _RunLog) -> None:
        """Check the replicas (repairing them), refuse non-finite ones, rank 0 writes the file."""
        self.check_replicas(step)
        # A finite gradient's update can still overflow; the replicas agree, so all ranks refuse.
        if not np.isfinite(self.s.net.params).all():
            raise NonFiniteError(f"non-finite parameters after step {step}: the run diverged "
                                 f"(try a smaller --lr); the last good checkpoint is kept")
        s = self.s
        self.last_checkpoint = checkpoint.checkpoint_path(s.checkpoint_dir, step)
        if not self.rank0:
            return
        epoch, in_epoch = data.step_cursor(step, s.steps_per_epoch)
        path = checkpoint.save(
            s.checkpoint_dir, step=step, epoch=epoch, step_in_epoch=in_epoch, seed=s.cfg.seed,
            layers=s.net.layers, activation=s.net.activation, output=s.net.output,
            loss=s.net.loss, params=s.net.params, optimizer_name=s.optimizer.name,
            optimizer_state=s.opt_state, config=stored_config(s.cfg), metrics=log.metrics.history,
            interval=log.interval.state(), world_size=self.comm.size, preprocess=s.preprocess,
            keep=s.cfg.keep)
        log.progress.line(f"checkpoint {path}")
