"""The `distbp` command: one module per subcommand, each parsing its arguments and calling the
library.

    mpiexec -n 2 distbp train                      # the bundled digits data, 2 ranks
    distbp train --config run.toml --steps 1000    # one process, no MPI needed
    distbp evaluate runs/default/checkpoints/ckpt-00001350.h5
    distbp gradcheck --layers 784,30,10 --activation sigmoid --output sigmoid --loss mse
    python -m distbp train --help

Exit codes: 0 done · 2 bad input or configuration (one line on stderr) · 75 preempted, a
checkpoint was written: run the same command with --resume auto to continue · 141 stdout was
closed by its reader (`distbp ... | head`), as a shell reports SIGPIPE · 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from distbp.cli import bench, data, evaluate, gradcheck, info, inspect, plot, predict, train
from distbp.cli.args import EPILOG, Parser
from distbp.launch import Job, guarded
from distbp.version import __version__

__all__ = ["build_parser", "main"]

COMMANDS = (train, evaluate, predict, inspect, info, data, plot, gradcheck, bench)


def build_parser() -> argparse.ArgumentParser:
    """The `distbp` parser with every subcommand."""
    parser = Parser(prog="distbp", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"distbp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_command(sub)
    for command_parser in sub.choices.values():  # unknown arguments are its to report
        command_parser.set_defaults(parser=command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `distbp` command (distbp.entry, the console script, calls it); returns the exit code
    (distbp.launch.guarded: how failures become exit codes on every rank)."""
    job = Job()

    def run() -> int:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.run(args, job)

    return guarded(job, run)


if __name__ == "__main__":
    sys.exit(main())
