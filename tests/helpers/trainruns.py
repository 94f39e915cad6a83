"""Shared by tests/test_training.py and tests/test_resume.py: tiny data files, `distbp train` run
as a real process (plain python, or under mpiexec), and what the run leaves behind.

    data = write_data(tmp_path / "d.h5", n=66)
    proc = train(2, data, tmp_path / "run", "--steps", "20", "--dtype", "float64")
    ckpt = final(tmp_path / "run", 20)          # distbp.checkpoint.load of ckpt-00000020.h5
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
from conftest import child_env, run_mpi, run_py

from distbp import checkpoint
from distbp.data import synthetic_teacher

__all__ = ["LAUNCHER_PREFIXES", "TINY", "assert_same_state", "clean_env", "final", "metrics", "ok",
           "record_steps", "rel_diff", "train", "train_args", "write_data"]

LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_")
# A tiny model on 8 features and 3 classes: every run of it takes a fraction of a second.
TINY = ("--layers", "8,16,3", "--activation", "tanh", "--seed", "3", "--lr", "0.1",
        "--check-every", "none", "--collective-timeout", "60")


def clean_env(**extra: str) -> dict[str, str]:
    """A child environment without launcher variables (so plain python really runs serially),
    one BLAS thread per process."""
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(extra)
    return env


def write_data(path: Path, n: int, seed: int = 1) -> Path:
    """n rows of the synthetic teacher task (8 float32 features, 3 classes) as HDF5 x, y."""
    ds = synthetic_teacher(n, 8, 3, seed)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = ds.x, ds.y
    return path


def train_args(data: Path, run_dir: Path, *options: str) -> list[str]:
    return ["-m", "distbp", "train", "--data", str(data), "--run-dir", str(run_dir), *TINY,
            *options]


def train(ranks: int, data: Path, run_dir: Path, *options: str, env: dict | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
    """`distbp train` on the tiny model: ranks 0 = plain python (the serial fallback), else
    `mpiexec -n ranks`. Later options override TINY's."""
    args = train_args(data, run_dir, *options)
    env = env or clean_env()
    if ranks == 0:
        return run_py(args, timeout=timeout, env=env)
    return run_mpi(ranks, args, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert exit 0, showing the run's output otherwise."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def final(run_dir: Path, step: int) -> checkpoint.Checkpoint:
    """The verified checkpoint of `step` in the run's default checkpoint directory."""
    return checkpoint.load(checkpoint.checkpoint_path(Path(run_dir) / "checkpoints", step))


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |a|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def metrics(run_dir: Path) -> list[dict]:
    """The records of the run's metrics JSON-lines file."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_state(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    """Parameters, every optimizer state buffer and the input statistics bitwise equal; same
    step and cursor."""
    assert (a.step, a.epoch, a.step_in_epoch) == (b.step, b.epoch, b.step_in_epoch)
    assert a.params.dtype == b.params.dtype
    np.testing.assert_array_equal(a.params, b.params)
    assert a.optimizer_state.keys() == b.optimizer_state.keys()
    for key, value in a.optimizer_state.items():
        np.testing.assert_array_equal(value, b.optimizer_state[key], err_msg=key)
    assert a.preprocess.keys() == b.preprocess.keys()
    for key, value in a.preprocess.items():
        np.testing.assert_array_equal(value, b.preprocess[key], err_msg=key)


def record_steps(run_dir: Path) -> dict[str, list[int]]:
    """Steps of the metrics records by kind, asserting no step appears twice within a kind."""
    steps: dict[str, list[int]] = {}
    for r in metrics(run_dir):
        steps.setdefault(r["kind"], []).append(r["step"])
    for kind, values in steps.items():
        assert values == sorted(set(values)), f"{kind} steps repeat or go back: {values}"
    return steps
