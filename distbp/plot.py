"""Training curves as a self-contained SVG: the reading and drawing behind `distbp plot`.

Reads the JSON-lines records a training writes (distbp.metrics: "kind" "train" or "val", "step",
"loss", "accuracy", "lr", ...) and draws one panel per metric against the step, stacked, every
run overlaid in its own colour: train solid, validation dashed with a dot per record. Plain
string building with the standard library, so a login node without a plotting stack can draw it.

Every element says what it is, so a picture can be checked by code as well as by eye:
  - a panel is `<g class="panel" data-metric="loss" data-scale="linear|log">`;
  - each tick is `<g class="tick" data-axis="x|y" data-value="0.5">` and its line sits at that
    value's pixel (x ticks: a vertical line, y ticks: a horizontal one);
  - each curve is ONE `<path class="series" data-run=... data-kind="train|val">` whose vertices
    ("M x y" starts a piece, "L x y" continues it) are the records' (step, value), in file
    order, mapped through the panel's axes. A piece of one record is drawn as a zero-length
    line ("M x y L x y", a dot through its round cap).
Values that cannot be drawn (NaN or ±inf from a diverged run, null, beyond ±1e300; on a log axis
below 1e-300, so <= 0 too) break the curve at that record and are counted in the legend: a finite
value near the float limit is a diverged run as surely as inf, and no axis grid reaching it stays
finite. Run names are shown with undecodable bytes and characters XML forbids replaced by U+FFFD.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from distbp.errors import UsageError
from distbp.plot_axes import LIMIT, Axis, drawable, linear_axis, log_axis

__all__ = ["KINDS", "LIMIT", "METRICS", "Axis", "Run", "Series", "display_name", "linear_axis",
           "log_axis", "read_run", "render_svg", "series_of"]

KINDS = ("train", "val")
# Numeric fields of train records (loss and accuracy also of val records), as distbp.metrics
# writes them, with the panel titles they get.
METRICS = {"loss": "loss", "accuracy": "accuracy", "lr": "learning rate",
           "samples_per_s": "samples per second", "compute_ms": "compute ms per step",
           "comm_ms": "communication ms per step",
           "grad_norm": "gradient norm before clipping"}  # with --clip-grad-norm only
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
WIDTH, PANEL_H = 880, 270  # pixels: the picture's width, each panel's height
LEFT, TOP, PLOT_W, PLOT_H = 76, 34, 580, 190  # a panel's plotting box, from the panel's top
LEGEND_X = LEFT + PLOT_W + 18


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Run:
    """One metrics file: `name` for the legend, its train and val records in file order."""

    name: str
    path: Path
    records: tuple[dict, ...]


def read_run(path: Path, name: str) -> Run:
    """The train and val records of a metrics JSON-lines file (other kinds are skipped).

    Raises UsageError (one line naming the file and line) for an unreadable file, a line that
    is not a JSON object, a train/val record without a numeric "step" or with a metric that is
    neither a number nor null. An unterminated last line that does not parse is skipped: the
    run may be writing it right now."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"metrics file '{path}': not found") from None
    except UnicodeDecodeError:
        raise UsageError(f"metrics file '{path}': not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"metrics file '{path}': cannot read ({e.strerror or e})") from None
    lines = text.split("\n")  # a terminated file ends with "": only the last may be partial
    records = [_record(path, n, line, partial=n == len(lines))
               for n, line in enumerate(lines, 1) if line.strip()]
    return Run(name, path, tuple(r for r in records if r is not None))


def _record(path: Path, n: int, line: str, partial: bool) -> dict | None:
    """Line n as a checked train/val record; None for other kinds and a partial last line."""
    try:
        record = json.loads(line)  # NaN and Infinity parse: json.dumps writes them so
    except ValueError as e:
        if partial:
            return None
        raise UsageError(f"metrics file '{path}': line {n} is not JSON ({e.args[0]})") from None
    if not isinstance(record, dict):
        raise UsageError(f"metrics file '{path}': line {n} is not a JSON object")
    if record.get("kind") not in KINDS:
        return None  # progress of other tools, future kinds: not curves against the step
    where = f"metrics file '{path}': line {n}"
    if not _is_number(record.get("step")):
        raise UsageError(f"{where}: {record['kind']} record without a numeric 'step'")
    for key in ("step", *METRICS):
        if key in record and not (_is_number(record[key]) or record[key] is None):
            raise UsageError(f"{where}: '{key}' is not a number ({_shown(record[key])})")
        if _is_number(record.get(key)) and not _is_float(record[key]):
            raise UsageError(f"{where}: '{key}' is too large for a float ({_shown(record[key])})")
    if not abs(record["step"]) <= LIMIT:  # also nan, inf: a step places the record
        raise UsageError(f"{where}: 'step' is not a finite number within ±{LIMIT:g} "
                         f"({_shown(record['step'])})")
    return record


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_float(v: int | float) -> bool:
    """Whether a JSON number converts to a float (an integer literal of 400 digits does not)."""
    try:
        float(v)
    except OverflowError:
        return False
    return True


def _shown(v: object) -> str:
    """A value as the file has it, cut to 40 characters for a one-line message."""
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:39] + "…"


