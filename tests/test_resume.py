"""Resume (issue 4), as real processes: interrupted + resumed equals uninterrupted bitwise (clean
stops, mid-epoch, momentum, Adam, SIGKILL of the whole job at random moments), resume on another
number of ranks within 1e-10 (train records spanning a resume: tests/test_resume_metrics.py),
fallback past a damaged newest checkpoint, refusal of checkpoints that do not fit the
configuration, and a metrics file without duplicated steps.
Shared helpers: tests/helpers/trainruns.py."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import mpiexec_path, run_py
from helpers.trainruns import (
    assert_same_state,
    clean_env,
    final,
    metrics,
    ok,
    record_steps,
    rel_diff,
    train,
    train_args,
    write_data,
)

from distbp import checkpoint

# 66 rows in global batches of 16: 5 steps per epoch, the 5th a tail of 2 rows.
ROWS, BATCH = 66, ("--batch-size", "16")


CLEAN_STOPS = {
    "sgd_momentum_mid_epoch_standardized_float64": ("float64", 7, ("--momentum", "0.9",
                                                                    "--standardize")),
    "sgd_nesterov_epoch_end_float32": ("float32", 10, ("--momentum", "0.9", "--nesterov")),
    "adam_mid_epoch_float32": ("float32", 7, ("--optimizer", "adam", "--lr", "0.01")),
    # warmup then step decay: after the resume the lr must follow the absolute step
    "adamw_warmup_step_schedule_float64": ("float64", 12, (
        "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.01", "--warmup-steps", "3",
        "--schedule", "step", "--lr-step-size", "6")),
}


@pytest.mark.parametrize("case", CLEAN_STOPS)
def test_resume_after_a_clean_stop_is_bitwise_equal_to_the_uninterrupted_run(tmp_path, case):
    dtype, k, options = CLEAN_STOPS[case]
    data = write_data(tmp_path / "d.h5", ROWS)
    opts = ("--dtype", dtype, *BATCH, *options)
    ok(train(2, data, tmp_path / "whole", *opts, "--steps", "20"))
    ok(train(2, data, tmp_path / "parts", *opts, "--steps", str(k)))
    proc = ok(train(2, data, tmp_path / "parts", *opts, "--steps", "20", "--resume", "auto"))
    stop = checkpoint.checkpoint_path(tmp_path / "parts" / "checkpoints", k)
    assert f"resumed from {stop} at step {k}" in proc.stdout
    assert f"resuming with changed settings: steps {k} -> 20" in proc.stdout
    assert_same_state(final(tmp_path / "whole", 20), final(tmp_path / "parts", 20))
    assert record_steps(tmp_path / "parts") == record_steps(tmp_path / "whole")


KILL_STEPS = 200


def newest_step(directory: Path) -> int:
    found = checkpoint.list_checkpoints(directory)
    return int(found[-1].name[5:13]) if found else -1


def run_until_killed(args: list[str], ckpt_dir: Path, target: int, rng: random.Random,
                     log: Path) -> None:
    """Start the job on 2 ranks; once a checkpoint of step >= target exists, wait a random
    0..20 ms and SIGKILL the whole process group (mpiexec, its proxy and both ranks)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([mpiexec_path(), "-n", "2", sys.executable, *args], stdout=out,
                                stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while newest_step(ckpt_dir) < target:
            assert proc.poll() is None, f"run ended (exit {proc.returncode}) before step {target}"
            assert time.monotonic() < deadline, f"no checkpoint of step {target} within 60 s"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.02))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_job_killed_at_random_moments_resumes_to_the_bitwise_same_final_state(tmp_path):
    data = write_data(tmp_path / "d.h5", ROWS)
    # float32, momentum, warmup + cosine over the whole run; `--resume auto` on every launch,
    # including the first (no checkpoint yet: a fresh start)
    opts = ("--dtype", "float32", "--batch-size", "8", "--momentum", "0.9", "--warmup-steps",
            "10", "--schedule", "cosine", "--steps", str(KILL_STEPS), "--checkpoint-every", "5",
            "--resume", "auto")
    ok(train(2, data, tmp_path / "whole", *opts))
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    t1 = rng.randrange(10, 60)
    t2 = rng.randrange(t1 + 20, 120)
    targets = (t1, t2, rng.randrange(t2 + 20, 175))
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    args = train_args(data, run, *opts)
    for target in targets:
        # at least 10 steps past where this launch resumes, even if the last kill came late
        target = min(max(target, newest_step(run / "checkpoints") + 10), KILL_STEPS - 10)
        run_until_killed(args, run / "checkpoints", target, rng, log)
        assert newest_step(run / "checkpoints") < KILL_STEPS, (seed, targets)
    proc = ok(train(2, data, run, *opts))
    assert "resumed from" in proc.stdout
    log_text = log.read_text()
    assert "starting fresh" in log_text and log_text.count("resumed from") >= 1, log_text
    assert_same_state(final(tmp_path / "whole", KILL_STEPS), final(run, KILL_STEPS))
    assert record_steps(run) == record_steps(tmp_path / "whole"), (seed, targets)


