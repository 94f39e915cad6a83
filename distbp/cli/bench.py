"""`distbp bench`: the trainer's own step on random data, split into forward+backward, allreduce
and update, against the GEMM peak measured in the same run (distbp.bench).

    distbp bench --layers 784,256,10 --batch-size 256
    mpiexec -n 2 distbp bench --layers 784,1024,1024,10 --batch-size 512 --json

Timings are the median over --steps steps of the slowest rank (the step waits for it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from distbp import bench
from distbp.bare_loop import BareLoop
from distbp.cli.args import (
    add_network_arguments,
    int_range,
    nonneg_float,
    positive_float,
    positive_int,
)
from distbp.config_schema import MAX_STEPS, MAX_THREADS, OPTIONS, TrainConfig
from distbp.config_values import parse_layers
from distbp.data import shard_bounds
from distbp.errors import UsageError
from distbp.launch import agree
from distbp.plot import require_matplotlib
from distbp.plot_files import check_picture, write_picture
from distbp.scaling import ALGORITHMS, efficiency_figure, table

__all__ = ["add_command"]

DEFAULT_MICRO_BATCHES = OPTIONS["micro_batches"].default
MAX_GEMM = 8192  # the peak GEMM: 3 float64 arrays of 0.5 GiB, 1.1 TFLOP a try

DESCRIPTION = """Measure, in one run, each rank's GEMM peak and the trainer's own step on random
data split into forward+backward, allreduce and update; print FLOPs utilisation against the peak
and the allreduce's bandwidth (times: the slowest rank's median over --steps)."""


def add_command(sub) -> None:
    p = sub.add_parser("bench", help="measure step time, allreduce and FLOPs utilisation",
                       description=DESCRIPTION)
    add_network_arguments(p, layers="784,256,10", activation="relu")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="GLOBAL batch (default 256)")
    p.add_argument("--steps", type=positive_int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int_range(0, MAX_STEPS), default=5,
                   help="untimed steps first (default 5)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="parameter and data dtype (default float32)")
    p.add_argument("--gemm-size", type=int_range(1, MAX_GEMM), default=2048,
                   help=f"n of the n×n×n peak GEMM, at most {MAX_GEMM} (default 2048)")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=None,
                   help="BLAS threads per rank, >= 1 (default: as for train --threads)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.add_argument("--overlap", default="auto", choices=("auto", "on", "off"),
                   help="allreduce in buckets during backward, as train --overlap (default auto)")
    p.add_argument("--bucket-mb", type=positive_float, default=TrainConfig.bucket_mb,
                   help=f"smallest bucket with --overlap, MiB (default {TrainConfig.bucket_mb:g}, "
                   f"as train)")
    p.add_argument("--baseline", action="store_true", help="also time a bare NumPy loop of the "
                   "same shapes (forward, backward, one allreduce, plain SGD), on one batch in "
                   "cache and reading each step's rows from the same rows in memory, beside "
                   "distbp's step in 5 alternating rounds of --steps/5 steps each (at least 1), "
                   "and print distbp's step as a ratio of each")
    p.add_argument("--reproducible", action="store_true", help="also time the step of train "
                   "--reproducible (on one BLAS thread, as train runs it) and print it as a "
                   "ratio of the default step")
    p.add_argument("--micro-batches", type=positive_int, default=None,
                   help=f"micro-batches per global batch with --reproducible (default "
                   f"{DEFAULT_MICRO_BATCHES}, as train)")
    m = p.add_argument_group("scaling model (--model)")
    m.add_argument("--model", action="store_true", help="also fit t_step(p, B) = fb(B/p) + "
                   "overhead + allreduce(p, n) to this launch and predict 1 to 4096 ranks, at "
                   "this global batch (strong) and these rows per rank (weak)")
    m.add_argument("--algorithm", default="rabenseifner", choices=ALGORITHMS,
                   help="the allreduce's cost on p ranks (default rabenseifner, MPICH's for "
                   "large messages)")
    m.add_argument("--alpha", type=nonneg_float, help="latency per message hop in seconds "
                   "(default: measured; 0 with one rank), e.g. 2e-6 for InfiniBand")
    m.add_argument("--beta", type=positive_float, help="seconds per byte (default: measured), e.g. "
                   "8e-11 for 100 Gbit/s")
    m.add_argument("--gflops", type=positive_float, help="forward+backward rate per rank in "
                   "GFLOP/s (default: measured), to predict other nodes")
    m.add_argument("--plot", metavar="FILE", help="draw the predicted efficiencies (png, svg "
                   "or pdf; needs matplotlib)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, job) -> int:
    """The GEMM peak, then --warmup + --steps timed steps; rank 0 prints the slowest rank's
    median phase times and the derived figures."""
    layers = parse_layers(args.layers)
    if args.plot is not None:  # refused now, not after the measurement
        check_picture(Path(args.plot), "--plot")
        require_matplotlib()
    if args.baseline and args.activation not in ("relu", "sigmoid"):
        raise UsageError(f"--baseline: the bare loop has relu and sigmoid hidden layers, not "
                         f"{args.activation}")
    comm = job.start(timeout=None, threads=args.threads)
    agree(comm, lambda: _check_micro_batches(args, comm.size))  # before anything is timed
    lo, hi = shard_bounds(args.batch_size, comm.rank, comm.size)
    extra = _baseline_steps(args) if args.baseline else 0  # the baseline's own distbp steps
    with tempfile.TemporaryDirectory(prefix="distbp-bench-") as run_dir:
        trainer = bench.bench_trainer(layers, args.activation, args.batch_size, args.dtype,
                                      comm, run_dir, args.warmup + args.steps + extra,
                                      args.overlap, args.bucket_mb)
        comm.barrier()
        peak = bench.gemm_peak(trainer.s.net, hi - lo, args.gemm_size)
        trial = len(trainer.stepper.buckets.trial)  # --overlap auto's steps, run first
        with trainer.open_loader():
            slowest = bench.time_steps(trainer, comm, args.warmup, args.steps)
            if args.baseline:
                start = trial + args.warmup + args.steps
                r_baseline = _baseline(args, layers, comm, hi - lo, trainer, start)
    comm.allreduce_max(slowest)
    peaks = np.array([peak, -peak])
    comm.allreduce_max(peaks)  # [best rank's peak, −worst rank's peak]
    med = np.median(slowest, axis=0)
    r = bench.report(trainer.s.net, args.batch_size, comm, job.threads, med, -peaks[1])
    buckets = trainer.stepper.buckets  # 1: no overlap (also when --overlap auto chose none)
    r["buckets"] = len(buckets.bounds) if buckets.overlap else 1
    if args.baseline:
        r["baseline"] = r_baseline
    if args.reproducible:
        r["reproducible"] = _reproducible(args, layers, comm, float(med[3]))
    if args.model:
        r["model"] = _model(args, trainer.s.net, comm, med, hi - lo)
    if comm.rank == 0:
        print(json.dumps(r) if args.json else bench.text(r))
        if args.baseline and not args.json:
            b = r["baseline"]
            print(f"bare NumPy loop of the same shapes: {b['bare_step_ms']:.3f} ms per step on "
                  f"one batch in cache, {b['bare_reading_step_ms']:.3f} ms reading each step's "
                  f"rows; distbp's whole step (Trainer.step: read, preprocess, step) "
                  f"{b['distbp_step_ms']:.3f} ms = {b['speed_ratio']:.2f}x the bare loop's "
                  f"speed ({b['reading_speed_ratio']:.2f}x the reading loop's)")
        if args.reproducible and not args.json:
            q = r["reproducible"]
            print(f"reproducible mode ({q['micro_batches']} micro-batches, 1 BLAS thread): "
                  f"{q['step_ms']:.3f} ms per step = {q['cost_ratio']:.2f}x the default step")
        if args.model and not args.json:
            print(_model_text(r["model"]))
    return 0


BASELINE_ROUNDS = 5  # --baseline alternates distbp's step and the bare loops this many times
BASELINE_WARMUP = 2  # untimed steps of each, every round: caches refilled after the switch


def _baseline_round(args: argparse.Namespace) -> int:
    """Timed steps of each in one of `_baseline`'s rounds: --steps over the rounds, at least 1."""
    return -(-args.steps // BASELINE_ROUNDS)


def _baseline_steps(args: argparse.Namespace) -> int:
    """Trainer steps `_baseline` runs."""
    return BASELINE_ROUNDS * (BASELINE_WARMUP + _baseline_round(args))


def _baseline(args: argparse.Namespace, layers, comm, rows: int, trainer, start: int) -> dict:
    """distbp's whole step and the bare loop's, on one batch in cache and reading its rows from
    the trainer's rows in memory, side by side: BASELINE_ROUNDS rounds of --steps / rounds
    steps of each, so that a drift in the machine's speed meets all three alike. The median
    step of each (the slowest rank's) and distbp's speed as a ratio of each bare loop's."""
    train = trainer.s.train  # the random rows the trainer reads, in memory
    loops = [BareLoop(layers, args.activation, rows, args.dtype, comm, data=rows_from,
                      batch=args.batch_size) for rows_from in (None, (train.x, train.y))]
    per_round = _baseline_round(args)
    times: list[list[np.ndarray]] = [[], [], []]  # distbp, bare, bare reading
    for _ in range(BASELINE_ROUNDS):
        times[0].append(bench.time_steps(trainer, comm, BASELINE_WARMUP, per_round, start)[:, 3])
        start += BASELINE_WARMUP + per_round
        for loop, kept in zip(loops, times[1:]):
            kept.append(loop.time(BASELINE_WARMUP, per_round))
    medians = []
    for kept in times:
        slowest = np.concatenate(kept)
        comm.allreduce_max(slowest)
        medians.append(float(np.median(slowest)))
    step, bare, reading = medians
    return {"bare_step_ms": 1e3 * bare, "bare_reading_step_ms": 1e3 * reading,
            "distbp_step_ms": 1e3 * step, "speed_ratio": bare / step,
            "reading_speed_ratio": reading / step}


def _check_micro_batches(args: argparse.Namespace, ranks: int) -> None:
    if args.micro_batches is not None and not args.reproducible:
        raise UsageError("--micro-batches applies to --reproducible only")
    if args.reproducible and _micro_batches(args) < ranks:
        raise UsageError(f"--reproducible: each of the {ranks} ranks needs one of the "
                         f"{_micro_batches(args)} micro-batches: raise --micro-batches")


def _micro_batches(args: argparse.Namespace) -> int:
    return args.micro_batches or DEFAULT_MICRO_BATCHES


def _reproducible(args: argparse.Namespace, layers, comm, step_s: float) -> dict:
    """The median step (slowest rank) of train --reproducible, run the same way, as a ratio of
    the default step measured just before."""
    with tempfile.TemporaryDirectory(prefix="distbp-bench-") as run_dir, threadpool_limits(1):
        trainer = bench.bench_trainer(layers, args.activation, args.batch_size, args.dtype,
                                      comm, run_dir, args.warmup + args.steps, "off",
                                      micro_batches=_micro_batches(args))
        with trainer.open_loader():
            times = bench.time_steps(trainer, comm, args.warmup, args.steps)
    comm.allreduce_max(times)
    step = float(np.median(times, axis=0)[3])
    return {"micro_batches": _micro_batches(args), "step_ms": 1e3 * step,
            "default_step_ms": 1e3 * step_s, "cost_ratio": step / step_s}


def _model(args: argparse.Namespace, net, comm, med: np.ndarray, rows: int) -> dict:
    """The fitted model, its check against this launch's step, and its predictions."""
    model = bench.fit_model(net, comm, med, rows, args.algorithm, args.alpha, args.beta)
    if args.gflops is not None:
        model = model.with_compute_rate(bench.executed_flops(net, 1), 1e9 * args.gflops)
    strong, weak = model.strong(args.batch_size), model.weak(rows)
    if args.plot and comm.rank == 0:
        write_picture(efficiency_figure(strong, weak), Path(args.plot), "--plot")
    return {"terms": dataclasses.asdict(model), "ranks": comm.size,
            "measured_step_s": float(med[3]), "predicted_step_s": model.step(comm.size, rows),
            "strong": strong, "weak": weak}


def _model_text(m: dict) -> str:
    t = m["terms"]
    head = (f"model ({t['algorithm']}): alpha {1e6 * t['alpha']:.2f} us, beta "
            f"{1e9 * t['beta']:.4f} ns/byte ({1e-9 / t['beta'] if t['beta'] else float('inf'):.2f}"
            f" GB/s), forward+backward {1e3 * t['fb_fixed']:.3f} ms + "
            f"{1e6 * t['fb_per_row']:.3f} us/row, overhead {1e3 * t['overhead']:.3f} ms, "
            f"allreduce {t['nbytes'] / 1e6:.2f} MB\n"
            f"check on this launch ({m['ranks']} rank(s)): predicted step "
            f"{1e3 * m['predicted_step_s']:.3f} ms, measured {1e3 * m['measured_step_s']:.3f} ms")
    return "\n".join([head, table("strong scaling (fixed global batch):", m["strong"]),
                      table("weak scaling (fixed rows per rank):", m["weak"])])
