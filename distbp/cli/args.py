"""What several `distbp` commands parse alike: the parser class and shared argument types."""

from __future__ import annotations

import argparse
import math
import sys

from distbp.activations import HIDDEN
from distbp.config_schema import MAX_SEED, MAX_THREADS
from distbp.errors import UsageError, env_rank

__all__ = ["EPILOG", "Parser", "add_checkpoint_data_arguments", "add_network_arguments",
           "int_range", "nonneg_float", "positive_float", "positive_int", "seed_int"]

EPILOG = """exit codes: 0 done; 2 bad input or configuration (one line on stderr naming the
problem); 75 preempted (SIGTERM/SIGUSR1/Ctrl-C): a checkpoint was written, run the same command
with --resume auto to continue; 141 stdout was closed by its reader (`distbp ... | head`), as
for SIGPIPE; 1 anything else (the failing rank prints its traceback and every rank stops)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage through UsageError (exit 2) instead of exiting: rank 0
    prints the usage as one line, then the error once as `distbp: error: ...`."""

    def _print_message(self, message: str, file=None) -> None:
        if env_rank() == 0:  # --help, --version: once for the job, not once per rank
            super()._print_message(message, file)

    def error(self, message: str):  # type: ignore[override]
        if env_rank() == 0:
            print(" ".join(self.format_usage().split()), file=sys.stderr)
        command = self.prog.removeprefix("distbp").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def int_range(low: int, high: int):
    """argparse type: an integer from `low` to `high` (what the command can serve)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got "
                                             f"{text!r}")
        return value
    return parse


seed_int = int_range(0, MAX_SEED)  # a seed NumPy and a checkpoint's int64 can hold


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _finite(text, lambda v: v > 0, "a finite number > 0")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite(text, lambda v: v >= 0, "a finite number >= 0")


def _finite(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def add_checkpoint_data_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and the data file of `evaluate` and `predict`, and how to run them."""
    p.add_argument("checkpoint", help="checkpoint file (ckpt-<step>.h5)")
    p.add_argument("--data", help="HDF5/NPZ data file; default, for a checkpoint trained on the "
                   "bundled digits: their test split")
    p.add_argument("--x-name", help="inputs dataset name (default: the checkpoint's, else x)")
    p.add_argument("--batch-size", type=positive_int,
                   help="rows per forward pass and rank (default: the training batch size)")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS),
                   help="BLAS threads per rank (default: as for train --threads)")


def add_network_arguments(p: argparse.ArgumentParser, layers: str, activation: str) -> None:
    """--layers and --activation of the commands that build a network of their own."""
    p.add_argument("--layers", default=layers, help=f"layer widths (default {layers})")
    p.add_argument("--activation", default=activation, choices=tuple(HIDDEN),
                   help=f"hidden-layer activation (default {activation})")
