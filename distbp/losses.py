"""The output layer and the loss, together: a_L = g_out(z_L), L, and δ_L = ∂L/∂z_L.

Everything here is a SUM over the rows of the batch; the caller divides once by the (global)
number of rows. With targets T (B, K) (one-hot rows for integer labels, except where the
integer-label form below is used):

    cross_entropy, softmax:  L = Σ_rows [ lse(z)·ΣT − Σ_k T z ]      δ_L = a·ΣT − T   (= a − T)
      with integer labels y:   L = Σ_rows [ lse(z) − z_y ]             δ_L = a − onehot(y)
    cross_entropy, sigmoid:  L = Σ [ softplus(z) − T z ]              δ_L = a − T
    mse, any output:         L = ½ Σ_rows ‖a − T‖²                    Δa_L = a − T,
                             δ_L = Δa_L ⊙ g′(z_L)    (softmax: a ⊙ (Δa_L − Σ_k a Δa_L))

lse(z) = m + log Σ_k e^(z−m) with m = max_k z (log-sum-exp) and softplus(z) = max(z, 0) +
log(1 + e^(−|z|)): both finite for any finite z. `mse` is Nielsen's quadratic cost; divided by B
it is L = (1/2B) Σ_rows ‖a − y‖².
"""

from __future__ import annotations

import numpy as np

from distbp.activations import OUTPUTS, sigmoid

__all__ = ["LOSSES", "OUTPUTS", "Scratch", "check_output_loss", "loss_delta", "output_forward",
           "softmax_cross_entropy_labels"]

LOSSES = ("cross_entropy", "mse")

Array = np.ndarray


class Scratch:
    """Buffers the output/loss computation needs for one batch size B and width K."""

    def __init__(self, batch: int, width: int, dtype: np.dtype):
        self.bk = np.empty((batch, width), dtype)  # (B, K)
        self.row = np.empty((batch, 1), dtype)  # (B, 1); softmax: m = max_k z
        self.row2 = np.empty((batch, 1), dtype)  # (B, 1); softmax: Σ_k e^(z−m)
        self.row_1d, self.row2_1d = self.row[:, 0], self.row2[:, 0]  # the same two, as (B,)
        self.picked = np.empty(batch, dtype)  # one element of each row


def check_output_loss(output: str, loss: str) -> None:
    """ValueError naming the problem for an unknown or unsupported (output, loss) pair."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}: choose one of {', '.join(OUTPUTS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if loss == "cross_entropy" and output == "identity":
        raise ValueError("loss 'cross_entropy' needs output 'softmax' or 'sigmoid', not 'identity'")


def output_forward(output: str, z: Array, a: Array, s: Scratch) -> Array:
    """a_L = g_out(z_L), row-wise for softmax. z, a: (B, K)."""
    if output == "softmax":  # ufunc reductions called directly: np.max's wrapper costs a µs
        np.maximum.reduce(z, axis=1, out=s.row_1d)  # m
        np.subtract(z, s.row, out=a)
        np.exp(a, out=a)
        np.add.reduce(a, axis=1, out=s.row2_1d)  # Σ_k e^(z−m)
        a /= s.row2
    elif output == "sigmoid":
        sigmoid(z, a)
    else:
        np.copyto(a, z)
    return a


def loss_delta(output: str, loss: str, z: Array, a: Array, t: Array, delta: Array,
               s: Scratch) -> float:
    """Return L summed over the rows and write δ_L = ∂L/∂z_L (B, K) into `delta`.

    Must follow `output_forward` on the same Scratch (softmax reuses m and Σe^(z−m) from it).
    """
    if loss == "cross_entropy" and output == "softmax":
        return _softmax_cross_entropy(z, a, t, delta, s)
    if loss == "cross_entropy":  # sigmoid output: independent binary cross-entropies
        return _sigmoid_cross_entropy(z, a, t, delta, s)
    return _mse(output, a, t, delta, s)


def _softmax_cross_entropy(z: Array, a: Array, t: Array, delta: Array, s: Scratch) -> float:
    """L = Σ_rows [lse(z)·ΣT − Σ_k T z], δ_L = a·ΣT − T; lse from output_forward's Scratch."""
    # lse = m + log Σ e^(z−m), kept from output_forward in row (m) and row2 (the sum)
    np.log(s.row2, out=s.row2)
    s.row2 += s.row  # lse: (B, 1)
    np.sum(t, axis=1, keepdims=True, out=s.row)  # ΣT per row: (B, 1), 1 for one-hot
    np.multiply(t, z, out=s.bk)
    total = float(np.dot(s.row2[:, 0], s.row[:, 0])) - float(s.bk.sum())
    np.multiply(a, s.row, out=delta)
    delta -= t  # δ_L = a·ΣT − T
    return total


