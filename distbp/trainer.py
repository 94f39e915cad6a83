"""The training loop: one step as data flows through it (docs/design.md),

    this rank's shard of the global batch -> forward/backward: gradient SUMS into one flat buffer
    (plus loss sum, sample count, correct count and a stop flag in the same buffer)
    -> ONE in-place Allreduce(SUM) (or buckets of it while backward runs: distbp.overlap)
    -> divide by the global count -> optimizer step, same everywhere -> rank 0: metrics, checkpoint

    code = Trainer(session, comm, stop=catch_stop_signals()).train()   # EXIT_OK or EXIT_PREEMPTED

A stop signal (SIGTERM, SIGUSR1, a first SIGINT) only sets a flag (distbp.stopflag) that rides in
the step's own allreduce: all ranks see it at the same step, rank 0 writes a checkpoint.
"""

from __future__ import annotations

import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from distbp import checkpoint, data, preprocess
from distbp.early_stop import stop_reason
from distbp.errors import EXIT_OK, EXIT_PREEMPTED, CollectiveTimeout, NonFiniteError
from distbp.evaluation import loss_sums
from distbp.loader import BatchPlan, MemoryLoader, ShardLoader, open_loader
from distbp.metrics import Interval, MetricsLog, Progress, RunLog
from distbp.session import Session, peak_lr, stored_config
from distbp.step import CORRECT, LOSS_SUM, ROWS, STOP, Step
from distbp.stopflag import StopFlag, catch_stop_signals
from distbp.trace import RUN, Tracer

__all__ = ["Trainer"]

MIN_JUDGED_EPOCH = 20  # steps an epoch needs before its loss says whether the network learns


