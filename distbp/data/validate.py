"""`validate_dataset`: does a data source fit a network? Checked before any collective call.

Separate from the sources because it is the one pass that may read every row: the label range
and NaN/inf scans read in bounded chunks (`plan.row_blocks`), each rank only its share of the
rows, so a whole-file check costs O(file / ranks) per rank.
"""

from __future__ import annotations

import math

import numpy as np

from distbp.data.plan import row_blocks, shard_bounds
from distbp.data.sources import Dataset, data_error

__all__ = ["validate_dataset"]


def _check_labels(ds: Dataset, n_outputs: int | None, share: tuple[int, int]) -> None:
    if ds.y_dtype.kind not in "iu":
        raise data_error(ds.source, f"labels y have dtype {ds.y_dtype}; 1-D y must hold integer "
                                    f"class labels (store targets as 2-D (rows, outputs))")
    lo, hi = math.inf, -math.inf          # ints after the first chunk of a non-empty share
    for rows in row_blocks(share[1], ds.y_dtype.itemsize, share[0]):
        y = ds.read_y(rows)
        lo, hi = min(lo, int(y.min())), max(hi, int(y.max()))
    # One output (a binary sigmoid unit) takes labels 0 and 1, like Network does.
    classes = None if n_outputs is None else max(n_outputs, 2)
    if lo <= hi and (lo < 0 or (classes is not None and hi >= classes)):
        need = f"0..{classes - 1} for {n_outputs} outputs" if classes is not None else ">= 0"
        raise data_error(ds.source, f"labels y out of range: min {lo}, max {hi}; need {need}")


def _check_finite(ds: Dataset, share: tuple[int, int], dtype, scale: float | None) -> None:
    """NaN/inf in float x or y, and values that overflow the run's `dtype` once x is scaled
    (float64 1e39 in a float32 run; uint8 times a scale of 1e300)."""
    big = float(np.finfo(dtype).max)
    scan_x = ds.x_dtype.kind == "f" or (scale is not None and scale * _largest(ds.x_dtype) > big)
    scan_y = ds.y_dtype.kind == "f"
    if not (scan_x or scan_y):
        return
    row_bytes = (ds.n_features * ds.x_dtype.itemsize * scan_x
                 + math.prod(ds.y_shape[1:]) * ds.y_dtype.itemsize)
    for rows in row_blocks(share[1], row_bytes, share[0]):
        x, y = ds.read(rows) if scan_x else (None, ds.read_y(rows))
        for name, a in (("x", x), ("y", y)):
            if a is None or not (a.dtype.kind == "f" or name == "x"):
                continue
            bad = np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))
            if len(bad):
                raise data_error(ds.source, f"{name} contains NaN or inf "
                                            f"(first at row {rows[bad[0]]})")
            factor = scale if name == "x" and scale is not None else 1.0
            flat = np.abs(a.reshape(len(a), -1), dtype=np.float64)
            bad = np.flatnonzero((flat > big / factor).any(axis=1))  # no overflow: > a bound
            if len(bad):
                raise data_error(ds.source, f"{name} holds values beyond {np.dtype(dtype).name}'s "
                                            f"range{' once scaled' if factor != 1.0 else ''} "
                                            f"(first at row {rows[bad[0]]})")


def _largest(dtype: np.dtype) -> float:
    """The largest magnitude a value of the integer or float `dtype` can have."""
    return float(np.iinfo(dtype).max if dtype.kind in "iu" else np.finfo(dtype).max)


def validate_dataset(ds: Dataset, n_inputs: int | None, n_outputs: int | None, *,
                     int_labels_required: bool = False, check_values: bool = True,
                     rank: int = 0, size: int = 1, dtype="float64",
                     scale: float | None = None) -> None:
    """Raise DataError unless `ds` fits a network with n_inputs inputs and n_outputs outputs.

    1-D y must be an integer dtype with labels in [0, n_outputs) (float labels are rejected,
    even whole numbers: convert them once, in the file). 2-D y must have width n_outputs and is
    refused when `int_labels_required`. The label range is always scanned (y only); with
    `check_values`, float x and y are scanned for NaN/inf, chunk by chunk, and for values beyond
    the run's `dtype` once x is multiplied by `scale` (the preprocessing's, None: none).

    The layout checks (sizes, dtypes, widths) look at every row count on every rank. The value
    scans read only rank `rank`'s contiguous share of `size`, shard_bounds(n, rank, size): each
    rank reads O(file / size) rows, and the caller combines the ranks' outcomes (`cli.agree`:
    the lowest failing rank's message is printed; the shares are in row order, so for one kind
    of problem it names the first bad row, as a whole scan would). The defaults scan every row.
    """
    if ds.n == 0:
        raise data_error(ds.source, "empty data (0 rows)")
    if n_inputs is not None and ds.n_features != n_inputs:
        raise data_error(ds.source, f"x has {ds.n_features} features but the network's input "
                                    f"layer has {n_inputs}")
    share = shard_bounds(ds.n, rank, size)
    if len(ds.y_shape) == 1:
        _check_labels(ds, n_outputs, share)
    elif int_labels_required:
        raise data_error(ds.source, f"y holds targets of shape {ds.y_shape}; integer class labels "
                                    f"of shape ({ds.n},) are required")
    elif n_outputs is not None and ds.y_shape[1] != n_outputs:
        raise data_error(ds.source, f"targets y have width {ds.y_shape[1]} but the network's "
                                    f"output layer has {n_outputs}")
    if check_values:
        _check_finite(ds, share, dtype, scale)
