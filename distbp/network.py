"""A fully-connected network: forward pass, backpropagation, and the parameters as one flat array.

Notation as in docs/notation.md (the seed note's, explained there), with the batch as rows:
layer j takes the activations a_k of the layer k before it,

    z_j = a_k W_jᵀ + b_j                       (B, n_j)      forward, `_forward`
    a_j = g(z_j)                               (B, n_j)
    δ_j = Δa_j ⊙ g′(z_j)                       (B, n_j)      backward, `backward_layer`
    ΔW_j = δ_jᵀ a_k                            (n_j, n_k)    Δw_{k→j} = (Δa_j | g′ z_j) | a_kᵀ
    Δb_j = Σ_rows δ_j                          (n_j,)
    Δa_k = δ_j W_j                             (B, n_k)      Δa_k = w_{k→j}ᵀ | (Δa_j | g′ z_j)

The code computes the transposes of the (B, n_j) arrays, z_jᵀ = W_j a_kᵀ + b_j and so on, so
that every GEMM reads contiguous memory (see _Workspace); the equations are the same.
ΔW_j and Δb_j are SUMS over the rows, written straight into views of one flat gradient buffer laid
out like `params`; callers divide once by the number of samples (the global batch, under MPI).
`loss_grad_sum` runs the whole pass; a caller that acts on each layer's gradient as soon as it
exists (the trainer starting an allreduce) runs `forward_loss`, then `backward_layer(j)` for
j = L .. 1 itself.
The update w′ = w − α Δw lives in distbp.optim. Buffers are kept per batch size, so after the
first call with a given B a step allocates no arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from distbp.activations import get_hidden
from distbp.losses import (
    Scratch,
    check_output_loss,
    loss_delta,
    output_forward,
    softmax_cross_entropy_labels,
)

__all__ = ["DTYPES", "DW_BLOCK_ELEMS", "Network", "n_params", "param_views"]

DTYPES = ("float32", "float64")
# Across nodes (distbp.step), ΔW_j is computed in blocks of rows of at most this many elements
# (a layer up to 1 MiB of float32 in one GEMM), the last block first: backward reports each
# block as it is written, so the trainer can start sending a large layer's gradient before the
# whole layer is done (distbp.overlap). Blocks cost 3-7 % of a pass of 784-1024-1024-10 (smaller
# GEMMs) and change a GEMM's bits, so a network computes each ΔW whole unless
# `use_row_blocks` asks.
DW_BLOCK_ELEMS = 1 << 18
_RELU_FAMILY = ("relu", "leaky_relu")


class _Workspace:
    """Everything one forward + backward pass over B rows needs, allocated once per B.

    z_j, a_j and δ_j are stored feature-major, as their transposes (n_j, B) C-contiguous (but the
    output a_L, which only the loss reads, row-major): every GEMM of the pass then reads
    contiguous operands (W_j a_kᵀ rather than a_k W_jᵀ), 5-14 % faster for the 32-128 rows a
    rank or a micro-batch often has (docs/notation.md).
    `z`, `a`, `delta` are the (B, n_j) views the equations are written in."""

    def __init__(self, layers: Sequence[int], batch: int, dtype: np.dtype):
        self.x = np.empty((batch, layers[0]), dtype)  # x cast to the network's dtype, if needed
        self.zT = [None] + [np.empty((n, batch), dtype) for n in layers[1:]]
        self.aT = [None] + [np.empty((n, batch), dtype) for n in layers[1:-1]] + [None]
        self.deltaT = [None] + [np.empty((n, batch), dtype) for n in layers[1:]]
        self.z = [None] + [m.T for m in self.zT[1:]]
        # a[0]: x; the output a_L row-major, (B, n_L): count_correct's argmax along its rows
        # then needs no copy
        self.a = [self.x] + [m.T for m in self.aT[1:-1]] + [np.empty((batch, layers[-1]), dtype)]
        self.delta = [None] + [m.T for m in self.deltaT[1:]]
        self.t = np.empty((batch, layers[-1]), dtype)  # targets T
        self.rows = np.arange(batch)
        # (row, label) positions: in T, row·n_L + y (_targets), or in the (n_L, B) memory of
        # z_L and δ_L, y·B + row (_output_loss)
        self.flat = np.empty(batch, np.intp)
        self.pred = np.empty(batch, np.intp)  # argmax per row, for count_correct
        self.hit = np.empty(batch, bool)
        self.scratch = Scratch(batch, layers[-1], dtype)


class Network:
    """Fully-connected network with hand-written backpropagation.

    Args:
        layers: widths [n_0 (inputs), n_1, ..., n_L (outputs)], at least two, each ≥ 1.
        activation: hidden g: relu (default, as `distbp train`), sigmoid, tanh, leaky_relu,
            identity.
        output: softmax, sigmoid or identity.
        loss: cross_entropy (softmax: categorical; sigmoid: binary per output) or mse.
        seed: initialisation seed; the same seed gives the same bits on every machine and rank.
        dtype: float32 (default, fast) or float64 (exactness tests), in any spelling numpy
            accepts ("float64", "f8", "double", np.float64, np.dtype("float64")).

    `params` is one flat array: W_1, b_1, W_2, b_2, ... (each W row-major, shape (n_j, n_k));
    `weights[j]` and `biases[j]` (j = 0 .. L−1) are views into it.
    """

    def __init__(self, layers: Sequence[int], activation: str = "relu",
                 output: str = "softmax", loss: str = "cross_entropy", seed: int = 0,
                 dtype: str | np.dtype | type = "float32"):
        self.layers = _check_layers(layers)
        self.activation, self.output, self.loss = activation, output, loss
        self.g = get_hidden(activation)
        check_output_loss(output, loss)
        self.dtype = _check_dtype(dtype)
        self.params = np.zeros(n_params(self.layers), self.dtype)
        self.weights, self.biases = param_views(self.params, self.layers)
        # where W_j begins in the flat parameters (and gradient), j = 1 .. L
        self.layer_starts = [n_params(self.layers[:j]) for j in range(1, len(self.layers))]
        self._bias_columns = [b[:, None] for b in self.biases]  # b_j as (n_j, 1), for z_jᵀ
        self.use_row_blocks(None)
        self._init_params(seed)
        self._workspaces: dict[int, _Workspace] = {}
        # views (dW, db) of the gradient buffers forward_loss was given, by memory address; each
        # entry holds its buffer, so the address cannot be another array's while it is here
        self._grad_views: dict[tuple[int, int], tuple] = {}
        self._views: tuple = (None, [], [])  # the pass's: (buffer, dW, db)
        self._pass: _Workspace | None = None  # the workspace of the pass backward_layer ends
        self.last_output = np.empty((0, self.layers[-1]), self.dtype)
        # The input transform the network was trained with (keys of distbp.preprocess: scale,
        # mean, std): distbp.evaluate/predict apply it to raw rows; the methods here do not.
        self.preprocess: dict[str, np.ndarray] = {}

    @property
    def n_inputs(self) -> int:
        return self.layers[0]

    @property
    def n_outputs(self) -> int:
        return self.layers[-1]

    def _init_params(self, seed: int) -> None:
        # Drawn in float64 and then cast: identical bits for float32 and float64 runs of one seed.
        rng = np.random.default_rng(seed)
        for W, b in zip(self.weights, self.biases):
            n_out, n_in = W.shape
            if self.activation in _RELU_FAMILY:  # He: Var = 2 / n_in
                W[...] = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
            else:  # Glorot/Xavier uniform: Var = 2 / (n_in + n_out)
                limit = np.sqrt(6.0 / (n_in + n_out))
                W[...] = rng.uniform(-limit, limit, (n_out, n_in))
            b.fill(0.0)

    # ---------------------------------------------------------------- public API

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Output activations a_L (B, n_out) for inputs x (B, n_in), a new array."""
        return self._forward(self._check_x(x)).copy()

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """(mean loss over the B rows, mean gradient as a new flat array laid out like params).

        B must be at least 1: a mean over no rows is undefined (ValueError). loss_grad_sum, the
        sum, accepts zero rows.
        """
        if len(self._check_x(x)) == 0:
            raise ValueError("x has no rows")
        grad = np.empty_like(self.params)
        total = self.loss_grad_sum(x, y, grad)
        grad /= len(x)
        return total / len(x), grad

    def loss_grad_sum(self, x: np.ndarray, y: np.ndarray, grad: np.ndarray) -> float:
        """Forward and backward over the rows of x; write Σ_rows ∂L/∂params into `grad`.

        Returns the loss summed over the rows. `grad` (n_params,) is overwritten, not added to.
        Zero rows give a zero gradient and a zero loss (a rank with an empty shard).
        """
        total = self.forward_loss(x, y, grad)
        for j in range(self.depth, 0, -1):
            self.backward_layer(j, grad)
        return total

    @property
    def depth(self) -> int:
        """L: the layers with weights (one fewer than the widths)."""
        return len(self.layers) - 1

    def use_row_blocks(self, block_elems: int | None) -> None:
        """Compute each ΔW_j in blocks of rows of at most `block_elems` elements (None: whole),
        reported one by one to backward_layer's `gradient_ready`."""
        # ΔW_j's row blocks, in the order backward writes them (last first), with the offset
        # in the flat gradient where each block begins
        self._dw_blocks = [[(lo, hi, start + lo * n_in)
                            for lo, hi in reversed(_row_blocks(n_out, n_in, block_elems))]
                           for start, (n_out, n_in) in zip(self.layer_starts,
                                                           (w.shape for w in self.weights))]

    def ready_offsets(self) -> list[int]:
        """The offsets into the flat gradient that `backward_layer(j, grad, gradient_ready)`
        reports for j = L .. 1, in that order: from each on, the gradient is complete."""
        return [at for j in range(self.depth, 0, -1) for _, _, at in self._dw_blocks[j - 1]]

    def forward_loss(self, x: np.ndarray, y: np.ndarray, grad: np.ndarray) -> float:
        """The forward pass over the rows of x and the output layer's δ_L; returns the loss
        summed over the rows. `backward_layer(j, grad)` for j = L down to 1 (each needs δ_j from
        the layer above) then writes the gradient sums into `grad`. Zero rows (a rank with an
        empty shard): `grad` is zeroed, the loss is 0 and backward_layer writes nothing."""
        if len(x) == 0:
            grad.fill(0.0)
            self._pass = None
            return 0.0
        ws = self._workspace(len(x))
        self._forward(self._check_x(x), ws)
        total = self._output_loss(y, ws)
        self._views = self._gradient_views(grad)
        self._pass = ws
        return total

    def loss_sum(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """(loss summed over the rows, number of rows classified correctly); no gradient."""
        if len(x) == 0:
            return 0.0, 0
        ws = self._workspace(len(x))
        self._forward(self._check_x(x), ws)
        total = self._output_loss(y, ws)
        return total, self.count_correct(ws.a[-1], y)

    def count_correct(self, a: np.ndarray, y: np.ndarray) -> int:
        """Rows whose prediction matches y: argmax for several outputs, a > ½ for one."""
        y = np.asarray(y)
        if self.n_outputs == 1:
            truth = (y.reshape(-1) > 0.5) if y.ndim == 1 else (y[:, 0] > 0.5)
            return int(np.count_nonzero((a[:, 0] > 0.5) == truth))
        if y.ndim == 1 and len(a) in self._workspaces:  # the training step: no allocation
            ws = self._workspaces[len(a)]
            a.argmax(axis=1, out=ws.pred)
            np.equal(ws.pred, y, out=ws.hit)
            return int(np.count_nonzero(ws.hit))
        truth = y if y.ndim == 1 else np.argmax(y, axis=1)
        return int(np.count_nonzero(np.argmax(a, axis=1) == truth))

    # ---------------------------------------------------------------- the equations

    def _forward(self, x: np.ndarray, ws: _Workspace | None = None) -> np.ndarray:
        ws = ws or self._workspace(len(x))
        if x.dtype == self.dtype and x.flags.c_contiguous:
            ws.a[0] = x  # a_0 = x, read where it lies (valid until the pass ends)
        else:
            ws.a[0] = ws.x  # a_0 = x, in the network's dtype
            np.copyto(ws.x, x, casting="unsafe")
        L = len(self.layers) - 1
        for j in range(1, L + 1):
            k = j - 1
            np.matmul(self.weights[k], ws.a[k].T, out=ws.zT[j])  # z_jᵀ = W_j a_kᵀ    (n_j, B)
            ws.zT[j] += self._bias_columns[k]  #                            + b_j
            if j < L:
                self.g.g(ws.zT[j], ws.aT[j])  # a_j = g(z_j)               (n_j, B)
        output_forward(self.output, ws.z[L], ws.a[L], ws.scratch)  # a_L = g_out(z_L)
        self.last_output = ws.a[L]  # (B, n_L) view, valid until the next pass
        return ws.a[L]

    def backward_layer(self, j: int, grad: np.ndarray,
                       gradient_ready: Callable[[int], None] | None = None) -> None:
        """Layer j's gradient sums ΔW_j, Δb_j into `grad` (the buffer forward_loss was given)
        and, below the first layer, δ_k of the layer k = j − 1 under it. ΔW_j is written in
        blocks of rows (`use_row_blocks`; one block by default), the last first; after each,
        `gradient_ready(offset)` says that grad[offset:] is complete (ready_offsets lists them),
        before δ_k is formed (the trainer starts sending meanwhile)."""
        ws = self._pass
        k = j - 1
        if ws is None:  # no rows: forward_loss zeroed grad
            if gradient_ready is not None:
                for _, _, at in self._dw_blocks[k]:
                    gradient_ready(at)
            return
        _, dW, db = self._views
        delta = ws.deltaT[j]  # δ_jᵀ                                     (n_j, B)
        np.add.reduce(delta, axis=1, out=db[k])  # Δb_j = Σ_rows δ_j         (n_j,)
        for lo, hi, at in self._dw_blocks[k]:  # ΔW_j = δ_jᵀ a_k, by rows (n_j, n_k)
            np.matmul(delta[lo:hi], ws.a[k], out=dW[k][lo:hi])
            if gradient_ready is not None:
                gradient_ready(at)
        if k > 0:
            np.matmul(self.weights[k].T, delta, out=ws.deltaT[k])  # Δa_kᵀ = W_jᵀ δ_jᵀ (n_k, B)
            self.g.gprime(ws.zT[k], ws.aT[k], ws.zT[k])  # g′(z_k), over z_k (no longer needed)
            ws.deltaT[k] *= ws.zT[k]  # δ_k = Δa_k ⊙ g′(z_k)             (n_k, B)

    # ---------------------------------------------------------------- helpers

    def _gradient_views(self, grad: np.ndarray) -> tuple:
        """(grad, dW views, db views), made once per buffer (also when `grad` is a new view
        object of the same memory, as a slice taken every step is)."""
        if self._views[0] is grad:  # the same buffer as the last pass: nothing to look up
            return self._views
        key = (grad.__array_interface__["data"][0], grad.size)
        views = self._grad_views.get(key)
        if views is None:
            if len(self._grad_views) >= 16:  # bounded: a run uses a few buffers
                self._grad_views.clear()
            views = self._grad_views[key] = (grad, *param_views(grad, self.layers))
        return views

    def _workspace(self, batch: int) -> _Workspace:
        ws = self._workspaces.get(batch)
        if ws is None:
            if len(self._workspaces) >= 8:  # bounded: shard sizes differ by at most one
                self._workspaces.clear()
            ws = self._workspaces[batch] = _Workspace(self.layers, batch, self.dtype)
        return ws

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"x must have shape (B, {self.n_inputs}), got {x.shape}")
        return x

    def _output_loss(self, y: np.ndarray, ws: _Workspace) -> float:
        """After `_forward`: the loss summed over the rows, and δ_L into ws.delta[-1]. Integer
        labels of a softmax cross-entropy output go straight from their positions (no one-hot
        T: a dozen fewer NumPy calls, a tenth of a small network's step); other targets
        through T (ws.t)."""
        y = np.asarray(y)
        if (y.ndim == 1 and self.n_outputs > 1 and self.output == "softmax"
                and self.loss == "cross_entropy"):
            y = self._labels(y, ws)
            positions = ws.flat  # of (row, y[row]) in the (n_L, B) memory of z_L and δ_L
            np.multiply(y, len(y), out=positions, dtype=np.intp)  # no overflow in a narrow y
            positions += ws.rows
            return softmax_cross_entropy_labels(ws.zT[-1], ws.a[-1], positions,
                                                ws.deltaT[-1], ws.scratch)
        self._targets(y, ws)
        return loss_delta(self.output, self.loss, ws.z[-1], ws.a[-1], ws.t, ws.delta[-1],
                          ws.scratch)

    def _targets(self, y: np.ndarray, ws: _Workspace) -> None:
        """T (B, n_out) in ws.t: one-hot rows for integer labels, y itself for targets.

        1-D boolean y holds the labels False = 0 and True = 1 (numpy's own bool → int rule), e.g.
        the binary target of a single sigmoid output.
        """
        batch, k = ws.t.shape
        if y.ndim == 2 and y.shape == (batch, k):
            np.copyto(ws.t, y, casting="unsafe")
            return
        if y.ndim == 2 and k == 1 and y.shape == (batch, 1):
            np.copyto(ws.t, y, casting="unsafe")
            return
        y = self._labels(y, ws)
        if k == 1:  # one output: labels are the binary target itself
            ws.t[:, 0] = y
            return
        ws.t.fill(0.0)
        np.multiply(ws.rows, k, out=ws.flat)  # flat index of (row, y[row]) in T
        ws.flat += y
        ws.t.reshape(-1).put(ws.flat, 1.0)

    def _labels(self, y: np.ndarray, ws: _Workspace) -> np.ndarray:
        """1-D y as integer class labels, each a valid class (ValueError naming the problem)."""
        batch, k = ws.t.shape
        if y.ndim != 1 or len(y) != batch:
            raise ValueError(f"y must have shape ({batch},) labels or ({batch}, {k}) targets, "
                             f"got {y.shape}")
        if y.dtype == np.bool_:
            y = y.view(np.uint8)  # same itemsize: a view, no copy; fancy indexing needs ints
        if y.dtype.kind not in "iu":
            raise ValueError(f"1-D y must hold integer class labels, got dtype {y.dtype}")
        classes = max(k, 2)  # one output: the labels 0 and 1
        # one reduction: seen unsigned (same byte order), a negative label is at least
        # 2^(bits−1), above any class a dtype that narrow can name; a wider K needs the minimum
        unsigned, largest = _label_view(y.dtype)
        if batch and (np.maximum.reduce(y.view(unsigned)) >= classes
                      or classes > largest and np.minimum.reduce(y) < 0):
            lo, hi = int(y.min()), int(y.max())
            if k == 1:
                raise ValueError(f"labels for a single output must be 0 or 1, got {lo}..{hi}")
            raise ValueError(f"label out of range: labels must be in 0..{k - 1}, got {lo}..{hi}")
        return y


