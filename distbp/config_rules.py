"""The rules of `distbp train`'s configuration that involve more than one option: exclusive
pairs, options of another optimizer than the chosen one, what a schedule or early stopping
needs, --min-lr against --lr. distbp.config_schema checks each option alone, then these.

    for field, message in cross_problems(cfg): ...     # (the option to name, one line)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from distbp.config_values import option_name

__all__ = ["OPTIMIZER_OPTIONS", "cross_problems"]

# Options of one optimizer, refused with another unless left at their defaults.
OPTIMIZER_OPTIONS = {"sgd": ("momentum", "nesterov"), "adam": ("betas", "eps"),
                     "adamw": ("betas", "eps")}


def _default(c, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(c) if f.name == name)


def _optimizer_problems(c) -> Iterator[tuple[str, str]]:
    """Options set away from their defaults that the chosen optimizer does not have."""
    if c.nesterov and c.optimizer != "sgd":
        yield "nesterov", f"--nesterov needs --optimizer sgd, got --optimizer {c.optimizer}"
    for name in ("momentum", "betas", "eps"):
        if name not in OPTIMIZER_OPTIONS.get(c.optimizer, ()) \
                and getattr(c, name) != _default(c, name):
            users = [k for k, names in OPTIMIZER_OPTIONS.items() if name in names]
            yield name, (f"{option_name(name)} applies to --optimizer {' and '.join(users)} "
                         f"only, got --optimizer {c.optimizer}")
    if c.nesterov and c.momentum == 0:
        yield "nesterov", f"--nesterov needs --momentum > 0, got --momentum {c.momentum}"


def cross_problems(c) -> Iterator[tuple[str, str]]:
    """Checks that involve more than one option."""
    if c.epochs is not None and c.steps is not None:
        yield "steps", (f"--epochs and --steps are mutually exclusive, got --epochs {c.epochs} "
                        f"and --steps {c.steps}")
    if c.val_data is not None and c.val_fraction is not None:
        yield "val_fraction", (f"--val-data and --val-fraction are mutually exclusive, got "
                               f"--val-data {c.val_data!r} and --val-fraction {c.val_fraction}")
    yield from _optimizer_problems(c)
    if c.schedule == "step" and c.lr_step_size is None:
        yield "schedule", "--schedule step needs --lr-step-size N (steps between decays)"
    if c.early_stop is not None and c.data is not None and c.val_data is None \
            and c.val_fraction is None:
        yield "early_stop", (f"--early-stop needs validation data: add --val-data FILE or "
                             f"--val-fraction F (--data {c.data!r} alone has none)")
    yield from _reproducible_problems(c)
    if c.min_lr > c.lr:
        yield "min_lr", f"--min-lr must not exceed --lr, got --min-lr {c.min_lr} > --lr {c.lr}"


def _reproducible_problems(c) -> Iterator[tuple[str, str]]:
    """What --reproducible cannot keep its promise with: another BLAS thread count (a GEMM's
    bits depend on it), buckets reduced while backward runs, pieces cut per rank."""
    if not c.reproducible:
        if c.micro_batches != _default(c, "micro_batches"):
            yield "micro_batches", (f"--micro-batches applies to --reproducible only, got "
                                    f"--micro-batches {c.micro_batches} without it")
        return
    if c.threads is not None and c.threads != 1:
        yield "threads", (f"--reproducible runs one BLAS thread per rank (a GEMM's bits depend "
                          f"on the thread count), got --threads {c.threads}: start one rank per "
                          f"core instead")
    if c.overlap == "on":
        yield "overlap", ("--reproducible sums the micro-batches in a fixed order after "
                          "backward: --overlap on cannot apply (use auto or off)")
    if c.accumulate != 1:
        yield "accumulate", (f"--reproducible already works through each rank's micro-batches one "
                             f"at a time: set their number per global batch with --micro-batches, "
                             f"not --accumulate {c.accumulate}")
