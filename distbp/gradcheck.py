"""Compare backpropagation with central finite differences, layer by layer.

    rows = gradcheck([784, 30, 10], "sigmoid", "sigmoid", "mse")   # `distbp gradcheck`

For each parameter θ_i the finite difference is (L(θ + ε e_i) − L(θ − ε e_i)) / 2ε, in float64.
The error of a layer's block (W_j or b_j) is the NORMWISE relative error of the two gradient
vectors, ‖g_bp − g_fd‖ / (‖g_bp‖ + ‖g_fd‖) (0 when both are zero): scale-free, and not dominated
by entries that are almost zero. Pass/fail is decided on it. The worst ELEMENTWISE relative error,
max_i |a_i − b_i| / max(|a_i|, |b_i|, floor), is reported too, for information only: for entries
near zero it measures finite-difference noise, not backprop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distbp.network import Network, param_views

__all__ = ["LayerError", "gradcheck", "relative_error",
           "elementwise_relative_error", "ELEMENT_FLOOR"]

ELEMENT_FLOOR = 1e-8  # smaller entries count as this magnitude in the elementwise error


@dataclass(frozen=True)
class LayerError:
    name: str  # "W1", "b1", ...
    size: int  # parameters checked
    rel_error: float  # normwise: ‖a − b‖ / (‖a‖ + ‖b‖); decides pass/fail
    max_abs_error: float  # max_i |a_i − b_i|
    max_elem_rel_error: float  # max_i |a_i − b_i| / max(|a_i|, |b_i|, ELEMENT_FLOOR); information


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Normwise relative error ‖a − b‖ / (‖a‖ + ‖b‖) (2-norms, any equal shapes), in [0, 1];
    0 when both are zero."""
    denom = float(np.linalg.norm(a) + np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / denom if denom > 1e-300 else 0.0


def elementwise_relative_error(a: np.ndarray, b: np.ndarray,
                               floor: float = ELEMENT_FLOOR) -> float:
    """Worst elementwise relative error max_i |a_i − b_i| / max(|a_i|, |b_i|, floor); 0 if empty.

    The floor keeps entries that are (almost) zero in both from dividing noise by noise.
    """
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)
    return float(np.max(np.abs(a - b) / scale))


def gradcheck(layers: Sequence[int], activation: str, output: str, loss: str, *,
              batch: int = 8, seed: int = 0, eps: float = 1e-6) -> list[LayerError]:
    """Backprop vs central differences on random data; one LayerError per W_j and b_j.

    Biases are drawn small and nonzero so that no relu unit sits exactly on its kink (z = 0),
    where the derivative is one-sided and a central difference would disagree by design.
    """
    net = Network(layers, activation=activation, output=output, loss=loss, seed=seed,
                  dtype="float64")
    rng = np.random.default_rng(seed + 1)
    for b in net.biases:
        b[...] = rng.uniform(-0.1, 0.1, b.shape)
    x = rng.standard_normal((batch, net.n_inputs))
    y = _random_targets(rng, batch, net.n_outputs, output)
    _, grad = net.loss_and_grad(x, y)
    numeric = np.empty_like(grad)
    theta = net.params
    for i in range(theta.size):
        old = theta[i]
        theta[i] = old + eps
        plus, _ = net.loss_sum(x, y)
        theta[i] = old - eps
        minus, _ = net.loss_sum(x, y)
        theta[i] = old
        numeric[i] = (plus - minus) / (2 * eps * batch)
    return _per_layer(grad, numeric, net.layers)


def _random_targets(rng: np.random.Generator, batch: int, k: int, output: str) -> np.ndarray:
    if output == "softmax" and k > 1:
        return rng.integers(0, k, batch)  # integer labels, the normal classification case
    if output == "sigmoid":
        return rng.integers(0, 2, (batch, k)).astype(np.float64)
    return rng.standard_normal((batch, k))


def _per_layer(grad: np.ndarray, numeric: np.ndarray, layers: tuple[int, ...]) -> list:
    out = []
    for j, (gw, gb, nw, nb) in enumerate(zip(*param_views(grad, layers),
                                             *param_views(numeric, layers)), start=1):
        for name, a, b in ((f"W{j}", gw, nw), (f"b{j}", gb, nb)):
            out.append(LayerError(name, a.size, relative_error(a, b),
                                  float(np.max(np.abs(a - b))), elementwise_relative_error(a, b)))
    return out
