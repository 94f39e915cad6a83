"""The batch plan: which rows each rank reads at each step, as pure functions of integers.

Every rank computes the same permutation of the n rows for an epoch, cuts it into global
batches and reads its own contiguous slice of each. A cursor (epoch, step_in_epoch) is
divmod(global_step, steps_per_epoch): an exact resume needs no RNG state beyond the seed.
Rank and size are passed in; nothing here knows of MPI, files or data sources, so the plan is
testable alone. `row_blocks` (bounded runs of rows for whole-data scans) is index arithmetic
of the same kind, used by `HDF5Dataset.load` and `validate_dataset`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from distbp.errors import ConfigError

__all__ = ["SCAN_BYTES", "batch_bounds", "epoch_permutation", "micro_cuts", "row_blocks",
           "shard_bounds", "shard_indices", "step_cursor", "steps_per_epoch"]

SCAN_BYTES = 16 << 20          # validation reads at most ~this many bytes of rows at a time


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Row order for `epoch`: (n,) int64, identical on every rank and machine for one NumPy."""
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n: int, batch: int, drop_last: bool) -> int:
    """ceil(n / batch) steps, or floor with `drop_last` (which drops the last partial batch)."""
    if batch < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch}")
    steps = n // batch if drop_last else -(-n // batch)
    if steps == 0:
        why = f"exceeds the {n} rows with drop_last" if n else "has no data (0 rows)"
        raise ConfigError(f"batch size {batch} {why}: an epoch would have no step")
    return steps


def step_cursor(global_step: int, steps: int) -> tuple[int, int]:
    """(epoch, step_in_epoch) of a global step, with `steps` = steps_per_epoch(...)."""
    return divmod(global_step, steps)


def batch_bounds(step_in_epoch: int, n: int, batch: int) -> tuple[int, int]:
    """[lo, hi) positions in the epoch's permutation; the last batch may be partial."""
    lo = step_in_epoch * batch
    if not 0 <= lo < n:
        raise ValueError(f"step {step_in_epoch} is outside an epoch of {n} rows in batches "
                         f"of {batch}")
    return lo, min(lo + batch, n)


def shard_bounds(count: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous slice of `count` rows: the first count % size ranks get
    one row more; a rank gets 0 rows when count < size."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, {size})")
    base, extra = divmod(count, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def micro_cuts(count: int, parts: int, rank: int, size: int) -> tuple[int, ...]:
    """Reproducible mode's cut of a global batch of `count` rows: micro-batch m (of `parts`)
    holds positions shard_bounds(count, m, parts) of the batch, whoever computes it, and rank
    takes the contiguous run of micro-batches shard_bounds(parts, rank, size). Returns
    (offset of its first micro-batch in the batch, (0, c_1, ..., rows)): the micro-batches'
    bounds within the rank's rows, one more entry than micro-batches it takes."""
    first, stop = shard_bounds(parts, rank, size)
    base = shard_bounds(count, first, parts)[0] if first < parts else count
    ends = [shard_bounds(count, m, parts)[1] - base for m in range(first, stop)]
    return base, (0, *ends)


def shard_indices(perm: np.ndarray, step_in_epoch: int, batch: int, rank: int,
                  size: int) -> np.ndarray:
    """Sorted row indices (int64) this rank reads for this step. Sorted because HDF5 reads want
    increasing indices; the gradient SUM over the shard does not depend on row order."""
    lo, hi = batch_bounds(step_in_epoch, len(perm), batch)
    a, b = shard_bounds(hi - lo, rank, size)
    return np.sort(perm[lo + a:lo + b])


def row_blocks(n: int, row_bytes: int, start: int = 0) -> Iterator[np.ndarray]:
    """Row indices start..n-1 (int64) in consecutive runs of ~SCAN_BYTES // row_bytes rows (at
    least one), so a scan's memory is bounded by one run."""
    step = max(1, SCAN_BYTES // max(1, row_bytes))
    for lo in range(start, n, step):
        yield np.arange(lo, min(lo + step, n), dtype=np.int64)