def display_name(name: str) -> str:
    """`name` fit for XML text and attributes: every undecodable byte of a file name (a
    surrogate escape), control character (XML 1.0 forbids most; a one-line legend shows none)
    and U+FFFE/U+FFFF becomes U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff"
                   else c for c in name)


@dataclass(frozen=True)
class Series:
    """One curve: `metric` of a run's `kind` records, as recorded (values may be nan/inf)."""

    run: str
    kind: str
    metric: str
    steps: tuple[float, ...]
    values: tuple[float, ...]


def series_of(runs: Sequence[Run], metric: str) -> list[Series]:
    """Every (run, kind) curve of `metric`, in run order, train before val; a kind whose records
    lack the metric (val records have no lr) gives no curve. null values read as nan."""
    out = []
    for run in runs:
        for kind in KINDS:
            rows = [r for r in run.records if r["kind"] == kind and metric in r]
            if rows:
                out.append(Series(run.name, kind, metric, tuple(float(r["step"]) for r in rows),
                                  tuple(math.nan if r[metric] is None else float(r[metric])
                                        for r in rows)))
    return out


# ----------------------------------------------------------------------------- axes

def _value_axis(series: Sequence[Series], log: bool) -> Axis:
    """The y axis of a panel: around every drawable value, [0, 1] (log: [1, 10]) if none."""
    values = [v for s in series for v in s.values if drawable(v, log)]
    if log:
        return log_axis(min(values), max(values)) if values else log_axis(1.0, 10.0)
    return linear_axis(min(values), max(values)) if values else linear_axis(0.0, 1.0)


# ----------------------------------------------------------------------------- drawing

def render_svg(runs: Sequence[Run], metrics: Sequence[str], log: Sequence[str] = ()) -> str:
    """The SVG text: one panel per metric (stacked in the given order), x = step shared by all
    panels, every run's curves of that metric overlaid (run names must differ: the colour goes
    by name). `log`: metrics drawn on a log axis. UsageError if a metric is in no record."""
    panels = []
    for metric in metrics:
        series = series_of(runs, metric)
        if not series:
            files = ", ".join(f"'{r.path}'" for r in runs)
            raise UsageError(f"no train or val records with '{metric}' in {files}")
        panels.append((metric, series))
    steps = [t for _, series in panels for s in series for t in s.steps]
    x = linear_axis(min(steps), max(steps), target=8, integer=True)
    colours = {r.name: i % len(PALETTE) for i, r in enumerate(runs)}
    # a panel grows below its plot when its legend is longer than the plot is tall
    heights = [max(PANEL_H, TOP + 18 * len(series) + 16) for _, series in panels]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{sum(heights)}" '
           f'viewBox="0 0 {WIDTH} {sum(heights)}" font-family="sans-serif" font-size="12">',
           f"<title>{_xml('distbp metrics: ' + ', '.join(r.name for r in runs))}</title>",
           "<defs>", *_dot_markers(), "</defs>",
           f'<rect width="{WIDTH}" height="{sum(heights)}" fill="white"/>']
    for i, (metric, series) in enumerate(panels):
        out += _panel(sum(heights[:i]), metric, series, x, _value_axis(series, metric in log),
                      colours)
    return "\n".join(out + ["</svg>"]) + "\n"


def _dot_markers() -> list[str]:
    """A dot marker per palette colour (`context-stroke` is too new for many viewers)."""
    return [f'<marker id="dot{i}" viewBox="0 0 6 6" refX="3" refY="3" markerWidth="6" '
            f'markerHeight="6" markerUnits="userSpaceOnUse"><circle cx="3" cy="3" r="2.5" '
            f'fill="{c}"/></marker>' for i, c in enumerate(PALETTE)]


def _stroke(kind: str, colour: int) -> str:
    """Stroke attributes: train solid; validation dashed with a dot at every record."""
    style = (f'fill="none" stroke="{PALETTE[colour]}" stroke-width="1.8" '
             'stroke-linecap="round" stroke-linejoin="round"')
    if kind == "val":
        style += ''.join(f' marker-{at}="url(#dot{colour})"' for at in ("start", "mid", "end"))
        style += ' stroke-dasharray="6 4"'
    return style


