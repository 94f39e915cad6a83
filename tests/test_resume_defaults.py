"""Resume of runs that leave settings to distbp: the digits preset with no --data and layer widths
derived from the data (no --layers), as README's first command and the Slurm template run them.

A review found such runs could not be resumed at all: the checkpoint stored `layers` as None and
the resume saw "None -> [64, 128, 10]" as a change of the model. Checkpoints now store the derived
widths, and older ones (None) are read as the widths the model in them has."""

from __future__ import annotations

import numpy as np
from conftest import run_mpi, run_py
from helpers.trainruns import clean_env, final, ok

DEFAULT_RUN = ("-m", "distbp", "train", "--check-every", "none", "--collective-timeout", "60",
               "--checkpoint-every", "5", "--log-every", "5")


def default_train(ranks: int, run_dir, *options: str, fault: str | None = None):
    """`distbp train` with no --data and no --layers (the digits preset, widths derived);
    `fault`: DISTBP_FAULT, the test-only failure injection (e.g. "raise:0:12")."""
    args = [*DEFAULT_RUN, "--run-dir", str(run_dir), *options]
    env = clean_env(**({"DISTBP_FAULT": fault} if fault else {}))
    if ranks == 0:
        return run_py(args, timeout=120, env=env)
    return run_mpi(ranks, args, timeout=120, env=env)


def test_a_run_with_derived_layers_resumes_bitwise_and_stores_the_widths(tmp_path):
    ok(default_train(2, tmp_path / "whole", "--steps", "20"))
    crashed = default_train(2, tmp_path / "split", "--steps", "20", fault="raise:0:12")
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr  # after ckpt-00000010
    proc = ok(default_train(2, tmp_path / "split", "--steps", "20", "--resume", "auto"))
    assert "resumed from" in proc.stdout, proc.stdout
    whole, split = final(tmp_path / "whole", 20), final(tmp_path / "split", 20)
    assert np.array_equal(whole.params, split.params)
    assert split.config["layers"] == list(split.layers) == [64, 128, 10]