@pytest.mark.parametrize("first,then", [(2, 3), (4, 1)])
def test_resume_on_another_number_of_ranks_continues_within_1e_10(tmp_path, first, then):
    data = write_data(tmp_path / "d.h5", ROWS)
    opts = ("--dtype", "float64", *BATCH, "--momentum", "0.9", "--standardize", "--keep", "5")
    ok(train(0, data, tmp_path / "whole", *opts, "--steps", "20"))
    ok(train(first, data, tmp_path / "parts", *opts, "--steps", "8"))
    ok(train(then, data, tmp_path / "parts", *opts, "--steps", "20", "--resume", "auto"))
    ckpts = tmp_path / "parts" / "checkpoints"
    for step, ranks in ((8, first), (20, then)):
        with h5py.File(checkpoint.checkpoint_path(ckpts, step), "r") as f:
            assert f.attrs["world_size"] == ranks
    whole, parts = final(tmp_path / "whole", 20), final(tmp_path / "parts", 20)
    assert rel_diff(whole.params, parts.params) <= 1e-10
    assert rel_diff(whole.optimizer_state["velocity"], parts.optimizer_state["velocity"]) <= 1e-10
    with h5py.File(data, "r") as f:  # --standardize: the training set's mean and (population) std
        x = f["x"][()].astype(np.float64)
    mean = x.sum(axis=0) / len(x)
    std = np.sqrt((x * x).sum(axis=0) / len(x) - mean * mean)
    np.testing.assert_allclose(parts.preprocess["mean"], mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(parts.preprocess["std"], std, rtol=1e-12)


# Train records every 4 steps, checkpoints every 3: a run that dies right after step 8, before
# its record, resumes from ckpt-6, two steps into the record of steps 5..8 (5: the epoch's 2-row
# tail; 6: 16 rows).
def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside /model/W1's data: the file stays valid HDF5, the SHA-256 fails."""
    with h5py.File(path, "r") as f:
        offset = f["model/W1"].id.get_offset() + 3
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage", [truncate, flip_a_weight_byte])
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_ends_in_the_same_state(tmp_path,
                                                                                damage):
    data = write_data(tmp_path / "d.h5", ROWS)
    opts = ("--dtype", "float64", *BATCH, "--momentum", "0.9", "--checkpoint-every", "5")
    ok(train(2, data, tmp_path / "whole", *opts, "--steps", "20"))
    ok(train(2, data, tmp_path / "parts", *opts, "--steps", "15"))
    ckpts = tmp_path / "parts" / "checkpoints"
    newest, previous = (checkpoint.checkpoint_path(ckpts, s) for s in (15, 10))
    damage(newest)
    proc = ok(train(2, data, tmp_path / "parts", *opts, "--steps", "20", "--resume", "auto"))
    assert proc.stdout.count(f"skipping checkpoint {newest}: ") == 1, proc.stdout
    assert f"resumed from {previous} at step 10" in proc.stdout
    assert_same_state(final(tmp_path / "whole", 20), final(tmp_path / "parts", 20))
    assert record_steps(tmp_path / "parts") == record_steps(tmp_path / "whole")


def test_resume_after_the_training_data_changed_length_is_refused(tmp_path):
    data = write_data(tmp_path / "d.h5", ROWS)
    ok(train(0, data, tmp_path / "run", *BATCH, "--steps", "7"))  # epoch 1, step 2 of 5
    write_data(data, 90)  # 6 steps per epoch: step 7 would be epoch 1, step 1
    line = one_error_line(train(0, data, tmp_path / "run", *BATCH, "--steps", "20",
                                "--resume", "auto"))
    assert "the training data changed" in line and "ckpt-00000007.h5" in line, line


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, run directory) of a serial float64 run of 5 steps: ckpt-00000005.h5."""
    root = tmp_path_factory.mktemp("base")
    data = write_data(root / "d.h5", ROWS)
    ok(train(0, data, root / "run", "--dtype", "float64", *BATCH, "--steps", "5"))
    return data, root / "run"


def base_checkpoint(base) -> Path:
    return checkpoint.checkpoint_path(base[1] / "checkpoints", 5)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 with exactly one line on stderr and no traceback; returns that line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_explicit_resume_of_a_corrupt_checkpoint_is_exit_2_with_one_line(tmp_path, base):
    bad = tmp_path / "ckpt-00000005.h5"
    shutil.copy(base_checkpoint(base), bad)
    flip_a_weight_byte(bad)
    proc = train(2, base[0], tmp_path / "run", "--dtype", "float64", *BATCH, "--steps", "10",
                 "--resume", str(bad))
    line = one_error_line(proc)
    assert str(bad) in line and "SHA-256" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


MISMATCHES = {
    "layers": (("--layers", "8,32,3"), "layers 8,16,3 but the configuration asks for 8,32,3"),
    "dtype": (("--dtype", "float32"), "dtype float64 but the configuration asks for float32"),
    "activation": (("--activation", "relu"), "activation tanh but the configuration asks for "
                                             "relu"),
    "optimizer": (("--optimizer", "adam"), "optimizer 'sgd' -> 'adam'"),
    "batch_size": (("--batch-size", "8"), "batch_size 16 -> 8"),
    # hyper-parameters that change the trajectory may not change silently either
    "lr": (("--lr", "0.9"), "lr 0.1 -> 0.9"),
    "momentum": (("--momentum", "0.5"), "momentum 0.0 -> 0.5"),
    "schedule": (("--schedule", "cosine"), "schedule 'constant' -> 'cosine'"),
}


@pytest.mark.parametrize("what", MISMATCHES)
def test_checkpoint_that_does_not_fit_the_configuration_is_refused(tmp_path, base, what):
    change, message = MISMATCHES[what]
    proc = train(0, base[0], tmp_path / "run", "--dtype", "float64", *BATCH, "--steps", "10",
                 "--resume", str(base_checkpoint(base)), *change)
    line = one_error_line(proc)
    assert str(base_checkpoint(base)) in line and message in line, line


def test_resume_with_changed_safe_settings_is_allowed_and_reported(tmp_path, base):
    run = tmp_path / "run"
    proc = ok(train(0, base[0], run, "--dtype", "float64", *BATCH, "--steps", "12",
                    "--checkpoint-every", "3", "--min-lr", "0.01",
                    "--resume", str(base_checkpoint(base))))
    assert "resuming with changed settings: " in proc.stdout
    assert "steps 5 -> 12" in proc.stdout and "checkpoint_every None -> 3" in proc.stdout
    assert "min_lr 0.0 -> 0.01" in proc.stdout  # the schedule's end value may move too
    steps = [int(p.name[5:13]) for p in checkpoint.list_checkpoints(run / "checkpoints")]
    assert steps == [6, 9, 12]  # the new cadence, counted in absolute steps


def test_resume_at_the_final_step_exits_0_without_training(tmp_path, base):
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    ckpt = checkpoint.checkpoint_path(run / "checkpoints", 5)
    before = ckpt.read_bytes(), (run / "metrics.jsonl").read_text()
    proc = ok(train(0, base[0], run, "--dtype", "float64", *BATCH, "--steps", "5",
                    "--resume", "auto"))
    assert "nothing to do: already at step 5 of 5" in proc.stdout
    assert "step 1/" not in proc.stdout and "checkpoint " + str(ckpt) not in proc.stdout
    assert checkpoint.list_checkpoints(run / "checkpoints") == [ckpt]
    assert (ckpt.read_bytes(), (run / "metrics.jsonl").read_text()) == before


def test_resume_accepts_the_same_data_file_named_by_an_absolute_path(tmp_path, base):
    data = base[0]
    rel = os.path.relpath(data, tmp_path)
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    args = train_args(Path(rel), run, "--dtype", "float64", *BATCH, "--steps", "6",
                      "--resume", "auto")
    ok(run_py(args, cwd=tmp_path, timeout=60, env=clean_env()))
    assert checkpoint.load(checkpoint.checkpoint_path(run / "checkpoints", 6)).config["data"] \
        == str(data.resolve())  # stored absolute, so a resume from elsewhere finds it


def test_resume_auto_refuses_to_restart_when_every_checkpoint_is_corrupt(tmp_path, base):
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    ckpt = checkpoint.checkpoint_path(run / "checkpoints", 5)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = train(0, base[0], run, "--dtype", "float64", *BATCH, "--steps", "8",
                 "--resume", "auto")
    line = one_error_line(proc)
    assert "none of the 1 checkpoint(s)" in line and "--resume none" in line
    assert checkpoint.list_checkpoints(run / "checkpoints") == [ckpt]  # nothing new written


def test_ranks_that_see_different_checkpoints_stop_instead_of_training_apart(tmp_path, base):
    # MPMD: rank 0 runs where the run directory holds ckpt-5, rank 1 where it is empty.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(base[1], tmp_path / "a" / "run")
    args = train_args(base[0], Path("run"), "--dtype", "float64", *BATCH, "--steps", "8",
                      "--resume", "auto")
    cmd = [mpiexec_path(), "-n", "1", "-wdir", str(tmp_path / "a"), sys.executable, *args, ":",
           "-n", "1", "-wdir", str(tmp_path / "b"), sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean_env())
    line = one_error_line(proc)
    assert "ranks found different checkpoints to resume from (steps 0 to 5)" in line
    assert not list((tmp_path / "b" / "run" / "checkpoints").glob("ckpt-*.h5"))


def test_a_fresh_run_sets_aside_an_earlier_runs_newer_checkpoints(tmp_path, base):
    # --resume none into a directory holding ckpt-5 of an earlier run: that checkpoint must
    # neither be picked by a later --resume auto nor deleted by --keep.
    run = tmp_path / "run"
    shutil.copytree(base[1], run)
    earlier = checkpoint.checkpoint_path(run / "checkpoints", 5).read_bytes()
    earlier_metrics = (run / "metrics.jsonl").read_text()
    proc = ok(train(0, base[0], run, "--dtype", "float64", *BATCH, "--steps", "3",
                    "--keep", "1"))
    assert "moved 2 file(s) of an earlier run (ckpt-00000005.h5, metrics.jsonl)" in proc.stdout
    kept = [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")]
    assert kept == ["ckpt-00000003.h5"]
    (aside,) = (run / "checkpoints").glob("superseded-*/ckpt-00000005.h5")
    assert aside.read_bytes() == earlier
    # the earlier run's metrics went with its checkpoint, whole; the new file is the new run's
    assert (aside.parent / "metrics.jsonl").read_text() == earlier_metrics
    assert [r["step"] for r in metrics(run) if r["kind"] == "train"][-1] == 3
