"""distbp from Python: train, evaluate, predict and load a checkpoint, in one script that runs
unchanged as one process and data-parallel. Copy it and change what you need.

    .venv/bin/python scripts/example_api.py                           # one process, bundled digits
    .venv/bin/mpiexec -n 2 .venv/bin/python scripts/example_api.py    # the same on 2 ranks
    .venv/bin/mpiexec -n 2 .venv/bin/python scripts/example_api.py --data train.h5 \
        --val-data test.h5 --epochs 5 --run-dir runs/api              # your HDF5/.npz files
    .venv/bin/python scripts/example_api.py --arrays --epochs 3       # the rows as NumPy arrays

Every rank runs every line with the same arguments and gets the same results; only rank 0
prints. Without --data, `fit` trains on the bundled digits with their `digits` preset, exactly as
`mpiexec -n 2 distbp train --run-dir runs/api` does: `fit` and `distbp train` are one code path,
so the two runs end with bitwise the same parameters. With --arrays the files' rows are read into
NumPy arrays and passed to `fit` as x, y (what a script with its own data does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

import distbp
from distbp.data import BUNDLED_DIR
from distbp.errors import env_rank

RANK = env_rank()  # the launcher's rank variable; 0 in one process


def say(*args) -> None:
    """Print on rank 0 only (every rank computes the same)."""
    if RANK == 0:
        print(*args, flush=True)


def read_rows(path: Path) -> tuple[np.ndarray, np.ndarray, float | None]:
    """A data file's x (N, features), y (N,) and `scale` attribute (None if it has none)."""
    with h5py.File(path, "r") as f:
        scale = f["x"].attrs.get("scale", f.attrs.get("scale"))
        return f["x"][()], f["y"][()], None if scale is None else float(scale)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="training file (default: the bundled digits)")
    p.add_argument("--val-data", type=Path, help="validation file (default, without --data: "
                   "the bundled digits' test split)")
    p.add_argument("--arrays", action="store_true", help="pass the rows to fit as arrays")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--run-dir", default="runs/api")
    p.add_argument("--resume", default="none", help="none, auto or a checkpoint")
    args = p.parse_args()
    train_file = args.data or BUNDLED_DIR / "digits-train.h5"
    val_file = args.val_data or (BUNDLED_DIR / "digits-test.h5" if args.data is None else None)
    options = {"epochs": args.epochs, "run_dir": args.run_dir, "resume": args.resume}

    # 1. Train. Keyword options are the keys of a `distbp train` TOML file.
    if args.arrays:  # your own arrays: every rank passes the same full arrays
        x, y, scale = read_rows(train_file)
        val = read_rows(val_file)[:2] if val_file else (None, None)
        result = distbp.fit(None, x, y, x_val=val[0], y_val=val[1], scale=scale,
                            **({"preset": "digits"} if args.data is None else {}), **options)
    elif args.data is None:  # the bundled digits, with the digits preset
        result = distbp.fit(**options)
    else:
        result = distbp.fit(data=str(args.data), val_data=args.val_data and str(args.val_data),
                            **options)
    say(f"fit: exit code {result.exit_code}, checkpoint {result.checkpoint}")
    if result.preempted:  # SIGTERM/SIGUSR1/Ctrl-C: run again with --resume auto
        raise SystemExit(result.exit_code)
    vals = [r for r in result.records if r["kind"] == "val"]
    if vals:
        say(f"last validation record: loss {vals[-1]['loss']:.4f} "
            f"accuracy {vals[-1]['accuracy']:.4f}")

    # 2. Load the final checkpoint: the network and its input preprocessing, verified.
    net = distbp.load(result.checkpoint)
    say(f"loaded {'-'.join(map(str, net.layers))} {net.dtype}, preprocessing "
        f"{sorted(net.preprocess)}")

    # 3. Evaluate and predict on arrays (raw rows: evaluate and predict apply .preprocess).
    if val_file is not None:
        x_val, y_val, _ = read_rows(val_file)
        scores = distbp.evaluate(net, x_val, y_val)
        say(f"evaluate: loss {scores['loss']:.4f} accuracy {scores['accuracy']:.4f} "
            f"({scores['samples']} samples)")
        out = distbp.predict(net, x_val[:5])  # (5, n_out) on every rank
        say(f"predict: classes {out.argmax(axis=1).tolist()}, labels {y_val[:5].tolist()}")


if __name__ == "__main__":
    main()
