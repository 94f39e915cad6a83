"""`distbp bench`: the trainer's own step on random data, split into forward+backward, allreduce
and update, against the GEMM peak measured in the same run (distbp.bench).

    distbp bench --layers 784,256,10 --batch-size 256
    mpiexec -n 2 distbp bench --layers 784,1024,1024,10 --batch-size 512 --json

Timings are the median over --steps steps of the slowest rank (the step waits for it).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from distbp import bench
from distbp.activations import HIDDEN
from distbp.cli.args import positive_int
from distbp.config_values import parse_layers
from distbp.data import shard_bounds
from distbp.errors import UsageError

__all__ = ["add_command"]


def add_command(sub) -> None:
    p = sub.add_parser("bench", help="measure step time, allreduce and FLOPs utilisation",
                       description="Measure, in one run, each rank's GEMM peak and the "
                       "trainer's own step on random data split into forward+backward, allreduce "
                       "and update; print FLOPs utilisation against the peak and the allreduce's "
                       "bandwidth (times: the slowest rank's median over --steps).")
    p.add_argument("--layers", default="784,256,10", help="layer widths (default 784,256,10)")
    p.add_argument("--activation", default="relu", choices=tuple(HIDDEN),
                   help="hidden-layer activation (default relu)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="GLOBAL batch (default 256)")
    p.add_argument("--steps", type=positive_int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="parameter and data dtype (default float32)")
    p.add_argument("--gemm-size", type=positive_int, default=2048,
                   help="n of the n×n×n peak GEMM (default 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank, >= 1 (default: as for train --threads)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, job) -> int:
    """The GEMM peak, then --warmup + --steps timed steps; rank 0 prints the slowest rank's
    median phase times and the derived figures."""
    layers = parse_layers(args.layers)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    comm = job.start(timeout=None, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="distbp-bench-") as run_dir:
        trainer = bench.bench_trainer(layers, args.activation, args.batch_size, args.dtype,
                                      comm, run_dir, args.warmup + args.steps)
        comm.barrier()
        lo, hi = shard_bounds(args.batch_size, comm.rank, comm.size)
        peak = bench.gemm_peak(trainer.s.net, hi - lo, args.gemm_size)
        with trainer.open_loader():
            slowest = bench.time_steps(trainer, comm, args.warmup, args.steps)
    comm.allreduce_max(slowest)
    peaks = np.array([peak, -peak])
    comm.allreduce_max(peaks)  # [best rank's peak, −worst rank's peak]
    if comm.rank == 0:
        r = bench.report(trainer.s.net, args.batch_size, comm, job.threads,
                         np.median(slowest, axis=0), -peaks[1])
        print(json.dumps(r) if args.json else bench.text(r))
    return 0
