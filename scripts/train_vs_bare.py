"""distbp's whole training loop against the bare loop, per step, as a user's run pays it.

`distbp bench --baseline` times `Trainer.step` alone. This times `distbp.fit`, the code path of
`distbp train`, with its metrics, progress, replica checks and checkpoints at their defaults, on
rows in memory, for two lengths: the difference of the two runs' wall times over the difference
of their steps cancels start-up and the final checkpoint. Beside it, in the same process and in
turns, distbp.bare_loop's two yardsticks: one batch in cache, and reading each step's rows from
the same rows.

    mpiexec -n 2 .venv/bin/python scripts/train_vs_bare.py --layers 784,128,10 --batch-size 64
    mpiexec -n 2 .venv/bin/python scripts/train_vs_bare.py --layers 784,1024,1024,10 \\
        --activation sigmoid --batch-size 256 --steps 40,240

One node: the runs' directory lies under rank 0's temporary directory, which rank 0 removes.
The rows are random, their labels the argmax of a fixed random linear map of them (learnable).
A first short run, untimed, takes the first call's costs. Rank 0 prints one line per round and
the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import distbp
from distbp.bare_loop import BareLoop
from distbp.comm import get_comm
from distbp.data import shard_bounds
from distbp.launch import set_threads


def rows(n: int, n_in: int, n_out: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Random rows and the labels argmax(x R) of a fixed random map R."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n_in)).astype(dtype)
    return x, np.argmax(x @ rng.standard_normal((n_in, n_out)).astype(dtype), axis=1)


def fit_seconds(layers, x, y, args: argparse.Namespace, steps: int, comm) -> float:
    """Wall seconds of one `distbp.fit` of `steps` steps (output swallowed), every rank, in a
    run directory every rank names alike (a token from rank 0), removed afterwards."""
    token = np.array([secrets.randbits(48)], np.int64)
    comm.bcast(token)
    run_dir = Path(tempfile.gettempdir()) / f"distbp-train-vs-bare-{token[0]:x}"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            comm.barrier()
            start = time.perf_counter()
            distbp.fit(layers, x, y, steps=steps, batch_size=args.batch_size, lr=0.01,
                       momentum=0.0, activation=args.activation, dtype=args.dtype,
                       run_dir=str(run_dir))
            comm.barrier()
            return time.perf_counter() - start
    finally:
        comm.barrier()
        if comm.rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="784,128,10", help="layer widths (default 784,128,10)")
    p.add_argument("--activation", default="relu", choices=("relu", "sigmoid"))
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--rows", type=int, default=60000, help="rows in memory (default 60000)")
    p.add_argument("--steps", default="500,3000",
                   help="the two run lengths, short,long (default 500,3000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all three (default 3)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = p.parse_args()
    layers = [int(w) for w in args.layers.split(",")]
    short, long = (int(s) for s in args.steps.split(","))
    if not 0 < short < long:
        p.error(f"--steps: two lengths short,long with 0 < short < long, got {args.steps}")
    comm = get_comm()
    set_threads(None, comm.local_size)  # as fit sets them: the bare loops run alike
    x, y = rows(args.rows, layers[0], layers[-1], args.dtype)
    lo, hi = shard_bounds(args.batch_size, comm.rank, comm.size)
    loops = [BareLoop(layers, args.activation, hi - lo, args.dtype, comm, data=data,
                      batch=args.batch_size) for data in (None, (x, y))]
    fit_seconds(layers, x, y, args, short, comm)  # first-call costs (imports, caches) go here
    results = []
    for _ in range(args.rounds):
        step = (fit_seconds(layers, x, y, args, long, comm)
                - fit_seconds(layers, x, y, args, short, comm)) / (long - short)
        bare = []
        for loop in loops:
            times = loop.time(5, long - short)
            comm.allreduce_max(times)
            bare.append(float(np.median(times)))
        results.append((step, *bare))
        if comm.rank == 0:
            print(f"distbp train {1e3 * step:.3f} ms per step; bare loop {1e3 * bare[0]:.3f} ms "
                  f"on one batch ({bare[0] / step:.2f}x), {1e3 * bare[1]:.3f} ms reading its "
                  f"rows ({bare[1] / step:.2f}x)", flush=True)
    if comm.rank == 0:
        step, bare, reading = np.median(np.array(results), axis=0)
        print(f"median of {args.rounds} rounds, {comm.size} rank(s): distbp / bare speed "
              f"{bare / step:.2f}x, distbp / reading bare speed {reading / step:.2f}x")


if __name__ == "__main__":
    main()
