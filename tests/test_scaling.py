"""The step-time model of `distbp bench --model`: its allreduce costs, its fits, its predictions,
and the command that measures and prints them."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_mpi, run_py

from distbp.scaling import StepModel, allreduce_terms, fit_alpha_beta, fit_line

# 76 K parameters: the sweep's largest allreduces (2 x 0.3 MB) take long enough for β to show
ARGS = ["-m", "distbp", "bench", "--layers", "256,256,40", "--batch-size", "32", "--steps", "5",
        "--warmup", "1", "--gemm-size", "64", "--model", "--json"]


@pytest.mark.parametrize("p,algorithm,expected", [
    (1, "ring", (0.0, 0.0)),
    (4, "ring", (6.0, 1.5)),                       # 2(p−1), 2(p−1)/p
    (8, "recursive-doubling", (3.0, 3.0)),         # log₂p, log₂p
    (8, "rabenseifner", (6.0, 1.75)),              # 2 log₂p, 2(p−1)/p
])
def test_allreduce_costs_are_the_algorithms(p, algorithm, expected):
    assert allreduce_terms(p, algorithm) == pytest.approx(expected)


@pytest.mark.parametrize("algorithm", ["ring", "recursive-doubling", "rabenseifner"])
@pytest.mark.parametrize("p", [2, 3, 8])
def test_alpha_and_beta_are_recovered_from_exact_allreduce_times(algorithm, p):
    alpha, beta = 3e-6, 2e-10
    hops, factor = allreduce_terms(p, algorithm)
    sizes = [8, 1024, 65536, 4 << 20]
    times = [hops * alpha + factor * n * beta for n in sizes]
    assert fit_alpha_beta(p, sizes, times, algorithm) == pytest.approx((alpha, beta), rel=1e-6)


def test_a_line_fit_never_gives_a_negative_time():
    assert fit_line([1, 2, 3], [3.0, 2.0, 1.0]) == (pytest.approx(4.0), 0.0)
    assert fit_line([1, 2, 4], [2.0, 3.0, 5.0]) == (pytest.approx(1.0), pytest.approx(1.0))


def test_predictions_follow_the_model_and_efficiency_is_relative_to_one_rank():
    m = StepModel(alpha=2e-6, beta=1e-9, fb_fixed=1e-4, fb_per_row=1e-5, overhead=5e-5,
                  nbytes=4_000_000, algorithm="ring")
    strong = m.strong(1024)
    assert [r["ranks"] for r in strong] == [2 ** k for k in range(11)]  # down to 1 row per rank
    one = strong[0]
    assert one["efficiency"] == 1.0 and one["allreduce_s"] == 0.0
    assert one["step_s"] == pytest.approx(1e-4 + 1024 * 1e-5 + 5e-5)
    four = strong[2]
    expected = 1e-4 + 256 * 1e-5 + 5e-5 + 6 * 2e-6 + 1.5 * 4e6 * 1e-9
    assert four["step_s"] == pytest.approx(expected)
    assert four["efficiency"] == pytest.approx(one["step_s"] / (4 * expected))
    assert four["samples_per_s"] == pytest.approx(1024 / expected)
    weak = m.weak(64)
    assert all(r["rows_per_rank"] == 64 and r["global_batch"] == 64 * r["ranks"] for r in weak)
    assert [r["efficiency"] for r in weak] == sorted((r["efficiency"] for r in weak),
                                                     reverse=True)


def test_bench_model_under_mpi_measures_alpha_beta_and_predicts_every_rank_count():
    out = run_mpi(2, ARGS, timeout=120)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    m = json.loads(line)["model"]
    t = m["terms"]
    assert t["alpha"] >= 0 and t["beta"] > 0 and t["fb_per_row"] > 0
    assert t["nbytes"] == (256 * 256 + 256 + 256 * 40 + 40 + 4) * 4
    assert m["ranks"] == 2 and m["measured_step_s"] > 0 and m["predicted_step_s"] > 0
    assert [r["ranks"] for r in m["weak"]] == [2 ** k for k in range(13)]
    assert [r["ranks"] for r in m["strong"]] == [1, 2, 4, 8, 16, 32]  # 32 rows: one per rank


def test_bench_model_takes_a_named_clusters_alpha_beta_and_rate_and_plots(tmp_path):
    picture = tmp_path / "scaling.png"
    out = run_py([*ARGS, "--alpha", "2e-6", "--beta", "8e-11", "--gflops", "50", "--plot",
                  str(picture)], timeout=120)
    assert out.returncode == 0, out.stderr
    t = json.loads(out.stdout)["model"]["terms"]
    assert (t["alpha"], t["beta"]) == (2e-6, 8e-11)
    flops_per_row = 2 * (2 * (256 * 256 + 256 * 40) + 256 * 40)  # the step's matmuls, one row
    assert math.isclose(t["fb_per_row"], flops_per_row / 50e9)
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_refuses_a_plot_it_could_not_write_before_measuring(tmp_path):
    out = run_py([*ARGS, "--plot", str(tmp_path / "scaling.jpg")], timeout=60)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert "--plot" in out.stderr and ".png" in out.stderr
