"""`distbp bench`: how close one training step comes to what the hardware allows.

    distbp bench --layers 784,256,10 --batch-size 256
    mpiexec -n 2 distbp bench --layers 784,1024,1024,10 --batch-size 512 --json

Measured in ONE run, so ratios are meaningful on a noisy machine:
- the GEMM peak of this rank (an n×n×n matmul in the run's dtype, with the run's BLAS threads,
  while every other rank does the same),
- the step, split as DESIGN.md's performance model splits it: forward+backward over the shard,
  the one allreduce of the flat buffer, the optimizer update,
- model FLOPs utilisation: 6·P·(B/p) FLOPs per step and rank (2 forward, 4 backward per parameter
  and row) against the GEMM peak,
- the allreduce's algorithmic bandwidth, bytes / time, and the ring model's bus bandwidth
  2(p−1)/p · bytes / time.
Timings are the median over --steps steps, the slowest rank's (the step waits for it).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from distbp.activations import HIDDEN
from distbp.errors import UsageError

__all__ = ["add_commands", "gemm_peak", "run_bench"]


def add_commands(sub) -> None:
    """Add `distbp bench` and its options to the `distbp` subcommands."""
    p = sub.add_parser("bench", help="measure step time, allreduce and model FLOPs utilisation",
                       description="Measure, in one run, each rank's GEMM peak and a training "
                       "step on random data split into forward+backward, allreduce and update; "
                       "print model FLOPs utilisation against the peak and the allreduce's "
                       "bandwidth (times: the slowest rank's median over --steps).")
    p.add_argument("--layers", default="784,256,10", help="layer widths (default 784,256,10)")
    p.add_argument("--activation", default="relu", choices=tuple(HIDDEN),
                   help="hidden-layer activation (default relu)")
    p.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch (default 256)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="parameter and data dtype (default float32)")
    p.add_argument("--gemm-size", type=int, default=2048,
                   help="n of the n×n×n peak GEMM (default 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank, >= 1 (default: as for train --threads)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.set_defaults(run=run_bench)


def gemm_peak(n: int, dtype: str, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` n×n×n matmuls (2n³ FLOPs each)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2.0 * n ** 3 / best


def _timed(fn) -> float:
    """Seconds one call of fn() takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_bench(args: argparse.Namespace, job) -> int:
    """`distbp bench`: the GEMM peak, then --warmup + --steps timed training steps on random
    data; rank 0 prints the slowest rank's median phase times and the derived figures."""
    from distbp.cli import set_threads
    from distbp.comm import get_comm

    layers = _parse_layers(args.layers)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.gemm_size < 1:
        raise UsageError("--batch-size, --steps and --gemm-size must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    job.comm = comm = get_comm()
    threads = set_threads(args.threads, comm.local_size)
    net, x, y = _model_and_shard(layers, args, comm)
    comm.barrier()
    peak = gemm_peak(args.gemm_size, args.dtype)
    slowest = np.ascontiguousarray(_time_steps(net, x, y, comm, args.warmup, args.steps))
    comm.allreduce_max(slowest)
    peaks = np.array([peak, -peak])
    comm.allreduce_max(peaks)  # [best rank's peak, −worst rank's peak]
    if comm.rank == 0:
        report = _report(net, args, comm, threads, np.median(slowest, axis=0), -peaks[1])
        print(json.dumps(report) if args.json else _text(report))
    return 0


def _model_and_shard(layers: list[int], args: argparse.Namespace, comm):
    """The network (seed 0) and this rank's shard of a random global batch: x (b, n_in) in
    the run's dtype, y (b,) int labels, b this rank's share of --batch-size."""
    from distbp.data import shard_bounds
    from distbp.network import Network

    net = Network(layers, activation=args.activation, seed=0, dtype=args.dtype)
    lo, hi = shard_bounds(args.batch_size, comm.rank, comm.size)
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((hi - lo, layers[0])).astype(args.dtype)
    y = rng.integers(0, layers[-1], hi - lo)
    return net, x, y


def _time_steps(net, x: np.ndarray, y: np.ndarray, comm, warmup: int, steps: int
                ) -> np.ndarray:
    """(steps, 3) seconds of this rank's forward+backward, allreduce and update, one row per
    timed step after `warmup` untimed ones. Momentum SGD, lr 0.01, as a run would step."""
    from distbp.optim import SGD

    buf = np.zeros(net.params.size + 2, net.dtype)  # gradient, loss sum, rows: one allreduce
    grad = buf[:net.params.size]
    opt = SGD(momentum=0.9)
    state = opt.init(net.params)
    times = np.zeros((steps, 3))
    for i in range(warmup + steps):
        comm.barrier()  # time each phase, not the waiting for a straggler's previous step
        t0 = time.perf_counter()
        buf[-2] = net.loss_grad_sum(x, y, grad)
        buf[-1] = len(y)
        t1 = time.perf_counter()
        comm.allreduce_sum(buf)
        t2 = time.perf_counter()
        grad /= buf[-1]
        opt.step(net.params, grad, state, 0.01)
        t3 = time.perf_counter()
        if i >= warmup:
            times[i - warmup] = (t1 - t0, t2 - t1, t3 - t2)
    return times


def _parse_layers(text: str) -> list[int]:
    """'784,256,10' -> [784, 256, 10]; UsageError naming --layers otherwise."""
    try:
        layers = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {text!r}") from None
    if len(layers) < 2 or min(layers) < 1:
        raise UsageError(f"--layers needs two or more positive widths, got {text!r}")
    return layers


def _report(net, args, comm, threads: str, med: np.ndarray, peak: float) -> dict:
    """The figures, from median (compute, allreduce, update) seconds and the GEMM peak FLOP/s."""
    compute, allreduce, update = (float(v) for v in med)
    step = compute + allreduce + update
    p = comm.size
    flops = 6.0 * net.params.size * args.batch_size / p
    # What the step really executes: 2 FLOPs per weight and row for z = a Wᵀ, 2 for ΔW = δᵀ a,
    # and 2 for Δa_k = δ W except in the first layer (no gradient for the inputs). Below the
    # 6·P convention, most for shallow networks with a wide first layer.
    weights = [w.size for w in net.weights]
    executed = 2.0 * (2 * sum(weights) + sum(weights[1:])) * args.batch_size / p
    nbytes = (net.params.size + 2) * net.dtype.itemsize
    return {
        "ranks": p, "comm": comm.name, "threads": threads, "dtype": args.dtype,
        "layers": list(net.layers), "params": int(net.params.size),
        "global_batch": args.batch_size, "gemm_peak_gflops": peak / 1e9,
        "step_ms": 1e3 * step, "compute_ms": 1e3 * compute, "allreduce_ms": 1e3 * allreduce,
        "update_ms": 1e3 * update, "model_gflops_per_rank": flops / compute / 1e9,
        "mfu": flops / compute / peak, "mfu_step": flops / step / peak,
        "hfu": executed / compute / peak,
        "allreduce_bytes": nbytes,
        "allreduce_algbw_gbs": nbytes / allreduce / 1e9 if p > 1 else None,
        "allreduce_busbw_gbs": 2 * (p - 1) / p * nbytes / allreduce / 1e9 if p > 1 else None,
        "samples_per_s": args.batch_size / step,
    }


def _text(r: dict) -> str:
    """The report as lines of text for a person."""
    lines = [
        f"distbp bench: {r['ranks']} rank(s), {r['comm']}; {r['threads']}; {r['dtype']}",
        f"model {'-'.join(map(str, r['layers']))} ({r['params']:,} parameters), "
        f"global batch {r['global_batch']} ({r['global_batch'] / r['ranks']:.0f} rows per rank)",
        f"GEMM peak per rank (slowest rank): {r['gemm_peak_gflops']:.1f} GFLOP/s",
        f"step {r['step_ms']:.3f} ms = forward+backward {r['compute_ms']:.3f} + allreduce "
        f"{r['allreduce_ms']:.3f} + update {r['update_ms']:.3f}",
        f"model FLOPs utilisation: {r['model_gflops_per_rank']:.1f} GFLOP/s per rank in "
        f"forward+backward = {100 * r['mfu']:.0f}% of GEMM peak "
        f"({100 * r['mfu_step']:.0f}% over the whole step; 6·params·rows FLOPs)",
        f"executed FLOPs utilisation (no input gradient in layer 1): {100 * r['hfu']:.0f}% of "
        f"GEMM peak in forward+backward",
    ]
    if r["allreduce_algbw_gbs"] is not None:
        lines.append(f"allreduce of {r['allreduce_bytes'] / 1e6:.2f} MB: algorithmic bandwidth "
                     f"{r['allreduce_algbw_gbs']:.2f} GB/s, ring bus bandwidth "
                     f"{r['allreduce_busbw_gbs']:.2f} GB/s")
    lines.append(f"throughput {r['samples_per_s']:,.0f} samples/s")
    return "\n".join(lines)
