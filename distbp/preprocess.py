"""Input preprocessing: the one definition that training, evaluation and prediction share.

A checkpoint's `/preprocess` group (and a training session's `preprocess` dict) holds up to three
arrays, applied in this order to the raw rows x (B, n_in) read from disk:

    scale  ()        x ← x · scale            (e.g. 1/16 for the bundled digits' 0..16 pixels)
    mean   (n_in,)   x ← (x − mean) / std     (--standardize: training-set statistics)
    std    (n_in,)

The arithmetic runs in the buffer's dtype (the network's), in exactly this order, so an evaluation
of a checkpoint sees the bits the trainer's validation saw.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["KEYS", "apply", "check"]

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
