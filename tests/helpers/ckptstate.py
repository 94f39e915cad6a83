"""Shared by the tests/test_checkpoint*.py files: the keyword arguments of a plausible
`distbp.checkpoint.save` call (a small model, float or Adam/SGD state, unicode config).

    path = ck.save(tmp_path, **run_state("float32", "sgd", step=3))
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["LAYERS", "N_PARAMS", "run_state"]

LAYERS = (4, 5, 3)
N_PARAMS = 4 * 5 + 5 + 5 * 3 + 3  # W1 (5, 4), b1 (5,), W2 (3, 5), b2 (3,)


def run_state(dtype: str = "float64", optimizer: str = "adam", step: int = 7, seed: int = 0,
              layers=LAYERS) -> dict:
    """Keyword arguments for ck.save describing a plausible run at `step`."""
    rng = np.random.default_rng(seed + step)
    n = sum(a * b + b for a, b in itertools.pairwise(layers))
    params = rng.standard_normal(n).astype(dtype)
    params[:2] = [-0.0, np.finfo(dtype).smallest_subnormal]  # bit patterns a cast would lose
    if optimizer == "adam":
        state = {"m": rng.standard_normal(n).astype(dtype),
                 "v": rng.random(n).astype(dtype), "t": np.array(step, dtype=np.int64)}
    else:
        state = {"velocity": rng.standard_normal(n).astype(dtype)}
    state["_scratch"] = np.ones(n, dtype=dtype)
    config = {"model": {"layers": list(layers), "activation": "sigmoid"},
              "optim": {"lr": 0.1, "momentum": None, "nesterov": False},
              "note": "naïve — ünïcode"}
    preprocess = {"mean": rng.random(layers[0]), "std": rng.random(layers[0]).astype(np.float32)}
    return {"step": step, "epoch": 2, "step_in_epoch": step % 5, "seed": seed,
            "layers": list(layers), "activation": "sigmoid", "output": "softmax",
            "loss": "cross_entropy", "params": params, "optimizer_name": optimizer,
            "optimizer_state": state, "config": config,
            "metrics": [{"step": s, "loss": 1.0 / (s + 1)} for s in range(step)],
            "interval": {"steps": step % 4, "loss_sum": 1.0 / 3.0, "correct": 5.0,
                         "samples": 17.0},
            "world_size": 3, "preprocess": preprocess}
