"""`distbp bench` measures and reports the performance model's figures, serially and under MPI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, error_lines, run_mpi, run_py
from helpers.memory import peak_growth

KEYS = {"step_ms", "compute_ms", "allreduce_ms", "update_ms", "gemm_peak_gflops", "mfu",
        "params", "samples_per_s"}
ARGS = ["-m", "distbp", "bench", "--layers", "64,32,10", "--batch-size", "64", "--steps", "5",
        "--warmup", "1", "--gemm-size", "128", "--json"]


def test_bench_reports_consistent_figures_serially():
    out = run_py(ARGS, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert KEYS <= r.keys() and r["ranks"] == 1
    assert r["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert r["step_ms"] == pytest.approx(r["compute_ms"] + r["allreduce_ms"] + r["update_ms"])
    assert r["gemm_peak_gflops"] > 0 and r["mfu"] > 0
    # the matmuls the step executes: 2·m·k·n for z = a Wᵀ and ΔW = δᵀ a in both layers, and
    # Δa = δ W in the second only (the inputs need no gradient)
    executed = 2 * (2 * (64 * 32 + 32 * 10) + 32 * 10) * 64
    assert r["mfu"] == pytest.approx(executed / (r["compute_ms"] / 1e3)
                                     / (r["gemm_peak_gflops"] * 1e9))


def test_bench_under_mpi_prints_once_with_allreduce_bandwidth():
    out = run_mpi(2, ARGS, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 only
    r = json.loads(lines[0])
    assert r["ranks"] == 2 and r["allreduce_bytes"] == (r["params"] + 4) * 4  # and 4 scalars
    assert r["allreduce_algbw_gbs"] > 0 and r["allreduce_busbw_gbs"] == pytest.approx(
        r["allreduce_algbw_gbs"])  # 2(p−1)/p = 1 for p = 2


def test_bench_rejects_bad_layers_with_one_line():
    out = run_py(["-m", "distbp", "bench", "--layers", "64,x"], timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--layers" in out.stderr


@pytest.mark.parametrize("flags,phrase", [
    (["--threads", "0"], "argument --threads: must be an integer from 1 to 4096, got '0'"),
    (["--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
    (["--warmup", "-1"], "argument --warmup: must be an integer from 0 to"),
    (["--gemm-size", "100000"], "argument --gemm-size: must be an integer from 1 to 8192"),
    (["--bucket-mb", "inf"], "argument --bucket-mb: must be a finite number > 0, got 'inf'"),
    (["--model", "--alpha=-1"], "argument --alpha: must be a finite number >= 0, got '-1'"),
    (["--model", "--beta", "0"], "argument --beta: must be a finite number > 0, got '0'"),
    (["--model", "--gflops", "nan"], "argument --gflops: must be a finite number > 0"),
    (["--layers", "8,3000000000,2"], "needs about"),
    (["--batch-size", "99999999999999"], "99999999999999 rows a pass) needs about"),
])
def test_bench_rejects_bad_options_with_one_line(flags, phrase):
    out = run_py(["-m", "distbp", "bench", "--layers", "8,4,2", "--steps", "1", *flags],
                 timeout=30)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    (line,) = error_lines(out.stderr)
    assert phrase in line, out.stderr


def test_bench_help_is_plain_text_with_defaults():
    out = run_py(["-m", "distbp", "bench", "--help"], timeout=30)
    assert out.returncode == 0 and "`" not in out.stdout, out.stdout
    text = " ".join(out.stdout.split())
    for shown in ("(default relu)", "(default float32)", "(default 2048)"):
        assert shown in text, shown


def test_bench_times_the_trainers_own_step_function(tmp_path):
    # every timed step goes through Trainer.step, the function `distbp train` runs
    from distbp import bench
    from distbp.comm import SerialComm
    from distbp.trainer import Trainer

    calls = []
    trainer = bench.bench_trainer((8, 4, 2), "relu", 16, "float64", SerialComm(), tmp_path, 5)
    step = Trainer.step
    trainer.step = lambda i: calls.append(i) or step(trainer, i)
    before = trainer.s.net.params.copy()
    with trainer.open_loader():
        times = bench.time_steps(trainer, SerialComm(), warmup=2, steps=3)
    assert calls == [0, 1, 2, 3, 4] and times.shape == (3, 4) and (times > 0).all()
    assert not np.array_equal(before, trainer.s.net.params)  # the updates really happened


def test_bench_baseline_times_a_bare_loop_of_the_same_shapes_and_gives_the_ratio():
    out = run_mpi(2, [*ARGS, "--baseline"], timeout=120)
    assert out.returncode == 0, out.stderr
    b = json.loads(out.stdout)["baseline"]
    assert b["bare_step_ms"] > 0 and b["distbp_step_ms"] > 0
    assert b["speed_ratio"] == pytest.approx(b["bare_step_ms"] / b["distbp_step_ms"])
    assert b["reading_speed_ratio"] == pytest.approx(b["bare_reading_step_ms"]
                                                     / b["distbp_step_ms"])
    text = run_py([*ARGS[:-1], "--baseline", "--activation", "sigmoid"], timeout=120)
    assert text.returncode == 0 and "x the bare loop's speed" in text.stdout, text.stderr
    assert "x the reading loop's)" in text.stdout
    uneven = [*ARGS, "--baseline"]  # 33 and 32 rows a rank: each bare loop reads its share
    uneven[uneven.index("--batch-size") + 1] = "65"
    out = run_mpi(2, uneven, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["baseline"]["bare_reading_step_ms"] > 0
    refused = run_py([*ARGS, "--baseline", "--activation", "tanh"], timeout=60)
    assert refused.returncode == 2 and "--baseline" in refused.stderr


def test_bench_reproducible_times_the_reproducible_step_beside_the_default_one():
    out = run_mpi(2, [*ARGS, "--reproducible", "--micro-batches", "2"], timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    q = r["reproducible"]
    assert q["micro_batches"] == 2 and q["step_ms"] > 0
    assert q["cost_ratio"] == pytest.approx(q["step_ms"] / q["default_step_ms"])
    text = run_py([*ARGS[:-1], "--reproducible"], timeout=120)
    assert text.returncode == 0, text.stderr
    assert "reproducible mode (4 micro-batches, 1 BLAS thread)" in text.stdout
    refused = run_mpi(2, [*ARGS, "--reproducible", "--micro-batches", "1"], timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert [line for line in error_lines(refused.stderr) if line.startswith("distbp:")] == [
        "distbp: error: --reproducible: each of the 2 ranks needs one of the 1 micro-batches: "
        "raise --micro-batches"]


# shapes whose smallest per-step array (batch x outputs) is 8 KiB or more, above the budget
@pytest.mark.parametrize("layers,activation,batch", [((784, 128, 16), "relu", 128),
                                                     ((64, 256, 256, 16), "sigmoid", 256)])
def test_the_trainers_step_allocates_no_array_after_warm_up(tmp_path, layers, activation, batch):
    # every thread (the loader's too) is traced: a per-step copy of the batch, a temporary of
    # a layer's activations or of the gradient would show as tens of KiB or more
    from distbp import bench
    from distbp.comm import SerialComm

    trainer = bench.bench_trainer(layers, activation, batch, "float32", SerialComm(), tmp_path, 60)
    # NumPy's own iterator buffer (8192 elements, for broadcasting such as z += b) is no array
    # of ours: shrink it, so what remains is what distbp allocates
    old = np.setbufsize(64)
    try:
        with trainer.open_loader():
            for i in range(10):
                trainer.step(i)
            grown = peak_growth(trainer.step, range(10, 60))
    finally:
        np.setbufsize(old)
    assert 4 * batch * min(layers) >= 8192
    assert grown < 4096, grown  # a few Python objects (the loader's queue, step scalars)


def test_train_vs_bare_times_whole_fit_runs_beside_both_bare_loops():
    script = str(ROOT / "scripts" / "train_vs_bare.py")
    out = run_mpi(2, [script, "--layers", "20,16,4", "--batch-size", "16", "--rows", "400",
                      "--steps", "5,25", "--rounds", "2"], timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("distbp train ") for line in lines[:2])
    ratios = [float(w[:-1]) for w in lines[2].replace(",", "").split() if w.endswith("x")]
    assert lines[2].startswith("median of 2 rounds, 2 rank(s)") and len(ratios) == 2
    assert all(0 < r < 100 for r in ratios)
