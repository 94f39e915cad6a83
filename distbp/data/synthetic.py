"""Seeded synthetic data sets ("teacher" and "spiral"), in memory or as bounded blocks of rows.

Separate because they are generators, not readers: `synthetic_blocks` makes any number of rows
one block at a time (`distbp data synthetic` writes files larger than memory with it), and the
in-memory `synthetic_teacher` / `synthetic_spiral` are its rows gathered into an ArrayDataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from distbp.data.sources import ArrayDataset
from distbp.errors import ConfigError

__all__ = ["SYNTHETIC_BLOCK_BYTES", "synthetic_blocks", "synthetic_source", "synthetic_spiral",
           "synthetic_teacher"]

_TEACHER_STREAM = 0x7465       # spawn keys: streams that never coincide with epoch permutations
_SPIRAL_STREAM = 0x7370
_TEACHER_HIDDEN = 32
SYNTHETIC_BLOCK_BYTES = 8 << 20  # synthetic rows are made in blocks of ~this much x
_LABEL_ROWS = 1024              # ... and teacher labels this many rows at a time


def synthetic_teacher(n: int, n_features: int, n_classes: int, seed: int) -> ArrayDataset:
    """n random inputs x ~ N(0, 1) (float32) labelled (int64) by a fixed random teacher network
    argmax(tanh(x W1^T) W2^T): a learnable task. The teacher does not depend on n. The rows of
    `synthetic_blocks("teacher", ...)`, held in memory."""
    return _in_memory("teacher", n, n_features, n_classes, seed)


def synthetic_spiral(n: int, n_features: int, n_classes: int, seed: int) -> ArrayDataset:
    """n points on n_classes interleaved spiral arms: a task no linear model solves.

    Row i has class c = i mod n_classes; with t ~ U[0, 1) the first two features are
    t·(cos θ, sin θ) + N(0, 0.02²) noise, θ = 2πc/n_classes + 3πt (1.5 turns); the other
    features are N(0, 0.1²) noise. x float32 (n, n_features), y int64 (n,). The rows of
    `synthetic_blocks("spiral", ...)`, held in memory.
    """
    return _in_memory("spiral", n, n_features, n_classes, seed)


def _in_memory(kind: str, n: int, n_features: int, n_classes: int, seed: int) -> ArrayDataset:
    blocks = synthetic_blocks(kind, n, n_features, n_classes, seed)  # checks the sizes first
    x, y = np.empty((n, n_features), np.float32), np.empty(n, np.int64)
    lo = 0
    for xb, yb in blocks:
        x[lo:lo + len(xb)], y[lo:lo + len(yb)] = xb, yb
        lo += len(xb)
    return ArrayDataset(x, y, source=synthetic_source(kind, n, n_features, n_classes, seed))


def synthetic_source(kind: str, n: int, n_features: int, n_classes: int, seed: int) -> str:
    """How a synthetic data set names itself (the `source` of files and messages)."""
    return (f"synthetic {kind} (n={n}, features={n_features}, classes={n_classes}, "
            f"seed={seed})")


def synthetic_blocks(kind: str, n: int, n_features: int, n_classes: int, seed: int,
                     block_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows of a seeded synthetic data set ("teacher" or "spiral") as (x, y) blocks in row
    order: x float32 (k, n_features), y int64 (k,). A block holds `block_rows` rows (default:
    ~SYNTHETIC_BLOCK_BYTES of x; teacher blocks are rounded up to whole _LABEL_ROWS), so memory
    is one block, whatever n.

    The values depend on (kind, n, n_features, n_classes, seed) only, never on the block size:
    every random draw comes from a seeded stream consumed in row order (NumPy's generators give
    the same values drawn in pieces as at once), and teacher labels are computed _LABEL_ROWS
    rows at a time from row 0, so BLAS rounds each row alike. A shorter set is a prefix of a
    longer one (teacher labels: unless the last, partial label unit rounds an exact argmax tie
    another way). Raises ConfigError (bad sizes) at the call, before any row is made.
    """
    if kind == "teacher":
        if n < 1 or n_features < 1 or n_classes < 2:
            raise ConfigError(f"synthetic data needs n >= 1, features >= 1, classes >= 2; "
                              f"got {n}, {n_features}, {n_classes}")
    elif kind == "spiral":
        if n < 1 or n_features < 2 or n_classes < 2:
            raise ConfigError(f"spiral data needs n >= 1, features >= 2, classes >= 2; "
                              f"got {n}, {n_features}, {n_classes}")
    else:
        raise ConfigError(f"synthetic kind must be 'teacher' or 'spiral', got {kind!r}")
    rows = block_rows or max(1, SYNTHETIC_BLOCK_BYTES // (4 * n_features))
    if kind == "teacher":
        return _teacher_blocks(n, n_features, n_classes, seed, -(-rows // _LABEL_ROWS))
    return _spiral_blocks(n, n_features, n_classes, seed, rows)


def _teacher_blocks(n: int, n_features: int, n_classes: int, seed: int, units: int):
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TEACHER_STREAM,)))
    w1 = rng.standard_normal((_TEACHER_HIDDEN, n_features)) / math.sqrt(n_features)
    w2 = rng.standard_normal((n_classes, _TEACHER_HIDDEN)) / math.sqrt(_TEACHER_HIDDEN)
    rows = units * _LABEL_ROWS
    for lo in range(0, n, rows):
        x = rng.standard_normal((min(rows, n - lo), n_features), dtype=np.float32)
        y = np.empty(len(x), np.int64)
        for a in range(0, len(x), _LABEL_ROWS):
            xa = x[a:a + _LABEL_ROWS].astype(np.float64)
            y[a:a + _LABEL_ROWS] = (np.tanh(xa @ w1.T) @ w2.T).argmax(axis=1)
        yield x, y


def _spiral_blocks(n: int, n_features: int, n_classes: int, seed: int, rows: int):
    seeds = np.random.SeedSequence(seed, spawn_key=(_SPIRAL_STREAM,)).spawn(2)
    radii, noise = (np.random.default_rng(s) for s in seeds)   # 1 and n_features draws a row
    for lo in range(0, n, rows):
        k = min(rows, n - lo)
        y = np.arange(lo, lo + k, dtype=np.int64) % n_classes
        t = radii.random(k)
        theta = 2 * np.pi * y / n_classes + 3 * np.pi * t
        z = noise.standard_normal((k, n_features))
        x = 0.1 * z
        x[:, 0] = t * np.cos(theta) + 0.02 * z[:, 0]
        x[:, 1] = t * np.sin(theta) + 0.02 * z[:, 1]
        yield x.astype(np.float32), y
