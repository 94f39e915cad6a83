"""Allreduce in buckets while backward runs (distbp.overlap): the buckets cover the reduced
buffer exactly, cut from its end where backward reports blocks of a layer's rows written,
training with them gives the results of one allreduce per step (bitwise on two ranks, within
summation order on more), and --overlap auto keeps the mode its trial steps measured faster."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, run_mpi
from helpers.trainruns import clean_env, final, ok, rel_diff, train, write_data

from distbp.comm import SerialComm
from distbp.network import Network
from distbp.overlap import TRIAL_STEPS, TRIAL_WARMUP, Buckets, bucket_bounds, bucket_name

PROG = str(ROOT / "tests" / "mpi_progs" / "overlap_prog.py")
LAYERS = (8, 32, 16, 3)  # layer 1: 288 parameters, layer 2: 528, layer 3: 51


@pytest.mark.parametrize("bucket_bytes,expected", [
    (1, {816: (816, 871), 288: (288, 816), 0: (0, 288)}),   # one bucket per layer
    (8 * 500, {288: (288, 871), 0: (0, 288)}),                # layers 3+2 reach 500 floats
    (8 * 10_000, {0: (0, 871)}),                               # everything in one bucket
])
def test_buckets_are_cut_at_layer_boundaries_from_the_end_and_cover_the_buffer(bucket_bytes,
                                                                              expected):
    size = 867 + 4  # the gradient, then the step's four scalars (in the first bucket)
    net = Network(LAYERS, dtype="float64")
    assert net.ready_offsets() == [816, 288, 0]  # each layer's ΔW in one block
    bounds = bucket_bounds(net.ready_offsets(), 8, bucket_bytes, size)
    assert {at: (b.start, b.stop) for at, b in bounds.items()} == expected
    covered = sorted((b.start, b.stop) for b in bounds.values())
    assert covered[0][0] == 0 and covered[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_a_large_layers_gradient_is_reported_and_cut_in_blocks_of_rows():
    """Blocks of at most 100 elements: backward reports each as it writes it, the last rows
    first, and buckets may end inside a layer."""
    net = Network(LAYERS, dtype="float64")
    net.use_row_blocks(100)
    # W_3 (3x16) one block; W_2 (16x32, from 288) rows 13, 10, 8, 5, 2, 0; W_1 (32x8) 21, 10, 0
    offsets = [816, 704, 608, 544, 448, 352, 288, 168, 80, 0]
    assert net.ready_offsets() == offsets
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 8)), rng.integers(0, 3, 5)
    grad, reported = np.full(net.params.size, np.nan), []

    def ready(at: int) -> None:  # everything from `at` on is written, nothing below yet
        assert not np.isnan(grad[at:]).any() and (at == 0 or np.isnan(grad[at - 1]))
        reported.append(at)

    net.forward_loss(x, y, grad)
    for j in range(net.depth, 0, -1):
        net.backward_layer(j, grad, ready)
    assert reported == offsets
    np.testing.assert_allclose(grad, Network(LAYERS, dtype="float64").loss_and_grad(x, y)[1] * 5,
                               rtol=1e-12)  # the same gradient as computed whole
    bounds = bucket_bounds(offsets, 8, 8 * 500, 871)
    assert {at: (b.start, b.stop) for at, b in bounds.items()} == {352: (352, 871), 0: (0, 352)}
    starts = net.layer_starts
    assert starts == [0, 288, 816]
    assert bucket_name(bounds[352], starts, 867) == "allreduce of layers 2-3 (part)"
    assert bucket_name(bounds[0], starts, 867) == "allreduce of layers 1-2"
    assert bucket_name(slice(816, 871), starts, 867) == "allreduce of layer 3"


@pytest.mark.parametrize("ranks", [2, 3])
def test_training_with_buckets_equals_one_allreduce_per_step(tmp_path, ranks):
    data = write_data(tmp_path / "d.h5", 70)
    proc = run_mpi(ranks, [PROG, str(data), str(tmp_path)], timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    whole, buckets = np.load(tmp_path / "whole.npy"), np.load(tmp_path / "buckets.npy")
    if ranks == 2:  # a + b whatever the message: bitwise
        np.testing.assert_array_equal(whole, buckets)
    assert rel_diff(whole, buckets) <= 1e-10


def test_the_overlap_options_of_distbp_train_keep_two_rank_runs_bitwise(tmp_path):
    # --overlap on with buckets smaller than a layer: every layer's allreduce starts during
    # backward; the result is the one-allreduce run's, bit for bit, on 2 ranks
    data = write_data(tmp_path / "d.h5", 66)
    opts = ("--dtype", "float32", "--batch-size", "16", "--steps", "10", "--momentum", "0.9")
    ok(train(2, data, tmp_path / "off", *opts, "--overlap", "off"))
    ok(train(2, data, tmp_path / "on", *opts, "--overlap", "on", "--bucket-mb", "0.0001"))
    a, b = final(tmp_path / "off", 10), final(tmp_path / "on", 10)
    assert a.params.tobytes() == b.params.tobytes()
    assert (a.config["overlap"], b.config["overlap"]) == ("off", "on")


@pytest.mark.parametrize("faster", [True, False])
def test_overlap_auto_keeps_the_mode_whose_trial_steps_were_faster(faster):
    """The trial: TRIAL_WARMUP steps, then TRIAL_STEPS alternating with and without buckets;
    the mode of the smaller median stays, and is said once."""
    told = []
    net = Network(LAYERS, dtype="float64")
    buckets = Buckets(np.zeros(871), net, 1, SerialComm(), trial=True, log=told.append)
    seen = []
    for _ in range(TRIAL_WARMUP + TRIAL_STEPS):
        buckets.begin_step()
        seen.append(buckets.overlap)
        buckets.end_step(0.010 if buckets.overlap == faster else 0.012)  # 17 % apart
    assert seen == [True] * TRIAL_WARMUP + [True, False] * (TRIAL_STEPS // 2)
    assert buckets.trial == [] and buckets.overlap == faster
    assert told == [f"overlap auto: {'on' if faster else 'off'} (measured "
                    f"{10 if faster else 12:.2f} ms a step with buckets during backward, "
                    f"{12 if faster else 10:.2f} ms with one allreduce after it)"]
    buckets.begin_step()
    assert buckets.overlap == faster  # from now on


def test_overlap_auto_keeps_one_allreduce_on_a_near_tie():
    net = Network(LAYERS, dtype="float64")
    buckets = Buckets(np.zeros(871), net, 1, SerialComm(), trial=True)
    for _ in range(TRIAL_WARMUP + TRIAL_STEPS):
        buckets.begin_step()
        buckets.end_step(0.0100 if buckets.overlap else 0.0102)  # overlap 2 % faster: a tie
    assert buckets.overlap is False
