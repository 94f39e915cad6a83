"""The `distbp` console script (and `python -m distbp`): catch the preemption signals first.

`distbp train` installs its SIGTERM/SIGUSR1/SIGINT handler here, before NumPy, h5py, MPI and the
argument parser are imported (0.3-0.8 s on a busy node), so a signal sent to a rank that is
still starting is caught instead of killing it: once the rank has its communicator it says so
and the job exits 75 at once (nothing was trained or written yet; distbp.stopflag); once
training is about to begin the signal sets the stop flag, the next step sees it, rank 0
checkpoints and every rank exits 75. Other commands keep the default action (terminate).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from distbp.errors import EXIT_ERROR, env_rank
from distbp.stopflag import install_early

__all__ = ["command_of", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Install the stop handler when the command is `train`, then run `distbp.cli.main`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if command_of(args) == "train":
        install_early()
    try:
        from distbp.cli import main as cli_main  # the heavy imports, covered by the handler
    except KeyboardInterrupt:  # Ctrl-C twice before the command started: stop, as documented
        print(f"distbp: rank {env_rank()}: interrupted", file=sys.stderr, flush=True)
        return EXIT_ERROR
    return cli_main(argv)


def command_of(args: Sequence[str]) -> str | None:
    """The subcommand: the first argument that is not an option (the parser has no global
    options taking a value)."""
    return next((a for a in args if not a.startswith("-")), None)
