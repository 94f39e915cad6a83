"""How close the trainer's own step comes to what the hardware allows, measured in ONE run so that
ratios are meaningful on a noisy machine (`distbp bench`).

    trainer = bench_trainer(layers, "relu", batch, "float32", comm, run_dir)   # random data
    with trainer.open_loader():
        times = time_steps(trainer, comm, warmup=5, steps=30)   # (steps, 3) seconds per phase
    peak = gemm_peak(net, rows, 2048)     # best FLOP/s over square and the step's own GEMMs

The step timed is `Trainer.step`, the function `distbp train` runs: this rank's shard read,
forward+backward, the one allreduce, the update (phases as the trainer splits them). The peak is
the best rate of the GEMMs the step itself runs and of an n×n×n one, each the best of several
tries, and at least the rate the step itself reached: the utilisation never exceeds 100 %.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from distbp import data
from distbp.config_schema import TrainConfig
from distbp.network import Network
from distbp.overlap import TRIAL_STEPS, TRIAL_WARMUP
from distbp.scaling import (
    StepModel,
    fit_alpha_beta,
    fit_line,
    measure_allreduce,
    measure_forward_backward,
)
from distbp.session import ARRAYS_LABEL, build_session, check_model_memory
from distbp.step import TAIL
from distbp.trainer import Trainer

__all__ = ["DATA_BYTES", "bench_trainer", "executed_flops", "fit_model", "gemm_peak", "report",
           "time_steps"]

DATA_BYTES = 64 << 20  # random inputs the bench trains on, at most


def bench_trainer(layers, activation: str, batch: int, dtype: str, comm, run_dir: Path,
                  steps: int, overlap: str = "auto", bucket_mb: float = TrainConfig.bucket_mb,
                  micro_batches: int | None = None) -> Trainer:
    """A Trainer of `steps` steps (and those of --overlap auto's trial) on random rows in memory
    (labels from the network's classes): up to 64 global batches of `batch` rows per epoch (at
    most DATA_BYTES of x), so
    the epoch's shuffle, done once per epoch, stays out of most steps; plain SGD (the default) at
    lr 0.01, no checkpoint or check in between. `micro_batches`: in reproducible mode, with that
    many micro-batches (the caller runs it on one BLAS thread, as `distbp train` does)."""
    check_model_memory(layers, dtype, batch, comm.local_size)  # before the rows are made
    rng = np.random.default_rng(0)
    n = batch * max(1, min(64, DATA_BYTES // (batch * layers[0] * np.dtype(dtype).itemsize)))
    x = rng.standard_normal((n, layers[0])).astype(dtype)
    y = rng.integers(0, layers[-1], n)
    options = {
        "data": f"{ARRAYS_LABEL}random>", "layers": list(layers), "activation": activation,
        "batch_size": batch, "dtype": dtype, "steps": steps + TRIAL_WARMUP + TRIAL_STEPS,
        "optimizer": "sgd",
        "momentum": 0.0, "lr": 0.01, "run_dir": str(run_dir), "check_every": None,
        "progress": "lines", "overlap": overlap, "bucket_mb": bucket_mb}
    if micro_batches is not None:
        options.update(reproducible=True, micro_batches=micro_batches)
    cfg = TrainConfig.from_dict(options, "distbp bench")
    s = build_session(cfg, local_size=comm.local_size, rank=comm.rank, size=comm.size,
                      datasets=(data.ArrayDataset(x, y, source="random rows"), None))
    return Trainer(s, comm)


def time_steps(trainer: Trainer, comm, warmup: int, steps: int, start: int = 0) -> np.ndarray:
    """(steps, 4) seconds of this rank's forward+backward, allreduce and update, and of the whole
    `Trainer.step` (also its shard's read and preprocessing), one row per timed step after
    `warmup` untimed ones (the loader must be open), after --overlap auto's trial if any (its
    steps alternate the modes it chooses between). Steps `start` on: a later call goes on
    where the last one ended (`start` = the steps run so far)."""
    warmup += len(trainer.stepper.buckets.trial)
    times = np.zeros((steps, 4))
    for i in range(warmup + steps):
        comm.barrier()  # time each phase, not the waiting for a straggler's previous step
        t0 = time.perf_counter()
        trainer.step(start + i)
        if i >= warmup:
            times[i - warmup] = (*trainer.stepper.phase_s, time.perf_counter() - t0)
    return times


def _allreduce_bytes(net: Network) -> int:
    """Bytes of the step's one allreduce: the gradient and the step's scalars (step.TAIL)."""
    return (net.params.size + TAIL) * net.dtype.itemsize


def fit_model(net: Network, comm, med: np.ndarray, rows: int, algorithm: str,
              alpha: float | None = None, beta: float | None = None) -> StepModel:
    """The step model (distbp.scaling) of this launch: forward+backward measured at `rows` rows
    per rank and 1/2, 1/4, 1/8 of them; α and β from a sweep of allreduce sizes up to twice the
    gradient (given ones win; none with one rank: communication counts as free); the overhead
    is what the median step `med` (forward+backward, allreduce, update, whole) spends besides
    forward+backward and the allreduce. A collective: every rank gets the same model."""
    counts = sorted({max(1, rows // k) for k in (1, 2, 4, 8)})
    fb = measure_forward_backward(net, counts)
    comm.allreduce_max(fb)
    fb_fixed, fb_per_row = fit_line(counts, fb)
    nbytes = _allreduce_bytes(net)
    if comm.size > 1 and (alpha is None or beta is None):
        sizes = np.unique(np.geomspace(1, 2 * nbytes // 4, 10).astype(int))
        fitted = fit_alpha_beta(comm.size, sizes * 4, measure_allreduce(comm, sizes), algorithm)
        alpha, beta = (fitted[0] if alpha is None else alpha), (fitted[1] if beta is None else beta)
    overhead = max(float(med[3] - med[0] - med[1]), 0.0)
    return StepModel(alpha or 0.0, beta or 0.0, fb_fixed, fb_per_row, overhead, nbytes,
                     algorithm)


def step_gemms(net: Network, rows: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul in one step on `rows` rows: z = a Wᵀ, ΔW = δᵀ a and Δa = δ W
    (none for the input layer)."""
    shapes = []
    for j, w in enumerate(net.weights):
        n_out, n_in = w.shape
        shapes += [(rows, n_in, n_out), (n_out, rows, n_in)] + ([(rows, n_out, n_in)] if j else [])
    return shapes


def executed_flops(net: Network, rows: int) -> float:
    """FLOPs of the step's matmuls on `rows` rows: 2·m·k·n each."""
    return float(sum(2 * m * k * n for m, k, n in step_gemms(net, rows)))


def gemm_peak(net: Network, rows: int, square: int, repeats: int = 10) -> float:
    """The best FLOP/s of an n×n×n matmul (n = `square`) and of each matmul the step runs, in
    the network's dtype with the current BLAS threads: best of `repeats` tries each."""
    shapes = [(square, square, square), *step_gemms(net, max(rows, 1))]
    return max(_gemm_rate(m, k, n, net.dtype, repeats) for m, k, n in shapes)


def _gemm_rate(m: int, k: int, n: int, dtype, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    out = np.empty((m, n), dtype)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / max(best, 1e-9)


def report(net: Network, batch: int, comm, threads: str, med: np.ndarray, peak: float) -> dict:
    """The figures, from median (compute, allreduce, update) seconds and the GEMM peak FLOP/s."""
    compute, allreduce, update = (float(v) for v in med[:3])
    step = compute + allreduce + update
    p = comm.size
    rows = data.shard_bounds(batch, 0, p)[1]  # rank 0's share, the largest
    flops = executed_flops(net, rows)
    peak = max(peak, flops / compute)  # the best rate seen in this run: never above 100 %
    nbytes = _allreduce_bytes(net)
    return {
        "ranks": p, "comm": comm.name, "threads": threads, "dtype": str(net.dtype),
        "layers": list(net.layers), "params": int(net.params.size), "global_batch": batch,
        "gemm_peak_gflops": peak / 1e9, "step_ms": 1e3 * step, "compute_ms": 1e3 * compute,
        "allreduce_ms": 1e3 * allreduce, "update_ms": 1e3 * update,
        "gflops_per_rank": flops / compute / 1e9, "mfu": flops / compute / peak,
        "mfu_step": flops / step / peak, "allreduce_bytes": nbytes,
        "allreduce_algbw_gbs": nbytes / allreduce / 1e9 if p > 1 else None,
        "allreduce_busbw_gbs": 2 * (p - 1) / p * nbytes / allreduce / 1e9 if p > 1 else None,
        "samples_per_s": batch / step,
    }


def text(r: dict) -> str:
    """The report as lines of text for a person."""
    lines = [
        f"distbp bench: {r['ranks']} rank(s), {r['comm']}; {r['threads']}; {r['dtype']}",
        f"model {'-'.join(map(str, r['layers']))} ({r['params']:,} parameters), "
        f"global batch {r['global_batch']} ({r['global_batch'] / r['ranks']:.0f} rows per rank)",
        f"GEMM peak per rank (slowest rank; best of square and the step's own shapes): "
        f"{r['gemm_peak_gflops']:.1f} GFLOP/s",
        f"step {r['step_ms']:.3f} ms = forward+backward {r['compute_ms']:.3f} + allreduce "
        f"{r['allreduce_ms']:.3f} + update {r['update_ms']:.3f} (Trainer.step, the trainer's own"
        + (f"; {r['buckets']} buckets allreduced during backward)" if r.get("buckets", 1) > 1
           else ")"),
        f"FLOPs utilisation: {r['gflops_per_rank']:.1f} GFLOP/s per rank in forward+backward = "
        f"{100 * r['mfu']:.0f}% of GEMM peak ({100 * r['mfu_step']:.0f}% over the whole step; "
        f"the matmuls' 2·m·k·n, no input gradient in layer 1)",
    ]
    if r["allreduce_algbw_gbs"] is not None:
        lines.append(f"allreduce of {r['allreduce_bytes'] / 1e6:.2f} MB: algorithmic bandwidth "
                     f"{r['allreduce_algbw_gbs']:.2f} GB/s, ring bus bandwidth "
                     f"{r['allreduce_busbw_gbs']:.2f} GB/s")
    lines.append(f"throughput {r['samples_per_s']:,.0f} samples/s")
    return "\n".join(lines)
