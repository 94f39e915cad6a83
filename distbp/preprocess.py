"""Input preprocessing: the one definition that training, evaluation and prediction share.

A checkpoint's `/preprocess` group (and a training session's `preprocess` dict) holds up to three
arrays, applied in this order to the raw rows x (B, n_in) read from disk:

    scale  ()        x ← x · scale            (e.g. 1/16 for the bundled digits' 0..16 pixels)
    mean   (n_in,)   x ← (x − mean) / std     (--standardize: training-set statistics)
    std    (n_in,)

The arithmetic runs in the buffer's dtype (the network's), in exactly this order, so an evaluation
of a checkpoint sees the bits the trainer's validation saw.

feature_stats() computes mean and std for --standardize: the training set's per-feature sums,
each rank reading its share of blocks of rows, added in one fixed order (the same bits on any
number of ranks). It lives here, by the arithmetic that uses its result, rather than in the
training loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from distbp.errors import DataError
from distbp.ordered_sum import OrderedSum

__all__ = ["KEYS", "STATS_BLOCK", "Inputs", "apply", "check", "feature_stats"]

KEYS = ("scale", "mean", "std")


def apply(x: np.ndarray, params: Mapping[str, np.ndarray], out: np.ndarray) -> np.ndarray:
    """Write the network inputs for raw rows `x` (B, ...) into `out` (B, n_in) and return `out`.

    `x` may have any numeric dtype (uint8 pixels stay uint8 on disk); it is cast into `out`'s
    dtype first, then scaled, then standardized. Allocates nothing.
    """
    np.copyto(out, x.reshape(out.shape), casting="unsafe")  # (B, a, b) images flatten too
    if "scale" in params:
        out *= params["scale"]
    if "mean" in params:
        out -= params["mean"]
        out /= params["std"]
    return out


class Inputs:
    """Raw rows -> network inputs through `apply`, into a buffer reused per batch length, so a
    loop over batches allocates only at its first batch of each length (the last is shorter)."""

    def __init__(self, params: Mapping[str, np.ndarray], n_inputs: int, dtype) -> None:
        self.params, self.n_inputs, self.dtype = params, n_inputs, np.dtype(dtype)
        self._buffers: dict[int, np.ndarray] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, ...) raw rows -> (B, n_inputs) in the network's dtype, preprocessed: x itself
        when there is nothing to do (no preprocessing, the dtype and shape already right)."""
        if not self.params and x.dtype == self.dtype and x.shape[1:] == (self.n_inputs,):
            return x
        buf = self._buffers.get(len(x))
        if buf is None:
            buf = self._buffers[len(x)] = np.empty((len(x), self.n_inputs), self.dtype)
        return apply(x, self.params, buf)


def check(params: Mapping[str, np.ndarray], n_inputs: int) -> None:
    """Raise ValueError naming the problem unless `params` is preprocessing `apply` understands
    for n_inputs features: known keys only (an unknown step silently skipped would give wrong
    inputs), a single scale, mean and std together with one value per feature, every value
    finite and scale and std positive."""
    unknown = sorted(set(params) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown preprocessing step(s) {', '.join(unknown)} "
                         f"(this distbp knows {', '.join(KEYS)})")
    if "scale" in params and np.size(params["scale"]) != 1:
        raise ValueError(f"preprocessing scale must be one number, got shape "
                         f"{np.shape(params['scale'])}")
    if ("mean" in params) != ("std" in params):
        raise ValueError("preprocessing needs mean and std together, found only one")
    for key in ("mean", "std"):
        if key in params and np.shape(params[key]) != (n_inputs,):
            raise ValueError(f"preprocessing {key} has shape {np.shape(params[key])}, the "
                             f"network has {n_inputs} inputs")
    for key in KEYS:  # x · scale and (x − mean) / std must stay finite numbers
        values = np.asarray(params.get(key, 1.0))
        if values.dtype.kind not in "iuf" or not np.isfinite(values).all() or (
                key != "mean" and not (values > 0).all()):
            rule = "finite" if key == "mean" else "finite and positive"
            raise ValueError(f"preprocessing {key} must be {rule}, got "
                             f"{np.ravel(values)[:4].tolist()}...")


STATS_BLOCK = 4096  # rows per part of feature_stats' sums


def feature_stats(ds, comm, scale: float | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population std (n_in,) each, in `dtype`, of the rows of dataset `ds`
    times `scale` (None: unscaled), computed in float64; a collective over `comm`.

    Two passes, each a sum over blocks of STATS_BLOCK rows along distbp.ordered_sum's fixed tree
    (each rank reads its share of the blocks), so the statistics have the same bits on any
    number of ranks: the mean = Σx / n, then M2 = Σ(x − mean)², the sum of squared deviations
    from that mean (nothing cancels when a feature's offset dwarfs its spread, as it would in
    E[x²] − E[x]²). A constant feature gets std 1, so it passes through (x − mean) / std as 0."""
    n_in, n = ds.n_features, ds.n
    summed = OrderedSum(comm, n_in, max(1, -(-n // STATS_BLOCK)), np.float64)
    total = np.empty(n_in)
    summed.reduce(lambda m, out: np.sum(_block(ds, m, scale), axis=0, out=out), total)
    mean = total / max(n, 1)

    def squares(m: int, out: np.ndarray) -> None:
        x = _block(ds, m, scale)
        x -= mean
        np.einsum("ij,ij->j", x, x, out=out)

    summed.reduce(squares, total)
    var = total / max(n, 1)
    std = np.where(var > 1e-12, np.sqrt(var), 1.0)
    mean, std = mean.astype(dtype), std.astype(dtype)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError(f"data file {ds.source!r}: --standardize: the features' mean or spread "
                        f"overflows {np.dtype(dtype).name} (values too large to standardize)")
    return mean, std


def _block(ds, m: int, scale: float | None) -> np.ndarray:
    """Rows of block m (STATS_BLOCK rows from m · STATS_BLOCK) as float64 (k, n_in), scaled."""
    rows = np.arange(m * STATS_BLOCK, min((m + 1) * STATS_BLOCK, ds.n), dtype=np.int64)
    x = ds.read(rows)[0].reshape(len(rows), -1).astype(np.float64)
    if scale is not None:
        x *= scale
    return x
