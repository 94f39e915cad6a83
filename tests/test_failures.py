"""Failure handling of `distbp train` under `mpiexec -n 2`, with real processes and real signals.

What MPICH 5's hydra does, measured here and relied on below:
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
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, child_env, mpiexec_path

from distbp import checkpoint
from distbp.data import HDF5Dataset, epoch_permutation, shard_indices, synthetic_teacher
from distbp.errors import DataError

N, BATCH = 64, 16  # rows of the data file; global batch: 4 steps per epoch
MODEL = ("--layers", "8,16,3", "--activation", "tanh", "--seed", "3", "--batch-size", str(BATCH),
         "--check-every", "none")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_")
TAG = "DISTBP_TEST_JOB"  # a unique value per job marks its ranks in /proc/PID/environ
RANK_EXIT = ROOT / "tests" / "helpers" / "rank_exit.py"


@pytest.fixture(scope="module")
def mpiexec() -> str:
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec: pip install '.[mpi]'")
    return exe


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """N rows of a learnable task: 8 float32 features, 3 classes."""
    ds = synthetic_teacher(N, 8, 3, seed=1)
    path = tmp_path_factory.mktemp("data") / "d.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = ds.x, ds.y
    return path


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or job_env())
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


# ----------------------------------------------------------------------------- crashing ranks

def test_exception_on_rank_1_ends_the_job_in_seconds_with_rank_error_and_traceback(
        mpiexec, data, tmp_path):
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "400", "--collective-timeout", "60")
    proc, took = run(cmd, job_env(DISTBP_FAULT="raise:1:5"))
    assert proc.returncode == 1, shown(proc)  # MPI_Abort(1): mpiexec exits 1
    assert took < 15  # the abort, not the 60 s deadline, ended rank 0
    assert "distbp: rank 1: error: RuntimeError: injected fault at step 5" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert 'raise RuntimeError(f"injected fault' in proc.stderr  # the failing line is shown
    assert "rank 0: error" not in proc.stderr  # rank 0 was stopped, it did not fail


def test_rank_killed_by_sigkill_ends_the_job_with_hydra_reporting_signal_9(
        mpiexec, data, tmp_path):
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "400", "--collective-timeout", "60")
    proc, took = run(cmd, job_env(DISTBP_FAULT="kill:1:5"))
    assert proc.returncode == 9, shown(proc)  # hydra: exit code = the signal number
    assert took < 15
    assert "Killed (signal 9)" in proc.stdout  # hydra's banner goes to stdout


def test_sigkill_sent_from_outside_to_one_rank_ends_the_job(mpiexec, data, tmp_path):
    env = job_env()
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "100000", "--log-every", "1",
                  "--collective-timeout", "60")
    proc = start(cmd, env, tmp_path / "stderr")
    t0 = time.monotonic()
    os.kill(rank_pids(env[TAG])[1], signal.SIGKILL)
    code, out = finish(proc)
    assert code == 9, out[-2000:]
    assert time.monotonic() - t0 < 15
    assert "Killed (signal 9)" in out


def test_hung_rank_makes_rank_0_abort_at_the_deadline_naming_the_step(mpiexec, data, tmp_path):
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "400", "--collective-timeout", "3")
    proc, took = run(cmd, job_env(DISTBP_FAULT="hang:1:5"))
    assert proc.returncode == 1, shown(proc)
    assert 3 <= took < 12  # waited for the deadline, no longer
    assert ("distbp: rank 0: error: collective at step 6 did not complete within 3 s "
            "(--collective-timeout): a peer rank may have died or hung") in proc.stderr
    assert "Traceback" not in proc.stderr  # rank 0 did nothing wrong: one line, no traceback


def test_frozen_rank_sigstop_is_caught_by_the_collective_deadline(mpiexec, data, tmp_path):
    # SIGSTOP: the process neither runs nor dies, so hydra sees nothing; only the deadline helps.
    env = job_env()
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "100000", "--log-every", "1",
                  "--collective-timeout", "2")
    proc = start(cmd, env, tmp_path / "stderr")
    t0 = time.monotonic()
    os.kill(rank_pids(env[TAG])[1], signal.SIGSTOP)
    code, _ = finish(proc)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 1, stderr
    assert 2 <= time.monotonic() - t0 < 12
    assert re.search(r"distbp: rank 0: error: collective at step \d+ did not complete within 2 s",
                     stderr)


def test_rank_that_exits_0_mid_run_does_not_make_the_job_look_successful(
        mpiexec, data, tmp_path):
    # SystemExit(0) on rank 1 after step 5: a normal return would hang in MPI_Finalize, an
    # os._exit(0) would make hydra report success; distbp aborts with 1.
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "400", "--collective-timeout", "60")
    proc, took = run(cmd, job_env(DISTBP_FAULT="exit0:1:5"))
    assert proc.returncode == 1, shown(proc)
    assert took < 15
    assert "distbp: rank 1: error: SystemExit: 0" in proc.stderr


def test_abort_with_code_0_still_fails_the_job(mpiexec, tmp_path):
    prog = tmp_path / "abort0.py"
    prog.write_text("from distbp.comm import get_comm\nc = get_comm(timeout=60)\n"
                    "if c.rank == 1:\n    c.abort(0)\nc.barrier()\n")
    proc, took = run([mpiexec, "-n", "2", sys.executable, str(prog)])
    assert proc.returncode == 1, shown(proc)
    assert took < 15
    serial, _ = run([sys.executable, "-c", "from distbp.comm import SerialComm\n"
                     "SerialComm().abort(0)"])
    assert serial.returncode == 1


# ----------------------------------------------------------------------------- bad data mid-run

WIDE = 1 << 16  # features of the damaged file: 64 KiB rows, so that a rank reads its own rows
# and no others (distbp.data reads nearby rows of a chunked dataset as one slice, bridging gaps
# of up to 64 KiB); first_failure checks that premise.


def corrupt_chunk_file(path: Path, row: int) -> None:
    """x uint8 (N, WIDE) stored gzip-compressed one row per chunk, y int64 labels 0..2; then
    the bytes of the chunk of `row` are overwritten, so inflating it fails. uint8 x is not
    scanned for NaN at startup: the damage is found only when a batch needs that row."""
    rng = np.random.default_rng(5)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=rng.integers(0, 4, (N, WIDE), dtype=np.uint8),
                         chunks=(1, WIDE), compression="gzip")
        f["y"] = rng.integers(0, 3, N)
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info_by_coord((row, 0))
    assert info.size > 64
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(bytes((37 * i + 11) % 256 for i in range(info.size - 32)))


def first_failure(path: Path, seed: int = 3) -> tuple[int, list[int]]:
    """(1-based step, ranks whose read fails) of the first failing step of epoch 0: each rank's
    shard read in this process as the trainer does (its batch plan, distbp.data's reader)."""
    ds, perm = HDF5Dataset(path), epoch_permutation(seed, 0, N)
    try:
        for step in range(N // BATCH):
            failed = []
            for rank in range(2):
                try:
                    ds.read(shard_indices(perm, step, BATCH, rank, 2))
                except DataError:
                    failed.append(rank)
            if failed:
                return step + 1, failed
    finally:
        ds.close()
    raise AssertionError("no shard read fails")


def test_corrupt_compressed_chunk_read_by_one_rank_ends_the_job_naming_the_file(
        mpiexec, tmp_path):
    path = tmp_path / "damaged.h5"
    corrupt_chunk_file(path, row=40)
    step, failed = first_failure(path)
    assert (step, failed) == (3, [1])  # found later, by one rank: the case under test
    cmd = command(mpiexec, path, tmp_path / "run", "--layers", f"{WIDE},16,3", "--steps", "8",
                  "--in-memory", "no", "--scale", "0.3", "--collective-timeout", "60")
    proc, took = run(cmd)
    assert proc.returncode == 2, shown(proc)  # bad input, found mid-run: MPI_Abort(2)
    assert took < 15  # aborted, not left to the deadline
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distbp:")]
    assert len(ours) == 1, shown(proc)  # one line, from the one rank that read the chunk
    assert re.fullmatch(rf"distbp: rank 1: error: data file '{re.escape(str(path))}': "
                        rf"cannot read rows \d+\.\.\d+ \(8 rows\) of '/x': .*", ours[0]), ours[0]
    assert "Traceback" not in proc.stderr  # an expected data error: one line is the message
    assert "step 2/8" in proc.stdout and "step 3/8" not in proc.stdout  # stopped at step 3


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
BIG = ("--layers", "8,2000,2000,3", "--dtype", "float64", "--steps", "24",
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
def test_stop_signal_during_start_up_checkpoints_and_exits_75_instead_of_killing(
        mpiexec, data, tmp_path, entry, delay):
    # USR1 to both ranks `delay` s after they exec: during the imports, MPI init or the data
    # checks. Only the interpreter's own start-up (before distbp's first line) is uncovered, so
    # the signal waits until the kernel shows the handler, which must come before NumPy.
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
    codes = rank_codes(stderr)
    assert codes in ({0: 75, 1: 75}, {0: 0, 1: 0}), f"{codes}\n{stdout[-2000:]}\n{stderr}"
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1, saved
    checkpoint.load(saved[0])
    if codes[0] == 75:
        assert "preempted by a signal: checkpoint at step" in stdout


# ----------------------------------------------------------------------------- divergence

def test_divergence_stops_every_rank_at_one_step_and_keeps_the_last_good_checkpoint(
        mpiexec, data, tmp_path):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 8 good steps at lr 0.1, then a step schedule multiplies it by 1e7: the run explodes.
    # A checkpoint after every good step. (A resumed run may not change --lr: refused.)
    proc, took = run(command(mpiexec, data, run_dir, "--activation", "relu", "--steps", "60",
                             "--schedule", "step", "--lr-step-size", "8", "--lr-gamma", "1e7",
                             "--checkpoint-every", "1", "--keep", "100",
                             "--collective-timeout", "60"))
    assert proc.returncode == 1, shown(proc)
    assert took < 15  # every rank stopped: none was left waiting for the 60 s deadline
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, shown(proc)  # one message, no warnings, no traceback, no abort
    m = re.fullmatch(r"distbp: error: non-finite (?:loss or gradient at step|parameters after "
                     r"step) (\d+): the run diverged \(try a smaller --lr\); the last good "
                     r"checkpoint is kept", lines[0])
    assert m, lines[0]
    bad = int(m.group(1))  # "at step s": step s's gradient; "after step s": its update
    last_good = bad - 1
    assert 8 < bad < 60
    steps = [int(p.stem[5:]) for p in checkpoint.list_checkpoints(ckpt_dir)]
    assert steps == list(range(1, last_good + 1))  # nothing at or after the failing step
    newest = checkpoint.load(checkpoint.checkpoint_path(ckpt_dir, last_good))
    assert np.isfinite(newest.params).all()


# ----------------------------------------------------------------------------- exit codes

def test_exit_codes_are_documented_in_train_help_and_readme():
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--help"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for phrase in ("exit codes: 0 done", "2 bad input or configuration", "75 preempted",
                   "--resume auto", "1 anything else"):
        assert phrase in text, phrase
    readme = " ".join((ROOT / "README.md").read_text().split())
    for phrase in ("`0` done", "`2` bad input", "`75` preempted", "`1` anything else"):
        assert phrase in readme, phrase
