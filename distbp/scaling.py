"""A model of the training step's time on p ranks, fitted to measurements of this launch, and its
predictions for many ranks (`distbp bench --model`).

    t_step(p, B) = fb(B/p) + overhead + allreduce(p, n)
    fb(r)        = fb_fixed + r · fb_per_row                 forward+backward of r rows per rank
    allreduce    = hops(p) · α + bytes(p) · n · β            n: the gradient's bytes

with the allreduce's cost as the MPI algorithm spends it on p ranks:

    ring                 hops 2(p−1)        bytes 2(p−1)/p
    recursive-doubling   hops log₂p         bytes log₂p
    rabenseifner         hops 2·log₂p       bytes 2(p−1)/p     (reduce-scatter + allgather:
                                                                MPICH's choice for large messages)

    m = fit(comm, trainer, rows, algorithm)      # α, β from a sweep of message sizes; fb from
                                                 # the step's own forward+backward at 4 row counts
    m.strong(global_batch=256)                   # [{"ranks": p, "step_s": ..., "efficiency": ...}]

Measurements are the slowest rank's medians. α and β can only be measured with two or more
ranks; with one, or to predict another cluster, they are given (e.g. 100 Gbit/s InfiniBand:
α ≈ 2 µs, β = 8 / 100e9 s per byte), and so can the compute rate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["ALGORITHMS", "RANKS", "StepModel", "allreduce_terms", "fit_alpha_beta", "fit_line",
           "measure_allreduce", "measure_forward_backward", "efficiency_figure", "table"]

ALGORITHMS = ("rabenseifner", "ring", "recursive-doubling")
RANKS = tuple(2 ** k for k in range(13))  # 1 .. 4096


def allreduce_terms(p: int, algorithm: str) -> tuple[float, float]:
    """(hops, bytes factor) of an allreduce on p ranks: its time is hops·α + factor·n·β."""
    if p <= 1:
        return 0.0, 0.0
    log_p = math.log2(p)
    return {"ring": (2.0 * (p - 1), 2.0 * (p - 1) / p),
            "recursive-doubling": (log_p, log_p),
            "rabenseifner": (2.0 * log_p, 2.0 * (p - 1) / p)}[algorithm]


def fit_line(xs, ys) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points, both clipped at 0:
    a time cannot have a negative part."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return max(float(intercept), 0.0), max(float(slope), 0.0)


def fit_alpha_beta(p: int, nbytes, seconds, algorithm: str) -> tuple[float, float]:
    """α (s per hop) and β (s per byte) from allreduce times of messages of `nbytes` on p ranks."""
    hops, factor = allreduce_terms(p, algorithm)
    if hops == 0:
        raise ValueError("α and β need an allreduce between two or more ranks")
    intercept, slope = fit_line(nbytes, seconds)
    return intercept / hops, slope / factor


@dataclass(frozen=True)
class StepModel:
    """The fitted (or given) terms of the step-time model of the module docstring."""

    alpha: float        # s per message hop
    beta: float         # s per byte
    fb_fixed: float     # s of forward+backward that do not grow with the rows
    fb_per_row: float   # s per row on one rank
    overhead: float     # s of the step that depend on neither rows nor ranks (update, reads)
    nbytes: int         # bytes of one allreduce of the gradient (and the step's scalars)
    algorithm: str = "rabenseifner"

    def allreduce(self, p: int) -> float:
        hops, factor = allreduce_terms(p, self.algorithm)
        return hops * self.alpha + factor * self.nbytes * self.beta

    def step(self, p: int, rows_per_rank: float) -> float:
        return self.fb_fixed + rows_per_rank * self.fb_per_row + self.overhead + self.allreduce(p)

    def strong(self, global_batch: int, ranks=RANKS) -> list[dict]:
        """Fixed global batch: rows per rank fall as B/p (down to one row per rank)."""
        base = self.step(1, global_batch)
        return [self._row(p, global_batch, global_batch / p, base * 1.0 / p)
                for p in ranks if global_batch / p >= 1]

    def weak(self, rows_per_rank: int, ranks=RANKS) -> list[dict]:
        """Fixed rows per rank: the global batch grows as p·b."""
        base = self.step(1, rows_per_rank)
        return [self._row(p, p * rows_per_rank, rows_per_rank, base) for p in ranks]

    def with_compute_rate(self, flops_per_row: float, flops_per_s: float) -> StepModel:
        """The model with forward+backward at another compute rate (a cluster's node)."""
        return dataclasses.replace(self, fb_per_row=flops_per_row / flops_per_s)

    def _row(self, p: int, batch: float, rows: float, ideal: float) -> dict:
        t = self.step(p, rows)
        return {"ranks": p, "global_batch": batch, "rows_per_rank": rows, "step_s": t,
                "allreduce_s": self.allreduce(p), "samples_per_s": batch / t,
                "efficiency": ideal / t}


def measure_allreduce(comm, sizes, reps: int = 20) -> np.ndarray:
    """Seconds of one allreduce_sum of float32 buffers of `sizes` elements: each the median of
    `reps` after one warm-up, the slowest rank's (all ranks get the same answer)."""
    times = np.zeros(len(sizes))
    for i, n in enumerate(sizes):
        buf = np.zeros(int(n), np.float32)
        comm.allreduce_sum(buf)
        runs = []
        for _ in range(reps):
            comm.barrier()
            t0 = time.perf_counter()
            comm.allreduce_sum(buf)
            runs.append(time.perf_counter() - t0)
        times[i] = np.median(runs)
    comm.allreduce_max(times)
    return times


def measure_forward_backward(net, rows, reps: int = 10) -> np.ndarray:
    """Seconds of `net.loss_grad_sum` (the trainer's forward+backward) on random rows, one
    median per row count in `rows` (after a warm-up of each)."""
    rng = np.random.default_rng(0)
    grad = np.zeros_like(net.params)
    times = np.zeros(len(rows))
    for i, r in enumerate(rows):
        x = rng.standard_normal((int(r), net.n_inputs)).astype(net.dtype)
        y = rng.integers(0, net.n_outputs, int(r))
        net.loss_grad_sum(x, y, grad)
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            net.loss_grad_sum(x, y, grad)
            runs.append(time.perf_counter() - t0)
        times[i] = np.median(runs)
    return times


def table(title: str, rows: list[dict]) -> str:
    """A prediction table as text, with where parallel efficiency first falls below 50 %."""
    lines = [title, f"{'ranks':>6} {'batch':>9} {'rows/rank':>10} {'step ms':>10} "
                    f"{'allreduce ms':>13} {'samples/s':>12} {'efficiency':>10}"]
    for r in rows:
        lines.append(f"{r['ranks']:>6} {r['global_batch']:>9.0f} {r['rows_per_rank']:>10.4g} "
                     f"{1e3 * r['step_s']:>10.3f} {1e3 * r['allreduce_s']:>13.3f} "
                     f"{r['samples_per_s']:>12,.0f} {100 * r['efficiency']:>9.0f}%")
    below = next((r["ranks"] for r in rows if r["efficiency"] < 0.5), None)
    lines.append(f"efficiency falls below 50% at {below} ranks" if below else
                 "efficiency stays at or above 50% on every rank count shown")
    return "\n".join(lines)


def efficiency_figure(strong: list[dict], weak: list[dict]):
    """A matplotlib Figure (the `plot` extra) of parallel efficiency against ranks, strong and
    weak scaling."""
    from matplotlib.figure import Figure  # optional: only `--plot` needs it

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for rows, label in ((strong, "strong (fixed global batch)"),
                        (weak, "weak (fixed rows per rank)")):
        ax.plot([r["ranks"] for r in rows], [100 * r["efficiency"] for r in rows], marker="o",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks")
    ax.set_ylabel("parallel efficiency (%)")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
