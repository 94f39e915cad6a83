"""Files made to hurt: HDF5 features distbp does not read, headers that claim terabytes, corrupt
bytes, values beyond the run's dtype, FIFOs where a file is expected, outputs that are inputs,
symlinks planted where distbp writes. Each is a real `distbp` process: exit 2, one line naming
the file and the problem, no traceback, no hang, nothing destroyed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env

from distbp import checkpoint
from distbp.data import synthetic_teacher

N = 64


def distbp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m distbp ARGS` as one process; a hang fails the test at `timeout`."""
    return subprocess.run([sys.executable, "-m", "distbp", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=child_env())


def refused(proc: subprocess.CompletedProcess, pattern: str) -> None:
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distbp: error: "), shown
    assert pattern in lines[0], shown


def write_h5(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
    return path


def storage_builders(d: Path, x: np.ndarray, y: np.ndarray) -> dict:
    """name -> a function writing an HDF5 file whose x is not plain data of its own."""

    def external_link(f):
        f["x"] = h5py.ExternalLink(str(d / "missing.h5"), "x")
        f["y"] = y

    def cycle(f):  # two files whose x are links to each other
        f["x"] = h5py.ExternalLink(str(d / "cycle_b.h5"), "x")
        f["y"] = y

    def soft_link(f):
        f["data"] = x
        f["x"] = h5py.SoftLink("/data")
        f["y"] = y

    def virtual(f):
        layout = h5py.VirtualLayout(x.shape, x.dtype)
        layout[:] = h5py.VirtualSource(str(d / "missing.h5"), "x", x.shape)
        f.create_virtual_dataset("x", layout, fillvalue=0)
        f["y"] = y

    def external_raw(f):
        f.create_dataset("x", x.shape, x.dtype, external=[(str(d / "missing.bin"), 0,
                                                            h5py.h5f.UNLIMITED)])
        f["y"] = y

    def claims_2_40_rows(f):
        f.create_dataset("x", (2**40, 8), np.float32, chunks=(1024, 8))
        f.create_dataset("y", (2**40,), np.int64, chunks=(1024,))

    return {"external_link": external_link, "cycle_a": cycle, "soft_link": soft_link,
            "virtual": virtual, "external_raw": external_raw,
            "claims_2_40_rows": claims_2_40_rows}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    ds = synthetic_teacher(N, 8, 3, seed=1)
    x, y = ds.x, ds.y
    made = {"good": write_h5(d / "good.h5", lambda f: f.update(x=x, y=y))}
    for name, build in storage_builders(d, x, y).items():
        made[name] = write_h5(d / f"{name}.h5", build)
    write_h5(d / "cycle_b.h5", lambda f: f.update(
        x=h5py.ExternalLink(str(d / "cycle_a.h5"), "x"), y=y))
    made["scale_inf"] = write_h5(d / "scale_inf.h5", lambda f: (
        f.update(x=x, y=y), f.attrs.__setitem__("scale", np.inf)))
    made["scale_zero"] = write_h5(d / "scale_zero.h5", lambda f: (
        f.update(x=x, y=y), f["x"].attrs.__setitem__("scale", 0.0)))
    made["beyond_float32"] = write_h5(d / "beyond_float32.h5", lambda f: f.update(
        x=np.where(np.arange(N)[:, None] == 6, 1e39, x.astype(np.float64)), y=y))
    made["huge_npz"] = d / "huge.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2**40, 8)})
    with zipfile.ZipFile(made["huge_npz"], "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(4096))
        z.writestr("y.npy", header.getvalue())
    os.mkfifo(d / "fifo")
    made["fifo"] = d / "fifo"
    return made


DATA_CASES = {
    "external_link": "'x' is an external link",
    "cycle_a": "'x' is an external link",
    "soft_link": "'x' is a soft link",
    "virtual": "dataset '/x' is a virtual dataset",
    "external_raw": "dataset '/x' uses external raw storage",
    "claims_2_40_rows": "declares shape (1099511627776, 8)",
    "huge_npz": "array 'x' claims shape (1099511627776, 8)",
    "scale_inf": "attribute 'scale' must be a finite positive number, got inf",
    "scale_zero": "attribute 'scale' must be a finite positive number, got 0.0",
    "beyond_float32": "x holds values beyond float32's range (first at row 6)",
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_hostile_data_file_is_refused_at_setup_and_creates_nothing(files, tmp_path, case):
    run_dir = tmp_path / "run"
    proc = distbp("train", "--data", files[case], "--layers", "8,16,3", "--steps", "2",
                  "--run-dir", run_dir)
    refused(proc, DATA_CASES[case])
    assert not run_dir.exists()


@pytest.mark.parametrize("case", ["external_link", "virtual", "claims_2_40_rows", "huge_npz"])
def test_data_info_refuses_what_training_refuses(files, case):
    refused(distbp("data", "info", files[case]), DATA_CASES[case])


def test_randomly_corrupted_data_files_give_one_line_never_a_traceback(files, tmp_path):
    raw = bytearray(files["good"].read_bytes())
    rng = np.random.default_rng(7)
    refusals = 0
    for trial in range(40):
        bad = bytearray(raw)
        at = rng.integers(0, min(len(raw), 4096), size=8)  # the first pages: headers, B-trees
        for i, value in zip(at, rng.integers(0, 256, size=8)):
            bad[int(i)] = int(value)
        path = tmp_path / f"corrupt{trial}.h5"
        path.write_bytes(bytes(bad))
        proc = distbp("train", "--data", path, "--layers", "8,16,3", "--steps", "1",
                      "--run-dir", tmp_path / f"run{trial}")
        assert proc.returncode in (0, 2), f"trial {trial}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, f"trial {trial}: {proc.stderr}"
        if proc.returncode == 2:  # refused: one line, naming the file
            refused(proc, path.name)
            refusals += 1
    assert refusals > 0  # the corruption reached what distbp reads


def corrupted(raw: bytes, rng: np.random.Generator, first: int) -> bytes:
    """`raw` with 8 random bytes of its first `first` bytes replaced."""
    bad = bytearray(raw)
    for i, value in zip(rng.integers(0, min(len(raw), first), size=8),
                        rng.integers(0, 256, size=8)):
        bad[int(i)] = int(value)
    return bytes(bad)


def test_randomly_corrupted_npz_files_give_one_line_never_a_traceback(files, tmp_path):
    ds = synthetic_teacher(N, 8, 3, seed=1)
    buf = io.BytesIO()
    np.savez(buf, x=ds.x, y=ds.y)  # stored: the arrays' headers sit in the first bytes
    raw, rng, refusals = buf.getvalue(), np.random.default_rng(11), 0
    for trial in range(20):
        path = tmp_path / f"corrupt{trial}.npz"
        path.write_bytes(corrupted(raw, rng, 512))
        proc = distbp("train", "--data", path, "--layers", "8,16,3", "--steps", "1",
                      "--run-dir", tmp_path / f"run{trial}")
        assert proc.returncode in (0, 2), f"trial {trial}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, f"trial {trial}: {proc.stderr}"
        if proc.returncode == 2:
            refused(proc, path.name)
            refusals += 1
    assert refusals > 0


def test_corrupted_data_files_give_one_line_to_every_command_that_reads_data(files, tmp_path):
    """data info, evaluate and predict read data files too: the same corruptions, one line."""
    run = tmp_path / "run"
    assert distbp("train", "--data", files["good"], "--layers", "8,16,3", "--steps", "2",
                  "--run-dir", run).returncode == 0
    ckpt = checkpoint.checkpoint_path(run / "checkpoints", 2)
    raw, rng, refusals = files["good"].read_bytes(), np.random.default_rng(5), 0
    for trial in range(12):
        path = tmp_path / f"corrupt{trial}.h5"
        path.write_bytes(corrupted(raw, rng, 4096))
        out = tmp_path / f"pred{trial}.h5"
        for command in (("data", "info", path), ("evaluate", ckpt, "--data", path),
                        ("predict", ckpt, "--data", path, "--out", out)):
            proc = distbp(*command)
            shown = f"trial {trial} {command[0]}: {proc.stderr}"
            assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, shown
            if proc.returncode == 2:
                refused(proc, path.name)
                refusals += 1
                assert not out.exists() or command[0] != "predict", shown
    assert refusals > 0


def test_every_path_option_refuses_a_fifo_instead_of_blocking(files, tmp_path):
    fifo, good = files["fifo"], files["good"]
    done = distbp("train", "--data", good, "--layers", "8,16,3", "--steps", "2",
                  "--run-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    ckpt = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    for args in (("train", "--config", fifo), ("train", "--data", fifo),
                 ("train", "--val-data", fifo, "--data", good), ("train", "--resume", fifo),
                 ("train", "--data", good, "--metrics", fifo, "--run-dir", tmp_path / "r2"),
                 ("info", fifo), ("inspect", fifo), ("data", "info", fifo), ("plot", fifo),
                 ("plot", tmp_path / "run", "-o", fifo.with_suffix(".png")),
                 ("evaluate", ckpt, "--data", fifo), ("predict", ckpt, "--data", fifo,
                                                       "--out", tmp_path / "p.h5"),
                 ("data", "import-idx", fifo, fifo, "--out", tmp_path / "i.h5")):
        if args[-1] == fifo.with_suffix(".png"):
            os.mkfifo(fifo.with_suffix(".png"))
        proc = distbp(*args, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "FIFO" in proc.stderr or "not a file" in proc.stderr, (args, proc.stderr)


def test_an_output_that_is_an_input_is_refused_and_left_intact(files, tmp_path):
    good = files["good"]
    before = good.read_bytes()
    link = tmp_path / "hard-link.h5"
    os.link(good, link)  # another name, the same inode
    run = tmp_path / "run"
    refused(distbp("train", "--data", good, "--metrics", link, "--run-dir", run,
                   "--layers", "8,16,3"), "is the --data")
    assert distbp("train", "--data", good, "--layers", "8,16,3", "--steps", "2",
                  "--run-dir", run).returncode == 0
    ckpt = checkpoint.list_checkpoints(run / "checkpoints")[-1]
    ckpt_bytes = ckpt.read_bytes()
    spelled = run / "checkpoints" / ".." / "checkpoints" / ckpt.name
    refused(distbp("predict", ckpt, "--data", good, "--out", spelled), "is the checkpoint")
    refused(distbp("predict", ckpt, "--data", good, "--out", link), "is the --data")
    refused(distbp("plot", run, "-o", run / "metrics.jsonl"), "metrics file")
    assert good.read_bytes() == before and ckpt.read_bytes() == ckpt_bytes


def test_a_config_file_is_never_an_output_of_its_run(files, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 2\n")
    common = ("train", "--config", toml, "--data", files["good"], "--layers", "8,16,3",
              "--run-dir", tmp_path / "run")
    refused(distbp(*common, "--metrics", toml), "is the --config file")
    refused(distbp(*common, "--trace", tmp_path / "." / "run.toml"), "is the --config file")
    toml_in_run = tmp_path / "run" / "metrics.jsonl"  # the metrics file --run-dir implies
    toml_in_run.parent.mkdir()
    toml_in_run.write_text("steps = 2\n")
    refused(distbp("train", "--config", toml_in_run, "--data", files["good"], "--layers",
                   "8,16,3", "--run-dir", tmp_path / "run"), "is the --config file")
    assert toml.read_text() == toml_in_run.read_text() == "steps = 2\n"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_symlink_planted_in_the_checkpoint_directory_is_never_followed(files, tmp_path):
    ckpts, victim = tmp_path / "run" / "checkpoints", tmp_path / "victim.txt"
    ckpts.mkdir(parents=True)
    victim.write_text("precious\n")
    for step in range(1, 4):  # every name the old code would have used
        for pid in range(os.getpid(), os.getpid() + 50):
            (ckpts / f".tmp-ckpt-{step:08d}.h5.{pid}").symlink_to(victim)
        (ckpts / f"ckpt-{step:08d}.h5").symlink_to(victim)
    proc = distbp("train", "--data", files["good"], "--layers", "8,16,3", "--steps", "3",
                  "--checkpoint-every", "1", "--run-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious\n"
    newest = checkpoint.checkpoint_path(ckpts, 3)
    assert not newest.is_symlink() and checkpoint.load(newest).step == 3


def test_a_metrics_file_that_is_a_symlink_is_refused_and_its_target_kept(files, tmp_path):
    victim, run = tmp_path / "victim.txt", tmp_path / "run"
    victim.write_text("precious\n")
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    proc = distbp("train", "--data", files["good"], "--layers", "8,16,3", "--steps", "2",
                  "--run-dir", run)
    refused(proc, "is a symbolic link; distbp never writes through one")
    assert victim.read_text() == "precious\n"


def test_a_checkpoint_directory_writable_by_all_needs_the_sticky_bit(files, tmp_path):
    shared = tmp_path / "scratch"
    shared.mkdir()
    os.chmod(shared, 0o777)
    args = ("train", "--data", files["good"], "--layers", "8,16,3", "--steps", "2",
            "--checkpoint-dir", shared, "--run-dir", tmp_path / "run")
    refused(distbp(*args), "is writable by every user (mode 777) without the sticky bit")
    os.chmod(shared, 0o1777)  # /scratch, /tmp: others cannot replace what distbp writes
    assert distbp(*args).returncode == 0


def test_files_distbp_data_and_bench_write_follow_the_output_rules(files, tmp_path):
    """--out of distbp data and bench --plot: never a FIFO or device (it would be replaced by
    a file), never through a symlink, never into a directory others may write without the
    sticky bit; the target is left as it was."""
    good = files["good"]
    kept = good.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(good)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    synthetic = ("data", "synthetic", "--n", "10", "--features", "3", "--classes", "2", "--out")
    for out, phrase in ((files["fifo"], "not a regular file (a FIFO)"),
                        (link, "is a symbolic link"),
                        (shared / "s.h5", "writable by every user")):
        refused(distbp(*synthetic, out), phrase)
    assert files["fifo"].is_fifo() and good.read_bytes() == kept and not list(shared.iterdir())
    png = tmp_path / "model.png"
    png.symlink_to(good)
    bench = ("bench", "--layers", "3,2", "--batch-size", "4", "--gemm-size", "8", "--steps", "1",
             "--warmup", "0", "--model", "--plot")
    for out, phrase in ((png, "is a symbolic link"), (shared / "m.png", "writable by every user")):
        refused(distbp(*bench, out), phrase)
    assert good.read_bytes() == kept and not list(shared.iterdir())


def test_sigterm_during_a_long_start_up_ends_it_at_once(tmp_path):
    """An 80 GB sparse data file (12 KB on disk) takes minutes to check; a stop signal during
    that start-up ends the run at once with exit 75 and one line, writing nothing."""
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", (2**31, 8), np.float32)[0] = 1.0
        f.create_dataset("y", (2**31,), np.int64)[0] = 1
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "train", "--data", str(path),
                             "--layers", "8,16,3", "--steps", "5", "--run-dir",
                             str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        time.sleep(3)  # well into the data check
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - sent < 5, "the signal waited for the rest of the start-up"
    assert proc.returncode == 75, err
    (line,) = err.strip().splitlines()
    assert line.startswith("distbp: rank 0: stopped by SIGTERM before training began")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_values_whose_spread_overflows_cannot_be_standardized(tmp_path):
    """float64 values near its largest: their squared deviations overflow, so --standardize
    would divide by an infinite std and train on zeros; refused, one line."""
    ds = synthetic_teacher(N, 8, 3, seed=1)
    x = ds.x.astype(np.float64)
    x[::2, 0], x[1::2, 0] = 1e308, -1e308
    path = write_h5(tmp_path / "huge.h5", lambda f: f.update(x=x, y=ds.y))
    proc = distbp("train", "--data", path, "--layers", "8,16,3", "--dtype", "float64",
                  "--standardize", "--steps", "2", "--run-dir", tmp_path / "run")
    refused(proc, "--standardize: the features' mean or spread overflows float64")
