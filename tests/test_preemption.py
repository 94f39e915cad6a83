"""Preemption of `distbp train` under `mpiexec -n 2`, with real processes and real signals:
SIGUSR1/SIGTERM sent to the ranks or to mpiexec (once, in a burst, or a second one while rank 0
writes the checkpoint) give one intact checkpoint, exit 75 on every rank and a bitwise exact
resume; a stop signal during start-up (imports, MPI init, data checks) is caught too, through
`python -m distbp` and through the console script.

Other failures (crashes, hangs, bad data, divergence): tests/test_failures.py. What MPICH's hydra
does, and the job helpers both rely on: tests/helpers/mpijob.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from helpers.mpijob import (
    TAG,
    command,
    finish,
    job_env,
    rank_codes,
    rank_pids,
    run,
    shown,
    start,
    teacher_file,
    wrapped,
)

from distbp import checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return teacher_file(tmp_path_factory.mktemp("data") / "d.h5")


# ----------------------------------------------------------------------------- preemption

N_STEPS = 600  # long enough that a signal sent after step 1 lands well before the end
PREEMPT = ("--dtype", "float64", "--steps", str(N_STEPS), "--checkpoint-every", "100000",
           "--resume", "auto", "--log-every", "1", "--collective-timeout", "60")


@pytest.fixture(scope="module")
def uninterrupted(mpiexec, data, tmp_path_factory) -> checkpoint.Checkpoint:
    run_dir = tmp_path_factory.mktemp("reference")
    proc, _ = run(command(mpiexec, data, run_dir, *PREEMPT))
    assert proc.returncode == 0, shown(proc)
    return checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", N_STEPS))


def assert_bitwise_equal(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    assert a.params.dtype == b.params.dtype == np.float64
    assert a.params.tobytes() == b.params.tobytes()
    assert sorted(a.optimizer_state) == sorted(b.optimizer_state)
    for key in a.optimizer_state:
        assert a.optimizer_state[key].tobytes() == b.optimizer_state[key].tobytes(), key


def preempt_and_resume(mpiexec, data, run_dir: Path, target: str, signals: list,
                       gap_s: float = 0.0) -> checkpoint.Checkpoint:
    """Start the run, send `signals` (gap_s apart) to every rank or to mpiexec, expect exit 75
    on each rank and ONE checkpoint, then run the same command again: it must finish (exit 0 on
    each rank). Returns the final checkpoint."""
    env = job_env()
    cmd = wrapped(mpiexec, data, run_dir, *PREEMPT)
    stderr = run_dir.parent / f"{run_dir.name}.stderr"
    pids: list[int] = []

    def find_ranks() -> None:
        if target == "ranks":
            pids.extend(rank_pids(env[TAG]).values())

    proc = start(cmd, env, stderr, meanwhile=find_ranks)
    pids = pids or [proc.pid]
    for i, sig in enumerate(signals):
        if i:
            time.sleep(gap_s)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # a late signal of the burst: that rank is done
                pass
    code, out = finish(proc)
    assert code == 75, out[-2000:]
    assert rank_codes(stderr.read_text()) == {0: 75, 1: 75}, stderr.read_text()
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1, saved
    ckpt = checkpoint.load(saved[0])  # verified: every dataset matches its SHA-256
    assert 0 < ckpt.step < N_STEPS
    assert out.count(f"preempted by a signal: checkpoint at step {ckpt.step} written") == 1
    proc2, _ = run(cmd, env)
    assert proc2.returncode == 0, shown(proc2)
    assert rank_codes(proc2.stderr) == {0: 0, 1: 0}, shown(proc2)
    assert f"resumed from {saved[0]} at step {ckpt.step}" in proc2.stdout
    return checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", N_STEPS))


@pytest.mark.parametrize("target", ["ranks", "mpiexec"])
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_gives_exit_75_a_checkpoint_and_a_bitwise_exact_resume(
        mpiexec, data, tmp_path, uninterrupted, sig, target):
    # to "mpiexec": hydra forwards SIGTERM and SIGUSR1 to every rank
    final = preempt_and_resume(mpiexec, data, tmp_path / "run", target, [sig])
    assert_bitwise_equal(final, uninterrupted)


def test_signals_in_quick_succession_do_not_corrupt_the_checkpoint(
        mpiexec, data, tmp_path, uninterrupted):
    # a burst, 3 ms apart, so some arrive while rank 0 writes the checkpoint
    burst = [signal.SIGUSR1, signal.SIGTERM] * 10
    final = preempt_and_resume(mpiexec, data, tmp_path / "run", "ranks", burst, gap_s=0.003)
    assert_bitwise_equal(final, uninterrupted)


# A model whose checkpoint takes rank 0 a while to write: float64, 4.0 M parameters plus as much
# momentum, 64 MB (~0.3 s here), so a second signal can be sent while the file is being written.
BIG = ("--layers", "8,2000,2000,3", "--momentum", "0.9", "--dtype", "float64", "--steps", "24",
       "--checkpoint-every", "100000", "--resume", "auto", "--log-every", "1",
       "--collective-timeout", "60")


def wait_for_temp_checkpoint(ckpt_dir: Path, timeout: float = 30) -> Path:
    """The temporary file checkpoint.save writes before renaming it, as soon as it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(ckpt_dir.glob(".tmp-ckpt-*.h5.*")) if ckpt_dir.is_dir() else []
        if found:
            return found[0]
        time.sleep(0.0005)
    raise AssertionError(f"no checkpoint was being written in {ckpt_dir}")


