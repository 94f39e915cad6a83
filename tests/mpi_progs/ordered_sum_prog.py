"""Test program for distbp.ordered_sum, run by tests/test_reproducible.py on 1..5 ranks.

    mpiexec -n 3 python tests/mpi_progs/ordered_sum_prog.py     # rank 0 prints one JSON line

For several part counts and vector lengths, parts whose values span many orders of magnitude
(so that the order of additions shows in the bits) are summed by OrderedSum; rank 0 prints the
SHA-256 of each total, and every rank checks that it holds the same total as rank 0.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from distbp.comm import get_comm
from distbp.ordered_sum import OrderedSum

CASES = [(parts, n, dtype) for parts in (1, 2, 3, 4, 5, 6, 8, 13) for n in (1, 7, 1000)
         for dtype in ("float32", "float64")]


def part(m: int, n: int, dtype: str) -> np.ndarray:
    """Part m: random values times powers of two from 2^-30 to 2^30, the same on every rank;
    with n = 7, element 3 is a NaN whose payload is m + 1 (NaN + NaN keeps the left one's
    payload on x86, so the order of additions shows in it too)."""
    rng = np.random.default_rng([m, n])
    values = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 31, n)).astype(dtype)
    if n == 7:
        bits = values.view(np.uint32 if values.itemsize == 4 else np.uint64)
        quiet = 0x7FC00000 if values.itemsize == 4 else 0x7FF8000000000000
        bits[3] = quiet | (m + 1)
    return values


def main() -> None:
    comm = get_comm(timeout=60)
    out = {}
    for parts, n, dtype in CASES:
        if comm.size > parts:
            continue
        summed = OrderedSum(comm, n, parts, dtype)
        # two ranks of one tree node each swap them (any even count; 3 parts split 2 + 1 do not)
        assert summed.pair == (comm.size == 2 and parts % 2 == 0), (parts, summed.nodes)
        seen: list[int] = []

        def leaf(m: int, buf: np.ndarray) -> None:
            seen.append(m)
            buf[...] = part(m, n, dtype)

        total = np.empty(n, dtype)
        summed.reduce(leaf, total)
        assert seen == list(range(summed.first, summed.stop)), (seen, summed.first)
        reference = total.copy()
        comm.bcast(reference, root=0)
        assert np.array_equal(total.view(np.uint8), reference.view(np.uint8)), "ranks differ"
        out[f"{parts}/{n}/{dtype}"] = hashlib.sha256(total.tobytes()).hexdigest()
    if comm.rank == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
