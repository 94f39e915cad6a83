"""Failure handling of `distbp train` under `mpiexec -n 2`, with real processes and real signals:
a rank that raises, is killed (SIGKILL from inside or outside), hangs, is frozen (SIGSTOP) or
exits 0 mid-run; a compressed chunk that only one rank reads turns out corrupt mid-run; the run
diverges; and the exit codes are documented.

Preemption (SIGTERM/SIGUSR1: checkpoint, exit 75, bitwise resume) is in tests/test_preemption.py.
What MPICH's hydra does, and the job helpers both rely on: tests/helpers/mpijob.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, child_env
from helpers.mpijob import (
    BATCH,
    LAUNCHER_PREFIXES,
    TAG,
    N,
    command,
    finish,
    job_env,
    rank_pids,
    run,
    shown,
    start,
    teacher_file,
)

from distbp import checkpoint
from distbp.data import HDF5Dataset, epoch_permutation, shard_indices
from distbp.errors import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return teacher_file(tmp_path_factory.mktemp("data") / "d.h5")


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
    m = re.fullmatch(r"distbp: error: non-finite (?:loss at step|parameters after "
                     r"step) (\d+): the run diverged \(try a smaller --lr\); the last good "
                     r"checkpoint is kept", lines[0])
    assert m, lines[0]
    bad = int(m.group(1))  # "at step s": step s's loss; "after step s": its update
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
