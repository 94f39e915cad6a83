"""Gradient clipping by global norm (`--clip-grad-norm C`): the function against a hand-written
reference (also where float32 squares overflow or underflow), one clipped training step against
the update written out by hand, clipping on 1 and 2 ranks within 1e-10, an inactive bound
bitwise equal to no clipping, exact resume with clipping.
Shared helpers: tests/helpers/trainruns.py."""

from __future__ import annotations

import math
import tracemalloc

import h5py
import numpy as np
import pytest
from helpers.configs import resolve
from helpers.trainruns import clean_env, final, metrics, ok, rel_diff, train, write_data

from distbp.config_schema import TrainConfig
from distbp.network import Network
from distbp.optim import clip_grad_norm

# 66 rows in global batches of 16: 5 steps per epoch, 20 steps in all
ROWS, OPTS = 66, ("--momentum", "0.9", "--dtype", "float64", "--batch-size", "16", "--steps",
                  "20", "--log-every", "1")
# the unclipped run's gradient norms range over about 0.24 .. 1.8: this bound clips about half
BOUND = "0.6"


def reference_norm(g: np.ndarray) -> float:
    """√(Σ g²) over every element, summed exactly (math.fsum) in double precision, scaled by a
    power of two (exact) so that no double square overflows or underflows."""
    top = max((abs(float(v)) for v in g.ravel()), default=0.0)
    k = -math.frexp(top)[1] if top else 0  # 2^k · max |g| in [0.5, 1)
    total = math.fsum(math.ldexp(float(v), k) ** 2 for v in g.ravel())
    return math.ldexp(math.sqrt(total), -k)


def test_a_gradient_above_the_bound_is_scaled_to_the_bound_as_the_reference_says():
    g = np.random.default_rng(0).normal(size=1001)  # an odd length: pairwise-sum tails
    norm = reference_norm(g)
    c = norm / 3
    expected = [float(v) * (c / norm) for v in g]  # Δw · C/‖Δw‖, element by element
    got = g.copy()
    assert clip_grad_norm(got, c, np.empty_like(got)) == pytest.approx(norm, rel=1e-14)
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    assert reference_norm(got) == pytest.approx(c, rel=1e-14)


def test_a_gradient_within_the_bound_is_left_bitwise_untouched():
    g = np.random.default_rng(1).normal(size=300).astype(np.float32)
    norm = reference_norm(g)
    for c in (norm * (1 + 1e-6), 1e30):
        got = g.copy()
        assert clip_grad_norm(got, c, np.empty_like(got)) == pytest.approx(norm, rel=1e-6)
        np.testing.assert_array_equal(got, g)


def test_float32_squares_that_overflow_still_give_the_true_norm():
    g = np.array([3e20, -4e20, 0.0, 1e19], np.float32)  # g² overflows float32 (max ~3.4e38)
    norm = reference_norm(g)  # ~5e20, fine in float64
    got = g.copy()
    assert clip_grad_norm(got, 1.0, np.empty_like(got)) == pytest.approx(norm, rel=1e-6)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, g.astype(np.float64) / norm, rtol=1e-6)


@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e-30), (np.float32, 1e-20),
                                          (np.float32, 1e-40), (np.float64, 1e-160)])
def test_squares_that_underflow_still_give_the_true_norm_and_clip(dtype, scale, strict_numpy):
    # float32 1e-30: every square (1e-60) is 0; 1e-20: the squares (1e-40) are subnormal, with
    # 4 or 5 digits left, though their sum (~1e-37) is normal; 1e-40: subnormal elements
    g = (np.random.default_rng(3).normal(size=1001) * scale).astype(dtype)
    norm = reference_norm(g)  # the float32 values themselves, squared and summed exactly
    assert 0 < norm < 1e-14
    got = g.copy()
    # abs=0: pytest.approx would otherwise accept anything within 1e-12, 0.0 included
    assert clip_grad_norm(got, norm * 2, np.empty_like(got)) == pytest.approx(norm, 1e-6, 0)
    np.testing.assert_array_equal(got, g)  # within the bound: untouched
    c = norm / 4
    assert clip_grad_norm(got, c, np.empty_like(got)) == pytest.approx(norm, 1e-6, 0)
    assert reference_norm(got) == pytest.approx(c, 1e-5 if scale == 1e-40 else 1e-6, 0)


