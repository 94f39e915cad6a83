"""One run per directory: a run locks its checkpoint directory and its metrics file's
directory for its lifetime; a second run into either is refused at setup (exit 2, one line
naming the holder's host and PID) and disturbs nothing; a run refused at setup creates
nothing, also when the problem is found by rank 1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, mpiexec_path

from distbp import checkpoint
from distbp.data import synthetic_teacher
from distbp.errors import ConfigError
from distbp.paths import LOCK_NAME, RunLock

N = 64


def data_file(d: Path, bad_row: int | None = None) -> Path:
    ds = synthetic_teacher(N, 8, 3, seed=1)
    x = ds.x.copy()
    if bad_row is not None:
        x[bad_row, 0] = np.nan
    path = d / f"data{'' if bad_row is None else bad_row}.h5"
    with h5py.File(path, "w") as f:
        f.update(x=x, y=ds.y)
    return path


def train(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distbp", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), **kw)


def test_lock_is_exclusive_and_given_back_with_its_file(tmp_path):
    first = RunLock.acquire(tmp_path, "--run-dir", ConfigError)
    holder = (tmp_path / LOCK_NAME).read_text()
    assert holder == f"host {socket.gethostname()} pid {os.getpid()}\n"
    with pytest.raises(ConfigError, match=rf"is in use by another run \({holder.strip()}\)"):
        RunLock.acquire(tmp_path, "--run-dir", ConfigError)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock.acquire(tmp_path, "--run-dir", ConfigError).release()


def test_second_run_into_a_running_directory_is_refused_naming_the_holder(tmp_path):
    data, run_dir = data_file(tmp_path), tmp_path / "run"
    first = train("--data", data, "--layers", "8,16,3", "--steps", "99999", "--run-dir",
                  run_dir, "--checkpoint-every", "50", "--keep", "2")
    try:
        lock = run_dir / LOCK_NAME
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the first run never took its lock"
        for extra in ((), ("--resume", "auto"), ("--metrics", tmp_path / "other.jsonl")):
            second = train("--data", data, "--layers", "8,16,3", "--steps", "10", "--run-dir",
                           run_dir, *extra)
            out, err = second.communicate(timeout=60)
            assert second.returncode == 2, err
            assert err.strip().splitlines() == [
                f"distbp: error: --run-dir '{run_dir}': '{run_dir / 'checkpoints'}' is in use "
                f"by another run (host {socket.gethostname()} pid {first.pid}); wait for it "
                "to end or give another directory"], err
        for target in (run_dir / "metrics.jsonl", run_dir / "checkpoints" / "t.json"):
            # a trace written into a running run's directory: refused too (it is locked)
            second = train("--data", data, "--layers", "8,16,3", "--steps", "10", "--run-dir",
                           tmp_path / "other", "--trace", target)
            out, err = second.communicate(timeout=60)
            assert second.returncode == 2, err
            assert f"is in use by another run (host {socket.gethostname()} pid {first.pid})" \
                in err and f"--trace '{target}'" in err, err
        assert (run_dir / "metrics.jsonl").read_text().startswith('{"kind"')
        assert not list(run_dir.rglob("superseded-*")), "the second run moved nothing aside"
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 75, err
    assert not (run_dir / LOCK_NAME).exists() and not (run_dir / "checkpoints" / LOCK_NAME).exists()
    for path in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        checkpoint.load(path)
    again = train("--data", data, "--layers", "8,16,3", "--steps", "10", "--run-dir", run_dir,
                  "--resume", "auto")
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err


def test_a_run_refused_on_rank_1_creates_no_directory(tmp_path):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec")
    run_dir = tmp_path / "fresh" / "run"
    proc = subprocess.run([exe, "-n", "2", sys.executable, "-m", "distbp", "train", "--data",
                           data_file(tmp_path, bad_row=N - 1), "--layers", "8,16,3", "--steps",
                           "2", "--run-dir", run_dir, "--collective-timeout", "30"],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 2, proc.stderr
    assert "x contains NaN or inf (first at row 63)" in proc.stderr
    assert not (tmp_path / "fresh").exists()