def softmax_cross_entropy_labels(zT: Array, a: Array, positions: Array, deltaT: Array,
                                 s: Scratch) -> float:
    """Integer labels y, softmax output: L = Σ_rows [lse(z) − z_y], δ_L = a − onehot(y), the
    one-hot targets never formed (the same δ_L and, up to rounding, the same L as loss_delta).
    zT and deltaT are z_L and δ_L held transposed, (K, B) C-contiguous (the network's layout);
    a is (B, K); positions[r] = y_r·B + r is where element (r, y_r) lies in zT's and deltaT's
    memory, in range (the caller checked the labels). Must follow `output_forward` on the same
    Scratch."""
    if not (zT.flags.c_contiguous and deltaT.flags.c_contiguous):
        raise ValueError("softmax_cross_entropy_labels needs C-contiguous (K, B) zT and deltaT")
    z_flat, delta_flat = zT.reshape(-1), deltaT.reshape(-1)  # views, no copy
    z_flat.take(positions, out=s.picked, mode="wrap")  # z_y per row
    lse = s.row2_1d
    np.log(lse, out=lse)  # log Σ_k e^(z−m)
    lse += s.row_1d  # + m: lse(z) per row
    lse -= s.picked
    total = float(np.add.reduce(lse))
    np.copyto(deltaT.T, a)
    delta_flat.take(positions, out=s.picked, mode="wrap")  # δ_L = a − onehot(y)
    s.picked -= 1.0
    delta_flat.put(positions, s.picked, mode="wrap")
    return total


def _sigmoid_cross_entropy(z: Array, a: Array, t: Array, delta: Array, s: Scratch) -> float:
    """L = Σ [softplus(z) − T z] with softplus(z) = max(z, 0) + log(1 + e^(−|z|)), δ_L = a − T."""
    np.abs(z, out=s.bk)
    np.negative(s.bk, out=s.bk)
    np.exp(s.bk, out=s.bk)
    np.log1p(s.bk, out=s.bk)  # log(1 + e^(−|z|))
    total = float(s.bk.sum())
    np.maximum(z, 0.0, out=s.bk)
    total += float(s.bk.sum())
    np.multiply(t, z, out=s.bk)
    total -= float(s.bk.sum())
    np.subtract(a, t, out=delta)  # δ_L = a − T
    return total


def _mse(output: str, a: Array, t: Array, delta: Array, s: Scratch) -> float:
    """L = ½ Σ ‖a − T‖², Δa_L = a − T, δ_L = Δa_L ⊙ g′(z_L) for `output`'s g (identity: 1)."""
    np.subtract(a, t, out=delta)
    total = 0.5 * float(np.vdot(delta, delta))
    if output == "sigmoid":
        np.multiply(a, a, out=s.bk)
        np.subtract(a, s.bk, out=s.bk)  # σ′ = a − a²
        delta *= s.bk
    elif output == "softmax":
        # δ_L = J^T Δa with J = diag(a) − a aᵀ:  a ⊙ (Δa − Σ_k a Δa)
        np.multiply(a, delta, out=s.bk)
        np.sum(s.bk, axis=1, keepdims=True, out=s.row)
        delta -= s.row
        delta *= a
    return total
