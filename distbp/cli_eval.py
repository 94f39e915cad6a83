"""`distbp evaluate` and `predict`: a checkpoint alone is enough, serially or under MPI.

    distbp evaluate runs/default/checkpoints/ckpt-00001350.h5        # bundled digits, test split
    mpiexec -n 4 distbp evaluate ckpt.h5 --data test.h5 --json        # one JSON line on stdout
    mpiexec -n 4 distbp predict ckpt.h5 --data new.h5 --out pred.h5

Every rank loads and verifies the checkpoint and opens the data; no collective runs until all
ranks agree that this worked (distbp.cli.agree: bad input is exit 2 everywhere, never a hang).
Each rank then takes a contiguous share of the rows (distbp.data.shard_bounds) and applies the
checkpoint's own training preprocessing (distbp.preprocess, the function the trainer uses).

evaluate: loss sum, correct rows and row count, reduced by ONE allreduce; the loss is the mean over
all rows and does not depend on the number of ranks beyond summation order. Rows are processed in
chunks of --batch-size (default: the training batch size, so the numbers are the ones the
trainer's validation printed for the same data).

predict: the HDF5 writer is serial, so rows travel to rank 0, which alone writes the file
(atomically: temporary name, fsync, os.replace). The communicator has only allreduce/bcast, so the
gather is an allreduce_sum in rounds: in round t rank r fills slot r of a zeroed (ranks, C, n_out)
buffer with its next C rows (x + 0 = x, so the values arrive unchanged, except that −0.0 arrives
as +0.0), and rank 0 writes slot r at rank r's row positions. C keeps the buffer near
GATHER_BYTES, so memory does not grow with N; all ranks compute in every round.

`distbp inspect` lives in distbp.cli_inspect (it reads no data); it builds its network with
model_from_checkpoint from here.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from distbp import __version__, checkpoint, data, preprocess
from distbp.cli import agree, set_threads
from distbp.comm import get_comm
from distbp.durable import replace_durably
from distbp.errors import EXIT_OK, CheckpointError, ConfigError, DataError
from distbp.network import Network

__all__ = ["COLLECTIVE_TIMEOUT_S", "GATHER_BYTES", "Loaded", "add_commands", "evaluate",
           "gather_plan", "model_from_checkpoint", "round_bounds"]

GATHER_BYTES = 16 << 20       # predict: size of the per-round gather buffer (all ranks' slots)
_DEFAULT_BATCH = 256          # when the checkpoint's config names no batch size
COLLECTIVE_TIMEOUT_S = 600.0  # collective deadline: `distbp train`'s default --collective-timeout


def add_commands(sub) -> None:
    """Register `evaluate` and `predict` on the `distbp` subparsers."""
    p = sub.add_parser("evaluate", help="loss and accuracy of a checkpoint on a data file",
                       description="Loss (mean over rows) and accuracy of a checkpoint's model on "
                       "a data file, with the checkpoint's training preprocessing.")
    _add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.set_defaults(run=_run_evaluate)

    p = sub.add_parser("predict", help="write a checkpoint's predictions to an HDF5 file",
                       description="Write dataset `prediction` (N, n_out) of output "
                       "activations in the model's dtype and, for softmax/sigmoid models, `label` "
                       "(N,) (argmax; a > 0.5 for one output), rows in the input order. Only x "
                       "is used, but the data file must hold a y dataset too.")
    _add_data_arguments(p)
    p.add_argument("--out", required=True, help="output HDF5 file (written atomically by rank 0)")
    p.set_defaults(run=_run_predict)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (ckpt-<step>.h5)")
    p.add_argument("--data", help="HDF5/NPZ data file; default, for a checkpoint trained on the "
                   "bundled digits: their test split")
    p.add_argument("--x-name", help="inputs dataset name (default: the checkpoint's, else x)")
    p.add_argument("--y-name", help="labels/targets dataset name (default: the checkpoint's, "
                   "else y)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="rows per forward pass and rank (default: the training batch size)")
    p.add_argument("--threads", type=_positive_int,
                   help="BLAS threads per rank (default: as for train --threads)")


# ----------------------------------------------------------------------------- loading

def model_from_checkpoint(ckpt: checkpoint.Checkpoint) -> Network:
    """The checkpoint's network with its parameters; CheckpointError if it cannot be built."""
    try:
        net = Network(ckpt.layers, activation=ckpt.activation, output=ckpt.output,
                      loss=ckpt.loss, dtype=ckpt.dtype)
        preprocess.check(ckpt.preprocess, net.n_inputs)
    except ValueError as e:
        raise CheckpointError(f"checkpoint '{ckpt.path}': {e}") from None
    np.copyto(net.params, ckpt.params)
    return net


