"""What a run tells as it goes, with real `distbp train` processes: train records dense enough
for a curve (--record-every, about 200 per run) and progress lines (--log-every, about 20), the
summary line at the end against the metrics file and the checkpoint, the warning after an epoch
0 that learned nothing (once, on rank 0), and under `mpiexec -n 2` a fresh run moving an earlier
run's metrics aside while a resumed run continues them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_mpi, run_py
from helpers.trainruns import clean_env, final, metrics, ok, record_steps, train, write_data

from distbp import checkpoint

WARNING = "distbp: warning: the training loss at the end of epoch 0"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "d.h5", n=66)


def step_lines(stdout: str) -> list[int]:
    """The steps of the progress lines ("step S/T epoch ...")."""
    return [int(m[1]) for m in re.finditer(r"^step (\d+)/\d+ epoch", stdout, re.M)]


# ----------------------------------------------------------------------------- cadences


def test_a_1000_step_run_records_about_200_train_points_and_prints_about_20_lines(
        tmp_path, data):
    proc = ok(train(0, data, tmp_path / "run", "--steps", "1000"))
    recorded = record_steps(tmp_path / "run")["train"]
    assert recorded == list(range(5, 1001, 5))  # 200 records, one every 5 steps
    assert step_lines(proc.stdout) == list(range(50, 1001, 50))  # 20 lines
    assert set(step_lines(proc.stdout)) <= set(recorded)  # each line has its record


def test_record_every_and_log_every_set_the_two_cadences(tmp_path, data):
    proc = ok(train(0, data, tmp_path / "run", "--steps", "1000", "--record-every", "7",
                    "--log-every", "100"))
    recorded = record_steps(tmp_path / "run")["train"]
    lines = step_lines(proc.stdout)
    assert lines == list(range(100, 1001, 100))
    # every 7th step, and a record at each progress line (700 is both)
    assert recorded == sorted({*range(7, 1001, 7), *lines})
    assert len(recorded) == 151


def test_each_progress_line_shows_its_records_numbers(tmp_path, data):
    proc = ok(train(0, data, tmp_path / "run", "--steps", "40", "--record-every", "2",
                    "--log-every", "10"))
    by_step = {r["step"]: r for r in metrics(tmp_path / "run") if r["kind"] == "train"}
    shown = list(re.finditer(r"^step (\d+)/40 epoch (\d+) loss (\S+) acc (\S+) lr (\S+)",
                             proc.stdout, re.M))
    assert [int(m[1]) for m in shown] == [10, 20, 30, 40], proc.stdout
    for m in shown:
        r = by_step[int(m[1])]
        assert (int(m[2]), m[3], m[4]) == (r["epoch"], f"{r['loss']:.4f}",
                                           f"{r['accuracy']:.4f}")
    # a record every 2 steps: its interval is 2 batches of 64 rows (66 rows: 64, then 2)
    assert {r["step"] for r in by_step.values()} == set(range(2, 41, 2))


# ----------------------------------------------------------------------------- the summary

SUMMARY = re.compile(
    r"^done: step (\d+) of (\d+) \((\d+) trained in \S+ s, [\d,]+ samples/s\); validation: "
    r"last accuracy (\S+) loss (\S+) \(step (\d+)\), best accuracy (\S+) \(step (\d+)\); "
    r"final checkpoint (\S+)$", re.M)


def check_summary(stdout: str, run_dir: Path, total: int, trained: int) -> None:
    """The summary line's fields against the metrics file and the checkpoint it names."""
    (m,) = SUMMARY.findall(stdout)
    assert stdout.rstrip().endswith(f"final checkpoint {m[8]}")  # the last line
    assert (int(m[0]), int(m[1]), int(m[2])) == (total, total, trained)
    vals = [r for r in metrics(run_dir) if r["kind"] == "val"]
    last = vals[-1]
    assert (m[3], m[4], int(m[5])) == (f"{last['accuracy']:.4f}", f"{last['loss']:.4f}",
                                       last["step"])
    best = max(vals, key=lambda r: (r["accuracy"], -r["loss"]))
    assert (m[6], int(m[7])) == (f"{best['accuracy']:.4f}", best["step"])
    path = Path(m[8])
    assert path.exists() and checkpoint.list_checkpoints(path.parent)[-1] == path
    assert checkpoint.load(path).step == total
    assert path == checkpoint.checkpoint_path(run_dir / "checkpoints", total)


