"""distbp: data-parallel training of fully-connected networks with hand-written backpropagation.

    from distbp import Network
    net = Network([784, 128, 10], activation="sigmoid", output="softmax", loss="cross_entropy")
    loss, grad = net.loss_and_grad(x, y)
"""

__version__ = "0.1.0"

from distbp.network import Network  # noqa: E402

__all__ = ["Network", "__version__"]