@dataclass
class Loaded:
    """A checkpoint's model and the data it runs on, as every rank holds them."""

    ckpt: checkpoint.Checkpoint
    net: Network
    ds: data.Dataset
    batch: int
    _inputs: dict[int, np.ndarray] = field(default_factory=dict)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """Raw rows x (B, ...) -> network inputs (B, n_in): a reused buffer, preprocessed."""
        buf = self._inputs.get(len(x))
        if buf is None:
            buf = self._inputs[len(x)] = np.empty((len(x), self.net.n_inputs), self.net.dtype)
        return preprocess.apply(x, self.ckpt.preprocess, buf)

    def close(self) -> None:
        if hasattr(self.ds, "close"):
            self.ds.close()


def _data_source(args: argparse.Namespace, ckpt) -> tuple[str | None, str, str]:
    """(path or None for the bundled digits test split, x name, y name)."""
    cfg = ckpt.config
    x_name = args.x_name or cfg.get("x_name") or "x"
    y_name = args.y_name or cfg.get("y_name") or "y"
    if args.data is None and cfg.get("data") is not None:
        raise ConfigError(f"{args.command}: --data is required: checkpoint '{ckpt.path}' was "
                          f"trained on '{cfg['data']}', not on the bundled digits")
    return args.data, x_name, y_name


def _load(args: argparse.Namespace, labels: bool, rank: int = 0, size: int = 1) -> Loaded:
    """Load and verify the checkpoint, open and check the data (no collective; UsageError).
    The label range is checked on rank `rank`'s share of `size` only: call it through agree."""
    ckpt = checkpoint.load(args.checkpoint)
    net = model_from_checkpoint(ckpt)
    path, x_name, y_name = _data_source(args, ckpt)
    ds = data.open_dataset(path, x_name, y_name, split="test")
    batch = args.batch_size or ckpt.config.get("batch_size")
    loaded = Loaded(ckpt, net, ds, batch if isinstance(batch, int) and batch > 0
                    else _DEFAULT_BATCH)
    try:
        if labels:
            int_labels = ckpt.output == "softmax" and ckpt.loss == "cross_entropy"
            data.validate_dataset(ds, net.n_inputs, net.n_outputs,
                                  int_labels_required=int_labels, rank=rank, size=size)
        elif ds.n_features != net.n_inputs:
            raise DataError(f"data file {ds.source!r}: x has {ds.n_features} features but the "
                            f"network's input layer has {net.n_inputs}")
    except BaseException:
        loaded.close()
        raise
    return loaded


def _start(args: argparse.Namespace, job):
    """The communicator (recorded on `job` for the error handler), with BLAS threads set."""
    job.comm = comm = get_comm(timeout=COLLECTIVE_TIMEOUT_S)
    set_threads(getattr(args, "threads", None), comm.local_size)
    return comm


# ----------------------------------------------------------------------------- evaluate

def _local_sums(m: Loaded, rank: int, size: int) -> np.ndarray:
    """[loss sum, correct rows, rows] over this rank's contiguous share, float64 (3,)."""
    totals = np.zeros(3, np.float64)
    lo, hi = data.shard_bounds(m.ds.n, rank, size)
    for start in range(lo, hi, m.batch):
        x, y = m.ds.read(np.arange(start, min(start + m.batch, hi), dtype=np.int64))
        loss, correct = m.net.loss_sum(m.inputs(x), y)
        totals += (loss, correct, len(y))
    return totals


def evaluate(m: Loaded, comm) -> tuple[float, int, int]:
    """(loss summed over all rows, correct rows, rows): one allreduce of the ranks' sums."""
    totals = agree(comm, lambda: _local_sums(m, comm.rank, comm.size))  # a read error stops all
    comm.allreduce_sum(totals)
    return float(totals[0]), int(totals[1]), int(totals[2])


def _run_evaluate(args: argparse.Namespace, job) -> int:
    comm = _start(args, job)
    m = agree(comm, lambda: _load(args, labels=True, rank=comm.rank, size=comm.size))
    try:
        loss_sum, correct, n = evaluate(m, comm)
    finally:
        m.close()
    if comm.rank == 0:
        record = {"checkpoint": str(m.ckpt.path), "step": m.ckpt.step, "data": m.ds.source,
                  "samples": n, "loss": loss_sum / n, "accuracy": correct / n,
                  "correct": correct, "ranks": comm.size}
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(f"evaluate {record['checkpoint']} (step {m.ckpt.step}) on {m.ds.source}: "
                  f"{n} rows, loss {record['loss']:.6f}, accuracy {record['accuracy']:.4f} "
                  f"({correct}/{n})", flush=True)
    return EXIT_OK


