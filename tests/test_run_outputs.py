"""Where a run's files go when the user places them: `--checkpoint-dir` and `--metrics` outside
the run directory, on 2 ranks, and `--resume auto` finding the checkpoints there."""

from __future__ import annotations

import json

import numpy as np
from helpers.trainruns import clean_env, ok, train, write_data

from distbp import checkpoint


def test_checkpoint_dir_and_metrics_elsewhere_are_used_and_resumed_from(tmp_path):
    data = write_data(tmp_path / "d.h5", 66)
    run, ckpts, log = tmp_path / "run", tmp_path / "elsewhere" / "ck", tmp_path / "logs" / "m.jsonl"
    placed = ("--checkpoint-dir", str(ckpts), "--metrics", str(log), "--checkpoint-every", "5",
              "--log-every", "5", "--record-every", "5", "--dtype", "float64")
    crashed = train(2, data, run, *placed, "--steps", "15",
                    env=clean_env(DISTBP_FAULT="raise:0:12"))  # after ckpt-00000010
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == [
        "ckpt-00000005.h5", "ckpt-00000010.h5"]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()
            if json.loads(line)["kind"] == "train"] == [5, 10]
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()

    proc = ok(train(2, data, run, *placed, "--steps", "15", "--resume", "auto"))
    assert f"resumed from {ckpts / 'ckpt-00000010.h5'} at step 10" in proc.stdout, proc.stdout
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()
            if json.loads(line)["kind"] == "train"] == [5, 10, 15]
    whole = tmp_path / "whole"
    ok(train(2, data, whole, "--checkpoint-every", "5", "--dtype", "float64", "--steps", "15"))
    resumed = checkpoint.load(checkpoint.checkpoint_path(ckpts, 15))
    uninterrupted = checkpoint.load(checkpoint.checkpoint_path(whole / "checkpoints", 15))
    assert np.array_equal(resumed.params, uninterrupted.params)


def test_the_checkpoint_resume_auto_picks_is_never_an_output(tmp_path):
    """--resume auto's choice is known only at setup: the metrics file and the trace are
    compared with it too, and the checkpoint survives byte for byte."""
    import hashlib

    data = write_data(tmp_path / "d.h5", n=66)
    run = tmp_path / "run"
    ok(train(0, data, run, "--steps", "4"))
    ckpt = checkpoint.checkpoint_path(run / "checkpoints", 4)
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for option in ("--metrics", "--trace"):
        proc = train(0, data, run, "--steps", "8", "--resume", "auto", option, str(ckpt))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert option in line and "is the checkpoint resumed from" in line, line
        assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before


def test_a_runs_outputs_never_replace_each_other_or_its_checkpoints(tmp_path):
    """The trace is not the metrics file; neither takes a name the checkpoints (or the run
    lock) use in the checkpoint directory; each refusal is one line and writes nothing."""
    data = write_data(tmp_path / "d.h5", n=66)
    run = tmp_path / "run"
    ok(train(0, data, run, "--steps", "2"))
    ckpts = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cases = [
        (("--trace", ckpts / "ckpt-00000004.h5"), "is a name the checkpoints use"),
        (("--metrics", ckpts / "ckpt-00000003.h5"), "is a name the checkpoints use"),
        (("--trace", run / "metrics.jsonl"), "is also the metrics file"),
        (("--trace", ckpts / ".distbp.lock"), "is the name of distbp's run lock"),
        (("--metrics", ckpts / "superseded-x"), "is a name the checkpoints use"),
    ]
    for option, phrase in cases:
        proc = train(0, data, run, "--steps", "4", "--resume", "auto", "--checkpoint-every", "1",
                     *map(str, option))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert option[0] in line and phrase in line, line
        assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
