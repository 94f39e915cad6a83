"""Data-parallel training end to end (issue 3), as real processes: the serial fallback and
`mpiexec -n 1..4` give the same trajectory, replicas agree and a perturbed one is repaired, the
fallback runs with mpi4py unimportable, the bundled digits reach 97 % test accuracy, and the
metrics file carries what it promises. Shared helpers: tests/helpers/trainruns.py."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_mpi, run_py
from helpers.trainruns import (
    clean_env,
    final,
    metrics,
    ok,
    rel_diff,
    train,
    train_args,
    write_data,
)

from distbp.data import BUNDLED_DIR
from distbp.network import Network

DUMP = str(Path(__file__).parent / "helpers" / "replica_dump.py")

# name -> (rows, options). 20 steps each, float64.
CASES = {
    # one global batch of all 60 rows per step (60 is divisible by 1..4 ranks)
    "full_batch": (60, ("--batch-size", "60", "--momentum", "0")),
    # 66 rows in batches of 16: 4 full batches, then a tail of 2 rows, which leaves some of 3
    # or 4 ranks an empty shard; momentum SGD
    "minibatch_epoch_tail": (66, ("--batch-size", "16", "--momentum", "0.9")),
    # a global batch of 7 divides by none of 2, 3, 4 ranks; AdamW
    "batch_not_divisible_by_ranks": (70, ("--batch-size", "7", "--optimizer", "adamw",
                                          "--lr", "0.01", "--weight-decay", "0.01")),
}


@pytest.mark.parametrize("case", CASES)
def test_float64_run_is_the_same_serially_and_on_1_to_4_ranks(tmp_path, case):
    n, options = CASES[case]
    data = write_data(tmp_path / "d.h5", n)
    opts = ("--dtype", "float64", "--steps", "20", *options)
    ok(train(0, data, tmp_path / "serial", *opts))
    ref = final(tmp_path / "serial", 20).params
    initial = Network([8, 16, 3], activation="tanh", seed=3, dtype="float64").params
    assert rel_diff(initial, ref) > 1e-2  # it trained
    for ranks in (1, 2, 3, 4):
        run = tmp_path / f"n{ranks}"
        ok(train(ranks, data, run, *opts))
        params = final(run, 20).params
        if ranks == 1:  # same arithmetic as the serial run: bitwise
            np.testing.assert_array_equal(params, ref)
        assert rel_diff(ref, params) <= 1e-10, (ranks, rel_diff(ref, params))
        with h5py.File(run / "checkpoints" / "ckpt-00000020.h5", "r") as f:
            assert (f.attrs["step"], f.attrs["world_size"]) == (20, ranks)


def replica_run(tmp_path: Path, name: str, data: Path, **env: str):
    """3 ranks, 20 steps, replica check every 5 steps, every check's replicas dumped."""
    out, run = tmp_path / f"dump-{name}", tmp_path / name
    args = train_args(data, run, "--dtype", "float64", "--steps", "20", "--batch-size", "16",
                      "--check-every", "5")
    proc = ok(run_mpi(3, [DUMP, str(out), *args[2:]], timeout=60, env=clean_env(**env)))
    calls: dict[tuple[int, int, str], list[np.ndarray]] = {}
    for path in sorted(out.glob("*.npy")):
        call, step, rank, when = re.fullmatch(r"call(\d+)-step(\d+)-rank(\d)-(\w+)\.npy",
                                              path.name).groups()
        calls.setdefault((int(call), int(step), when), []).append(np.load(path))
    assert all(len(replicas) == 3 for replicas in calls.values())
    return proc, calls, final(run, 20).params


def test_replicas_agree_bitwise_and_a_perturbed_one_is_detected_and_repaired(tmp_path):
    data = write_data(tmp_path / "d.h5", 66)
    proc, calls, clean_params = replica_run(tmp_path, "clean", data)
    # every 5th step is both a check and a checkpoint step (5 steps per epoch): one check each
    checks = [(0, 5), (1, 10), (2, 15), (3, 20)]
    assert sorted((call, step) for call, step, when in calls if when == "before") == checks
    for replicas in calls.values():
        for other in replicas[1:]:
            np.testing.assert_array_equal(other, replicas[0])
    assert "differ between ranks" not in proc.stdout

    # rank 1's replica is nudged right after step 10, which is a check step
    proc, calls, params = replica_run(tmp_path, "perturbed", data, DISTBP_FAULT="perturb:1:10")
    assert sorted((call, step) for call, step, when in calls if when == "before") == checks
    rank0, rank1, rank2 = calls[1, 10, "before"]  # the one check at step 10 sees the nudge
    assert rank1[0] == rank0[0] + 1e-3 and np.array_equal(rank1[1:], rank0[1:])
    np.testing.assert_array_equal(rank2, rank0)
    assert proc.stdout.count("replica check at step 10: parameters differ between ranks") == 1
    for (_, step, when), replicas in calls.items():
        if step > 10 or when == "after":
            for other in replicas[1:]:
                np.testing.assert_array_equal(other, replicas[0])
    np.testing.assert_array_equal(params, clean_params)