def _panel(top: float, metric: str, series: Sequence[Series], x: Axis, y: Axis,
           colours: dict[str, int]) -> list[str]:
    """One panel's markup: title, frame, ticks, grid, curves and legend."""
    box = (LEFT, top + TOP, PLOT_W, PLOT_H)
    out = [f'<g class="panel" data-metric="{metric}" '
           f'data-scale="{"log" if y.log else "linear"}">',
           f'<text x="{LEFT}" y="{top + TOP - 12}" font-size="14" font-weight="bold">'
           f"{METRICS[metric]}{' (log scale)' if y.log else ''}</text>",
           *_axes(box, x, y),
           f'<text x="{LEFT + PLOT_W / 2:g}" y="{top + TOP + PLOT_H + 36}" '
           'text-anchor="middle">step</text>']
    for n, s in enumerate(series):
        d, hidden = _path_data(s, box, x, y)
        style = _stroke(s.kind, colours[s.run])
        out.append(f'<path class="series" data-run={_attr(s.run)} data-kind="{s.kind}" '
                   f'data-metric="{metric}" d="{d}" {style}>'
                   f"<title>{_xml(s.run)} {s.kind} {metric}</title></path>")
        out += _legend_entry(top + TOP + 8 + 18 * n, s, style, hidden)
    return out + ["</g>"]


def _axes(box: tuple, x: Axis, y: Axis) -> list[str]:
    """x ticks below the plotting box and y ticks left of it, with grid lines; then its frame."""
    left, top, w, h = box
    out = []
    for v in x.ticks:
        px = _px(left + w * x.frac(v))
        out.append(f'<g class="tick" data-axis="x" data-value="{v!r}">'
                   f'<line x1="{px}" y1="{top}" x2="{px}" y2="{top + h + 5}" stroke="#ddd"/>'
                   f'<text x="{px}" y="{top + h + 18}" text-anchor="middle">{x.label(v)}</text>'
                   "</g>")
    for v in y.ticks:
        py = _px(top + h * (1 - y.frac(v)))
        out.append(f'<g class="tick" data-axis="y" data-value="{v!r}">'
                   f'<line x1="{left - 5}" y1="{py}" x2="{left + w}" y2="{py}" stroke="#ddd"/>'
                   f'<text x="{left - 8}" y="{py}" dy="0.35em" text-anchor="end">{y.label(v)}'
                   "</text></g>")
    return out + [f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" '
                  'stroke="#444"/>']


def _path_data(s: Series, box: tuple, x: Axis, y: Axis) -> tuple[str, int]:
    """The path's d ("M x y L x y ..."; a new M after every undrawable value) and how many
    values were not drawn."""
    left, top, w, h = box
    parts: list[str] = []
    hidden = piece = 0  # piece: vertices in the current piece of the curve
    for t, v in zip(s.steps, s.values):
        if not y.drawable(v):
            hidden += 1
            parts += _end_piece(parts, piece)
            piece = 0
            continue
        parts.append(f"{'L' if piece else 'M'}{_px(left + w * x.frac(t))} "
                     f"{_px(top + h * (1 - y.frac(v)))}")
        piece += 1
    return " ".join(parts + _end_piece(parts, piece)), hidden


def _end_piece(parts: list[str], piece: int) -> list[str]:
    """A piece of one vertex gets a zero-length line to itself, so its round cap shows it."""
    return ["L" + parts[-1][1:]] if piece == 1 else []


def _legend_entry(y: float, s: Series, style: str, hidden: int) -> list[str]:
    """A line sample and "run train|validation", with the count of values not drawn."""
    name = s.run if len(s.run) <= 24 else s.run[:23] + "…"
    kind = "train" if s.kind == "train" else "validation"
    note = (f" ({hidden} not drawn)<title>{hidden} value(s) NaN, infinite, null, beyond "
            f"±{LIMIT:g} or, on a log axis, below {1 / LIMIT:g}</title>") if hidden else ""
    return [f'<g class="legend"><path d="M{LEGEND_X} {y} L{LEGEND_X + 12} {y} L{LEGEND_X + 24} '
            f'{y}" {style}/><text x="{LEGEND_X + 30}" y="{y}" dy="0.35em">'
            f"{_xml(name)} {kind}{note}</text></g>"]


def _xml(text: str) -> str:
    """Text content: display_name's replacements, then &, < and > escaped."""
    return escape(display_name(text))


def _attr(text: str) -> str:
    """A quoted attribute value: display_name's replacements, then quoted and escaped."""
    return quoteattr(display_name(text))


def _px(v: float) -> str:
    """A pixel coordinate, to 1/100 of a pixel, without trailing zeros."""
    return f"{v:.2f}".rstrip("0").rstrip(".")
