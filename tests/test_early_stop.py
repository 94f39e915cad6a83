"""Early stopping (`--early-stop PATIENCE`, `--early-stop-metric`, `--early-stop-min-delta`): the
rule on hand-made histories; real 2-rank runs that stop at the epoch their own validation records
call for (found here by a loop written out independently), with the parameters the uninterrupted
run had at that step; a run killed mid-way and resumed stops at the same epoch, bitwise; a
stopped run resumed stops again at once, or trains on with more patience; a run resumed with
less patience that stops at once still writes its last train record; bad values exit 2.
Shared helpers: tests/helpers/trainruns.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import resolve
from helpers.trainruns import clean_env, final, metrics, ok, train, write_data

from distbp import checkpoint
from distbp.config_schema import TrainConfig
from distbp.early_stop import standing, stop_reason

# ------------------------------------------------------------------ the rule, by hand


def history(values: list[float], key: str = "loss") -> list[dict]:
    """Validation records of epochs 0, 1, ... with a train record before each (to be skipped)."""
    out = []
    for epoch, v in enumerate(values):
        out += [{"kind": "train", "epoch": epoch, key: 99.0},
                {"kind": "val", "epoch": epoch, key: v}]
    return out


def first_stop(records: list[dict], patience: int, metric: str, delta: float) -> int | None:
    """The epoch of the first validation after which stop_reason says stop."""
    vals = [r for r in records if r["kind"] == "val"]
    for i in range(len(vals)):
        if stop_reason(vals[:i + 1], patience, metric, delta) is not None:
            return vals[i]["epoch"]
    return None


def test_loss_must_improve_by_more_than_min_delta_to_reset_the_count():
    records = history([1.0, 0.8, 0.85, 0.79, 0.9, 0.95, 0.81])
    # min_delta 0.02: 0.8 improves on 1.0 (best, epoch 1); 0.85 no (1); 0.79 is lower but by
    # only 0.01 (2), so the best stays 0.8; 0.9 no (3): patience 3 is used up after epoch 4
    assert first_stop(records, 3, "val_loss", 0.02) == 4
    assert stop_reason(records[:10], 3, "val_loss", 0.02) == (
        "early stop after epoch 4: val_loss did not improve by more than 0.02 for 3 "
        "validations (best 0.8 at epoch 1)")
    # min_delta 0: 0.79 improves (best, epoch 3); 0.9, 0.95, 0.81 do not: stop after epoch 6
    assert first_stop(records, 3, "val_loss", 0.0) == 6
    assert standing(records, "val_loss", 0.0) == (6, 0.79, 3, 3)
    assert first_stop(records, 4, "val_loss", 0.0) is None


def test_accuracy_must_rise_by_more_than_min_delta():
    records = history([0.5, 0.7, 0.7, 0.75, 0.72], "accuracy")
    # 0.7 improves (epoch 1); 0.7 equal: no (1); 0.75 is 0.05 > 0.04 higher: best (epoch 3)
    assert first_stop(records, 2, "val_accuracy", 0.04) is None
    assert standing(records, "val_accuracy", 0.04) == (4, 0.75, 3, 1)
    # with min_delta 0.06 the rise to 0.75 does not count: 0.7, 0.75 make 2 misses after epoch 3
    assert first_stop(records, 2, "val_accuracy", 0.06) == 3
    assert first_stop(records, 1, "val_accuracy", 0.0) == 2


def test_no_patience_or_no_validation_yet_never_stops():
    assert stop_reason(history([1.0, 2.0, 3.0]), None, "val_loss", 0.0) is None
    assert stop_reason([], 1, "val_loss", 0.0) is None
    assert standing([{"kind": "train", "epoch": 0, "loss": 1.0}], "val_loss", 0.0) is None


# ------------------------------------------------------------------ the options


def test_early_stopping_is_off_by_default_and_set_alike_from_a_file_or_the_command_line(
        tmp_path):
    cfg = TrainConfig()
    assert (cfg.early_stop, cfg.early_stop_metric, cfg.early_stop_min_delta) == (
        None, "val_loss", 0.0)
    path = tmp_path / "run.toml"
    path.write_text('data = "d.h5"\nval_fraction = 0.2\nearly_stop = 4\n'
                    'early_stop_metric = "val_accuracy"\nearly_stop_min_delta = 0.01\n')
    from_cli = resolve("--data", "d.h5", "--val-fraction", "0.2", "--early-stop", "4",
                       "--early-stop-metric", "val_accuracy", "--early-stop-min-delta", "0.01")
    assert resolve("--config", str(path)) == from_cli
    assert (from_cli.early_stop, from_cli.early_stop_min_delta) == (4, 0.01)
    assert resolve("--config", str(path), "--early-stop", "none").early_stop is None


@pytest.mark.parametrize("argv", [(), ("--data", "d.h5", "--val-data", "v.h5"),
                                  ("--data", "d.h5", "--val-fraction", "0.25")])
def test_early_stopping_is_accepted_wherever_there_is_validation_data(argv):
    # no --data: the bundled digits, whose test split validates
    assert resolve(*argv, "--early-stop", "2").early_stop == 2


# ------------------------------------------------------------------ real runs

# 40 rows, half held out: 20 training rows in global batches of 8, 3 steps per epoch. A wide
# hidden layer and lr 0.5 overfit them within a few epochs: the validation loss turns up.
SPE, EPOCHS = 3, 10
OPTS = ("--layers", "8,32,3", "--lr", "0.5", "--momentum", "0.9", "--batch-size", "8",
        "--val-fraction", "0.5",
        "--dtype", "float64", "--epochs", str(EPOCHS), "--keep", "100", "--log-every", "1")


def reference_stop(vals: list[dict], key: str, higher: bool, patience: int,
                   delta: float) -> tuple[int, float, int, int] | None:
    """(stop epoch, best, best epoch, misses) by the rule, or None: never."""
    best = best_epoch = None
    misses = 0
    for r in vals:
        v = r[key]
        better = best is None or (v - best > delta if higher else best - v > delta)
        if better:
            best, best_epoch, misses = v, r["epoch"], 0
        else:
            misses += 1
        if misses == patience:
            return r["epoch"], best, best_epoch, misses
    return None


def val_records(run: Path) -> list[dict]:
    return [r for r in metrics(run) if r["kind"] == "val"]


def ckpt_steps(run: Path) -> list[int]:
    return [int(p.name[5:13]) for p in checkpoint.list_checkpoints(run / "checkpoints")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """On 2 ranks: "full" trains all 10 epochs without early stopping, "stopped" is the same
    run with --early-stop 3; "data" is their data file."""
    root = tmp_path_factory.mktemp("early")
    data = write_data(root / "d.h5", 40)
    ok(train(2, data, root / "full", *OPTS))
    proc = ok(train(2, data, root / "stopped", *OPTS, "--early-stop", "3"))
    (root / "stopped.out").write_text(proc.stdout)
    return {"data": data, "full": root / "full", "stopped": root / "stopped"}


def assert_same_params(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    assert a.step == b.step
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.optimizer_state["velocity"], b.optimizer_state["velocity"])


def test_the_run_stops_at_the_epoch_its_validation_records_call_for(runs):
    full = val_records(runs["full"])
    assert len(full) == EPOCHS
    stop = reference_stop(full, "loss", False, 3, 0.0)
    assert stop is not None and stop[0] < EPOCHS - 1, full  # the data really overfits
    epoch, best, best_epoch, misses = stop
    out = (runs["stopped"].parent / "stopped.out").read_text()
    assert (f"early stop after epoch {epoch}: val_loss did not improve by more than 0 for 3 "
            f"validations (best {best:.6g} at epoch {best_epoch})") in out.splitlines()
    assert val_records(runs["stopped"]) == full[:epoch + 1]  # same ranks: bitwise
    step = (epoch + 1) * SPE
    assert ckpt_steps(runs["stopped"])[-1] == step  # the final checkpoint, nothing after it
    assert_same_params(final(runs["stopped"], step), final(runs["full"], step))
    assert [r for r in metrics(runs["stopped"]) if r["kind"] == "train"][-1]["step"] == step


def test_accuracy_with_min_delta_from_a_toml_file_stops_where_the_records_say(runs, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('early_stop = 2\nearly_stop_metric = "val_accuracy"\n'
                      "early_stop_min_delta = 0.04\n")
    proc = ok(train(2, runs["data"], tmp_path / "run", *OPTS, "--config", str(config)))
    full = val_records(runs["full"])
    epoch, best, best_epoch, misses = reference_stop(full, "accuracy", True, 2, 0.04)
    assert (f"early stop after epoch {epoch}: val_accuracy did not improve by more than 0.04 "
            f"for 2 validations (best {best:.6g} at epoch {best_epoch})") in proc.stdout
    assert val_records(tmp_path / "run") == full[:epoch + 1]
    assert ckpt_steps(tmp_path / "run")[-1] == (epoch + 1) * SPE


def test_a_stop_due_at_the_last_epoch_is_just_the_end_of_the_run(runs, tmp_path):
    epoch = reference_stop(val_records(runs["full"]), "loss", False, 3, 0.0)[0]
    proc = ok(train(2, runs["data"], tmp_path / "run", *OPTS, "--epochs", str(epoch + 1),
                    "--early-stop", "3"))
    assert "early stop" not in proc.stdout
    assert ckpt_steps(tmp_path / "run")[-1] == (epoch + 1) * SPE


def test_a_run_killed_and_resumed_stops_at_the_same_epoch_bitwise(runs, tmp_path):
    run, opts = tmp_path / "run", (*OPTS, "--early-stop", "3", "--checkpoint-every", "2")
    stop_step = ckpt_steps(runs["stopped"])[-1]
    died = train(2, runs["data"], run, *opts, env=clean_env(DISTBP_FAULT=f"raise:0:{SPE + 2}"))
    assert died.returncode == 1, died.stdout + died.stderr
    resume_step = ckpt_steps(run)[-1]  # mid-epoch, with validations before and after it
    assert resume_step < stop_step and resume_step % SPE != 0
    proc = ok(train(2, runs["data"], run, *opts, "--resume", "auto"))
    assert f"at step {resume_step}" in proc.stdout
    stopped_out = (runs["stopped"].parent / "stopped.out").read_text()
    line = next(x for x in stopped_out.splitlines() if x.startswith("early stop"))
    assert line in proc.stdout.splitlines()
    assert ckpt_steps(run)[-1] == stop_step
    assert_same_params(final(run, stop_step), final(runs["stopped"], stop_step))
    exact = ("kind", "step", "epoch", "loss", "accuracy")
    records = [tuple(r.get(k) for k in exact) for r in metrics(run)]
    assert records == [tuple(r.get(k) for k in exact) for r in metrics(runs["stopped"])]


def test_a_stopped_run_resumed_stops_at_once_or_trains_on_with_more_patience(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    before = ckpt_steps(run)
    proc = ok(train(2, runs["data"], run, *OPTS, "--early-stop", "3", "--resume", "auto"))
    assert "early stop after epoch" in proc.stdout
    assert not re.search(r"^step \d+/", proc.stdout, re.M)  # no step taken, no record
    assert ckpt_steps(run) == before and metrics(run) == metrics(runs["stopped"])
    # patience may change on resume: it only moves the end, like --epochs
    proc = ok(train(2, runs["data"], run, *OPTS, "--early-stop", "100", "--resume", "auto"))
    assert "early_stop 3 -> 100" in proc.stdout and "early stop" not in proc.stdout
    assert_same_params(final(run, EPOCHS * SPE), final(runs["full"], EPOCHS * SPE))
    assert val_records(run) == val_records(runs["full"])


def test_a_resume_that_stops_at_once_with_less_patience_writes_the_carried_steps_record(
        runs, tmp_path):
    # patience 3 trains past the epoch where patience 2 stops; killed just after it, with a
    # train record in progress in its checkpoint there, and resumed with patience 2: it stops
    # at once, and its records are the uninterrupted patience-2 run's, the last one included
    epoch = reference_stop(val_records(runs["full"]), "loss", False, 2, 0.0)[0]
    step = (epoch + 1) * SPE
    assert step < EPOCHS * SPE
    every = next(n for n in (4, 5) if step % n)  # no record due at the stop step itself
    opts = (*OPTS, "--checkpoint-every", str(SPE), "--log-every", str(every), "--record-every",
            str(every))
    ok(train(2, runs["data"], tmp_path / "two", *opts, "--early-stop", "2"))
    run = tmp_path / "run"
    died = train(2, runs["data"], run, *opts, "--early-stop", "3",
                 env=clean_env(DISTBP_FAULT=f"raise:0:{step + 1}"))
    assert died.returncode == 1, died.stdout + died.stderr
    assert ckpt_steps(run)[-1] == step and checkpoint.load(
        checkpoint.checkpoint_path(run / "checkpoints", step)).interval["steps"] == step % every
    proc = ok(train(2, runs["data"], run, *opts, "--early-stop", "2", "--resume", "auto"))
    assert f"early stop after epoch {epoch}:" in proc.stdout
    exact = ("kind", "step", "epoch", "loss", "accuracy", "lr")  # timings differ
    records = [tuple(r.get(k) for k in exact) for r in metrics(run)]
    assert records == [tuple(r.get(k) for k in exact) for r in metrics(tmp_path / "two")]
    assert records[-1][:2] == ("train", step) and records[-2][:2] == ("val", step)
    # the final checkpoint is rewritten with that record: the same history and parameters
    assert ckpt_steps(run)[-1] == ckpt_steps(tmp_path / "two")[-1] == step
    resumed, uninterrupted = final(run, step), final(tmp_path / "two", step)
    stored = [tuple(r.get(k) for k in exact) for r in resumed.metrics]
    assert stored == [tuple(r.get(k) for k in exact) for r in uninterrupted.metrics] == records
    assert resumed.interval["steps"] == uninterrupted.interval["steps"] == 0
    assert_same_params(resumed, uninterrupted)


def test_early_stopping_without_validation_data_exits_2_with_one_line(tmp_path):
    data = write_data(tmp_path / "d.h5", 40)
    proc = train(0, data, tmp_path / "run", "--early-stop", "2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "--early-stop needs validation data" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
