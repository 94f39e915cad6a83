"""Evaluation and prediction of a network over a dataset, each rank taking a contiguous share of
whole batches (`batch_share`): the one definition used by the trainer's validation, `distbp
evaluate`, `distbp predict` and the Python API. A row meets the same rows in its batch on any
number of ranks, so predictions are bitwise those of one process.

    m = open_checkpoint_data("ckpt.h5", "test.h5", labels=True)  # model, data, inputs, batch
    sums = loss_sums(net, ds, inputs, batch, comm)  # [loss sum, correct rows, rows], all rows
    predict_to_file(net, ds, inputs, comm, batch, writer)        # rank 0 writes, rows in order

`inputs` (preprocess.Inputs) turns raw rows into network inputs with the training
preprocessing, so an evaluation sees the bits the trainer's validation saw. Rows go through the
network `batch` at a time; the loss of all rows is the sum over batches along one fixed tree
(distbp.ordered_sum), so its bits do not depend on the number of ranks.

Prediction gathers rows to rank 0 in rounds: in round t each rank predicts the next C rows of its
share and one Gatherv brings them to rank 0 (values bit for bit, −0.0 included), which writes
each rank's rows at their positions. C keeps a round's rows near GATHER_BYTES, so memory does
not grow with the number of rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from distbp import checkpoint, data, paths, preprocess
from distbp.durable import replace_durably, umask
from distbp.errors import CheckpointError, ConfigError, DataError, OutputError, one_line
from distbp.network import Network
from distbp.ordered_sum import OrderedSum
from distbp.session import checked_config
from distbp.version import __version__

__all__ = ["GATHER_BYTES", "Loaded", "PredictionFile", "batch_share", "gather_plan", "loss_sums",
           "network_from_checkpoint", "open_checkpoint_data", "output_labels", "predict_rows",
           "predict_to_file", "round_bounds"]

def _call(f: Callable) -> object:
    return f()


GATHER_BYTES = 16 << 20  # predict: rows gathered per round, all ranks together, in bytes
DEFAULT_BATCH = 256      # rows per forward pass when the checkpoint's config names no batch size


def network_from_checkpoint(ckpt: checkpoint.Checkpoint) -> Network:
    """The checkpoint's network with its parameters; CheckpointError if it cannot be built
    or its configuration is not one distbp wrote (session.checked_config)."""
    checked_config(ckpt)
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
    inputs: preprocess.Inputs
    batch: int

    def close(self) -> None:
        if hasattr(self.ds, "close"):
            self.ds.close()


def open_checkpoint_data(path, data_path: str | None, *, x_name: str | None = None,
                         y_name: str | None = None, batch: int | None = None,
                         labels: bool = True, rank: int = 0, size: int = 1) -> Loaded:
    """Load and verify checkpoint `path`, open data file `data_path` (None: the bundled digits'
    test split, for a checkpoint trained on them) and check it against the model; UsageError on
    bad input, no collective. Dataset names default to the checkpoint's; `batch` to its training
    batch size. `labels`: y must be in the file and is checked too, on rank `rank`'s share of
    `size` only (so call it on every rank through launch.agree); without, only x is opened and
    checked (y_name is not used, and the file need hold no y)."""
    ckpt = checkpoint.load(path)
    net = network_from_checkpoint(ckpt)
    cfg = ckpt.config
    if data_path is None and cfg.get("data") is not None:
        raise ConfigError(f"--data is required: checkpoint '{ckpt.path}' was trained on "
                          f"'{cfg['data']}', not on the bundled digits")
    y_name = (y_name or cfg.get("y_name") or "y") if labels else None
    ds = data.open_dataset(data_path, x_name or cfg.get("x_name") or "x", y_name, split="test")
    batch = batch or cfg.get("batch_size")
    loaded = Loaded(ckpt, net, ds, preprocess.Inputs(ckpt.preprocess, net.n_inputs, net.dtype),
                    batch if isinstance(batch, int) and batch > 0 else DEFAULT_BATCH)
    try:
        if labels:
            int_labels = ckpt.output == "softmax" and ckpt.loss == "cross_entropy"
            scale = ckpt.preprocess.get("scale")
            data.validate_dataset(ds, net.n_inputs, net.n_outputs,
                                  int_labels_required=int_labels, rank=rank, size=size,
                                  dtype=net.dtype, scale=None if scale is None else float(scale))
        elif ds.n_features != net.n_inputs:
            raise DataError(f"data file {ds.source!r}: x has {ds.n_features} features but the "
                            f"network's input layer has {net.n_inputs}")
    except BaseException:
        loaded.close()
        raise
    return loaded


def loss_sums(net: Network, ds: data.Dataset, inputs: preprocess.Inputs, batch: int, comm,
              guard: Callable[[Callable], object] = _call) -> np.ndarray:
    """[loss sum, correct rows, rows] over every row of `ds`, float64 (3,), the same on every
    rank, with the same bits on any number of ranks (at one BLAS thread count: a GEMM's bits
    depend on it): batch m (rows m·batch ..) is part m of a
    distbp.ordered_sum tree, each rank taking its share of whole batches (`batch_share`).
    `guard` runs the reading and computing part, which has no collective in it (the CLI passes
    launch.agree, so a read that fails on one rank stops them all)."""
    parts = max(1, -(-ds.n // batch))
    totals = np.zeros(3, np.float64)

    def one_batch(m: int, out: np.ndarray) -> None:
        x, y = ds.read(np.arange(m * batch, min((m + 1) * batch, ds.n), dtype=np.int64))
        loss, correct = net.loss_sum(inputs(x), y)
        out[:] = (loss, correct, len(y))

    summed = OrderedSum(comm, 3, parts, np.float64)
    guard(lambda: summed.compute(one_batch, totals))
    summed.exchange(totals)
    return totals


def predict_rows(net: Network, ds: data.Dataset, inputs: preprocess.Inputs, lo: int, hi: int,
                 batch: int, out: np.ndarray) -> None:
    """Output activations of rows lo..hi-1 of `ds` into out (hi − lo, n_out)."""
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        x = ds.read_x(np.arange(start, stop, dtype=np.int64))
        out[start - lo:stop - lo] = net.predict(inputs(x))


def output_labels(a: np.ndarray) -> np.ndarray:
    """Predicted classes (B,) from output activations a (B, n_out): argmax, or a > 0.5 for one
    output."""
    return (a[:, 0] > 0.5).astype(np.int64) if a.shape[1] == 1 else a.argmax(axis=1)


def batch_share(n: int, batch: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s rows: whole batches of the one-process split (rows
    k·batch .. (k+1)·batch − 1), contiguous per rank. Every row meets the same other rows in its
    forward pass on any number of ranks, so BLAS computes it alike (at one thread count):
    predictions and each batch's loss do not depend on the rank count (a row alone in a batch
    can round otherwise)."""
    first, last = data.shard_bounds(-(-n // batch), rank, size)  # this rank's batches
    return min(first * batch, n), min(last * batch, n)


def gather_plan(n: int, size: int, n_out: int, itemsize: int, batch: int = 1
                ) -> tuple[int, int]:
    """(rows per rank per round C, rounds): C whole batches, a round's rows of all ranks near
    GATHER_BYTES (at least one batch each), and `rounds` rounds cover the largest share (rank
    0's)."""
    rows = max(1, GATHER_BYTES // (size * n_out * itemsize))
    chunk = max(batch, rows // batch * batch)
    lo, hi = batch_share(n, batch, 0, size)
    return chunk, math.ceil((hi - lo) / chunk)


def round_bounds(n: int, rank: int, size: int, chunk: int, t: int, batch: int = 1
                 ) -> tuple[int, int]:
    """[lo, hi) global rows rank `rank` predicts in round t: the t-th C rows of its share."""
    lo, hi = batch_share(n, batch, rank, size)
    a = min(lo + t * chunk, hi)
    return a, min(a + chunk, hi)


def predict_to_file(net: Network, ds: data.Dataset, inputs: preprocess.Inputs, comm, batch: int,
                    writer: PredictionFile | None) -> None:
    """Every rank predicts its share round by round; rank 0 (`writer`) writes all rows."""
    n, n_out = ds.n, net.n_outputs
    chunk, rounds = gather_plan(n, comm.size, n_out, net.dtype.itemsize, batch)
    mine = np.empty((chunk, n_out), net.dtype)
    gathered = np.empty((comm.size * chunk, n_out), net.dtype) if writer is not None else None
    for t in range(rounds):
        bounds = [round_bounds(n, r, comm.size, chunk, t, batch) for r in range(comm.size)]
        counts = [hi - lo for lo, hi in bounds]
        lo, hi = bounds[comm.rank]
        predict_rows(net, ds, inputs, lo, hi, batch, mine)
        recv = gathered[:sum(counts)] if gathered is not None else None
        comm.gather(mine[:hi - lo], recv, counts, root=0)
        if writer is not None:
            offset = 0
            for (lo, hi), count in zip(bounds, counts):
                writer.write(lo, recv[offset:offset + count])
                offset += count


class PredictionFile:
    """Rank 0's output of `distbp predict`: dataset `prediction` (N, n_out) in the network's
    dtype and, for softmax/sigmoid outputs, `label` (N,); written under a temporary name in the
    same directory, then renamed onto `out` (commit) or removed (discard)."""

    def __init__(self, out: str, net: Network, n: int, attrs: dict):
        self.out = Path(out)
        label = f"--out '{out}'"
        if not self.out.parent.is_dir() and not self.out.is_dir():
            raise ConfigError(f"{label}: directory '{self.out.parent}' does not exist")
        paths.check_output(self.out, label, (("checkpoint", attrs.get("checkpoint")),
                                             ("--data", attrs.get("data"))), (), ConfigError)
        self.labels = net.output in ("softmax", "sigmoid")
        try:  # O_EXCL, an unpredictable name: a planted symlink is never followed
            fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent)
            os.close(fd)
            self.tmp = Path(tmp)
            os.chmod(self.tmp, 0o666 & ~umask())  # mkstemp's 0600: as any new file
            self.file = h5py.File(self.tmp, "w")
        except OSError as e:
            if hasattr(self, "tmp"):
                self.tmp.unlink(missing_ok=True)
            raise ConfigError(f"--out '{out}': cannot write ({one_line(e)})") from None
        try:
            self.pred = self.file.create_dataset("prediction", (n, net.n_outputs), net.dtype)
            self.label = self.file.create_dataset("label", (n,), np.int64) if self.labels else None
            self.file.attrs.update({**attrs, "output": net.output, "distbp_version": __version__})
        except BaseException:
            self.discard()
            raise

    def write(self, lo: int, a: np.ndarray) -> None:
        """Rows lo .. lo + len(a) of the output: activations a (rows, n_out) and labels."""
        try:
            self.pred[lo:lo + len(a)] = a
            if self.label is not None:
                self.label[lo:lo + len(a)] = output_labels(a)
        except (OSError, RuntimeError) as e:  # a full disk, a file size limit: one line, and
            raise self._cannot_write(e) from None  # discard() removes the file

    def commit(self) -> None:
        """Close, flush to disk and rename onto `out`, then flush the directory entry."""
        try:
            self.file.close()
            replace_durably(self.tmp, self.out)
        except (OSError, RuntimeError) as e:  # h5py reports some failed writes as RuntimeError
            raise self._cannot_write(e) from None

    def discard(self) -> None:
        """Remove the temporary file unless commit() renamed it (safe to call always)."""
        with contextlib.suppress(Exception):  # a close that failed (full disk): thrown away
            if self.file.id.valid:
                self.file.close()
        self.tmp.unlink(missing_ok=True)

    def _cannot_write(self, e: Exception) -> OutputError:
        errno = getattr(e, "errno", None)
        why = os.strerror(errno) if errno else one_line(e)  # HDF5's own text is a paragraph
        return OutputError(f"--out '{self.out}': cannot write ({why})")
