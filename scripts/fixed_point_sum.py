"""The measurement behind reproducible mode's choice of summation (README, "Reproducible mode"):
distbp.ordered_sum's fixed tree of float additions against an order-independent fixed-point sum
(each part converted to int64 with one shared exponent per vector, summed as integers, which
any allreduce may do in any order, then converted back).

    .venv/bin/python scripts/fixed_point_sum.py [--params 235146] [--parts 8]

Prints, for gradient-like parts (values spread over many orders of magnitude): the time of one
tree addition and of one conversion-and-integer-addition per part, and the largest error of
each result against the exactly rounded sum (math.fsum) of a sample of elements, relative to
that element's own magnitude, in float64.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def parts(count: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n) float64: normal values times 2^k, k uniform in -40..0 per element."""
    return rng.standard_normal((count, n)) * 2.0 ** rng.integers(-40, 1, (count, n))


def tree(values: np.ndarray) -> np.ndarray:
    """distbp.ordered_sum's tree: [lo, hi) = [lo, mid) + [mid, hi)."""
    if len(values) == 1:
        return values[0].copy()
    mid = len(values) // 2
    return tree(values[:mid]) + tree(values[mid:])


def fixed_point(values: np.ndarray) -> np.ndarray:
    """One int64 per element, exponent shared by the vector, log2(parts) bits of headroom."""
    top = max(math.frexp(float(np.abs(values).max()))[1], -1000)
    shift = 62 - math.ceil(math.log2(len(values))) - top
    total = np.zeros(values.shape[1], np.int64)
    for v in values:
        total += np.rint(v * 2.0 ** shift).astype(np.int64)
    return total.astype(np.float64) * 2.0 ** -shift


def seconds(f, repeats: int = 20) -> float:
    f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=235146, help="elements per part (default: "
                   "the Fashion-MNIST preset's 784-256-128-10 network)")
    p.add_argument("--parts", type=int, default=8, help="parts summed (default 8)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    values = parts(args.parts, args.params, rng)
    g32, acc = values[0].astype(np.float32), np.zeros(args.params, np.int64)
    out32, conv = np.empty_like(g32), np.empty(args.params)

    def add() -> None:
        np.add(g32, out32, out=out32)

    def convert() -> None:  # the per-part work of the fixed-point sum, float32 gradient
        np.multiply(g32, 2.0 ** 30, out=conv)
        np.rint(conv, out=conv)
        acc.__iadd__(conv.astype(np.int64))

    print(f"{args.params} float32 elements a part: tree addition {1e3 * seconds(add):.3f} ms, "
          f"fixed-point conversion and integer addition {1e3 * seconds(convert):.3f} ms")
    sample = rng.choice(args.params, 2000, replace=False)
    exact = np.array([math.fsum(values[:, i]) for i in sample])
    scale = np.abs(values[:, sample]).max(axis=0)  # each element's own magnitude
    for name, total in (("fixed tree (float64)", tree(values)),
                        ("fixed point (int64)", fixed_point(values))):
        err = np.abs(total[sample] - exact) / scale
        print(f"{name}: largest error {err.max():.3e} of the element's magnitude")


if __name__ == "__main__":
    main()