# ----------------------------------------------------------------------------- predict

def gather_plan(n: int, size: int, n_out: int, itemsize: int) -> tuple[int, int]:
    """(rows per rank per round C, rounds): the (size, C, n_out) buffer stays near GATHER_BYTES
    (at least one row), and `rounds` rounds cover the largest share (rank 0's)."""
    chunk = max(1, GATHER_BYTES // (size * n_out * itemsize))
    lo, hi = data.shard_bounds(n, 0, size)
    return chunk, math.ceil((hi - lo) / chunk)


def round_bounds(n: int, rank: int, size: int, chunk: int, t: int) -> tuple[int, int]:
    """[lo, hi) global rows rank `rank` predicts in round t: the t-th C rows of its share."""
    lo, hi = data.shard_bounds(n, rank, size)
    a = min(lo + t * chunk, hi)
    return a, min(a + chunk, hi)


def _fill(m: Loaded, buf: np.ndarray, rank: int, size: int, t: int) -> None:
    """Zero buf (size, C, n_out), then put this rank's round-t predictions in slot `rank`."""
    buf.fill(0.0)
    lo, hi = round_bounds(m.ds.n, rank, size, buf.shape[1], t)
    for start in range(lo, hi, m.batch):
        stop = min(start + m.batch, hi)
        x, _ = m.ds.read(np.arange(start, stop, dtype=np.int64))
        buf[rank, start - lo:stop - lo] = m.net.predict(m.inputs(x))


class _PredictionFile:
    """Rank 0's output: written under a temporary name in the same directory, then renamed."""

    def __init__(self, out: str, m: Loaded):
        self.out = Path(out)
        if self.out.is_dir():
            raise ConfigError(f"--out '{out}' is a directory")
        if not self.out.parent.is_dir():
            raise ConfigError(f"--out '{out}': directory '{self.out.parent}' does not exist")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self.labels = m.net.output in ("softmax", "sigmoid")
        try:
            self.file = h5py.File(self.tmp, "w")
        except OSError as e:
            raise ConfigError(f"--out '{out}': cannot write ({' '.join(str(e).split())})") from None
        try:
            n, n_out = m.ds.n, m.net.n_outputs
            self.pred = self.file.create_dataset("prediction", (n, n_out), m.net.dtype)
            self.label = self.file.create_dataset("label", (n,), np.int64) if self.labels else None
            self.file.attrs.update({"checkpoint": str(m.ckpt.path), "step": m.ckpt.step,
                                    "data": m.ds.source, "output": m.net.output,
                                    "distbp_version": __version__})
        except BaseException:
            self.discard()
            raise

    def write(self, lo: int, a: np.ndarray) -> None:
        """Rows lo .. lo + len(a) of the output: activations a (rows, n_out) and labels."""
        self.pred[lo:lo + len(a)] = a
        if self.label is not None:
            self.label[lo:lo + len(a)] = (a[:, 0] > 0.5) if a.shape[1] == 1 else a.argmax(axis=1)

    def commit(self) -> None:
        """Close, flush to disk and rename onto --out, then flush the directory entry."""
        self.file.close()
        replace_durably(self.tmp, self.out)

    def discard(self) -> None:
        """Remove the temporary file unless commit() renamed it (safe to call always)."""
        if self.file.id.valid:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _load_predict(args: argparse.Namespace, rank: int) -> tuple[Loaded, _PredictionFile | None]:
    """The loaded model and data and, on rank 0 only, the opened output (no collective)."""
    m = _load(args, labels=False)
    try:
        return m, _PredictionFile(args.out, m) if rank == 0 else None
    except BaseException:
        m.close()
        raise


def _predict(m: Loaded, comm, writer: _PredictionFile | None) -> None:
    """All rounds of compute-then-gather; rank 0 (`writer`) writes each round's rows."""
    chunk, rounds = gather_plan(m.ds.n, comm.size, m.net.n_outputs, m.net.dtype.itemsize)
    buf = np.zeros((comm.size, chunk, m.net.n_outputs), m.net.dtype)
    for t in range(rounds):
        agree(comm, functools.partial(_fill, m, buf, comm.rank, comm.size, t))
        comm.allreduce_sum(buf)  # the gather: each slot has one non-zero contributor
        if writer is not None:
            for r in range(comm.size):
                lo, hi = round_bounds(m.ds.n, r, comm.size, chunk, t)
                writer.write(lo, buf[r, :hi - lo])


def _run_predict(args: argparse.Namespace, job) -> int:
    comm = _start(args, job)
    m, writer = agree(comm, lambda: _load_predict(args, comm.rank))
    try:
        _predict(m, comm, writer)
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
