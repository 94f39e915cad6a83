"""`distbp evaluate`: loss and accuracy of a checkpoint on a data file, serially or under MPI.

    distbp evaluate runs/default/checkpoints/ckpt-00001350.h5        # bundled digits, test split
    mpiexec -n 4 distbp evaluate ckpt.h5 --data test.h5 --json        # one JSON line on stdout

Every rank loads and verifies the checkpoint and opens the data; no other collective runs until
all ranks agree that this worked (bad input is exit 2 everywhere, never a hang). Each rank sums
its share of whole batches and the batches' sums are added along one fixed tree
(distbp.evaluation.loss_sums, as the trainer's validation does): the numbers the trainer's
validation printed for the same data and batch, with the same bits on any number of ranks at
one BLAS thread count per rank (--threads).
"""

from __future__ import annotations

import argparse
import json

from distbp.cli.args import add_checkpoint_data_arguments
from distbp.config_schema import DEFAULT_COLLECTIVE_TIMEOUT_S
from distbp.errors import EXIT_OK
from distbp.evaluation import loss_sums, open_checkpoint_data
from distbp.launch import agree

__all__ = ["add_command"]


def add_command(sub) -> None:
    p = sub.add_parser("evaluate", help="loss and accuracy of a checkpoint on a data file",
                       description="Loss (mean over rows) and accuracy of a checkpoint's model on "
                       "a data file, with the checkpoint's training preprocessing.")
    add_checkpoint_data_arguments(p)
    p.add_argument("--y-name", help="labels/targets dataset name (default: the checkpoint's, "
                   "else y)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, job) -> int:
    comm = job.start(timeout=DEFAULT_COLLECTIVE_TIMEOUT_S, threads=args.threads)
    m = agree(comm, lambda: open_checkpoint_data(
        args.checkpoint, args.data, x_name=args.x_name, y_name=args.y_name,
        batch=args.batch_size, labels=True, rank=comm.rank, size=comm.size))
    try:
        totals = loss_sums(m.net, m.ds, m.inputs, m.batch, comm, lambda f: agree(comm, f))
    finally:
        m.close()
    if comm.rank == 0:
        _print(m, float(totals[0]), int(totals[1]), int(totals[2]), comm.size, args.json)
    return EXIT_OK


def _print(m, loss_sum: float, correct: int, n: int, ranks: int, as_json: bool) -> None:
    record = {"checkpoint": str(m.ckpt.path), "step": m.ckpt.step, "data": m.ds.source,
              "samples": n, "loss": loss_sum / n, "accuracy": correct / n, "correct": correct,
              "ranks": ranks}
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        print(f"evaluate {record['checkpoint']} (step {m.ckpt.step}) on {m.ds.source}: "
              f"{n} rows, loss {record['loss']:.6f}, accuracy {record['accuracy']:.4f} "
              f"({correct}/{n})", flush=True)
