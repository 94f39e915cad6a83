"""Input preprocessing: the one definition that training, evaluation and prediction share.

A checkpoint's `/preprocess` group (and a training session's `preprocess` dict) holds up to three
arrays, applied in this order to the raw rows x (B, n_in) read from disk:

    scale  ()        x ← x · scale            (e.g. 1/16 for the bundled digits' 0..16 pixels)
    mean   (n_in,)   x ← (x − mean) / std     (--standardize: training-set statistics)
    std    (n_in,)

The arithmetic runs in the buffer's dtype (the network's), in exactly this order, so an evaluation
of a checkpoint sees the bits the trainer's validation saw.

feature_stats() computes mean and std for --standardize: the training set's per-feature moments,
each rank reading a contiguous share, combined exactly by two small allreduces. It lives here, by
the arithmetic that uses its result, rather than in the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from distbp.data import shard_bounds

__all__ = ["KEYS", "Inputs", "apply", "check", "feature_stats", "share_moments"]

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
    inputs), a single scale, and mean and std together with one value per feature."""
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


def feature_stats(ds, comm, scale: float | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and population std (n_in,) each, in `dtype`, of the rows of dataset `ds`
    times `scale` (None: unscaled), computed in float64; a collective over `comm`.

    Each rank reads its contiguous share once for its count, mean and M2 (the sum of squared
    deviations from its own mean); Chan et al.'s parallel formula combines them exactly:
    mean = Σ n_r·mean_r / n, M2 = Σ (M2_r + n_r·(mean_r − mean)²): two small allreduces.
    Unlike E[x²] − E[x]², nothing cancels when a feature's offset dwarfs its spread. A constant
    feature gets std 1, so it passes through (x − mean) / std as 0."""
    n_in = ds.n_features
    lo, hi = shard_bounds(ds.n, comm.rank, comm.size)
    n_r, mean_r, m2_r = share_moments(ds, lo, hi, scale, n_in)
    sums = np.append(mean_r * n_r, float(n_r))
    comm.allreduce_sum(sums)
    mean = sums[:n_in] / sums[-1]
    m2 = m2_r + n_r * (mean_r - mean) ** 2
    comm.allreduce_sum(m2)
    var = m2 / sums[-1]
    std = np.where(var > 1e-12, np.sqrt(var), 1.0)
    return mean.astype(dtype), std.astype(dtype)


def share_moments(ds, lo: int, hi: int, scale: float | None, n_in: int
                  ) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, mean (n_in,), M2 (n_in,)) of rows lo..hi-1 of `ds` times `scale`, float64, read in
    blocks of 4096 rows: each block's own mean and M2 (two passes over the block in memory),
    merged into the running ones by Chan et al.'s pairwise update. (0, zeros, zeros) if empty."""
    n, mean, m2 = 0, np.zeros(n_in), np.zeros(n_in)
    for start in range(lo, hi, 4096):
        rows = np.arange(start, min(start + 4096, hi))
        x = ds.read(rows)[0].reshape(len(rows), -1).astype(np.float64)
        if scale is not None:
            x *= scale
        k, block_mean = len(rows), x.mean(axis=0)
        x -= block_mean
        block_m2 = np.einsum("ij,ij->j", x, x)
        delta, total = block_mean - mean, n + k
        mean += delta * (k / total)
        m2 += block_m2 + delta * delta * (n * k / total)
        n = total
    return n, mean, m2