def test_equal_tiny_elements_whose_subnormal_squares_all_round_down_give_the_true_norm():
    # v² = 700.49 units of float32's smallest subnormal (2^-149): each square rounds to 700
    # units, 7e-4 too small, and 100 000 of them sum to ~7e-38, a normal float32
    v = np.float32(math.sqrt(700.49 * 2.0 ** -149))
    g = np.full(100_000, v)
    norm = reference_norm(g)  # exactly |v|·√n
    assert math.isclose(norm, float(v) * math.sqrt(g.size), rel_tol=1e-15)
    assert clip_grad_norm(g.copy(), 1.0, np.empty_like(g)) == pytest.approx(norm, 1e-6, 0)


def test_an_all_zero_gradient_has_norm_0_and_is_left_alone(strict_numpy):
    got = np.zeros(7, np.float32)
    assert clip_grad_norm(got, 1e-30, np.empty_like(got)) == 0.0
    np.testing.assert_array_equal(got, 0.0)


def test_clipping_allocates_no_array():
    g = np.random.default_rng(2).normal(size=250_000)  # 2 MB
    scratch = np.empty_like(g)
    clip_grad_norm(g, 1.0, scratch)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            g *= 10.0  # above the bound again, so every call scales
            clip_grad_norm(g, 1.0, scratch)
        grew = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert grew < 10_000, grew  # not one 2 MB temporary


def test_one_clipped_step_is_the_hand_written_update(tmp_path):
    # one full-batch SGD step without momentum: w1 = w0 − α·Δw·C/‖Δw‖, with Δw the mean
    # gradient over all 60 rows, computed here by the network directly
    data = write_data(tmp_path / "d.h5", 60)
    with h5py.File(data, "r") as f:
        x, y = f["x"][()].astype(np.float64), f["y"][()]
    net = Network([8, 16, 3], activation="tanh", seed=3, dtype="float64")  # helpers' TINY
    w0 = net.params.copy()
    _, grad = net.loss_and_grad(x, y)
    norm = reference_norm(grad)
    c = norm / 2
    ok(train(0, data, tmp_path / "run", "--dtype", "float64", "--batch-size", "60",
             "--momentum", "0", "--steps", "1", "--clip-grad-norm", repr(c)))
    expected = w0 - 0.1 * (grad * (c / norm))
    assert rel_diff(expected, final(tmp_path / "run", 1).params) <= 1e-12
    (record,) = [r for r in metrics(tmp_path / "run") if r["kind"] == "train"]
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-12)  # before clipping


def grad_norms(run) -> list[float]:
    return [r["grad_norm"] for r in metrics(run) if r["kind"] == "train"]


def test_a_clipped_run_is_the_same_on_1_and_2_ranks_within_1e_10(tmp_path):
    data = write_data(tmp_path / "d.h5", ROWS)
    for ranks in (1, 2):
        ok(train(ranks, data, tmp_path / f"n{ranks}", *OPTS, "--clip-grad-norm", BOUND))
    ok(train(1, data, tmp_path / "unclipped", *OPTS))
    one, two = (final(tmp_path / f"n{r}", 20).params for r in (1, 2))
    assert rel_diff(one, two) <= 1e-10
    norms = grad_norms(tmp_path / "n1")
    assert len(norms) == 20
    assert sum(n > float(BOUND) for n in norms) >= 5  # clipping acted on several steps
    assert sum(n < float(BOUND) for n in norms) >= 5  # and let others through
    for a, b in zip(norms, grad_norms(tmp_path / "n2")):
        assert math.isclose(a, b, rel_tol=1e-10)
    assert rel_diff(one, final(tmp_path / "unclipped", 20).params) > 1e-3  # it changed the run


def test_a_bound_never_reached_is_bitwise_equal_to_no_clipping(tmp_path):
    data = write_data(tmp_path / "d.h5", ROWS)
    ok(train(2, data, tmp_path / "off", *OPTS, "--momentum", "0.9"))
    ok(train(2, data, tmp_path / "huge", *OPTS, "--momentum", "0.9", "--clip-grad-norm", "1e30"))
    off, huge = final(tmp_path / "off", 20), final(tmp_path / "huge", 20)
    np.testing.assert_array_equal(off.params, huge.params)
    np.testing.assert_array_equal(off.optimizer_state["velocity"],
                                  huge.optimizer_state["velocity"])
    assert all(0 < n < 1e30 for n in grad_norms(tmp_path / "huge"))
    assert "grad_norm" not in metrics(tmp_path / "off")[0]  # only recorded when clipping