def test_summary_line_agrees_with_the_metrics_file_and_the_checkpoint(tmp_path, data):
    run_dir, held_out = tmp_path / "run", write_data(tmp_path / "val.h5", n=40, seed=5)
    opts = ("--val-data", str(held_out), "--batch-size", "16", "--lr", "0.5",
            "--checkpoint-every", "5", "--keep", "2")
    proc = ok(train(0, data, run_dir, *opts, "--steps", "25"))
    check_summary(proc.stdout, run_dir, 25, 25)
    # resumed: the summary counts the steps this run trained, and the whole run's validations
    proc = ok(train(2, data, run_dir, *opts, "--steps", "40", "--resume", "auto"))
    check_summary(proc.stdout, run_dir, 40, 15)
    assert len([r for r in metrics(run_dir) if r["kind"] == "val"]) == 8  # 5 steps per epoch


# ----------------------------------------------------------------------------- not learning


@pytest.mark.parametrize("ranks", [0, 2], ids=["python", "mpiexec-2"])
def test_a_run_that_learns_nothing_in_epoch_0_warns_once_on_rank_0(tmp_path, ranks):
    # the bundled digits (45 steps per epoch) at lr 1e-9: the loss stays at the class prior's
    args = ["--run-dir", str(tmp_path / "run"), "--epochs", "2", "--lr", "1e-9"]
    proc = ok(train_digits(ranks, args))
    assert proc.stderr.count(WARNING) == 1, proc.stderr
    assert WARNING not in proc.stdout
    (line,) = [ln for ln in proc.stderr.splitlines() if WARNING in ln]
    assert "no better than predicting the class frequencies" in line and "--lr (now 1e-09" in line


@pytest.mark.parametrize("ranks", [0, 2], ids=["python", "mpiexec-2"])
def test_a_run_that_learns_does_not_warn(tmp_path, ranks):
    proc = ok(train_digits(ranks, ["--run-dir", str(tmp_path / "run"), "--epochs", "1"]))
    assert "warning" not in proc.stderr + proc.stdout


def train_digits(ranks: int, args: list[str]):
    """`distbp train ARGS` on the bundled digits (no --data: the digits preset)."""
    argv = ["-m", "distbp", "train", *args]
    if ranks == 0:
        return run_py(argv, env=clean_env(), timeout=60)
    return run_mpi(ranks, argv, env=clean_env(), timeout=60)


# ----------------------------------------------------------------------------- metrics file


def test_under_mpi_a_fresh_run_moves_the_old_metrics_aside_and_a_resume_continues_them(
        tmp_path, data):
    run_dir = tmp_path / "run"
    opts = ("--batch-size", "16", "--record-every", "2", "--log-every", "2",
            "--checkpoint-every", "4", "--dtype", "float64")
    ok(train(2, data, run_dir, *opts, "--steps", "8", "--seed", "5"))
    earlier = (run_dir / "metrics.jsonl").read_text()
    # a fresh run (another seed) in the same directory: the earlier records go aside, whole
    proc = ok(train(2, data, run_dir, *opts, "--steps", "6"))
    assert "moved 3 file(s) of an earlier run (ckpt-00000004.h5, ckpt-00000008.h5, " \
           "metrics.jsonl)" in proc.stdout
    assert proc.stdout.count("moved ") == 1  # rank 0 alone moves and tells
    (aside,) = (run_dir / "checkpoints").glob("superseded-*/metrics.jsonl")
    assert aside.read_text() == earlier
    fresh = metrics(run_dir)
    assert [r["step"] for r in fresh if r["kind"] == "train"] == [2, 4, 6]
    # resumed from step 6: the records up to the checkpoint stay, bit for bit, and continue
    proc = ok(train(2, data, run_dir, *opts, "--steps", "10", "--resume", "auto"))
    assert "moved" not in proc.stdout
    resumed = metrics(run_dir)
    assert resumed[:len(fresh)] == fresh
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [2, 4, 6, 8, 10]
    assert final(run_dir, 10).metrics == resumed
