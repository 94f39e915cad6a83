"""The engine: exact gradients, views sharing memory, seeded init, stability, argument errors."""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np
import pytest

from distbp import Network
from distbp.gradcheck import gradcheck
from distbp.network import n_params

HIDDEN = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]
OUT_LOSS = [("softmax", "cross_entropy"), ("sigmoid", "cross_entropy"), ("softmax", "mse"),
            ("sigmoid", "mse"), ("identity", "mse")]


@pytest.mark.parametrize("activation,out_loss", list(itertools.product(HIDDEN, OUT_LOSS)))
def test_backprop_matches_finite_differences_for_every_combination(strict_numpy, activation,
                                                                    out_loss):
    output, loss = out_loss
    for layer in gradcheck([5, 4, 3, 3], activation, output, loss, batch=6, seed=3):
        assert layer.rel_error <= 1e-7, (layer.name, layer.rel_error)


def test_binary_sigmoid_output_with_integer_labels_matches_finite_differences(strict_numpy):
    net = Network([3, 4, 1], activation="tanh", output="sigmoid", loss="cross_entropy",
                  dtype="float64", seed=2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 3)), rng.integers(0, 2, 9)
    _, grad = net.loss_and_grad(x, y)
    eps, fd = 1e-6, np.empty_like(grad)
    for i in range(grad.size):
        old = net.params[i]
        net.params[i] = old + eps
        lp, _ = net.loss_and_grad(x, y)
        net.params[i] = old - eps
        lm, _ = net.loss_and_grad(x, y)
        net.params[i] = old
        fd[i] = (lp - lm) / (2 * eps)
    assert np.linalg.norm(grad - fd) / np.linalg.norm(grad + fd) < 1e-7


def test_softmax_cross_entropy_loss_equals_formula_written_out(strict_numpy):
    net = Network([4, 3], activation="sigmoid", output="softmax", dtype="float64", seed=5)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    z = x @ net.weights[0].T + net.biases[0]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(6), y]))
    loss, grad = net.loss_and_grad(x, y)
    assert loss == pytest.approx(expected, rel=1e-13)
    onehot = np.eye(3)[y]
    np.testing.assert_allclose(grad[:12].reshape(3, 4), (p - onehot).T @ x / 6, rtol=1e-12)
    np.testing.assert_allclose(grad[12:], (p - onehot).mean(axis=0), rtol=1e-12, atol=1e-15)


def test_mse_is_nielsens_quadratic_cost(strict_numpy):
    net = Network([3, 2], output="identity", loss="mse", dtype="float64", seed=0)
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    a = x @ net.weights[0].T + net.biases[0]
    loss, _ = net.loss_and_grad(x, t)
    assert loss == pytest.approx(np.sum((a - t) ** 2) / (2 * 5), rel=1e-13)


