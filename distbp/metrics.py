"""Rank 0's record of a run: JSON-lines metrics and progress (a bar on a terminal, lines in logs).

Each metrics record is one JSON object per line, for example

    {"kind": "train", "step": 200, "epoch": 3, "loss": 0.21, "accuracy": 0.94, "lr": 0.1,
     "samples_per_s": 5230.0, "compute_ms": 1.2, "comm_ms": 0.3, "time": 12.5}
    {"kind": "val", "step": 230, "epoch": 3, "loss": 0.25, "accuracy": 0.93, "samples": 360}

`step` counts optimizer steps taken so far. The same records go into every checkpoint, so a resumed
run rewrites the file up to the checkpoint and continues it: no duplicated or missing lines. The
sums behind the train record in progress (Interval.state()) go into checkpoints too, so the first
record after a resume is the one an uninterrupted run writes, timings aside (a --reproducible
run's records have none: TIMINGS). With
--clip-grad-norm, train records also carry "grad_norm": the norm of their last step's averaged
gradient before clipping.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from distbp.ckpt_integrity import INTERVAL_KEYS
from distbp.errors import UsageError, one_line

__all__ = ["Interval", "MetricsLog", "Progress", "RunLog", "TIMINGS", "format_train"]

# The wall-clock fields of a train record: left out of the records of a --reproducible run,
# whose metrics file is then byte-identical on any number of ranks (progress lines show them).
TIMINGS = ("samples_per_s", "compute_ms", "comm_ms", "time")


class MetricsLog:
    """Append-only JSON-lines file owned by rank 0, plus the in-memory history checkpoints carry."""

    def __init__(self, path: Path, history: list[dict]):
        self.path = path
        self.history = list(history)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Rewritten up to the resumed step; O_NOFOLLOW: never written through a symlink.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            self._file = open(fd, "w", encoding="utf-8", buffering=1)
            self._file.writelines(json.dumps(r) + "\n" for r in self.history)
        except OSError as e:  # a full disk, or a symlink planted since setup: one line
            raise UsageError(f"cannot write metrics file '{self.path}': {one_line(e)}") from None

    def write(self, record: dict) -> None:
        self.history.append(record)
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: one line (exit 2), not a traceback
            raise UsageError(f"cannot write metrics file '{self.path}': {one_line(e)}") from None

    def close(self) -> None:
        self._file.close()


class Interval:
    """Sums over the steps since the last train record.

    The exact sums (the checkpoint format's INTERVAL_KEYS: steps, loss sum, correct rows,
    samples) go into every checkpoint (`state()`) and come back on resume (`Interval(carried)`),
    so a record whose interval spans a stop and resume has the uninterrupted run's loss and
    accuracy, bit for bit. The timings (seconds of compute and communication, wall time, and the
    steps and samples they cover) count only the steps this process ran: downtime and another
    machine's speed are not carried."""

    def __init__(self, carried: Mapping[str, float] | None = None) -> None:
        """`carried`: `state()` of the interval in progress when the checkpoint resumed from
        was written; None or empty starts afresh."""
        self.reset()
        if carried:
            for k in INTERVAL_KEYS:  # steps an int, the sums floats, as state() gives them
                setattr(self, k, int(carried[k]) if k == "steps" else float(carried[k]))

    def reset(self) -> None:
        self.steps = 0
        self.loss_sum = self.correct = self.samples = 0.0
        self.timed_steps = 0
        self.timed_samples = self.compute_s = self.comm_s = 0.0
        self.started = time.perf_counter()

    def state(self) -> dict[str, float]:
        """The exact sums, as checkpoints store them: {"steps": int, the others float}."""
        return {k: getattr(self, k) for k in INTERVAL_KEYS}

    def add(self, loss_sum: float, correct: float, samples: float, compute_s: float,
            comm_s: float) -> None:
        self.steps += 1
        self.loss_sum += loss_sum
        self.correct += correct
        self.samples += samples
        self.timed_steps += 1
        self.timed_samples += samples
        self.compute_s += compute_s
        self.comm_s += comm_s

    def record(self, step: int, epoch: int, lr: float, elapsed: float) -> dict:
        """The train record at `step`: loss and accuracy over the interval's samples; samples/s
        and per-step milliseconds over the steps timed in this process."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        n, timed = max(self.samples, 1.0), max(self.timed_steps, 1)
        return {"kind": "train", "step": step, "epoch": epoch,
                "loss": self.loss_sum / n, "accuracy": self.correct / n, "lr": lr,
                "samples_per_s": round(self.timed_samples / wall, 1),
                "compute_ms": round(1e3 * self.compute_s / timed, 4),
                "comm_ms": round(1e3 * self.comm_s / timed, 4),
                "time": round(elapsed, 3)}


class Progress:
    """A bar redrawn in place on a terminal; plain periodic lines otherwise (SLURM logs)."""

    def __init__(self, total: int, every: int, stream: TextIO | None = None, mode: str = "auto"):
        self.total, self.every = total, every
        self.stream = stream or sys.stdout
        # "bar" also when stdout is a pipe that ends at a terminal (mpiexec forwards rank 0's)
        self.tty = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self._last_draw = 0.0

    def step(self, step: int, loss: float) -> None:
        """Called every step on rank 0 with the step's mean loss; draws at most ten times a
        second on a terminal (nothing is formatted otherwise)."""
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last_draw < 0.1 and step < self.total:
            return
        self._last_draw = now
        text = f"loss {loss:.4f}"
        width = 24
        filled = width * step // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {step}/{self.total} {text}\x1b[K")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A permanent line (periodic report, evaluation, checkpoint)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def format_train(r: dict, total: int) -> str:
    return (f"step {r['step']}/{total} epoch {r['epoch']} loss {r['loss']:.4f} "
            f"acc {r['accuracy']:.4f} lr {r['lr']:.4g} {r['samples_per_s']:.0f} samples/s "
            f"compute {r['compute_ms']:.2f} ms comm {r['comm_ms']:.2f} ms")


class RunLog:
    """A run's account as it goes. On every rank: `interval`, the sums since the last train
    record (they ride in checkpoints, so every rank must agree on them). On rank 0 (`metrics`
    not None): a train record every `record_every` steps, a progress line every `print_every`
    steps (each with its record), the bar, and the closing summary. `timings` False: the
    records leave out TIMINGS."""

    def __init__(self, metrics: MetricsLog | None, progress: Progress, total: int,
                 record_every: int, print_every: int, interval: Interval,
                 timings: bool = True) -> None:
        self.metrics, self.progress, self.total = metrics, progress, total
        self.timings = timings
        self.record_every, self.print_every, self.interval = record_every, print_every, interval
        self.started = time.perf_counter()  # the run's clock
        self.samples = self.loss_sum = 0.0  # over the steps this process trained

    def after_step(self, step: int, epoch: int, lr: float, sums: tuple[float, float, float],
                   times: tuple[float, float], grad_norm: float | None) -> None:
        """Step `step` (1-based) is done: `sums` (loss sum, correct, rows) over the global batch,
        `times` (compute, communication) seconds on this rank."""
        self.interval.add(*sums, *times)
        self.loss_sum += sums[0]
        self.samples += sums[2]
        if self.metrics is None:
            return
        printed = step % self.print_every == 0 or step == self.total
        if printed or step % self.record_every == 0:
            self.record(step, epoch, lr, grad_norm, printed)
        self.progress.step(step, sums[0] / max(sums[2], 1.0))

    def record(self, step: int, epoch: int, lr: float, grad_norm: float | None,
               printed: bool = True) -> None:
        """Rank 0: the train record of the interval's steps up to `step` (the interval restarts);
        with clipping, "grad_norm": `step`'s before clipping, if this process took that step."""
        record = self.interval.record(step, epoch, lr, time.perf_counter() - self.started)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        line = format_train(record, self.total) if printed else None  # before TIMINGS go
        if not self.timings:
            for key in TIMINGS:
                del record[key]
        self.metrics.write(record)
        if line is not None:
            self.progress.line(line)
        self.interval.reset()

    def summary(self, step: int, start: int, checkpoint) -> str:
        """One line: steps, wall time, samples/s, last and best validation, final checkpoint."""
        wall = time.perf_counter() - self.started
        vals = [r for r in self.metrics.history if r.get("kind") == "val"]
        text = (f"done: step {step} of {self.total} ({step - start} trained in {wall:.3g} s, "
                f"{self.samples / max(wall, 1e-9):,.0f} samples/s)")
        if vals:
            best = max(vals, key=lambda r: (r["accuracy"], -r["loss"]))
            text += (f"; validation: last accuracy {vals[-1]['accuracy']:.4f} loss "
                     f"{vals[-1]['loss']:.4f} (step {vals[-1]['step']}), best accuracy "
                     f"{best['accuracy']:.4f} (step {best['step']})")
        return text + (f"; final checkpoint {checkpoint}" if checkpoint else "")
