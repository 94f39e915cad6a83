"""Shared by tests/test_failures.py and tests/test_preemption.py: a 2-rank `distbp train` job
under `mpiexec`, started, watched through /proc and finished with a timeout.

What MPICH 5's hydra does, measured by those tests and relied on there:
- MPI_Abort(comm, c) ends every rank and mpiexec exits c (an "Abort(c) on node ..." line on
  stderr); a rank killed by signal s makes hydra kill the others and exit s (a banner on stdout).
- A rank that returns normally while another waits in a collective hangs in MPI_Finalize, so a
  lone failing rank must abort; a rank that ends with os._exit(0) makes hydra kill the rest and
  exit 0: the job looks successful. distbp therefore never aborts with 0.
- SIGTERM and SIGUSR1 sent to mpiexec are forwarded to every rank (SIGINT too).
- Output a rank writes just before MPI_Abort can be dropped by hydra's proxy (3 jobs in 30 lost
  their error line on 2 busy cores); distbp pauses 0.1 s before aborting.
- mpiexec's exit code is not each rank's: hydra reports 75 even when one rank exits 0. The
  preemption tests run each rank through tests/helpers/rank_exit.py, which prints the rank's own.
Ranks are found by PID through /proc (Linux).

    proc, took = run(command(mpiexec, data, tmp_path / "run", "--steps", "40"))
    env = job_env(); proc = start(wrapped(...), env, tmp_path / "stderr")
    os.kill(rank_pids(env[TAG])[1], signal.SIGKILL); code, out = finish(proc)
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import h5py
import pytest
from conftest import ROOT, child_env, with_faults

from distbp.data import synthetic_teacher

__all__ = ["BATCH", "LAUNCHER_PREFIXES", "MODEL", "N", "RANK_EXIT", "TAG", "command", "finish",
           "job_env", "rank_codes", "rank_pids", "run", "shown", "start", "teacher_file",
           "wrapped"]

N, BATCH = 64, 16  # rows of the data file; global batch: 4 steps per epoch
MODEL = ("--layers", "8,16,3", "--activation", "tanh", "--seed", "3", "--batch-size", str(BATCH),
         "--check-every", "none")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_")
TAG = "DISTBP_TEST_JOB"  # a unique value per job marks its ranks in /proc/PID/environ
RANK_EXIT = ROOT / "tests" / "helpers" / "rank_exit.py"


def job_env(**extra: str) -> dict[str, str]:
    """No launcher variables from an outer job, one BLAS thread, a unique TAG."""
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env[TAG] = uuid.uuid4().hex
    env.update(extra)
    return env


def command(mpiexec: str, data: Path, run_dir: Path, *options: str) -> list[str]:
    return [mpiexec, "-n", "2", sys.executable, "-m", "distbp", "train", "--data", str(data),
            "--run-dir", str(run_dir), *MODEL, *options]


def wrapped(mpiexec: str, data: Path, run_dir: Path, *options: str,
            entry: tuple[str, ...] = ("-m", "distbp")) -> list[str]:
    """`command`, each rank run through RANK_EXIT, which prints the rank's own exit code."""
    return [mpiexec, "-n", "2", sys.executable, str(RANK_EXIT), *entry, "train", "--data",
            str(data), "--run-dir", str(run_dir), *MODEL, *options]


def rank_codes(stderr: str) -> dict[int, int]:
    """rank -> exit code, from RANK_EXIT's lines (a rank killed by a signal has none). Not
    anchored: hydra may splice another rank's output into the line before it."""
    return {int(r): int(c) for r, c in re.findall(r"distbp-test: rank (\d+) exit (-?\d+)\n",
                                                  stderr)}


def run(cmd: list[str], env: dict | None = None, timeout: float = 60):
    """(CompletedProcess, seconds it took); the timeout turns a hang into a failure."""
    t0 = time.monotonic()
    env = env or job_env()
    proc = subprocess.run(with_faults(cmd, env), capture_output=True, text=True, timeout=timeout,
                          env=env)
    return proc, time.monotonic() - t0


def shown(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr}"


def rank_pids(tag: str, ranks: int = 2, timeout: float = 20) -> dict[int, int]:
    """rank -> PID of the job's rank processes: those whose environment holds the job's tag and
    the PMI_RANK hydra gives each rank (hydra's own proxy has the tag but no PMI_RANK)."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the ranks' PIDs needs Linux's /proc")
    want, deadline = f"{TAG}={tag}".encode(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
            except OSError:  # gone, or not ours to read
                continue
            rank = [v[9:] for v in env if v.startswith(b"PMI_RANK=")]
            if want in env and rank:
                found[int(rank[0])] = int(entry.name)
        if len(found) == ranks:
            return found
        time.sleep(0.05)
    raise AssertionError(f"ranks of job {tag} not found")


def start(cmd: list[str], env: dict, stderr_path: Path, meanwhile=None) -> subprocess.Popen:
    """Start a job and return once rank 0 has printed its first step line (--log-every 1).
    `meanwhile()`, if given, runs right after the start (e.g. find the ranks: after the first
    step a tiny run may end before a /proc scan does)."""
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if meanwhile is not None:
        meanwhile()
    watchdog = threading.Timer(30, proc.kill)  # a silent hang must not hang the test
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                return proc
    finally:
        watchdog.cancel()
    proc.kill()
    raise AssertionError(f"the job printed no step line; stderr:\n{stderr_path.read_text()}")


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def teacher_file(path: Path) -> Path:
    """Write N rows of a learnable task (8 float32 features, 3 classes) as HDF5 x/y at `path`."""
    ds = synthetic_teacher(N, 8, 3, seed=1)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = ds.x, ds.y
    return path