_LABEL_VIEWS: dict[np.dtype, tuple[np.dtype, int]] = {}


def _label_view(dtype: np.dtype) -> tuple[np.dtype, int]:
    """(the unsigned dtype of integer `dtype`'s size and byte order, the largest value `dtype`
    holds), made once per dtype: building them costs a small network's step a micro-second."""
    view = _LABEL_VIEWS.get(dtype)
    if view is None:
        view = _LABEL_VIEWS[dtype] = (np.dtype(dtype.str.replace("i", "u")),
                                      int(np.iinfo(dtype).max))
    return view


def _row_blocks(rows: int, cols: int, block_elems: int | None) -> list[tuple[int, int]]:
    """[lo, hi) row blocks of a (rows, cols) matrix, each at most `block_elems` elements (at
    least one row; None: one block), as even as can be, in increasing order."""
    count = 1 if block_elems is None else min(rows, -(-rows * cols // block_elems))
    return [(rows * i // count, rows * (i + 1) // count) for i in range(count)]


def _check_dtype(dtype) -> np.dtype:
    """np.dtype(dtype) if it is float32 or float64; ValueError naming the value otherwise."""
    # None would silently mean float64 to numpy; a Network's dtype is always said explicitly.
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose float32 or float64")
    return resolved


def _check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    """The widths as Python ints; ValueError naming any width that is not an int/numpy integer.

    Floats are refused even when integral (2.0): int(2.5) would truncate silently, and a float
    width means a computation upstream went wrong. A bool or a string is not a width either.
    """
    try:
        items = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a sequence of integers, got {layers!r}") from None
    bad = [n for n in items if isinstance(n, bool) or not isinstance(n, (int, np.integer))]
    if bad:
        shown = ", ".join(repr(n) for n in bad)
        raise ValueError(f"layer widths must be integers, got {shown} in {items!r}")
    sizes = tuple(int(n) for n in items)
    if len(sizes) < 2:
        raise ValueError(f"layers needs at least two sizes (inputs and outputs), got {sizes}")
    if any(n < 1 for n in sizes):
        raise ValueError(f"every layer needs at least one unit (width 0 found), got {sizes}")
    return sizes


def n_params(layers: Sequence[int]) -> int:
    """Number of parameters: Σ_j n_j (n_k + 1)."""
    return sum(n_out * (n_in + 1) for n_in, n_out in zip(layers[:-1], layers[1:]))


def param_views(flat: np.ndarray, layers: Sequence[int]) -> tuple[list, list]:
    """Views W_j (n_j, n_k) and b_j (n_j,) into a flat array laid out like Network.params."""
    weights, biases, offset = [], [], 0
    for n_in, n_out in zip(layers[:-1], layers[1:]):
        weights.append(flat[offset:offset + n_out * n_in].reshape(n_out, n_in))
        offset += n_out * n_in
        biases.append(flat[offset:offset + n_out])
        offset += n_out
    return weights, biases
