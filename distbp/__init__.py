"""distbp: data-parallel training of fully-connected networks with hand-written backpropagation.

    from distbp import Network
    net = Network([784, 128, 10], activation="sigmoid", output="softmax", loss="cross_entropy")
    loss, grad = net.loss_and_grad(x, y)

`Network` is imported on first use (PEP 562): importing the package costs nothing, so the
`distbp` entry point can install its signal handler before NumPy loads (distbp.entry).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Network", "__version__"]


def __getattr__(name: str):
    if name == "Network":
        from distbp.network import Network

        globals()["Network"] = Network  # later look-ups skip this function
        return Network
    raise AttributeError(f"module 'distbp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "Network"])
