"""`distbp predict`: a checkpoint's predictions for a data file, written by rank 0 to HDF5.

    mpiexec -n 4 distbp predict ckpt.h5 --data new.h5 --out pred.h5

Every rank loads the checkpoint and opens the data (through agreement: bad input is exit 2
everywhere); the ranks predict contiguous shares in rounds and gather them to rank 0, which
alone writes the file, atomically (distbp.evaluation.predict_to_file, PredictionFile).
"""

from __future__ import annotations

import argparse

from distbp.cli.args import add_checkpoint_data_arguments
from distbp.config_schema import DEFAULT_COLLECTIVE_TIMEOUT_S
from distbp.errors import EXIT_OK
from distbp.evaluation import Loaded, PredictionFile, open_checkpoint_data, predict_to_file
from distbp.launch import agree

__all__ = ["add_command"]

DESCRIPTION = """Write dataset `prediction` (N, n_out) of output activations in the model's dtype
and, for softmax/sigmoid models, `label` (N,) (argmax; a > 0.5 for one output), rows in the
input order. Only x is read: the data file need hold no labels."""


def add_command(sub) -> None:
    p = sub.add_parser("predict", help="write a checkpoint's predictions to an HDF5 file",
                       description=DESCRIPTION)
    add_checkpoint_data_arguments(p)
    p.add_argument("--out", required=True, help="output HDF5 file (written atomically by rank 0)")
    p.set_defaults(run=run)


def _open(args: argparse.Namespace, rank: int) -> tuple[Loaded, PredictionFile | None]:
    """The model and data and, on rank 0 only, the opened output (no collective)."""
    m = open_checkpoint_data(args.checkpoint, args.data, x_name=args.x_name,
                             batch=args.batch_size, labels=False)
    try:
        attrs = {"checkpoint": str(m.ckpt.path), "step": m.ckpt.step, "data": m.ds.source}
        return m, PredictionFile(args.out, m.net, m.ds.n, attrs) if rank == 0 else None
    except BaseException:
        m.close()
        raise


def run(args: argparse.Namespace, job) -> int:
    comm = job.start(timeout=DEFAULT_COLLECTIVE_TIMEOUT_S, threads=args.threads)
    m, writer = agree(comm, lambda: _open(args, comm.rank))
    try:
        predict_to_file(m.net, m.ds, m.inputs, comm, m.batch, writer)
        if writer is not None:
            writer.commit()
            print(f"predict: wrote {m.ds.n} rows of {m.net.n_outputs} output(s) ({m.net.dtype}"
                  f"{', with labels' if writer.labels else ''}) from {m.ckpt.path} (step "
                  f"{m.ckpt.step}) on {m.ds.source} to {writer.out}", flush=True)
    finally:
        m.close()
        if writer is not None:
            writer.discard()
    return EXIT_OK
