"""The yardstick for distbp's step: a bare NumPy loop of the same shapes, with one in-place
allreduce of a flat gradient and plain SGD, on random rows already in memory in the network's
dtype. Nothing else: no data reading, no preprocessing, no metrics, no checks.

    loop = BareLoop(layers, "relu", rows, "float32", comm)
    seconds = loop.time(warmup=5, steps=30)       # (steps,) wall seconds per step, this rank

`distbp bench --baseline` times it in the same process as `Trainer.step` and prints distbp's
step as a ratio of it. Written separately from distbp.network on purpose: it is the hardware's
cost of the arithmetic, against which the trainer's own code is measured.
"""

from __future__ import annotations

import time

import numpy as np

from distbp.network import n_params, param_views

__all__ = ["BareLoop"]


class BareLoop:
    """Forward, backward (softmax cross-entropy on the output; relu or sigmoid hidden layers),
    one allreduce and w −= α·g over `rows` random rows, every buffer allocated once."""

    def __init__(self, layers, activation: str, rows: int, dtype: str, comm, lr: float = 0.01):
        if activation not in ("relu", "sigmoid"):
            raise ValueError(f"the bare loop has relu and sigmoid, not {activation}")
        self.relu, self.comm, self.lr = activation == "relu", comm, np.dtype(dtype).type(lr)
        rng = np.random.default_rng(1)
        self.params = (rng.standard_normal(n_params(layers)) * 0.05).astype(dtype)
        self.grad = np.zeros_like(self.params)
        self.W, self.b = param_views(self.params, layers)
        self.gW, self.gb = param_views(self.grad, layers)
        for b in self.b:
            b.fill(0)
        self.a = [rng.standard_normal((rows, layers[0])).astype(dtype)]
        self.a += [np.empty((rows, n), dtype) for n in layers[1:]]
        self.delta = [np.empty((rows, n), dtype) for n in layers[1:]]
        self.tmp = [np.empty((rows, n), dtype) for n in layers[1:]]  # g′(z) of hidden layers
        self.row_max = np.empty((rows, 1), dtype)
        self.labels = rng.integers(0, layers[-1], rows)
        self.rows = np.arange(rows)

    def step(self) -> None:
        self.forward_backward()
        self.comm.allreduce_sum(self.grad)  # the one collective
        self.grad *= self.lr / (len(self.rows) * self.comm.size)  # one pass: α·mean
        self.params -= self.grad

    def forward_backward(self) -> None:
        """The gradient of the summed loss over this rank's rows into `grad`."""
        a, W, b = self.a, self.W, self.b
        last = len(W) - 1
        for j in range(len(W)):  # z_j = a_k W_jᵀ + b_j, then g in place
            np.matmul(a[j], W[j].T, out=a[j + 1])
            a[j + 1] += b[j]
            if j < last:
                if self.relu:
                    np.maximum(a[j + 1], 0, out=a[j + 1])
                else:
                    np.negative(a[j + 1], out=a[j + 1])
                    np.exp(a[j + 1], out=a[j + 1])
                    a[j + 1] += 1
                    np.reciprocal(a[j + 1], out=a[j + 1])
        out = a[-1]  # softmax, then δ_L = softmax − one-hot
        out -= np.max(out, axis=1, keepdims=True, out=self.row_max)
        np.exp(out, out=out)
        out /= np.sum(out, axis=1, keepdims=True, out=self.row_max)
        self.delta[-1][...] = out
        self.delta[-1][self.rows, self.labels] -= 1
        self._backward()

    def _backward(self) -> None:
        a, W, delta = self.a, self.W, self.delta
        for j in range(len(W) - 1, -1, -1):
            np.matmul(delta[j].T, a[j], out=self.gW[j])  # ΔW_j = δ_jᵀ a_k
            np.sum(delta[j], axis=0, out=self.gb[j])
            if j == 0:
                break
            np.matmul(delta[j], W[j], out=delta[j - 1])  # Δa_k = δ_j W_j, then ⊙ g′(z_k)
            slope = self.tmp[j - 1]
            if self.relu:
                np.greater(a[j], 0, out=slope)
            else:  # σ′ = a (1 − a)
                np.subtract(1, a[j], out=slope)
                slope *= a[j]
            delta[j - 1] *= slope

    def time(self, warmup: int, steps: int) -> np.ndarray:
        """(steps,) seconds per step after `warmup` untimed steps, each after a barrier."""
        times = np.zeros(steps)
        for i in range(warmup + steps):
            self.comm.barrier()
            t0 = time.perf_counter()
            self.step()
            if i >= warmup:
                times[i - warmup] = time.perf_counter() - t0
        return times

