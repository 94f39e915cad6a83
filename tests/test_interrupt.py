"""Ctrl-C with real processes and real signals: a first SIGINT to one rank of a running 2-rank
`distbp train`, to mpiexec (hydra forwards it) or to its process group (a terminal's Ctrl-C), is
a preemption like SIGTERM: one checkpoint, exit 75 on every rank, and `--resume auto` ends
bitwise where an uninterrupted run ends; a second SIGINT aborts at once (exit 1, "interrupted")
without writing the checkpoint the first one asked for. Job helpers: tests/helpers/mpijob.py;
SIGTERM/SIGUSR1: tests/test_preemption.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import mpijob as job

from distbp import checkpoint

N_STEPS = 600  # long enough that a signal sent after step 1 lands well before the end
OPTS = ("--dtype", "float64", "--steps", str(N_STEPS), "--checkpoint-every", "100000",
        "--resume", "auto", "--log-every", "1", "--collective-timeout", "60")
SLOW_SAVE = ROOT / "tests" / "helpers" / "slow_save.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return job.teacher_file(tmp_path_factory.mktemp("data") / "d.h5")


@pytest.fixture(scope="module")
def uninterrupted(mpiexec, data, tmp_path_factory) -> bytes:
    """The final parameters of the run, not interrupted."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc, _ = job.run(job.command(mpiexec, data, run_dir, *OPTS))
    assert proc.returncode == 0, job.shown(proc)
    return checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", N_STEPS)).params \
        .tobytes()


@pytest.mark.parametrize("target", ["rank 0", "rank 1", "mpiexec", "terminal"])
def test_first_ctrl_c_checkpoints_exits_75_on_every_rank_and_resumes_bitwise(
        mpiexec, data, tmp_path, uninterrupted, target):
    # "terminal": SIGINT to mpiexec's process group, as Ctrl-C in a shell sends it (hydra's
    # proxy runs the ranks in a session of their own, so each rank gets it once, forwarded)
    run_dir, stderr, env = tmp_path / "run", tmp_path / "stderr", job.job_env()
    cmd = job.wrapped(mpiexec, data, run_dir, *OPTS)  # each rank prints its own exit code
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                start_new_session=True)
    try:
        pids = job.rank_pids(env[job.TAG])  # before the first step: a tiny run is soon over
        wait_for_line(proc, "step ")
        if target == "terminal":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid if target == "mpiexec" else pids[int(target[-1])], signal.SIGINT)
        code, out = job.finish(proc)
    finally:
        proc.kill()  # a no-op once it has ended; reaped either way
        proc.wait()
    assert code == 75, out[-2000:] + stderr.read_text()
    assert job.rank_codes(stderr.read_text()) == {0: 75, 1: 75}, stderr.read_text()
    assert "interrupted" not in stderr.read_text()
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1, saved
    step = checkpoint.load(saved[0]).step
    assert 0 < step < N_STEPS
    told = f"preempted by a signal: checkpoint at step {step} written; run again with " \
           f"--resume auto to continue"
    assert out.count(told) == 1, out[-2000:]
    if target == "rank 1":  # rank 0 writes the checkpoint for a signal only rank 1 got
        assert "(no signal on rank 0: another rank got it)" in out
    else:
        assert "(INT received 1 time(s) on rank 0)" in out
    resumed, _ = job.run(cmd, env)
    assert job.rank_codes(resumed.stderr) == {0: 0, 1: 0}, job.shown(resumed)
    assert f"resumed from {saved[0]} at step {step}" in resumed.stdout
    final = checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", N_STEPS))
    assert final.params.tobytes() == uninterrupted


def test_second_ctrl_c_aborts_at_once_without_the_checkpoint(data, tmp_path):
    # A serial run of 10^6 steps whose checkpoint writes are held up 60 s (slow_save.py): the
    # first SIGINT asks for a checkpoint; the second, sent once that write has begun, must end
    # the run at once, not after the write, with exit 1 and no checkpoint.
    run_dir = tmp_path / "run"
    env = job.job_env(DISTBP_SLOW_SAVE="60")
    cmd = [sys.executable, str(SLOW_SAVE), "train", "--data", str(data), "--run-dir",
           str(run_dir), *job.MODEL, "--steps", "1000000", "--checkpoint-every", "1000000",
           "--log-every", "1"]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        wait_for_line(proc, "step ")
        proc.send_signal(signal.SIGINT)
        wait_for_line(proc, "distbp-test: saving")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=45)  # the held-up write alone would take 60 s
    finally:
        proc.kill()  # a no-op once it has ended; reaped either way
        proc.wait()
    took = time.monotonic() - t0
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 1, out[-2000:] + stderr
    assert stderr.strip().splitlines()[-1] == "distbp: rank 0: interrupted", stderr
    assert "Traceback" not in stderr
    assert "preempted" not in out
    assert not list(run_dir.rglob("ckpt-*")) and not list(run_dir.rglob(".tmp-*"))
    assert took < 45


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 30) -> None:
    """Read the process's stdout until a line starts with `prefix` (kill it after `timeout`)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"no line starting {prefix!r} (exit {proc.poll()})")
