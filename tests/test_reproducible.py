"""--reproducible: the same bits on any number of ranks, as real processes (plain python for the
serial fallback, mpiexec for 1..4 ranks), compared by SHA-256 of every checkpoint dataset under
/model, /optimizer and /preprocess, and of the metrics records (timings aside); --accumulate.

The data leave a short last batch (203 rows in batches of 24: eight of 24 and one of 11) and
uneven shards (6 micro-batches of 4 rows, 2 rows in the short batch but one; 4 ranks take 2, 2,
1 and 1 of them).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_mpi, run_py
from helpers.trainruns import clean_env, final, metrics, ok, rel_diff, train, write_data

from distbp import checkpoint
from distbp.metrics import TIMINGS

REPRO = ("--reproducible", "--micro-batches", "6", "--batch-size", "24", "--momentum", "0.9")


def digests(path, groups=("model", "optimizer", "preprocess", "metrics")) -> dict[str, str]:
    """SHA-256 of every dataset under `groups` of a checkpoint: by default /model, /optimizer,
    /preprocess and /metrics (the records and the open interval's sums)."""
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in groups:
                found[name] = hashlib.sha256(np.ascontiguousarray(obj[()]).tobytes()).hexdigest()
        f.visititems(visit)
    assert any(k.startswith("model/") for k in found), found
    return found


def records(run_dir) -> str:
    """The run's metrics file, verbatim: a reproducible run's records carry no timings, so the
    file itself must be the same bytes."""
    kept = metrics(run_dir)
    assert any(r["kind"] == "val" for r in kept) and any(r["kind"] == "train" for r in kept)
    assert not any(key in r for r in kept for key in TIMINGS), kept[0]
    return (run_dir / "metrics.jsonl").read_text()


def ckpt_file(run_dir, step):
    return checkpoint.checkpoint_path(run_dir / "checkpoints", step)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_serial_and_1_to_4_ranks_write_the_same_bits(tmp_path, dtype):
    data = write_data(tmp_path / "d.h5", n=203)
    options = (*REPRO, "--dtype", dtype, "--epochs", "2", "--val-fraction", "0.2",
               "--record-every", "3")
    results = {}
    for ranks in (0, 1, 2, 3, 4):
        run = tmp_path / f"r{ranks}"
        ok(train(ranks, data, run, *options))
        steps = final(run, 14).step  # 163 training rows: 7 steps of 24 per epoch
        results[ranks] = (digests(ckpt_file(run, steps)), records(run))
    first = results[0]
    assert "optimizer/velocity" in first[0]
    for ranks, got in results.items():
        assert got[0] == first[0], f"{ranks} rank(s): checkpoint datasets differ from serial"
        assert got[1] == first[1], f"{ranks} rank(s): metrics records differ from serial"


def test_the_default_mode_differs_across_rank_counts_where_reproducible_mode_does_not(tmp_path):
    """What the mode is for: the same run without it changes bits with the rank count (so the
    test above can fail)."""
    data = write_data(tmp_path / "d.h5", n=203)
    options = ("--batch-size", "24", "--steps", "20", "--dtype", "float32")
    ok(train(1, data, tmp_path / "a", *options))
    ok(train(3, data, tmp_path / "b", *options))
    a, b = final(tmp_path / "a", 20), final(tmp_path / "b", 20)
    assert not np.array_equal(a.params, b.params)
    assert rel_diff(a.params, b.params) < 1e-4  # summation order, nothing more


def test_adam_cosine_clipping_and_standardize_on_several_blocks_of_statistics(tmp_path):
    """Every optimizer feature at once, and --standardize over 9000 rows (three blocks of the
    statistics' fixed-order sum)."""
    data = write_data(tmp_path / "d.h5", n=9000)
    options = ("--reproducible", "--micro-batches", "4", "--batch-size", "500", "--epochs", "1",
               "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.01",
               "--schedule", "cosine", "--warmup-steps", "3", "--clip-grad-norm", "0.5",
               "--standardize", "--val-fraction", "0.1")
    got = {}
    for ranks in (0, 2, 3):
        run = tmp_path / f"r{ranks}"
        ok(train(ranks, data, run, *options))
        got[ranks] = (digests(ckpt_file(run, 17)), records(run))  # 8100 rows / 500: 17 steps
    assert {"preprocess/mean", "optimizer/m"} <= got[0][0].keys()
    assert got[0] == got[2] == got[3]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_resume_on_another_number_of_ranks_continues_the_same_bits(tmp_path, dtype):
    data = write_data(tmp_path / "d.h5", n=203)
    options = (*REPRO, "--dtype", dtype, "--steps", "20", "--checkpoint-every", "8",
               "--val-fraction", "0.2")
    ok(train(3, data, tmp_path / "whole", *options))
    ok(train(2, data, tmp_path / "parts", *REPRO, "--dtype", dtype, "--steps", "8",
             "--val-fraction", "0.2", "--checkpoint-every", "8"))
    proc = ok(train(3, data, tmp_path / "parts", *options, "--resume", "auto"))
    assert "resumed from" in proc.stdout and "at step 8" in proc.stdout
    assert " samples/s compute " in proc.stdout  # the progress lines keep the timings
    assert digests(ckpt_file(tmp_path / "whole", 20)) == digests(ckpt_file(tmp_path / "parts", 20))
    assert records(tmp_path / "whole") == records(tmp_path / "parts")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_rank_accumulating_equals_four_ranks(tmp_path, dtype):
    """Reproducible mode: 1 rank works through the 4 micro-batches one after the other, 4 ranks
    take one each; the bits are the same."""
    data = write_data(tmp_path / "d.h5", n=203)
    options = ("--reproducible", "--micro-batches", "4", "--batch-size", "24", "--steps", "12",
               "--dtype", dtype)
    ok(train(1, data, tmp_path / "one", *options))
    ok(train(4, data, tmp_path / "four", *options))
    assert digests(ckpt_file(tmp_path / "one", 12)) == digests(ckpt_file(tmp_path / "four", 12))


@pytest.mark.parametrize("ranks", [1, 2])
def test_accumulate_equals_the_unaccumulated_run_within_summation_order(tmp_path, ranks):
    data = write_data(tmp_path / "d.h5", n=203)
    options = ("--batch-size", "24", "--steps", "12", "--dtype", "float64")
    ok(train(ranks, data, tmp_path / "plain", *options))
    proc = ok(train(ranks, data, tmp_path / "pieces", *options, "--accumulate", "4"))
    assert "in 4 pieces" in proc.stdout
    plain, pieces = final(tmp_path / "plain", 12), final(tmp_path / "pieces", 12)
    assert rel_diff(plain.params, pieces.params) < 1e-12
    kept = [[(r["loss"], r["accuracy"]) for r in metrics(run) if r["kind"] == "train"]
            for run in (tmp_path / "plain", tmp_path / "pieces")]
    np.testing.assert_allclose(kept[0], kept[1], rtol=1e-12)


def test_reproducible_mode_runs_one_blas_thread_whatever_the_environment(tmp_path):
    data = write_data(tmp_path / "d.h5", n=203)
    env = clean_env(OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
    proc = ok(train(1, data, tmp_path / "run", *REPRO, "--steps", "2", env=env))
    assert "1 BLAS thread(s) per rank (--reproducible)" in proc.stdout
    assert "6 micro-batches of 4 rows, 6 per rank (reproducible)" in proc.stdout


@pytest.mark.parametrize("options, named", [
    (("--accumulate", "2"), "--accumulate"),
    (("--threads", "2"), "--threads"),
    (("--overlap", "on"), "--overlap"),
])
def test_settings_that_would_break_the_promise_are_refused(tmp_path, options, named):
    data = write_data(tmp_path / "d.h5", n=203)
    proc = train(0, data, tmp_path / "run", *REPRO, "--steps", "2", *options)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert named in lines[-1] and "--reproducible" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_more_ranks_than_micro_batches_is_refused_on_every_rank(tmp_path):
    data = write_data(tmp_path / "d.h5", n=203)
    proc = train(3, data, tmp_path / "run", "--reproducible", "--micro-batches", "2",
                 "--steps", "2")
    assert proc.returncode == 2, proc.stderr
    assert "--micro-batches" in proc.stderr and "3 ranks" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_reproducible_mode_is_a_setting_a_resume_cannot_change(tmp_path):
    data = write_data(tmp_path / "d.h5", n=203)
    ok(train(0, data, tmp_path / "run", *REPRO, "--steps", "4"))
    proc = train(0, data, tmp_path / "run", "--batch-size", "24", "--steps", "8",
                 "--resume", "auto")
    assert proc.returncode == 2
    assert "reproducible True -> False" in proc.stderr


ORDERED_PROG = str(Path(__file__).parent / "mpi_progs" / "ordered_sum_prog.py")


def tree_sum(parts: int, n: int, dtype: str) -> np.ndarray:
    """The documented tree, written out here: [lo, hi) = [lo, mid) + [mid, hi)."""
    sys.path.insert(0, str(Path(ORDERED_PROG).parent))
    from ordered_sum_prog import part

    def node(lo: int, hi: int) -> np.ndarray:
        if hi - lo == 1:
            return part(lo, n, dtype)
        mid = (lo + hi) // 2
        return node(lo, mid) + node(mid, hi)
    return node(0, parts)


def test_ordered_sums_have_the_same_bits_on_1_to_5_ranks_and_follow_the_documented_tree():
    serial = json.loads(ok(run_py([ORDERED_PROG], timeout=60)).stdout)
    for ranks in (1, 2, 3, 4, 5):
        got = json.loads(ok(run_mpi(ranks, [ORDERED_PROG], timeout=60)).stdout)
        assert got == {k: v for k, v in serial.items() if int(k.split("/")[0]) >= ranks}, ranks
    for key, digest in serial.items():
        parts, n, dtype = key.split("/")
        tree = tree_sum(int(parts), int(n), dtype)
        assert hashlib.sha256(tree.tobytes()).hexdigest() == digest, key
    # the order shows in these values: adding them left to right gives other bits
    from ordered_sum_prog import part
    left_to_right = sum(part(m, 1000, "float32") for m in range(13))
    assert hashlib.sha256(left_to_right.tobytes()).hexdigest() != serial["13/1000/float32"]


def test_a_checkpoint_from_before_these_settings_resumes_with_their_defaults(tmp_path):
    """A checkpoint whose configuration has no accumulate, reproducible or micro_batches (as
    written before they existed) ran with their defaults: it resumes, to the bits of a run that
    was never interrupted."""
    data = write_data(tmp_path / "d.h5", n=203)
    options = ("--batch-size", "24", "--momentum", "0.9", "--checkpoint-every", "5")
    ok(train(0, data, tmp_path / "whole", *options, "--steps", "10"))
    ok(train(0, data, tmp_path / "run", *options, "--steps", "5"))
    c = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "run" / "checkpoints", 5))
    config = {k: v for k, v in c.config.items()
              if k not in ("accumulate", "reproducible", "micro_batches")}
    checkpoint.save(tmp_path / "run" / "checkpoints", step=c.step, epoch=c.epoch,
                    step_in_epoch=c.step_in_epoch, seed=c.seed, layers=c.layers,
                    activation=c.activation, output=c.output, loss=c.loss, params=c.params,
                    optimizer_name=c.optimizer_name, optimizer_state=c.optimizer_state,
                    config=config, metrics=c.metrics, world_size=c.world_size,
                    preprocess=c.preprocess, interval=c.interval)
    assert "reproducible" not in checkpoint.load(c.path).config
    proc = ok(train(0, data, tmp_path / "run", *options, "--steps", "10", "--resume", "auto"))
    assert "at step 5" in proc.stdout
    state = ("model", "optimizer", "preprocess")  # the records hold timings outside the mode
    assert digests(ckpt_file(tmp_path / "run", 10), state) == \
        digests(ckpt_file(tmp_path / "whole", 10), state)
    refused = train(0, data, tmp_path / "run", *options, "--steps", "12", "--resume", "auto",
                    "--reproducible")
    assert refused.returncode == 2 and "reproducible False -> True" in refused.stderr


