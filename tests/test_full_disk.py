"""A disk that fills during a run, on 1 and 2 ranks: one line, exit 2 (bad input found mid-run,
docs/exit-codes.md), no temporary file left, every checkpoint that exists still verifies. The
disk is a small tmpfs mounted for the test (root only) and unmounted in a finalizer."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, mpiexec_path

from distbp import checkpoint
from distbp.data import synthetic_teacher


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk, gone after the test."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def data_file(d: Path) -> Path:
    ds = synthetic_teacher(256, 8, 3, seed=1)
    path = d / "data.h5"
    with h5py.File(path, "w") as f:
        f.update(x=ds.x, y=ds.y)
    return path


def run(ranks: int, args: list) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distbp", "train", *map(str, args)]
    if ranks > 1:
        exe = mpiexec_path()
        if exe is None:
            pytest.skip("no mpiexec")
        cmd = [exe, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, phrase: str) -> None:
    shown = f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("Abort(")]
    assert len(lines) == 1 and phrase in lines[0], shown  # (hydra may add its Abort note)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, shown


@pytest.mark.parametrize("ranks", [1, 2])
def test_checkpoints_filling_the_disk_end_with_one_line_and_leave_only_valid_files(
        small_disk, tmp_path, ranks):
    # ~570 KB a checkpoint (float64): the fourth does not fit beside three
    proc = run(ranks, ["--data", data_file(tmp_path), "--run-dir", small_disk / "run",
                       "--layers", "8,256,256,3", "--dtype", "float64", "--steps", "40",
                       "--checkpoint-every", "5", "--keep", "3", "--collective-timeout", "30"])
    assert_one_line_exit_2(proc, "No space left on device")
    ckpts = small_disk / "run" / "checkpoints"
    assert checkpoint.list_checkpoints(ckpts), "the first checkpoints fitted"
    for path in checkpoint.list_checkpoints(ckpts):
        checkpoint.load(path)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("ranks", [1, 2])
def test_metrics_on_a_full_disk_end_with_one_line(small_disk, tmp_path, ranks):
    (small_disk / "filler").write_bytes(bytes(2 * 1024 * 1024 - 8192))  # leave ~8 KiB
    proc = run(ranks, ["--data", data_file(tmp_path), "--run-dir", small_disk / "run",
                       "--checkpoint-dir", tmp_path / "ckpts", "--layers", "8,16,3",
                       "--steps", "400", "--record-every", "1", "--collective-timeout", "30"])
    assert_one_line_exit_2(proc, "cannot write metrics file")


def test_predictions_on_a_full_disk_end_with_one_line_and_leave_no_file(small_disk, tmp_path):
    """predict --out on a disk without room: one line, exit 2, neither the file nor a
    temporary left (the checkpoint and data live elsewhere)."""
    data = data_file(tmp_path)
    done = run(1, ["--data", data, "--run-dir", tmp_path / "run", "--layers", "8,16,3",
                   "--steps", "2"])
    assert done.returncode == 0, done.stderr
    (small_disk / "filler").write_bytes(bytes(2 * 1024 * 1024 - 4096))  # leave ~4 KiB
    ckpt = checkpoint.checkpoint_path(tmp_path / "run" / "checkpoints", 2)
    big = tmp_path / "big.h5"  # 20000 rows: 3 float32 outputs each do not fit in 4 KiB
    ds = synthetic_teacher(20000, 8, 3, seed=2)
    with h5py.File(big, "w") as f:
        f.update(x=ds.x, y=ds.y)
    proc = subprocess.run([sys.executable, "-m", "distbp", "predict", str(ckpt), "--data",
                           str(big), "--out", str(small_disk / "pred.h5")],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert_one_line_exit_2(proc, "No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_data_files_written_on_a_full_disk_end_with_one_line_and_leave_no_file(small_disk,
                                                                                tmp_path):
    """An IDX import whose HDF5 file does not fit fails in the middle of HDF5's writes: one
    line, exit 2, no file left. (distbp data synthetic checks the free space first.)"""
    rng = np.random.default_rng(1)
    images, labels = tmp_path / "img", tmp_path / "lab"
    x, y = rng.integers(0, 256, (4000, 28, 28), dtype=np.uint8), rng.integers(0, 10, 4000)
    images.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", *x.shape) + x.tobytes())
    labels.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", len(y)) +
                       y.astype(np.uint8).tobytes())
    (small_disk / "filler").write_bytes(bytes(2 * 1024 * 1024 - 4096))
    proc = subprocess.run([sys.executable, "-m", "distbp", "data", "import-idx", str(images),
                           str(labels), "--out", str(small_disk / "d.h5"), "--compression",
                           "none"], capture_output=True, text=True, timeout=120, env=child_env())
    assert_one_line_exit_2(proc, "No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    proc = subprocess.run([sys.executable, "-m", "distbp", "data", "synthetic", "--out",
                           str(small_disk / "s.h5"), "--n", "20000", "--features", "8",
                           "--classes", "3"], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert_one_line_exit_2(proc, "free there")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_output_beyond_a_file_size_limit_is_one_line_not_a_traceback(tmp_path):
    """stdout redirected to a file that may not grow (ulimit -f: EFBIG, like a full disk):
    one line, exit 2."""
    import resource

    done = run(1, ["--data", data_file(tmp_path), "--run-dir", tmp_path / "run", "--layers",
                   "8,16,3", "--steps", "2"])
    assert done.returncode == 0, done.stderr
    ckpt = checkpoint.checkpoint_path(tmp_path / "run" / "checkpoints", 2)
    with open(tmp_path / "out.json", "w") as out:
        proc = subprocess.run([sys.executable, "-m", "distbp", "inspect", "--json", str(ckpt)],
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=60,
                              env=child_env(), preexec_fn=lambda: resource.setrlimit(
                                  resource.RLIMIT_FSIZE, (512, 512)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["distbp: error: cannot write: File too large"]
