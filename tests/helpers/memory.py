"""How much memory a piece of code allocates while it runs: the peak tracemalloc sees (every
thread) above what was held before.

    grown = peak_growth(lambda i: loader.get(i), range(12, 60))   # after a warm-up of your own
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterable

__all__ = ["peak_growth"]


def peak_growth(call: Callable[[int], object], steps: Iterable[int]) -> int:
    """Bytes the traced peak rose above the start while `call(i)` ran for every i in `steps`."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in steps:
            call(i)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