def test_a_step_that_is_both_a_check_and_a_checkpoint_step_checks_the_replicas_once(tmp_path):
    # 66 rows in batches of 16: 5 steps per epoch, so checkpoints after steps 5 and 10 (ends of
    # epochs) and 12 (the last); --check-every 3 asks for checks after 3, 6, 9 and 12. Every
    # checkpoint checks the replicas, so step 12, both, must check once, not once per reason.
    data = write_data(tmp_path / "d.h5", 66)
    out = tmp_path / "dump"
    args = train_args(data, tmp_path / "run", "--dtype", "float64", "--steps", "12",
                      "--batch-size", "16", "--check-every", "3")
    proc = ok(run_py([DUMP, str(out), *args[2:]], timeout=60, env=clean_env()))
    saved = [int(m) for m in re.findall(r"^checkpoint \S*ckpt-(\d+)\.h5$", proc.stdout, re.M)]
    assert saved == [5, 10, 12]
    calls = sorted(out.glob("call*-before.npy"))  # one file per call, named in call order
    steps = [int(re.search(r"-step(\d+)-", path.name).group(1)) for path in calls]
    assert steps == [3, 5, 6, 9, 10, 12]


def without_mpi4py(tmp_path: Path) -> dict[str, str]:
    """A child environment in which `import mpi4py` raises ImportError."""
    shim = tmp_path / "no-mpi4py"
    (shim / "mpi4py").mkdir(parents=True)
    (shim / "mpi4py" / "__init__.py").write_text(
        'raise ImportError("mpi4py made unimportable by the test")\n')
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    env = clean_env(PYTHONPATH=path)
    probe = run_py(["-c", "import mpi4py"], timeout=30, env=env)
    assert "mpi4py made unimportable" in probe.stderr
    return env


def test_serial_fallback_trains_with_mpi4py_unimportable(tmp_path):
    data = write_data(tmp_path / "d.h5", 66)
    opts = ("--dtype", "float64", "--steps", "20", "--batch-size", "16")
    proc = ok(train(0, data, tmp_path / "broken", *opts, env=without_mpi4py(tmp_path)))
    assert "1 rank(s), serial" in proc.stdout
    ok(train(0, data, tmp_path / "normal", *opts))
    np.testing.assert_array_equal(final(tmp_path / "broken", 20).params,
                                  final(tmp_path / "normal", 20).params)


def test_two_ranks_without_mpi4py_refuse_to_train_independent_copies(tmp_path):
    data = write_data(tmp_path / "d.h5", 66)
    proc = train(2, data, tmp_path / "run", "--steps", "5", env=without_mpi4py(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to train 2 independent copies" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# The digits preset, written out here as the expectations below need it: global batch 32,
# 30 epochs, SGD lr 0.1 with a cosine schedule down to 0.
DIGITS_BATCH, DIGITS_EPOCHS, DIGITS_LR = 32, 30, 0.1


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """`mpiexec -n 2 distbp train --run-dir TMP`: the defaults, i.e. the bundled digits."""
    run = tmp_path_factory.mktemp("digits")
    ok(run_mpi(2, ["-m", "distbp", "train", "--run-dir", str(run)], timeout=120,
               env=clean_env()))
    return run


def rows(split: str) -> int:
    with h5py.File(BUNDLED_DIR / f"digits-{split}.h5", "r") as f:
        return len(f["y"])


def test_bundled_digits_on_two_ranks_reach_97_percent_test_accuracy(digits_run):
    val = [r for r in metrics(digits_run) if r["kind"] == "val"]
    assert len(val) == DIGITS_EPOCHS
    assert val[-1]["samples"] == rows("test")  # the whole test split, no padded duplicates
    assert val[-1]["accuracy"] >= 0.97, val[-1]


def test_metrics_lines_carry_step_epoch_loss_accuracy_lr_throughput_and_timings(digits_run):
    steps_per_epoch = math.ceil(rows("train") / DIGITS_BATCH)
    total = DIGITS_EPOCHS * steps_per_epoch
    records = metrics(digits_run)
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records[-1]["step"] == total
    steps = [r["step"] for r in train_records]
    assert steps == sorted(set(steps))
    for r in train_records:
        assert {"step", "epoch", "loss", "accuracy", "lr", "samples_per_s", "compute_ms",
                "comm_ms"} <= r.keys()
        assert r["epoch"] == (r["step"] - 1) // steps_per_epoch
        # the lr of the record's last step, step - 1 steps into a cosine decay over the run
        lr = DIGITS_LR * (1 + math.cos(math.pi * (r["step"] - 1) / total)) / 2
        assert r["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        assert 0 < r["loss"] < 10 and 0 <= r["accuracy"] <= 1
        assert r["samples_per_s"] > 0 and r["compute_ms"] > 0 and r["comm_ms"] > 0
    val = [r for r in records if r["kind"] == "val"]
    assert [(r["step"], r["epoch"]) for r in val] == [
        ((e + 1) * steps_per_epoch, e) for e in range(DIGITS_EPOCHS)]
    assert train_records[-1]["loss"] < train_records[0]["loss"] / 5


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_validation_is_exact_on_any_number_of_ranks(tmp_path):
    # 61 held-out rows over 3 ranks: shares of 21/20/20, each counted once. Equal loss and
    # accuracy to the serial run proves no row is skipped or evaluated twice.
    data = write_data(tmp_path / "d.h5", 203)
    opts = ("--dtype", "float64", "--epochs", "2", "--batch-size", "32", "--val-fraction", "0.3")
    records = {}
    for ranks in (0, 3):
        ok(train(ranks, data, tmp_path / f"n{ranks}", *opts))
        records[ranks] = [r for r in metrics(tmp_path / f"n{ranks}") if r["kind"] == "val"]
    assert len(records[0]) == len(records[3]) == 2
    for serial, parallel in zip(records[0], records[3]):
        assert serial["samples"] == parallel["samples"] == 61
        assert serial["accuracy"] == parallel["accuracy"]
        assert math.isclose(serial["loss"], parallel["loss"], rel_tol=1e-10)