class Trainer:
    """Runs a Session on a communicator. Only rank 0 writes checkpoints, metrics and progress."""

    def __init__(self, session: Session, comm, log=print, stop: StopFlag | None = None):
        self.s, self.comm, self.log = session, comm, log
        self.rank0 = comm.rank == 0
        self._vals = [r for r in session.history if r.get("kind") == "val"]  # on every rank
        self.stop = stop or catch_stop_signals()
        self.trace = Tracer(session.cfg.trace is not None, session.net.depth)
        self.stepper = Step(session, comm, self.stop, self.trace,  # buffers, buckets, the step
                            log=log if comm.rank == 0 else None)
        self.loader: ShardLoader | MemoryLoader | None = None  # open while train() runs
        self.plan: BatchPlan | None = None  # the loader's
        self.last_checkpoint: Path | None = session.resumed_from
        self._log: RunLog | None = None
        # the loss of predicting the class frequencies; loss and rows of epoch 0's first half
        self._baseline, self._half = None, (0.0, 0.0)
        self._at_step = session.start_step  # 1-based step in progress, for error messages

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run to the end (EXIT_OK) or to a preemption checkpoint (EXIT_PREEMPTED); a collective
        that times out is re-raised as CollectiveTimeout naming the step. Overflow warnings are
        silenced: a diverging run stops with one NonFiniteError, not RuntimeWarnings per rank."""
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
                    self.open_loader():
                code = self._train()
            if self.trace.on:  # a collective, on normal ends only: every rank is there
                self.trace.write(self.comm, self.s.cfg.trace, self.comm.hostname)
            return code
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
            tail, st = self.stepper.tail, self.stepper
            log.after_step(step, epoch, lr, (float(tail[LOSS_SUM]), float(tail[CORRECT]),
                                             float(tail[ROWS])), st.phase_s[:2], st.grad_norm)
            end_of_epoch = step % s.steps_per_epoch == 0
            if self._baseline is not None and step in (s.steps_per_epoch // 2, s.steps_per_epoch):
                self._warn_if_not_learning(log, step)
            if end_of_epoch and s.val is not None:
                t = time.perf_counter()
                self._validate(step, epoch, log)
                self.trace.span("validation", t, time.perf_counter(), RUN)
                if step < s.total_steps and self._early_stop_reason() is not None:
                    return self._finish_early(step, log)
            if tail[STOP] > 0 and step < s.total_steps:  # at the last step: just finish
                return self._preempt(step, log)
            if self._checkpoint_due(step, end_of_epoch):
                t = time.perf_counter()
                self._save(step, log)  # checks the replicas first: a check step checks once
                self.trace.span("checkpoint", t, time.perf_counter(), RUN)
            elif s.cfg.check_every and step % s.cfg.check_every == 0:
                self.check_replicas(step)
        self._finish(log)
        return EXIT_OK

    def step(self, step: int) -> float:
        """Optimizer step `step` (0-based, global): this rank's rows, then distbp.step.Step
        (forward, backward, the allreduce, the mean, the update). Returns its learning rate;
        `stepper.phase_s` holds its phases' seconds (what `distbp bench` times)."""
        self._at_step = step + 1
        t = time.perf_counter()
        x, y = self.loader.get(step)
        cuts = self.plan.cuts(self.s.train.n, step) if self.plan.parts else None
        self.trace.span("data", t, time.perf_counter())
        lr = self.stepper(x, y, step, cuts)
        if self.trace.on:  # the step's span holds its phases (nested by time, as Perfetto draws)
            self.trace.span(f"step {step + 1}", t, time.perf_counter())
        return lr

    def _begin(self) -> RunLog:
        """Before the first step: the preprocessing statistics and, for a fresh classification
        run, the class frequencies (collectives); rank 0 moves aside what an earlier run left
        (checkpoints newer than the start, a fresh run's old metrics file) and opens the
        metrics; the record in progress continues from the resumed checkpoint's sums."""
        s, cfg = self.s, self.s.cfg
        self._setup_preprocess()
        if self.trace.on:
            self.trace.begin(self.comm)  # the ranks' clocks start together
        fresh = s.resumed_from is None
        # judged on the second half of epoch 0: enough steps to tell learning from noise
        if fresh and s.steps_per_epoch >= MIN_JUDGED_EPOCH and s.net.output == "softmax" \
                and len(s.train.y_shape) == 1:
            self._baseline = self._class_entropy()
        self.stop.at_once = False  # from here on a stop signal is a checkpoint at a step
        if self.rank0:
            moved = checkpoint.set_aside_newer(s.checkpoint_dir, s.start_step,
                                               [s.metrics_path] if fresh else [])
            if moved:
                names = ", ".join(p.name for p in moved[:3]) + (", ..." if moved[3:] else "")
                self.log(f"moved {len(moved)} file(s) of an earlier run ({names}) to "
                         f"{moved[0].parent}")
        metrics = MetricsLog(s.metrics_path, s.history) if self.rank0 else None
        every = cfg.log_every or max(1, s.total_steps // 20)
        records = cfg.record_every or max(1, s.total_steps // 200)
        return RunLog(metrics, Progress(s.total_steps, every, mode=cfg.progress), s.total_steps,
                      records, every, Interval(s.interval), timings=not cfg.reproducible)

    def _class_entropy(self) -> float:
        """−Σ p log p of the training labels' frequencies (ranks count shares; one allreduce)."""
        s, n_out = self.s, self.s.net.n_outputs
        counts = np.zeros(n_out, np.float64)
        lo, hi = data.shard_bounds(s.train.n, self.comm.rank, self.comm.size)
        for start in range(lo, hi, 1 << 16):
            y = s.train.read_y(np.arange(start, min(start + (1 << 16), hi)))
            counts += np.bincount(y.astype(np.int64), minlength=n_out)[:n_out]
        self.comm.allreduce_sum(counts)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _warn_if_not_learning(self, log: RunLog, step: int) -> None:
        """A fresh run's rank 0 warns after epoch 0 when the training loss of the epoch's second
        half is no better than predicting the class frequencies: the network is not learning."""
        if step < self.s.steps_per_epoch:
            self._half = (log.loss_sum, log.samples)  # the sums of the first half
            return
        loss = (log.loss_sum - self._half[0]) / max(log.samples - self._half[1], 1.0)
        if self.rank0 and loss >= 0.98 * self._baseline:
            print(f"distbp: warning: the training loss at the end of epoch 0, {loss:.4f}, is no "
                  f"better than predicting the class frequencies ({self._baseline:.4f}): the "
                  f"network is not learning; check --lr (now {peak_lr(self.s.cfg):g}: too large "
                  f"diverges, too small stalls), try --standardize (inputs of very different "
                  f"scales) or another --optimizer", file=sys.stderr, flush=True)

    def _preempt(self, step: int, log: RunLog) -> int:
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

    def _finish_early(self, step: int, log: RunLog, saved: bool = False) -> int:
        """Every rank decided alike: the record of the steps since the last one (also those a
        resumed checkpoint carried), the final checkpoint (again if `saved` before it), EXIT_OK."""
        if (carried := log.interval.steps) and self.rank0:  # the loop's epoch, lr of `step`
            log.record(step, data.step_cursor(step - 1, self.s.steps_per_epoch)[0],
                       self.s.schedule.lr_at(step - 1), self.stepper.grad_norm)
        if not saved or carried:  # the file at `step` lacks that record: replace it (all ranks)
            self._save(step, log)
        if self.rank0:
            log.progress.line(self._early_stop_reason())
        self._finish(log, step)
        return EXIT_OK

    def _finish(self, log: RunLog, step: int | None = None) -> None:
        """After the last step (or none: already there), rank 0 sums the run up in one line and
        closes the metrics; every rank meets."""
        s = self.s
        if s.start_step >= s.total_steps and self.rank0:
            log.progress.line(f"nothing to do: already at step {s.start_step} of {s.total_steps}")
        if log.metrics:
            if s.start_step < s.total_steps:
                log.progress.line(log.summary(step or s.total_steps, s.start_step,
                                              self.last_checkpoint))
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

    def open_loader(self) -> ShardLoader | MemoryLoader:
        """This rank's shards of steps start..total: from memory, or read one step ahead by a
        background thread (no MPI in it); closed by train() on every way out."""
        s, cfg = self.s, self.s.cfg
        self.plan = BatchPlan(cfg.seed, s.steps_per_epoch, cfg.batch_size, self.comm.rank,
                              self.comm.size, cfg.micro_batches if cfg.reproducible else 0)
        self.loader = open_loader(s.train, self.plan, s.start_step,
                                  max(s.start_step, s.total_steps))
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

    def check_replicas(self, step: int) -> bool:
        """Compare every rank's parameters with rank 0's by checksum; re-broadcast on mismatch."""
        # CRC-32: five times faster than a cryptographic hash (1.4 vs 7.3 ms on 1.86 million
        # float32 parameters, every --check-every steps); it changes with any flipped bit, and
        # replicas that differ otherwise agree by chance once in 2^32 checks
        h = zlib.crc32(self.s.net.params.data)
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

    def _validate(self, step: int, epoch: int, log: RunLog) -> None:
        """Exact loss and accuracy over the validation set (distbp.evaluation: each rank takes
        whole batches, summed along one tree), recorded by rank 0 and kept for early stopping."""
        s, comm = self.s, self.comm
        totals = loss_sums(s.net, s.val, self.stepper.inputs, s.cfg.batch_size, comm)
        n = max(totals[2], 1.0)
        record = {"kind": "val", "step": step, "epoch": epoch, "loss": totals[0] / n,
                  "accuracy": totals[1] / n, "samples": int(totals[2])}
        self._vals.append(record)
        if self.rank0:
            log.metrics.write(record)
            log.progress.line(f"validation after epoch {epoch}: loss {record['loss']:.4f} "
                              f"accuracy {record['accuracy']:.4f} ({record['samples']} samples)")

    def _save(self, step: int, log: RunLog) -> None:
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