def test_micro_batches_without_reproducible_is_refused(tmp_path):
    data = write_data(tmp_path / "d.h5", n=203)
    proc = train(0, data, tmp_path / "run", "--micro-batches", "8", "--steps", "2")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--micro-batches applies to --reproducible only" in line


def test_the_memory_check_counts_the_rows_of_one_pass(tmp_path):
    """--accumulate and micro-batches lower the rows a pass holds; the setup's memory check
    counts those, so a run that fits only through them is not refused (RLIMIT_AS caps memory)."""
    data = write_data(tmp_path / "d.h5", n=30000)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000,) * 2); "
    options = ("--layers", "8,4096,3", "--batch-size", "30000", "--steps", "1")
    results = {}
    for name, extra in (("whole", ()), ("pieces", ("--accumulate", "64")),
                        ("micro", ("--reproducible", "--micro-batches", "64"))):
        code = (limit + "import sys; from distbp.entry import main; sys.exit(main(sys.argv[1:]))")
        results[name] = run_py(["-c", code, "train", "--data", str(data), "--run-dir",
                                str(tmp_path / name), *options, *extra], env=clean_env())
    assert results["whole"].returncode == 2 and "needs about" in results["whole"].stderr
    for name in ("pieces", "micro"):
        ok(results[name])


def test_the_fixed_point_alternative_is_less_accurate_than_the_tree_as_the_readme_says():
    script = Path(__file__).parents[1] / "scripts" / "fixed_point_sum.py"
    out = ok(run_py([str(script), "--params", "5000", "--parts", "8"], timeout=60)).stdout
    errors = {line.split(":")[0]: float(line.split("error ")[1].split()[0])
              for line in out.splitlines() if "largest error" in line}
    assert errors["fixed tree (float64)"] < 1e-14 < errors["fixed point (int64)"]
