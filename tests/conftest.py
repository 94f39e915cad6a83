"""Shared helpers: launching real `mpiexec` jobs with a timeout, strict numerics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mpiexec_path() -> str | None:
    """The mpiexec next to this Python (the `mpich` wheel's), else one on PATH."""
    local = BIN / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one BLAS thread unless a test says otherwise."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_mpi(n: int, args: list[str], timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `mpiexec -n N python ARGS...` and return the completed process (text output).

    The timeout is a hard bound: a hung job fails the test instead of hanging CI.
    """
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec: pip install '.[mpi]'")
    cmd = [exe, "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(), cwd=cwd)


def run_py(args: list[str], timeout: float = 120, env: dict | None = None,
           cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS...` as a plain process (no MPI launcher)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or child_env(), cwd=cwd)


@pytest.fixture
def strict_numpy():
    """Turn overflow, invalid and divide-by-zero into errors for the test's duration.

    Underflow stays silent: e^(−1e4) = 0 is the correct float, not a numerical accident.
    """
    old = np.seterr(all="raise", under="ignore")
    yield
    np.seterr(**old)
