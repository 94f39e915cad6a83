"""The bench's yardstick computes what distbp computes: the bare loop's gradient is the Network's,
so the ratio of their step times compares the same work."""

from __future__ import annotations

import numpy as np
import pytest

from distbp.bare_loop import BareLoop
from distbp.comm import SerialComm
from distbp.network import Network


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_the_bare_loops_gradient_is_the_networks(activation):
    layers = [7, 9, 5, 3]
    loop = BareLoop(layers, activation, 11, "float64", SerialComm())
    net = Network(layers, activation=activation, dtype="float64")
    net.params[...] = loop.params
    x, y = loop.a[0].T.copy(), loop.labels.copy()  # a[0] holds the rows transposed
    loss, grad = net.loss_and_grad(x, y)  # mean over the rows
    loop.forward_backward()
    np.testing.assert_allclose(loop.grad / 11, grad, rtol=1e-12, atol=1e-14)


def test_a_bare_step_is_plain_sgd_on_that_gradient():
    loop = BareLoop([4, 6, 2], "relu", 8, "float64", SerialComm(), lr=0.5)
    before = loop.params.copy()
    loop.forward_backward()
    expected = before - 0.5 * loop.grad / 8
    loop.params[...] = before
    loop.step()
    np.testing.assert_allclose(loop.params, expected, rtol=1e-14)


def test_the_reading_loop_takes_each_steps_rows_from_a_shuffled_order_and_computes_on_them():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 7)), rng.integers(0, 3, 40)
    layers = [7, 9, 3]
    loop = BareLoop(layers, "relu", 8, "float64", SerialComm(), data=(x, y))
    net = Network(layers, dtype="float64")
    seen = []
    for _ in range(5):  # 40 rows, 8 a step: one pass over the order
        net.params[...] = loop.params
        loop.read_rows()
        rows = loop.order[loop.cursor - 8:loop.cursor]
        np.testing.assert_array_equal(loop.a[0].T, x[rows])
        np.testing.assert_array_equal(loop.labels, y[rows])
        _, grad = net.loss_and_grad(x[rows], y[rows])
        loop.forward_backward()
        np.testing.assert_allclose(loop.grad / 8, grad, rtol=1e-12, atol=1e-14)
        seen += rows.tolist()
    assert sorted(seen) == list(range(40))  # every row once: a shuffled order, not one batch
    loop.read_rows()  # a new pass from the start of the order
    np.testing.assert_array_equal(loop.a[0].T, x[loop.order[:8]])
    with pytest.raises(ValueError, match="reads 8 rows a step"):
        BareLoop(layers, "relu", 8, "float64", SerialComm(), data=(x[:5], y[:5]))
    with pytest.raises(ValueError, match="has 9 rows of a global batch of 9, not 8"):
        BareLoop(layers, "relu", 8, "float64", SerialComm(), data=(x, y), batch=9)
