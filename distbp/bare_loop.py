"""The yardstick for distbp's step: a bare NumPy loop of the same shapes, with one in-place
allreduce of a flat gradient and plain SGD, in the network's dtype. Nothing else: no
preprocessing, no loss value, no accuracy count, no metrics, no checks, no checkpoints.

    loop = BareLoop(layers, "relu", rows, "float32", comm)              # one batch, kept in cache
    loop = BareLoop(layers, "relu", rows, "float32", comm, data=(x, y))  # reads each step's rows
    seconds = loop.time(warmup=5, steps=30)       # (steps,) wall seconds per step, this rank

Two yardsticks, because they answer two questions. On one batch of random rows the loop is the
hardware's cost of the arithmetic alone; given the rows of a data set in memory, each step first
gathers its own `rows` rows of a shuffled order into the input buffer (one np.take), which any
training step over a data set pays. `distbp bench --baseline` times both in the same process
as `Trainer.step` and prints distbp's step as a ratio of each. Written separately from
distbp.network on purpose: it is the cost of the arithmetic, against which the trainer's own
code is measured. It keeps the layers' values transposed, (n_j, rows), as distbp.network does
(the faster layout for few rows), so the ratio measures the trainer's overhead, not a
difference in how the products are laid out.
"""

from __future__ import annotations

import time

import numpy as np

from distbp.data import shard_bounds
from distbp.network import n_params, param_views

__all__ = ["BareLoop"]


class BareLoop:
    """Forward, backward (softmax cross-entropy on the output; relu or sigmoid hidden layers),
    one allreduce and w −= α·g over `rows` rows (one random batch, or with `data` this rank's
    share of each global batch of `batch` rows, default rows × ranks), every buffer allocated
    once."""

    def __init__(self, layers, activation: str, rows: int, dtype: str, comm, lr: float = 0.01,
                 data: tuple[np.ndarray, np.ndarray] | None = None, batch: int | None = None):
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
        x = rng.standard_normal((rows, layers[0])).astype(dtype)  # the rows, or their buffer
        self.a = [x.T] + [np.empty((n, rows), dtype) for n in layers[1:]]  # a_jᵀ (n_j, rows)
        self.delta = [np.empty((n, rows), dtype) for n in layers[1:]]  # δ_jᵀ
        self.tmp = [np.empty((n, rows), dtype) for n in layers[1:]]  # g′(z) of hidden layers
        self.col_max = np.empty((1, rows), dtype)
        self.labels = rng.integers(0, layers[-1], rows)
        self.rows = np.arange(rows)
        self.data = data  # (x (n, n_0) in the network's dtype, y (n,) labels) or None
        if data is not None:  # this rank's `rows` of each global batch of `batch` rows
            self.batch = batch or rows * comm.size
            self.shard = shard_bounds(self.batch, comm.rank, comm.size)
            if self.shard[1] - self.shard[0] != rows:
                raise ValueError(f"rank {comm.rank} has {self.shard[1] - self.shard[0]} rows of "
                                 f"a global batch of {self.batch}, not {rows}")
            if len(data[0]) < self.batch:  # the same on every rank
                raise ValueError(f"the bare loop reads {self.batch} rows a step, the data has "
                                 f"{len(data[0])}")
            self.labels = np.empty(rows, data[1].dtype)
            self.order = rng.permutation(len(data[0]))  # the same on every rank: seed 1
            self.cursor = 0  # where the next global batch starts in `order`

    def step(self) -> None:
        if self.data is not None:
            self.read_rows()
        self.forward_backward()
        self.comm.allreduce_sum(self.grad)  # the one collective
        self.grad *= self.lr / (len(self.rows) * self.comm.size)  # one pass: α·mean
        self.params -= self.grad

    def read_rows(self) -> None:
        """This rank's rows of the next global batch of the shuffled order into the input
        buffer and the labels (a new pass over the order when too few are left)."""
        if self.cursor + self.batch > len(self.order):
            self.cursor = 0
        picked = self.order[self.cursor + self.shard[0]:self.cursor + self.shard[1]]
        np.take(self.data[0], picked, axis=0, out=self.a[0].T, mode="wrap")  # in range
        np.take(self.data[1], picked, out=self.labels, mode="wrap")
        self.cursor += self.batch

    def forward_backward(self) -> None:
        """The gradient of the summed loss over this rank's rows into `grad`."""
        a, W, b = self.a, self.W, self.b
        last = len(W) - 1
        for j in range(len(W)):  # z_jᵀ = W_j a_kᵀ + b_j, then g in place
            np.matmul(W[j], a[j], out=a[j + 1])
            a[j + 1] += b[j][:, None]
            if j < last:
                if self.relu:
                    np.maximum(a[j + 1], 0, out=a[j + 1])
                else:
                    np.negative(a[j + 1], out=a[j + 1])
                    np.exp(a[j + 1], out=a[j + 1])
                    a[j + 1] += 1
                    np.reciprocal(a[j + 1], out=a[j + 1])
        out = a[-1]  # softmax down each column, then δ_L = softmax − one-hot
        out -= np.max(out, axis=0, keepdims=True, out=self.col_max)
        np.exp(out, out=out)
        out /= np.sum(out, axis=0, keepdims=True, out=self.col_max)
        self.delta[-1][...] = out
        self.delta[-1][self.labels, self.rows] -= 1
        self._backward()

    def _backward(self) -> None:
        a, W, delta = self.a, self.W, self.delta
        for j in range(len(W) - 1, -1, -1):
            np.matmul(delta[j], a[j].T, out=self.gW[j])  # ΔW_j = δ_jᵀ a_k
            np.sum(delta[j], axis=1, out=self.gb[j])
            if j == 0:
                break
            np.matmul(W[j].T, delta[j], out=delta[j - 1])  # Δa_kᵀ = W_jᵀ δ_jᵀ, then ⊙ g′(z_k)
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