def test_second_signal_while_rank_0_writes_the_checkpoint_does_not_corrupt_it(
        mpiexec, data, tmp_path):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "reference"
    reference, _ = run(command(mpiexec, data, ref_dir, *BIG))
    assert reference.returncode == 0, shown(reference)
    env, stderr = job_env(), tmp_path / "stderr"
    cmd = wrapped(mpiexec, data, run_dir, *BIG)
    proc = start(cmd, env, stderr)
    pids = rank_pids(env[TAG])
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    tmp = wait_for_temp_checkpoint(run_dir / "checkpoints")
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    still_writing = tmp.exists()  # the kill was delivered before save renamed the file
    code, out = finish(proc)
    assert still_writing, "the second signal came after the checkpoint was written"
    assert code == 75, out[-2000:]
    assert rank_codes(stderr.read_text()) == {0: 75, 1: 75}, stderr.read_text()
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and not list((run_dir / "checkpoints").glob(".tmp-*")), saved
    ckpt = checkpoint.load(saved[0])  # every dataset matches its SHA-256
    # rank 0 counted the second signal, which arrived while it was saving
    assert (f"preempted by a signal: checkpoint at step {ckpt.step} written; run again with "
            f"--resume auto to continue (TERM received 2 time(s) on rank 0)") in out
    assert "rank 1 received the stop signal 2 times (last TERM)" in stderr.read_text()
    resumed, _ = run(cmd, env)
    assert rank_codes(resumed.stderr) == {0: 0, 1: 0}, shown(resumed)
    assert f"resumed from {saved[0]} at step {ckpt.step}" in resumed.stdout
    assert_bitwise_equal(checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", 24)),
                         checkpoint.load(checkpoint.checkpoint_path(ref_dir / "checkpoints", 24)))


# ----------------------------------------------------------------------------- start-up signals

def console_script(directory: Path) -> Path:
    """The `distbp` console script pip makes from pyproject.toml's [project.scripts] entry
    (the venv's own is rewritten only when the package is reinstalled)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["distbp"]
    module, func = spec.split(":")
    path = directory / "distbp"
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                    f"if __name__ == '__main__':\n    sys.exit({func}())\n")
    path.chmod(0o755)
    return path


def started_ranks(tag: str, ranks: int = 2, timeout: float = 20) -> dict[int, tuple[int, float]]:
    """rank -> (PID, when it was first seen) of the job's ranks, polled as fast as /proc allows
    from the moment they exec RANK_EXIT (before that, a forked proxy has no PMI_RANK)."""
    want, found = f"{TAG}={tag}".encode(), {}
    deadline = time.monotonic() + timeout
    while len(found) < ranks:
        assert time.monotonic() < deadline, f"ranks of job {tag} not found"
        for entry in os.scandir("/proc"):
            try:
                if not entry.name.isdigit() or b"rank_exit.py" not in Path(
                        entry.path, "cmdline").read_bytes():
                    continue
                env = Path(entry.path, "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [v[9:] for v in env if v.startswith(b"PMI_RANK=")]
            if want in env and rank and int(rank[0]) not in found:
                found[int(rank[0])] = (int(entry.name), time.monotonic())
    return found


def catches_stop_signals(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM and SIGUSR1 (the kernel's SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return all(caught >> (sig - 1) & 1 for sig in (signal.SIGTERM, signal.SIGUSR1))


def numpy_loaded(pid: int) -> bool:
    return "/numpy/" in Path(f"/proc/{pid}/maps").read_text()


def wait_for_handler_before_numpy(pid: int, timeout: float = 20) -> None:
    """Poll until the rank catches the stop signals; fail if NumPy was ever seen loaded while it
    did not yet (maps read before status: loaded-then-uncaught proves NumPy came first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded = numpy_loaded(pid)
        if catches_stop_signals(pid):
            return
        assert not loaded, f"rank {pid} loaded NumPy before catching SIGTERM/SIGUSR1"
    raise AssertionError(f"rank {pid} never caught SIGTERM/SIGUSR1")


@pytest.mark.parametrize(("entry", "delay"), [
    ("module", 0.0), ("module", 0.1), ("module", 0.25), ("module", 0.5),
    ("script", 0.0), ("script", 0.2)])
def test_stop_signal_during_start_up_exits_75_instead_of_killing(
        mpiexec, data, tmp_path, entry, delay):
    # USR1 to both ranks `delay` s after they exec: during the imports, MPI init or the data
    # checks. Only the interpreter's own start-up (before distbp's first line) is uncovered, so
    # the signal waits until the kernel shows the handler, which must come before NumPy. Before
    # training begins the ranks stop at once, saying so (nothing to save); after, the first
    # step checkpoints; either way the job exits 75 (or 0 when it was over already).
    env, run_dir = job_env(), tmp_path / "run"
    how = ("-m", "distbp") if entry == "module" else (str(console_script(tmp_path)),)
    cmd = wrapped(mpiexec, data, run_dir, *PREEMPT, entry=how)
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
    try:
        ranks = started_ranks(env[TAG])
        for pid, _ in ranks.values():
            wait_for_handler_before_numpy(pid)
        for pid, seen in ranks.values():
            time.sleep(max(0.0, seen + delay - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # the run already ended: exit 0 below
                os.kill(pid, signal.SIGUSR1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # a failed assertion or a hang: end mpiexec and its ranks
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    shown = f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr}"
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    if "before training began" in stderr:  # stopped in start-up: at once, nothing written
        assert proc.returncode == 75, shown
        assert re.search(r"distbp: rank \d: stopped by SIGUSR1 before training began: nothing "
                         r"was trained or saved", stderr), shown
        assert saved == [] and "Traceback" not in stderr, shown
        return
    codes = rank_codes(stderr)
    assert codes in ({0: 75, 1: 75}, {0: 0, 1: 0}), f"{codes}\n{shown}"
    assert len(saved) == 1, saved
    checkpoint.load(saved[0])
    if codes[0] == 75:
        assert "preempted by a signal: checkpoint at step" in stdout
