"""Activation functions g and their derivatives g′, elementwise and in place.

Each hidden activation is a pair ``(g, g′)``:

    g(z, out)            writes a = g(z) into ``out`` (may be ``z`` itself)
    g′(z, a, out)        writes g′(z) into ``out``, using the cached ``a = g(z)`` where cheaper

Both take preallocated buffers so the training step allocates nothing. Every function is finite
for any finite input: sigmoid is computed as ½(1 + tanh(z/2)), which cannot overflow, instead of
1/(1 + e^(−z)), which overflows for z < −710 (float64) or z < −89 (float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["Activation", "HIDDEN", "OUTPUTS", "LEAKY_SLOPE", "get_hidden", "sigmoid"]

LEAKY_SLOPE = 0.01

Array = np.ndarray


class Activation(NamedTuple):
    g: Callable[[Array, Array], Array]
    gprime: Callable[[Array, Array, Array], Array]


def sigmoid(z: Array, out: Array) -> Array:
    """σ(z) = 1 / (1 + e^(−z)) = ½ (1 + tanh(z/2)), stable for any finite z."""
    np.multiply(z, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


def _sigmoid_prime(z: Array, a: Array, out: Array) -> Array:
    # σ′(z) = σ(z) (1 − σ(z)) = a − a²
    np.multiply(a, a, out=out)
    np.subtract(a, out, out=out)
    return out


def _tanh(z: Array, out: Array) -> Array:
    return np.tanh(z, out=out)


def _tanh_prime(z: Array, a: Array, out: Array) -> Array:
    # tanh′(z) = 1 − tanh²(z) = 1 − a²
    np.multiply(a, a, out=out)
    np.subtract(1.0, out, out=out)
    return out


def _relu(z: Array, out: Array) -> Array:
    return np.maximum(z, 0.0, out=out)


def _relu_prime(z: Array, a: Array, out: Array) -> Array:
    # relu′(z) = 1 where z > 0 else 0 (0 at the kink, by convention)
    return np.greater(z, 0.0, out=out, casting="unsafe")


def _leaky_relu(z: Array, out: Array) -> Array:
    # max(z, s·z) for 0 < s < 1
    np.multiply(z, LEAKY_SLOPE, out=out)
    return np.maximum(z, out, out=out)


def _leaky_relu_prime(z: Array, a: Array, out: Array) -> Array:
    np.greater(z, 0.0, out=out, casting="unsafe")  # 1 or 0
    out *= 1.0 - LEAKY_SLOPE
    out += LEAKY_SLOPE  # 1 or s
    return out


def _identity(z: Array, out: Array) -> Array:
    if out is not z:
        np.copyto(out, z)
    return out


def _identity_prime(z: Array, a: Array, out: Array) -> Array:
    out.fill(1.0)
    return out


HIDDEN: dict[str, Activation] = {
    "sigmoid": Activation(sigmoid, _sigmoid_prime),
    "tanh": Activation(_tanh, _tanh_prime),
    "relu": Activation(_relu, _relu_prime),
    "leaky_relu": Activation(_leaky_relu, _leaky_relu_prime),
    "identity": Activation(_identity, _identity_prime),
}

# Output layers are handled together with the loss in distbp.losses (softmax needs the whole row,
# and softmax/sigmoid + cross-entropy are fused for stability).
OUTPUTS = ("softmax", "sigmoid", "identity")


def get_hidden(name: str) -> Activation:
    """The (g, g′) pair of a hidden activation; ValueError naming the valid ones otherwise."""
    try:
        return HIDDEN[name]
    except KeyError:
        choices = ", ".join(HIDDEN)
        raise ValueError(f"unknown activation {name!r}: choose one of {choices}") from None
