"""Resume of runs that leave settings to distbp: the digits preset with no --data and layer widths
derived from the data (no --layers), as README's first command and the Slurm template run them.

A review found such runs could not be resumed at all: the checkpoint stored `layers` as None and
the resume saw "None -> [64, 128, 10]" as a change of the model. Checkpoints now store the derived
widths, and older ones (None) are read as the widths the model in them has."""

from __future__ import annotations

import json

import h5py
import numpy as np
from conftest import run_mpi, run_py
from helpers.trainruns import clean_env, final, ok

from distbp import checkpoint

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


def test_a_checkpoint_that_stored_derived_layers_as_none_still_resumes(tmp_path):
    ok(default_train(0, tmp_path / "whole", "--steps", "10"))
    assert default_train(0, tmp_path / "old", "--steps", "10", fault="raise:0:7").returncode == 1
    c = final(tmp_path / "old", 5)
    config = {**c.config, "layers": None}  # as checkpoints written before the fix stored it
    checkpoint.save(c.path.parent, step=c.step, epoch=c.epoch, step_in_epoch=c.step_in_epoch,
                    seed=c.seed, layers=c.layers, activation=c.activation, output=c.output,
                    loss=c.loss, params=c.params, optimizer_name=c.optimizer_name,
                    optimizer_state=c.optimizer_state, config=config, metrics=c.metrics,
                    world_size=c.world_size, preprocess=c.preprocess, interval=c.interval)
    with h5py.File(c.path, "r") as f:
        assert json.loads(f["config/json"][()])["layers"] is None
    ok(default_train(0, tmp_path / "old", "--steps", "10", "--resume", "auto"))
    assert np.array_equal(final(tmp_path / "whole", 10).params, final(tmp_path / "old", 10).params)
    # asking for other widths than the checkpoint's model is still refused
    proc = default_train(0, tmp_path / "old", "--steps", "15", "--resume", "auto",
                         "--layers", "64,32,10")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
