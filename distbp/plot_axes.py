"""Axes for distbp.plot: the span, ticks and value-to-position mapping of a panel's x or y axis.

Pure numbers, no SVG: separate so the grid arithmetic (1-2-5 steps, decades) can be read and
tested on its own. Every function keeps its arithmetic finite: an axis spans at most ±LIMIT (and,
logarithmic, at least 1/LIMIT); values beyond are not drawable, and a span beyond is ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LIMIT", "Axis", "drawable", "linear_axis", "log_axis"]

# Largest magnitude drawn (and smallest on a log axis: 1/LIMIT): far beyond any real metric, and
# far enough below the float maximum (1.8e308) that a grid of ticks around it stays finite.
LIMIT = 1e300
_TINY = 1e-290  # a linear axis's narrowest span: a grid step below it nears the float minimum


@dataclass(frozen=True)
class Axis:
    """[lo, hi] with tick values inside it; `log`: positions by log10. `spacing` is the linear
    tick step (labels get as many decimals as it needs), 0 on a log axis."""

    lo: float
    hi: float
    ticks: tuple[float, ...]
    log: bool = False
    spacing: float = 0.0

    def frac(self, v: float) -> float:
        """Where v sits between lo (0) and hi (1)."""
        if self.log:
            return math.log10(v / self.lo) / math.log10(self.hi / self.lo)
        return (v - self.lo) / (self.hi - self.lo)

    def drawable(self, v: float) -> bool:
        return drawable(v, self.log)

    def label(self, v: float) -> str:
        if self.log:
            return f"{v:g}"
        decimals = max(0, -math.floor(math.log10(self.spacing) + 1e-9))
        return f"{v:.{decimals}f}" if decimals <= 6 and abs(v) < 1e7 else f"{v:.4g}"


def drawable(v: float, log: bool) -> bool:
    """Whether v can be placed on a linear (|v| <= LIMIT) or log (1/LIMIT <= v <= LIMIT) axis."""
    return (1 / LIMIT if log else -LIMIT) <= v <= LIMIT  # False for nan


def _check_span(lo: float, hi: float, log: bool) -> None:
    """ValueError unless both ends are drawable: beyond them a grid would not stay finite."""
    if not (drawable(lo, log) and drawable(hi, log) and lo <= hi):
        raise ValueError(f"axis span [{lo!r}, {hi!r}] outside "
                         f"[{1 / LIMIT if log else -LIMIT:g}, {LIMIT:g}]")


def linear_axis(lo: float, hi: float, target: int = 5, integer: bool = False) -> Axis:
    """The smallest [a, b] ⊇ [lo, hi] on a grid of 1, 2 or 5 × 10^e, about `target` steps of
    it; lo == hi (or within 1e-9 of each other, relatively: a constant up to rounding; or
    within _TINY, below which a grid step underflows) is widened by 10 % (1 if that is tiny).
    `integer`: a step of at least 1. ValueError for ends beyond ±LIMIT."""
    _check_span(lo, hi, log=False)
    if hi - lo <= max(1e-9 * max(abs(lo), abs(hi)), _TINY):
        pad = abs(lo) * 0.1 if abs(lo) * 0.1 > _TINY else 1.0
        pad = max(pad, 1.0) if integer else pad
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    e = math.floor(math.log10(raw))
    m = next(m for m in (1, 2, 5, 10) if m * 10.0**e >= raw * (1 - 1e-9))
    spacing = max(m * 10.0**e, 1.0) if integer else m * 10.0**e
    digits = max(0, -math.floor(math.log10(spacing) + 1e-9))
    first, last = math.floor(lo / spacing + 1e-9), math.ceil(hi / spacing - 1e-9)
    ticks = tuple(round(k * spacing, digits) + 0.0 for k in range(first, last + 1))  # no -0.0
    return Axis(ticks[0], ticks[-1], ticks, spacing=spacing)


def log_axis(lo: float, hi: float) -> Axis:
    """Log axis around [lo, hi] (both in [1/LIMIT, LIMIT], else ValueError). Within two
    decades: bounds and ticks on the 1-2-5 grid (0.2, 0.5, 1, 2, ...); wider: whole decades, a
    tick at every power of ten (every k-th when there would be more than about 8)."""
    _check_span(lo, hi, log=True)
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    b = max(b, a + 1)
    if b - a > 2:
        every = math.ceil((b - a) / 8)
        ticks = tuple(float(f"1e{e}") for e in range(a, b + every, every))
        return Axis(ticks[0], ticks[-1], ticks, log=True)
    grid = sorted(float(f"{m}e{e}") for e in range(a, b + 2) for m in (1, 2, 5))
    first = max(i for i, g in enumerate(grid) if g <= lo * (1 + 1e-12))
    last = min(i for i, g in enumerate(grid) if g >= hi * (1 - 1e-12))
    ticks = tuple(grid[first:max(last, first + 1) + 1])  # lo == hi on the grid: one step up
    return Axis(ticks[0], ticks[-1], ticks, log=True)
