"""The batch plan (pure functions, no MPI): steps per epoch, the epoch permutation, and the
shards each rank reads, covering every sample exactly once for any number of ranks.

Data sources: tests/test_data_sources.py; their validation: tests/test_data_validation.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from distbp.data import (
    batch_bounds,
    epoch_permutation,
    shard_bounds,
    shard_indices,
    step_cursor,
    steps_per_epoch,
)
from distbp.errors import ConfigError

# ----------------------------------------------------------------------------- batch plan

PLAN_NS = [1, 2, 3, 4, 5, 7, 10, 17, 64]
PLAN_BATCHES = [1, 2, 3, 4, 7, 16, 100]


def plan_cases():
    """(n, batch, drop_last) for which an epoch has at least one step."""
    for n, batch, drop_last in itertools.product(PLAN_NS, PLAN_BATCHES, (False, True)):
        if not (drop_last and batch > n):
            yield n, batch, drop_last


def test_steps_per_epoch_is_ceil_or_floor():
    for n, batch, drop_last in plan_cases():
        expected = n // batch if drop_last else (n + batch - 1) // batch
        assert steps_per_epoch(n, batch, drop_last) == expected


def test_steps_per_epoch_rejects_batch_larger_than_data_with_drop_last():
    with pytest.raises(ConfigError, match="exceeds the 5 rows"):
        steps_per_epoch(5, 6, drop_last=True)
    assert steps_per_epoch(5, 6, drop_last=False) == 1
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        steps_per_epoch(5, 0, drop_last=False)


def test_shard_bounds_give_the_first_count_mod_size_ranks_one_more():
    assert [shard_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [shard_bounds(2, r, 5) for r in range(5)] == [(0, 1), (1, 2), (2, 2), (2, 2), (2, 2)]
    assert shard_bounds(0, 0, 3) == (0, 0)
    with pytest.raises(ValueError):
        shard_bounds(4, 3, 3)


def test_batch_bounds_make_the_last_batch_partial():
    assert batch_bounds(0, 10, 4) == (0, 4)
    assert batch_bounds(2, 10, 4) == (8, 10)
    with pytest.raises(ValueError):
        batch_bounds(3, 10, 4)


def check_one_step(perm, step, batch, size, drop_last):
    """Assert the shard contract for one step; return the rows of all ranks."""
    n = len(perm)
    lo = step * batch
    count = min(batch, n - lo)
    where = np.empty(n, dtype=np.int64)
    where[perm] = np.arange(n)          # position of each row in the permutation
    shards = [shard_indices(perm, step, batch, r, size) for r in range(size)]
    sizes = [len(s) for s in shards]
    assert sizes == [count // size + (r < count % size) for r in range(size)]
    assert max(sizes) - min(sizes) <= 1
    next_position = lo
    for shard in shards:
        assert shard.dtype == np.int64
        assert np.all(np.diff(shard) > 0)               # sorted, no repeats
        positions = np.sort(where[shard])
        expected = np.arange(next_position, next_position + len(shard))
        np.testing.assert_array_equal(positions, expected)   # contiguous, in rank order
        next_position += len(shard)
    union = np.sort(np.concatenate(shards))
    np.testing.assert_array_equal(union, np.sort(perm[lo:lo + count]))
    return union


def test_shards_cover_every_sample_exactly_once_per_epoch():
    for (n, batch, drop_last), size in itertools.product(plan_cases(), range(1, 6)):
        perm = epoch_permutation(3, 1, n)
        steps = steps_per_epoch(n, batch, drop_last)
        rows = np.concatenate([check_one_step(perm, s, batch, size, drop_last)
                               for s in range(steps)])
        covered = steps * batch if drop_last else n
        assert len(rows) == covered, (n, batch, drop_last, size)
        np.testing.assert_array_equal(np.sort(rows), np.sort(perm[:covered]))


def test_union_of_shards_is_the_same_global_batch_for_any_number_of_ranks():
    perm = epoch_permutation(0, 0, 23)
    for step in range(steps_per_epoch(23, 5, False)):
        unions = [np.sort(np.concatenate([shard_indices(perm, step, 5, r, size)
                                          for r in range(size)])) for size in range(1, 6)]
        for union in unions[1:]:
            np.testing.assert_array_equal(union, unions[0])


def test_step_cursor_maps_a_global_step_to_epoch_and_step():
    steps = steps_per_epoch(10, 3, False)      # 4
    assert [step_cursor(s, steps) for s in (0, 3, 4, 9)] == [(0, 0), (0, 3), (1, 0), (2, 1)]


def test_epoch_permutation_is_deterministic_and_differs_across_epochs_and_seeds():
    a = epoch_permutation(7, 2, 1000)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, epoch_permutation(7, 2, 1000))
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    np.testing.assert_array_equal(a, np.random.default_rng([7, 2]).permutation(1000))
    assert not np.array_equal(a, epoch_permutation(7, 3, 1000))
    assert not np.array_equal(a, epoch_permutation(8, 2, 1000))
    with pytest.raises(ConfigError):
        epoch_permutation(-1, 0, 10)
