"""distbp: data-parallel training of fully-connected networks with hand-written backpropagation.

The same script runs as one process and under `mpiexec -n 4 python my_script.py`:

    import distbp
    result = distbp.fit([64, 128, 10], x, y, epochs=5, batch_size=256, lr=0.05, run_dir="runs/a")
    net = distbp.load(result.checkpoint)       # a checkpoint's Network, with its preprocessing
    distbp.evaluate(net, x_test, y_test)       # {"loss", "accuracy", "samples"}, every rank
    distbp.predict(net, x_new)                 # output activations (N, n_out), every rank

Public names:
    fit(model, x, y, *, x_val, y_val, **options) -> FitResult   train; options = TOML keys
    load(checkpoint) -> Network                                  verified checkpoint's model
    evaluate(net, x, y, batch_size=256) -> dict                  mean loss and accuracy
    predict(net, x, batch_size=256) -> ndarray                   output activations
    Network(layers, activation, output, loss, seed, dtype)       the engine: params, views,
                                                                 loss_and_grad, predict
    FitResult                                                    network, records, checkpoint,
                                                                 exit_code
    __version__

They are imported on first use (PEP 562): importing the package costs nothing, so the `distbp`
entry point can install its signal handler before NumPy loads (distbp.entry).
"""

from __future__ import annotations

import importlib

from distbp.version import __version__

_LAZY = {"Network": "distbp.network", "fit": "distbp.api", "load": "distbp.api",
         "evaluate": "distbp.api", "predict": "distbp.api", "FitResult": "distbp.api"}

__all__ = ["FitResult", "Network", "__version__", "evaluate", "fit", "load", "predict"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'distbp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