def test_resume_with_clipping_is_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    # checkpoints every 3 steps, records every 4: rank 0 dies right after step 8, the resume
    # starts from step 6, two steps into the record of steps 5..8
    data = write_data(tmp_path / "d.h5", ROWS)
    opts = (*OPTS[:-2], "--momentum", "0.9", "--log-every", "4", "--record-every", "4",
            "--checkpoint-every", "3",
            "--clip-grad-norm", BOUND)
    ok(train(2, data, tmp_path / "whole", *opts))
    died = train(2, data, tmp_path / "parts", *opts, env=clean_env(DISTBP_FAULT="raise:0:8"))
    assert died.returncode == 1, died.stdout + died.stderr
    proc = ok(train(2, data, tmp_path / "parts", *opts, "--resume", "auto"))
    assert "ckpt-00000006.h5 at step 6" in proc.stdout
    whole, parts = final(tmp_path / "whole", 20), final(tmp_path / "parts", 20)
    np.testing.assert_array_equal(whole.params, parts.params)
    np.testing.assert_array_equal(whole.optimizer_state["velocity"],
                                  parts.optimizer_state["velocity"])
    exact = ("step", "loss", "accuracy", "grad_norm")

    def records(run):
        return [tuple(r[k] for k in exact) for r in metrics(run) if r["kind"] == "train"]

    assert [r[0] for r in records(tmp_path / "whole")] == [4, 8, 12, 16, 20]
    assert records(tmp_path / "parts") == records(tmp_path / "whole")  # floats, exactly


def test_the_bound_is_off_by_default_and_set_alike_from_a_file_or_the_command_line(tmp_path):
    assert TrainConfig().clip_grad_norm is None
    path = tmp_path / "run.toml"
    path.write_text('data = "d.h5"\nclip_grad_norm = 2\n')
    from_cli = resolve("--data", "d.h5", "--clip-grad-norm", "2")
    assert resolve("--config", str(path)) == from_cli and from_cli.clip_grad_norm == 2.0
    assert isinstance(from_cli.clip_grad_norm, float)
    assert resolve("--config", str(path), "--clip-grad-norm", "none").clip_grad_norm is None


def test_clipping_may_not_change_on_resume(tmp_path):
    data = write_data(tmp_path / "d.h5", ROWS)
    ok(train(0, data, tmp_path / "run", *OPTS[:-4], "--steps", "5"))
    proc = train(0, data, tmp_path / "run", *OPTS[:-4], "--steps", "10", "--resume", "auto",
                 "--clip-grad-norm", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "clip_grad_norm None -> 1.0" in line


def test_a_checkpoint_whose_configuration_lacks_a_setting_is_refused_on_resume(tmp_path):
    # without the key the run's clipping is unknown: resuming must not guess it
    from distbp import checkpoint
    data = write_data(tmp_path / "d.h5", ROWS)
    ok(train(0, data, tmp_path / "run", *OPTS[:-4], "--steps", "5"))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    c = checkpoint.load(checkpoint.list_checkpoints(ckpt_dir)[-1])
    config = {k: v for k, v in c.config.items() if k != "clip_grad_norm"}
    checkpoint.save(ckpt_dir, step=c.step, epoch=c.epoch, step_in_epoch=c.step_in_epoch,
                    seed=c.seed, layers=c.layers, activation=c.activation, output=c.output,
                    loss=c.loss, params=c.params, optimizer_name=c.optimizer_name,
                    optimizer_state=c.optimizer_state, config=config, metrics=c.metrics,
                    world_size=c.world_size, preprocess=c.preprocess, interval=c.interval)
    assert "clip_grad_norm" not in checkpoint.load(c.path).config
    for clip in ((), ("--clip-grad-norm", "1")):
        proc = train(0, data, tmp_path / "run", *OPTS[:-4], "--steps", "10", "--resume", "auto",
                     *clip)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "configuration lacks clip_grad_norm" in line
