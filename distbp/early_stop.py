"""Early stopping, decided from the run's validation records alone.

After each validation (one per epoch) the trainer asks `stop_reason(records, ...)` whether to stop.
The answer is a pure function of the "val" records in order, so it needs no state of its own:

- every rank holds the same records (the validation sums are reduced by one allreduce before
  the record is formed), so every rank reaches the same decision at the same step;
- the records travel in every checkpoint (/metrics), so a resumed run replays the same history
  and stops at the same epoch as an uninterrupted one, and a run resumed from its own
  early-stop checkpoint stops again at once instead of training on.

The rule is Keras' and Lightning's `EarlyStopping`: the first validation sets the best value; a
later one improves on it when it is better by MORE than `min_delta` (val_loss lower, val_accuracy
higher) and then becomes the best; otherwise it counts as one validation without improvement.
The run stops when `patience` validations in a row have not improved.

    reason = stop_reason(records, patience=3, metric="val_loss", min_delta=0.0)
    # "early stop after epoch 7: val_loss did not improve by more than 0 for 3 validations
    #  (best 0.2134 at epoch 4)"  or None: carry on
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

__all__ = ["METRICS", "Standing", "standing", "stop_reason"]

# --early-stop-metric -> (field of the "val" record, +1 if higher is better else -1)
METRICS = {"val_loss": ("loss", -1), "val_accuracy": ("accuracy", +1)}


class Standing(NamedTuple):
    """Where the validation history stands: the last validation's epoch, the best value and its
    epoch, and how many validations since then have not improved on it."""

    epoch: int
    best: float
    best_epoch: int
    waited: int


def standing(records: Iterable[Mapping], metric: str, min_delta: float) -> Standing | None:
    """The standing after the "val" records among `records` (others are skipped), in order;
    None when there is no validation yet."""
    key, sign = METRICS[metric]
    now = None
    for r in records:
        if r.get("kind") != "val":
            continue
        value, epoch = float(r[key]), int(r["epoch"])
        if now is None or sign * (value - now.best) > min_delta:
            now = Standing(epoch, value, epoch, 0)
        else:
            now = Standing(epoch, now.best, now.best_epoch, now.waited + 1)
    return now


def stop_reason(records: Iterable[Mapping], patience: int | None, metric: str,
                min_delta: float) -> str | None:
    """The one-line reason to stop after the last validation in `records`, or None (also when
    `patience` is None: early stopping off)."""
    if patience is None:
        return None
    now = standing(records, metric, min_delta)
    if now is None or now.waited < patience:
        return None
    return (f"early stop after epoch {now.epoch}: {metric} did not improve by more than "
            f"{min_delta:g} for {now.waited} validations (best {now.best:.6g} at epoch "
            f"{now.best_epoch})")
