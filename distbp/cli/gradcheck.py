"""`distbp gradcheck`: backpropagation against central finite differences (distbp.gradcheck).

    distbp gradcheck --layers 784,30,10 --activation sigmoid --output sigmoid --loss mse
"""

from __future__ import annotations

import argparse

from distbp.activations import OUTPUTS
from distbp.cli.args import (
    add_network_arguments,
    int_range,
    nonneg_float,
    positive_float,
    seed_int,
)
from distbp.config_values import parse_layers
from distbp.errors import EXIT_ERROR, EXIT_OK, UsageError
from distbp.gradcheck import gradcheck
from distbp.losses import LOSSES
from distbp.session import check_model_memory

__all__ = ["add_command"]

MAX_GRADCHECK_ROWS = 1 << 16  # every parameter's two perturbed passes run over all of them

DESCRIPTION = """Build a network, compare backpropagation with central finite differences on random
data, print per block (W_j, b_j) the normwise relative error |g_bp - g_fd| / (|g_bp| + |g_fd|)
(2-norms), the max absolute error and, for information, the worst elementwise relative error
(floor 1e-8); exit 1 when the worst normwise error is above --tolerance."""


def eps_float(text: str) -> float:
    """argparse type: a finite-difference step, 0 < eps <= 1 (a larger step measures nothing
    of the derivative)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text!r}")
    return value


def add_command(sub) -> None:
    p = sub.add_parser("gradcheck", help="compare backprop with finite differences (float64)",
                       description=DESCRIPTION)
    add_network_arguments(p, layers="784,30,10", activation="sigmoid")
    p.add_argument("--output", default="softmax", choices=OUTPUTS,
                   help="output-layer activation (default softmax)")
    p.add_argument("--loss", default="cross_entropy", choices=LOSSES,
                   help="loss on the output activations (default cross_entropy)")
    p.add_argument("--batch", type=int_range(1, MAX_GRADCHECK_ROWS), default=8,
                   help=f"random rows, 1 to {MAX_GRADCHECK_ROWS} (default 8)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the initial weights and the random rows (default 0)")
    p.add_argument("--eps", type=eps_float, default=1e-6,
                   help="finite-difference step, > 0 (default 1e-6)")
    p.add_argument("--tolerance", type=nonneg_float, default=1e-7,
                   help="largest normwise relative error that passes, >= 0 (default 1e-7)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, job) -> int:
    """Print the table; exit 1 when the worst normwise error is above --tolerance."""
    layers = parse_layers(args.layers)
    check_model_memory(layers, "float64", args.batch)
    try:
        rows = gradcheck(layers, args.activation, args.output, args.loss, batch=args.batch,
                         seed=args.seed, eps=args.eps)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"gradcheck {','.join(map(str, layers))} {args.activation}/{args.output}/{args.loss}"
          f" float64, {args.batch} rows, eps {args.eps:g}")
    print(f"{'block':>6} {'params':>8} {'normwise rel error':>19} {'max abs error':>14}"
          f" {'max elementwise rel error':>26}")
    for r in rows:
        print(f"{r.name:>6} {r.size:>8} {r.rel_error:>19.3e} {r.max_abs_error:>14.3e}"
              f" {r.max_elem_rel_error:>26.3e}")
    errors = [r.rel_error for r in rows]
    worst = float("nan") if any(e != e for e in errors) else max(errors)  # NaN is the worst
    passed = worst <= args.tolerance  # False for NaN: a failed comparison never passes
    print(f"worst normwise relative error {worst:.3e} (tolerance {args.tolerance:g}): "
          f"{'OK' if passed else 'FAIL'}")
    return EXIT_OK if passed else EXIT_ERROR
