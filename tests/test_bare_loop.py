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
