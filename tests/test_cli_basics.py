"""The first minutes with the `distbp` command, as real processes: `--version` names the version
of distbp/version.py; a command-line mistake prints exactly one usage line and one
`distbp: error:` line and exits 2, under plain python and under `mpiexec -n 2` alike; `distbp
train --help` states the defaults a run gets."""

from __future__ import annotations

import re

import pytest
from conftest import run_mpi, run_py
from helpers.trainruns import clean_env

from distbp.version import __version__


def distbp(ranks: int, *args: str):
    """`python -m distbp ARGS` in one process (ranks 0) or under `mpiexec -n ranks`."""
    argv = ["-m", "distbp", *args]
    if ranks == 0:
        return run_py(argv, env=clean_env(), timeout=60)
    return run_mpi(ranks, argv, env=clean_env(), timeout=60)


def test_version_prints_distbp_and_the_version_of_version_py():
    proc = distbp(0, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"distbp {__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


@pytest.mark.parametrize("ranks", [0, 2], ids=["python", "mpiexec-2"])
@pytest.mark.parametrize(("args", "error", "usage"), [
    (("train", "--bogus", "3"), "distbp: error: train: unrecognized arguments: --bogus 3", 1),
    (("train", "--lr"), "distbp: error: train: argument --lr: expected one argument", 1),
    (("bogus",), "distbp: error: argument command: invalid choice: 'bogus'", 1),
    # a value is checked with the configuration: the error alone, naming the option
    (("train", "--lr", "fast"), "distbp: error: --lr must be a number, got 'fast'", 0),
])
def test_a_command_line_mistake_prints_one_usage_line_and_one_error_line(ranks, args, error,
                                                                        usage):
    proc = distbp(ranks, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len([ln for ln in lines if ln.startswith("usage: distbp")]) == usage, lines
    errors = [ln for ln in lines if "distbp: error:" in ln]
    assert len(errors) == 1 and errors[0].startswith(error), lines
    assert len(lines) == usage + 1, lines
    assert proc.stdout == ""


def test_train_help_states_the_defaults_that_apply():
    proc = distbp(0, "train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps at the terminal width
    for stated in ("--lr X learning rate (peak rate when a schedule is used) (default: 0.1)",
                   "(default: 64; digits preset without --data: 32)",
                   "--log-every N progress line every N steps; none: about 20 per run",
                   "none: about 200 per run",
                   "without --data and --preset: digits",
                   "75 preempted (SIGTERM/SIGUSR1/Ctrl-C)"):
        assert stated in text, stated