@pytest.mark.parametrize("dtype", ["<i8", ">i4", "i1", "u1", "<u8", ">u2", "bool"])
@pytest.mark.parametrize("rows", [1, 8])
def test_labels_and_one_hot_targets_give_the_same_loss_and_gradient(strict_numpy, dtype, rows):
    # integer labels take their own path (no one-hot T): any integer dtype, either byte order,
    # a strided y, one row
    k = 2 if dtype == "bool" else 3
    net = Network([4, 5, k], activation="relu", dtype="float64", seed=1)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((rows, 4)), rng.integers(0, k, 2 * rows).astype(dtype)[::2]
    l1, g1 = net.loss_and_grad(x, y)
    l2, g2 = net.loss_and_grad(x, np.eye(k)[y.astype(np.int64)])
    assert l1 == pytest.approx(l2, rel=1e-14)
    np.testing.assert_allclose(g1, g2, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize(("labels", "k"), [([0, -1], 3), ([0, 3], 3), ([0, -1], 300),
                                           ([0, 127], 100)])
def test_a_label_out_of_range_is_refused_in_any_integer_dtype(labels, k):
    net = Network([2, k])
    x = np.zeros((2, 2), np.float32)
    for dtype in ("i1", ">i2", "<i8"):
        with pytest.raises(ValueError, match=f"labels must be in 0..{k - 1}, got"):
            net.loss_and_grad(x, np.array(labels, dtype))


def test_weight_and_bias_views_share_memory_with_params():
    net = Network([6, 4, 3])
    assert net.params.ndim == 1 and net.params.size == n_params([6, 4, 3]) == 6 * 4 + 4 + 4 * 3 + 3
    assert [w.shape for w in net.weights] == [(4, 6), (3, 4)]
    for view in net.weights + net.biases:
        assert np.shares_memory(view, net.params)
    net.params[:] = np.arange(net.params.size)
    assert net.weights[0][0, 1] == 1 and net.biases[0][0] == 24 and net.weights[1][0, 0] == 28
    net.weights[1][2, 3] = -7.0
    assert net.params[28 + 2 * 4 + 3] == -7.0


def test_same_seed_gives_identical_parameters_and_float32_equals_cast_float64():
    a = Network([10, 8, 3], seed=42)
    b = Network([10, 8, 3], seed=42)
    c = Network([10, 8, 3], seed=43)
    d = Network([10, 8, 3], seed=42, dtype="float64")
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    np.testing.assert_array_equal(a.params, d.params.astype(np.float32))
    assert a.params.dtype == np.float32 and d.params.dtype == np.float64


# SHA-256 of Network([4, 3, 2], activation="sigmoid", seed=0, dtype="float64").params as
# little-endian float64, computed once (numpy 2.4). It is the bit pattern of numpy's
# default_rng(0) (PCG64) stream pushed through the Glorot formula: a change of the init formulas,
# of the draw order, or of numpy's stream changes it, and with it every seeded run on every
# machine.
PARAMS_SHA256_432_SEED0 = "9391c4a6c0d7fa6b701399976d414d1d35503353e8dc1bfbaaf145dae83c4587"


def test_same_seed_gives_the_same_bits_on_every_machine():
    net = Network([4, 3, 2], activation="sigmoid", seed=0, dtype="float64")
    assert hashlib.sha256(net.params.astype("<f8").tobytes()).hexdigest() == \
        PARAMS_SHA256_432_SEED0
    # The same bits written out: Glorot uniform ±√(6/(n_in+n_out)) per W in layer order, b = 0.
    rng = np.random.default_rng(0)
    w1 = rng.uniform(-np.sqrt(6 / 7), np.sqrt(6 / 7), (3, 4))
    w2 = rng.uniform(-np.sqrt(6 / 5), np.sqrt(6 / 5), (2, 3))
    expected = np.concatenate([w1.ravel(), np.zeros(3), w2.ravel(), np.zeros(2)])
    assert net.params.tobytes() == expected.tobytes()


@pytest.mark.parametrize("spelling,expected", [
    ("float64", np.float64), ("f8", np.float64), ("double", np.float64), (np.float64, np.float64),
    (np.dtype("float64"), np.float64), ("float32", np.float32), ("f4", np.float32),
    ("single", np.float32), (np.float32, np.float32),
])
def test_every_numpy_spelling_of_float32_and_float64_is_accepted(spelling, expected):
    net = Network([3, 2], seed=4, dtype=spelling)
    assert net.dtype == expected and net.params.dtype == expected
    assert net.loss_and_grad(np.ones((2, 3)), np.array([0, 1]))[1].dtype == expected
    np.testing.assert_array_equal(net.params, Network([3, 2], seed=4, dtype="float64").params
                                  .astype(expected))


@pytest.mark.parametrize("dtype,shown", [
    ("float16", "'float16'"), (np.float16, "numpy.float16"), ("int32", "'int32'"),
    ("complex128", "'complex128'"), ("floaty", "'floaty'"), (None, "None"), (3, "3"),
])
def test_other_dtypes_are_refused_naming_the_value(dtype, shown):
    with pytest.raises(ValueError, match=f"unsupported dtype .*{re.escape(shown)}"):
        Network([3, 2], dtype=dtype)


@pytest.mark.parametrize("layers,shown", [
    ([3, 2.5, 2], "2.5"), ([3, 2.0, 2], "2.0"), ([3.7, 2], "3.7"), ([3, True, 2], "True"),
    (["3", 2], "'3'"), ([3, 4, np.float64(2.0)], "2.0"),
])
def test_layer_widths_that_are_not_integers_are_refused_not_truncated(layers, shown):
    phrase = f"layer widths must be integers, got .*{re.escape(shown)}"
    with pytest.raises(ValueError, match=phrase):
        Network(layers)


def test_numpy_integer_widths_are_accepted_as_python_ints():
    net = Network(np.array([3, 4, 2], dtype=np.int64))
    assert net.layers == (3, 4, 2) and all(type(n) is int for n in net.layers)
    assert Network([np.int32(3), np.uint8(2)]).layers == (3, 2)


def test_mean_loss_over_no_rows_is_refused_but_the_sum_is_zero():
    net = Network([3, 4, 2], dtype="float64")
    with pytest.raises(ValueError, match="x has no rows"):
        net.loss_and_grad(np.zeros((0, 3)), np.zeros(0, dtype=int))
    grad = np.ones_like(net.params)
    assert net.loss_grad_sum(np.zeros((0, 3)), np.zeros(0, dtype=int), grad) == 0.0
    assert not grad.any()


@pytest.mark.parametrize("layers,output", [([3, 4, 1], "sigmoid"), ([3, 4, 3], "softmax")])
def test_boolean_labels_are_the_labels_0_and_1(strict_numpy, layers, output):
    net = Network(layers, activation="tanh", output=output, dtype="float64", seed=6)
    x = np.random.default_rng(5).standard_normal((5, 3))
    yb = np.array([True, False, True, True, False])
    loss_b, grad_b = net.loss_and_grad(x, yb)
    loss_i, grad_i = net.loss_and_grad(x, yb.astype(np.int64))
    assert loss_b == loss_i and np.array_equal(grad_b, grad_i)
    assert net.loss_sum(x, yb) == net.loss_sum(x, yb.astype(np.int64))


@pytest.mark.parametrize("activation", HIDDEN)
def test_initialisation_scale_follows_glorot_or_he(activation):
    net = Network([400, 300, 10], activation=activation, seed=0, dtype="float64")
    var = net.weights[0].var()
    expected = 2 / 400 if activation in ("relu", "leaky_relu") else 2 / 700
    assert var == pytest.approx(expected, rel=0.05)
    assert not net.biases[0].any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation,out_loss", list(itertools.product(HIDDEN, OUT_LOSS)))
def test_extreme_inputs_give_finite_loss_and_gradient(strict_numpy, dtype, activation, out_loss):
    output, loss = out_loss
    net = Network([3, 4, 2], activation=activation, output=output, loss=loss, dtype=dtype)
    x = np.array([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4], [0.0, 0.0, 0.0]])
    y = np.array([0, 1, 1]) if output != "identity" else np.ones((3, 2))
    value, grad = net.loss_and_grad(x, y)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_predict_returns_probabilities_for_softmax():
    net = Network([4, 6, 3], activation="tanh")
    p = net.predict(np.random.default_rng(0).standard_normal((5, 4)))
    assert p.shape == (5, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


def test_repeated_steps_allocate_no_new_buffers():
    net = Network([6, 5, 3], activation="relu")
    rng = np.random.default_rng(0)
    x, y, grad = rng.standard_normal((4, 6)), rng.integers(0, 3, 4), np.empty_like(net.params)
    net.loss_grad_sum(x, y, grad)
    ws = net._workspaces[4]
    ids = [id(b) for b in ws.a + ws.z[1:] + ws.delta[1:]]
    net.loss_grad_sum(x, y, grad)
    assert net._workspaces[4] is ws and ids == [id(b) for b in ws.a + ws.z[1:] + ws.delta[1:]]


def test_gradient_is_a_sum_over_rows_and_empty_shards_give_zero():
    net = Network([3, 4, 2], dtype="float64")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    g_all, g_a, g_b = (np.empty_like(net.params) for _ in range(3))
    s_all = net.loss_grad_sum(x, y, g_all)
    s_a, s_b = net.loss_grad_sum(x[:2], y[:2], g_a), net.loss_grad_sum(x[2:], y[2:], g_b)
    assert s_all == pytest.approx(s_a + s_b, rel=1e-14)
    np.testing.assert_allclose(g_all, g_a + g_b, rtol=1e-13, atol=1e-15)
    g_empty = np.full_like(net.params, 5.0)
    assert net.loss_grad_sum(x[:0], y[:0], g_empty) == 0.0 and not g_empty.any()


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(layers=[3, 4], activation="swish"), "unknown activation 'swish'"),
    (dict(layers=[3, 0, 2]), "at least one unit"),
    (dict(layers=[3]), "at least two"),
    (dict(layers=[3, 2], dtype="float16"), "unsupported dtype 'float16'"),
    (dict(layers=[3, 2], output="relu"), "unknown output 'relu'"),
    (dict(layers=[3, 2], loss="hinge"), "unknown loss 'hinge'"),
    (dict(layers=[3, 2], output="identity", loss="cross_entropy"), "needs output"),
])
def test_bad_constructor_arguments_raise_value_error_naming_the_problem(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        Network(**kwargs)


@pytest.mark.parametrize("x_shape,y,phrase", [
    ((4, 3), np.array([0, 1, 2, 5]), "label out of range"),
    ((4, 3), np.array([0, 1, -1, 0]), "label out of range"),
    ((4, 3), np.array([0, 1, 1]), "y must have shape"),
    ((4, 5), np.array([0, 1, 1, 0]), "x must have shape"),
    ((4, 3), np.array([0.5, 1, 1, 0]), "integer class labels"),
])
def test_bad_data_raises_value_error_naming_the_problem(x_shape, y, phrase):
    net = Network([3, 4, 3])
    with pytest.raises(ValueError, match=phrase):
        net.loss_and_grad(np.zeros(x_shape), y)
