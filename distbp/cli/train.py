"""`distbp train`: parse the options into a TrainConfig and run `distbp.api.train`, the code path
`distbp.fit` takes too.

    mpiexec -n 2 distbp train
    mpiexec -n 4 distbp train --data train.h5 --val-data test.h5 --layers 784,256,10 --epochs 20
"""

from __future__ import annotations

import argparse
import signal

from distbp.api import train
from distbp.cli.args import EPILOG
from distbp.config import add_train_arguments, resolve_config
from distbp.launch import agree, setup_timeout
from distbp.stopflag import STOP_SIGNALS, catch_stop_signals

__all__ = ["add_command"]


def add_command(sub) -> None:
    p = sub.add_parser("train", help="train a network (under mpiexec/srun: data-parallel)",
                       description="Train a fully-connected network. Every option is also a key "
                       "of the TOML file given with --config (underscores for dashes); the "
                       "command line wins over the file, the file over the preset.",
                       usage="distbp train [--config FILE] [--preset NAME] [--OPTION VALUE ...]",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, job) -> int:
    stop = catch_stop_signals()  # the entry point's flag, if it installed one at start-up
    # The communicator before the configuration: a --config file readable on one rank only
    # (relative to each rank's working directory) must stop every rank through `agree`, not
    # leave the others waiting in MPI_Init.
    comm = job.start(timeout=setup_timeout(getattr(args, "collective_timeout", None)))
    cfg = agree(comm, lambda: resolve_config(args))
    code = train(cfg, job, stop).exit_code
    # Saved or done: from here a late stop signal (a burst from scancel, hydra forwarding a
    # second one) is moot. Ignored, not defaulted: Python resets its handlers to the default
    # (terminate) while finalizing, which would turn this rank's 75 or 0 into "killed by signal".
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return code

