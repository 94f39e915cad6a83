"""Train records (metrics.jsonl, kind "train") whose interval spans a stop and resume are bitwise
the uninterrupted run's on 1 and 2 ranks (their running sums travel in the checkpoint's
/metrics/interval), and a checkpoint without those sums still resumes with a fresh record.
Split from tests/test_resume.py; shared helpers: tests/helpers/trainruns.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import pytest
from helpers.trainruns import (
    assert_same_state,
    clean_env,
    final,
    metrics,
    ok,
    record_steps,
    train,
    write_data,
)

from distbp import checkpoint
from distbp.ckpt_integrity import INTERVAL_KEYS

# 66 rows in global batches of 16: 5 steps per epoch, the 5th a tail of 2 rows.
ROWS, BATCH = 66, ("--batch-size", "16")


SPAN = ("--dtype", "float32", *BATCH, "--momentum", "0.9", "--steps", "20", "--log-every", "4",
        "--record-every", "4", "--checkpoint-every", "3")
EXACT = ("kind", "step", "epoch", "loss", "accuracy", "lr")  # timings differ, these may not


def exact_train_fields(run_dir: Path) -> list[tuple]:
    return [tuple(r[k] for k in EXACT) for r in metrics(run_dir) if r["kind"] == "train"]


def die_after_step_8(ranks: int, data: Path, run: Path) -> checkpoint.Checkpoint:
    """Run SPAN until rank 0 raises right after step 8 (exit 1); return ckpt-6, the newest."""
    proc = train(ranks, data, run, *SPAN, env=clean_env(DISTBP_FAULT="raise:0:8"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert checkpoint.list_checkpoints(run / "checkpoints")[-1] == checkpoint.checkpoint_path(
        run / "checkpoints", 6)
    return final(run, 6)


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_records_spanning_a_resume_are_bitwise_the_uninterrupted_runs(tmp_path, ranks):
    data = write_data(tmp_path / "d.h5", ROWS)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    ok(train(ranks, data, whole, *SPAN))
    stopped = die_after_step_8(ranks, data, parts)
    assert [r["step"] for r in stopped.metrics] == [4]
    assert (stopped.interval["steps"], stopped.interval["samples"]) == (2, 2.0 + 16.0)
    with h5py.File(stopped.path, "r") as f:  # plain h5py: each sum carries its digest
        for key in INTERVAL_KEYS:
            ds = f["metrics/interval"][key]
            assert ds.attrs["sha256"] == hashlib.sha256(ds[()].tobytes()).hexdigest()
    proc = ok(train(ranks, data, parts, *SPAN, "--resume", "auto"))
    assert f"resumed from {stopped.path} at step 6" in proc.stdout
    expected = exact_train_fields(whole)
    assert [r[1] for r in expected] == [4, 8, 12, 16, 20]
    assert exact_train_fields(parts) == expected  # floats compared exactly
    assert record_steps(parts) == record_steps(whole)
    assert_same_state(final(whole, 20), final(parts, 20))
