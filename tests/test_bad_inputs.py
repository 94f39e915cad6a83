"""Every kind of bad input to `distbp train`, each run as a real `mpiexec -n 2` job: exit code 2,
exactly ONE line on stderr (not one per rank) that names the problem, no traceback, no hang,
and the run's existing checkpoint directory left byte for byte and mtime for mtime as it was.

The cases run four at a time in one module fixture (each is a separate job); one test per case
reads its result, so a failure names the case. Run as root, the permission cases (PERMISSION_CASES)
drop the capabilities that let root ignore file modes (see `launch`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, error_lines, mpiexec_path

from distbp.data import synthetic_teacher

N = 64  # rows of the good data file: 8 float32 features, 3 classes
MODEL = ("--layers", "8,16,3", "--activation", "tanh", "--seed", "3", "--steps", "4",
         "--collective-timeout", "30")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Root ignores file modes through two capabilities; without them it obeys them like any user.
# (Running as nobody instead fails here: the venv's python links into /root, mode 700.)
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]

# name -> (extra `distbp train` options, regex the one stderr line must match). In options,
# {d} is the directory of the files made by make_inputs and {good} the good data file.
# Options come after `--data {good}` and MODEL, so a later --data or --layers wins.
CASES: dict[str, tuple[tuple[str, ...], str]] = {
    # data files
    "data_missing": (("--data", "{d}/missing.h5"), r"data file '.*missing\.h5': not found"),
    "data_is_a_directory": (("--data", "{d}/folder.h5"), r"is a directory, not a data file"),
    "data_is_a_fifo": (("--data", "{d}/fifo.h5"), r"'.*fifo\.h5': not a regular file"),
    "data_unreadable": (("--data", "{d}/noperm.h5"), r"'.*noperm\.h5': not readable"),
    "data_not_hdf5": (("--data", "{d}/text.h5"), r"'.*text\.h5': not a valid HDF5 file"),
    "data_unknown_format": (("--data", "{d}/blob.bin"), r"not an HDF5 or NPZ file"),
    "dataset_x_missing": (("--data", "{d}/no_x.h5"),
                          r"dataset 'x' not found \(datasets: features, y\)"),
    "dataset_named_by_option_missing": (("--y-name", "labels"),
                                        r"dataset 'labels' not found \(datasets: x, y\)"),
    "dataset_name_not_a_name": (("--y-name", "."),
                                r"dataset '\.' is not a dataset name \(datasets: x, y\)"),
    "features_differ_from_input_layer": (("--layers", "5,16,3"),
                                         r"x has 8 features but the network's input layer has 5"),
    "label_negative": (("--data", "{d}/neg_label.h5"),
                       r"labels y out of range: min -1, max 2; need 0\.\.2 for 3 outputs"),
    "label_beyond_output_layer": (("--layers", "8,16,2"),
                                  r"labels y out of range: min 0, max 2; need 0\.\.1 for 2"),
    "x_y_length_mismatch": (("--data", "{d}/mismatch.h5"),
                            r"length mismatch: x has 64 rows, y has 63"),
    "nan_in_x": (("--data", "{d}/nan.h5"), r"'.*nan\.h5': x contains NaN or inf \(first at row 5"),
    "inf_in_validation_x": (("--val-data", "{d}/inf.h5"),
                            r"'.*inf\.h5': x contains NaN or inf \(first at row 7\)"),
    "empty_data": (("--data", "{d}/empty.h5"), r"'.*empty\.h5': empty data \(0 rows\)"),
    "x_of_strings": (("--data", "{d}/strings.h5"),
                     r"x has dtype \|S3; expected a float or integer dtype"),
    "float_labels": (("--data", "{d}/float_labels.h5"),
                     r"labels y have dtype float64; 1-D y must hold integer class labels"),
    # hyper-parameters and options
    "lr_zero": (("--lr", "0"), r"--lr must be a positive number, got 0\.0"),
    "lr_not_a_number": (("--lr", "abc"), r"--lr must be a number, got 'abc'"),
    "lr_nan": (("--lr", "nan"), r"--lr must be a positive number, got nan"),
    "batch_size_negative": (("--batch-size", "-4"),
                            r"--batch-size must be a positive integer, got -4"),
    "steps_not_an_integer": (("--steps", "2.5"), r"--steps must be an integer, got '2\.5'"),
    "momentum_out_of_range": (("--momentum", "1.5"), r"--momentum must be a number in \[0, 1\)"),
    "zero_width_layer": (("--layers", "8,0,3"), r"--layers: every layer needs at least one unit"),
    "unknown_activation": (("--activation", "swish"),
                           r"--activation must be one of .*, got 'swish'"),
    "unknown_optimizer": (("--optimizer", "lbfgs"), r"--optimizer must be one of .*'lbfgs'"),
    "bad_dtype": (("--dtype", "float16"), r"--dtype must be one of float32, float64"),
    "epochs_and_steps": (("--epochs", "2"), r"--epochs and --steps are mutually exclusive"),
    "unknown_command_line_option": (("--lrr", "0.1"), r"unrecognized arguments: --lrr 0\.1"),
    # ranges the code can serve: NumPy's seeds, an int64, the 8-digit checkpoint names
    "seed_negative": (("--seed", "-1"), r"--seed must be a non-negative integer, got -1"),
    "seed_beyond_int64": (("--seed", str(2**63)), r"--seed must be at most 9223372036854775807"),
    "layers_beyond_memory": (("--layers", "8,3000000000,3"),
                             r"--layers 8,3000000000,3 \(36,000,000,003 parameters, 32 rows a "
                             r"pass\) needs about \d+\.\d GiB per rank, more than the"),
    "steps_beyond_checkpoint_names": (("--steps", "100000000"),
                                      r"--steps must be at most 99999999"),
    "epochs_beyond_checkpoint_names": (("--steps", "none", "--epochs", "99999999",
                                        "--batch-size", "8"),  # 8 steps an epoch
                                       r"make \d+ steps; a run may have at most 99999999"),
    # TOML files
    "toml_syntax_error": (("--config", "{d}/syntax.toml"),
                          r"'.*syntax\.toml': invalid TOML: .*\(line 2, column"),
    "toml_unknown_key": (("--config", "{d}/unknown_key.toml"),
                         r"unknown key 'learning_rate' in config file '.*unknown_key\.toml'"),
    "toml_wrong_type": (("--config", "{d}/wrong_type.toml"),
                        r"--lr must be a number, got string 'fast' \(in config file"),
    "toml_missing": (("--config", "{d}/absent.toml"), r"'.*absent\.toml': cannot read"),
    "toml_is_a_fifo": (("--config", "{d}/fifo.toml"),
                       r"config file '.*fifo\.toml': not a regular file \(a FIFO\)"),
    # checkpoints
    "checkpoint_dir_is_a_file": (("--checkpoint-dir", "{d}/plain_file"),
                                 r"--checkpoint-dir '.*plain_file' exists and is not a directory"),
    # where the run writes: checked (created, a file written and removed) before training
    "checkpoint_dir_under_a_file": (("--checkpoint-dir", "{d}/plain_file/ckpts"),
                                    r"--checkpoint-dir '.*plain_file/ckpts': cannot create "
                                    r"directory '.*plain_file/ckpts': Not a directory"),
    "checkpoint_dir_not_writable": (("--checkpoint-dir", "{d}/read_only"),
                                    r"--checkpoint-dir '.*read_only': directory '.*read_only' "
                                    r"is not writable: Permission denied"),
    "run_dir_under_a_file": (("--run-dir", "{d}/plain_file/run"),
                             r"--run-dir '.*plain_file/run': cannot create directory "
                             r"'.*plain_file/run/checkpoints': Not a directory"),
    "metrics_under_a_file": (("--metrics", "{d}/plain_file/m.jsonl"),
                             r"--metrics '.*plain_file/m\.jsonl': '.*plain_file' exists and is "
                             r"not a directory"),
    "metrics_is_a_directory": (("--metrics", "{d}/folder.h5"),
                               r"--metrics '.*folder\.h5': metrics file '.*folder\.h5': is a "
                               r"directory"),
    "metrics_is_the_data_file": (("--metrics", "{good}"), r"'.*good\.h5': is the --data '.*good"),
    "metrics_is_a_fifo": (("--metrics", "{d}/fifo.h5"), r"fifo\.h5': not a regular file \(a FIFO"),
    # a directory others may write into, without the sticky bit (a shared /scratch)
    "checkpoint_dir_writable_by_all": (("--checkpoint-dir", "{d}/open_to_all"),
                                       r"'.*open_to_all' is writable by every user \(mode 777\)"),
    "resume_missing": (("--resume", "{d}/gone.h5"), r"checkpoint '.*gone\.h5': not found"),
    "resume_not_hdf5": (("--resume", "{d}/text.h5"),
                        r"checkpoint '.*text\.h5': no distbp checksum header"),
    "resume_truncated": (("--resume", "{d}/truncated.h5"),
                         r"checkpoint '.*truncated\.h5': file checksum mismatch \(corrupt or "
                         r"truncated\): \d+ bytes but its header says \d+"),
    "resume_corrupt": (("--resume", "{d}/corrupt.h5"),
                       r"'.*corrupt\.h5': file checksum mismatch .*: SHA-256 of the file differs"),
    "resume_data_file_not_checkpoint": (("--resume", "{good}"),
                                        r"checkpoint '.*good\.h5': no distbp checksum header "
                                        r"\(not a distbp checkpoint"),
    "resume_other_architecture": (("--resume", "auto", "--layers", "8,32,3"),
                                  r"has layers 8,16,3 but the configuration asks for 8,32,3"),
    "resume_other_dtype": (("--resume", "auto", "--dtype", "float64"),
                           r"dtype float32 but the configuration asks for float64"),
}

PERMISSION_CASES = ("data_unreadable", "checkpoint_dir_not_writable")


def clean_env() -> dict[str, str]:
    """No launcher variables from an outer job: mpiexec sets its own."""
    return {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}


def write_h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return path


def make_inputs(d: Path) -> Path:
    """The good data file and every bad file the cases name; returns the good file."""
    ds = synthetic_teacher(N, 8, 3, seed=1)
    x, y = ds.x, ds.y
    good = write_h5(d / "good.h5", x=x, y=y)
    (d / "folder.h5").mkdir()
    shutil.copy(good, d / "noperm.h5")
    os.chmod(d / "noperm.h5", 0)
    (d / "text.h5").write_text("x,y\n1,2\n")
    (d / "blob.bin").write_bytes(bytes(range(256)))
    write_h5(d / "no_x.h5", features=x, y=y)
    write_h5(d / "neg_label.h5", x=x, y=np.where(np.arange(N) == 9, -1, y))
    write_h5(d / "mismatch.h5", x=x, y=y[:-1])
    write_h5(d / "nan.h5", x=np.where(np.arange(N)[:, None] == 5, np.nan, x), y=y)
    write_h5(d / "inf.h5", x=np.where(np.arange(N)[:, None] == 7, np.inf, x), y=y)
    write_h5(d / "empty.h5", x=np.zeros((0, 8), np.float32), y=np.zeros(0, np.int64))
    write_h5(d / "strings.h5", x=np.full((N, 8), b"abc"), y=y)
    write_h5(d / "float_labels.h5", x=x, y=y.astype(np.float64))
    (d / "syntax.toml").write_text('lr = 0.1\nbatch_size = = 3\n')
    (d / "unknown_key.toml").write_text("learning_rate = 0.1\n")
    (d / "wrong_type.toml").write_text('lr = "fast"\n')
    (d / "plain_file").write_text("not a directory\n")
    os.mkfifo(d / "fifo.h5")  # open() of a FIFO blocks until a writer comes: never
    os.mkfifo(d / "fifo.toml")
    (d / "open_to_all").mkdir()
    os.chmod(d / "open_to_all", 0o777)  # no sticky bit: anyone may replace files there
    (d / "read_only").mkdir(mode=0o555)
    return good


def damage_checkpoints(ckpt: Path, d: Path) -> None:
    """A truncated copy and a copy with bytes of /model/W1 overwritten (still valid HDF5)."""
    raw = ckpt.read_bytes()
    (d / "truncated.h5").write_bytes(raw[:len(raw) // 2])
    with h5py.File(ckpt, "r") as f:
        offset = f["model/W1"].id.get_offset()  # contiguous storage: the raw bytes start here
    assert offset is not None
    corrupt = bytearray(raw)
    corrupt[offset:offset + 8] = bytes(a ^ 0xFF for a in corrupt[offset:offset + 8])
    (d / "corrupt.h5").write_bytes(bytes(corrupt))


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under root, plus the directories."""
    out: dict[str, tuple[int, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ((p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                    if p.is_file() else (0, "dir"))
    return out


def launch(exe: str, args: list[str], obey_modes: bool = False) -> subprocess.CompletedProcess:
    """`mpiexec -n 2 python -m distbp train ARGS`; `obey_modes`: as root, the whole job without
    the capabilities to override file modes (setpriv), so that a mode-000 file is unreadable.
    A hang of 60 s kills the job and gives exit code None: its case fails."""
    cmd = [exe, "-n", "2", sys.executable, "-m", "distbp", "train", *args]
    return run_job([*DROP_DAC, *cmd] if obey_modes and IS_ROOT else cmd)


def run_job(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` (an mpiexec job) in a session of its own: after 60 s, kill it all (mpiexec,
    its proxy, the ranks) and give returncode None."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=clean_env(), start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # mpiexec, its proxy and the ranks
            out, err = proc.communicate()
            return subprocess.CompletedProcess(cmd, None, out, f"{err}\n(hung: killed)")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case as its own `mpiexec -n 2` job, 4 at a time.

    Each case gets a copy of one finished run (a valid checkpoint, a metrics file) as its
    --run-dir; the outcome holds the process and the run directory's snapshot before and after.
    """
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec: pip install '.[mpi]'")
    d = tmp_path_factory.mktemp("inputs")
    good = make_inputs(d)
    base = tmp_path_factory.mktemp("runs") / "base"
    done = subprocess.run([sys.executable, "-m", "distbp", "train", "--data", str(good),
                           "--run-dir", str(base), *MODEL], capture_output=True, text=True,
                          timeout=60, env=clean_env())
    assert done.returncode == 0, done.stderr
    ckpt = base / "checkpoints" / "ckpt-00000004.h5"
    damage_checkpoints(ckpt, d)

    def run(name: str):
        options, _ = CASES[name]
        run_dir = base.parent / name
        shutil.copytree(base, run_dir)  # copy2: mtimes preserved
        before = snapshot(run_dir)
        args = ["--data", str(good), "--run-dir", str(run_dir), *MODEL,
                *(o.format(d=d, good=good) for o in options)]
        proc = launch(exe, args, obey_modes=name in PERMISSION_CASES)
        return proc, before, snapshot(run_dir)

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


def test_the_table_has_over_25_cases_with_distinct_key_phrases():
    phrases = [regex for _, regex in CASES.values()]
    assert len(CASES) >= 25
    assert len(set(phrases)) == len(phrases)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_naming_it_and_leaves_checkpoints_alone(outcomes, case):
    if case in PERMISSION_CASES and IS_ROOT and shutil.which(DROP_DAC[0]) is None:
        pytest.skip("root reads and writes regardless of modes, and setpriv (util-linux) to "
                    "drop that is missing")
    proc, before, after = outcomes[case]
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, shown  # once for the job, not once per rank
    assert lines[0].startswith("distbp: error: "), shown
    assert re.search(CASES[case][1], lines[0]), shown
    assert "Traceback" not in proc.stdout + proc.stderr
    assert after == before  # same files, bytes and mtimes: nothing written, nothing rotated


@pytest.mark.parametrize("missing_on", [0, 1], ids=["rank0", "rank1"])
def test_config_file_missing_on_one_rank_only_stops_both_ranks_with_one_line(tmp_path,
                                                                            missing_on):
    # MPMD: each rank in its own working directory, where --config run.toml exists on one
    # rank only. The rank that cannot read it must not exit alone (the other would wait in MPI
    # init or its first collective forever), and rank 1's problem must be printed too.
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec: pip install '.[mpi]'")
    ds = synthetic_teacher(N, 8, 3, seed=1)
    good = write_h5(tmp_path / "good.h5", x=ds.x, y=ds.y)
    has, lacks, run_dir = tmp_path / "has", tmp_path / "lacks", tmp_path / "run"
    has.mkdir()
    lacks.mkdir()
    (has / "run.toml").write_text(f'data = "{good}"\nrun_dir = "{run_dir}"\n'
                                  'layers = [8, 16, 3]\nsteps = 4\n')
    rank_dirs = [lacks, has] if missing_on == 0 else [has, lacks]
    rank = [sys.executable, "-m", "distbp", "train", "--config", "run.toml",
            "--collective-timeout", "30"]
    cmd = [exe, "-n", "1", "-wdir", str(rank_dirs[0]), *rank, ":",
           "-n", "1", "-wdir", str(rank_dirs[1]), *rank]
    proc = run_job(cmd)
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, shown
    assert proc.stderr.splitlines() == [
        "distbp: error: config file 'run.toml': cannot read: No such file or directory"], shown
    assert not run_dir.exists()  # stopped before anything was written
