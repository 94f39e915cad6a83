"""Training curves of distbp runs: reading their metrics files and drawing them with matplotlib.

Reads the JSON-lines records a training writes (distbp.metrics: "kind" "train" or "val", "step",
"loss", "accuracy", "lr", ...) and draws one panel per metric against the step, stacked, every
run overlaid in its own colour: train solid, validation dashed.

Contract, checked by tests/test_plot.py through `figure`'s Figure and the written files:
  - `figure` returns a matplotlib Figure with one Axes per metric, in the order given, and one
    Line2D per (run, kind) curve of it, in run order, train before val, labelled
    "<run> train" / "<run> validation"; its data are the records' (step, value) in file order;
  - values that cannot be drawn (NaN or ±inf from a diverged run, null, beyond ±LIMIT; on a log
    axis below 1/LIMIT, so <= 0 too) are NaN in the line's data, which breaks the curve there,
    and are counted in its label ("(3 not drawn)"). A finite value near the float limit is a
    diverged run as surely as inf, and no axis reaching it stays readable;
  - a curve of at most FEW records has a marker on each; a longer one is a plain line, except
    that a record alone between two breaks gets a marker (else it would not show) from an extra
    Line2D labelled "_alone" (so the legend leaves it out);
  - run names are shown literally: undecodable bytes and control characters become U+FFFD, and
    "$" starts no mathematics;
  - `save` writes PNG, SVG (text kept as text, so it can be searched) or PDF, without dates, so
    the same records give the same file.
matplotlib is optional (the `plot` extra) and imported only when drawing: training never pays
for it, and without it drawing is a UsageError saying how to install it.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from distbp.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "KINDS", "LIMIT", "METRICS", "NEEDS_MATPLOTLIB", "Run", "Series",
           "display_name", "drawable", "figure", "read_run", "require_matplotlib", "save",
           "series_of"]

KINDS = ("train", "val")
# Numeric fields of train records (loss and accuracy also of val records), as distbp.metrics
# writes them, with the panel titles they get.
METRICS = {"loss": "loss", "accuracy": "accuracy", "lr": "learning rate",
           "samples_per_s": "samples per second", "compute_ms": "compute ms per step",
           "comm_ms": "communication ms per step",
           "grad_norm": "gradient norm before clipping"}  # with --clip-grad-norm only
FORMATS = ("png", "svg", "pdf")
NEEDS_MATPLOTLIB = "distbp plot needs matplotlib: pip install 'distbp[plot]'"
# Largest magnitude drawn (and smallest on a log axis: 1/LIMIT): far beyond any real metric, and
# far enough below the float maximum (1.8e308) that an axis around it stays finite.
LIMIT = 1e300


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
    """`name` fit for a one-line legend and for SVG text: every undecodable byte of a file name
    (a surrogate escape), control character (XML 1.0 forbids most) and U+FFFE/U+FFFF becomes
    U+FFFD."""
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


def drawable(v: float, log: bool) -> bool:
    """Whether v can be placed on a linear (|v| <= LIMIT) or log (1/LIMIT <= v <= LIMIT) axis."""
    return (1 / LIMIT if log else -LIMIT) <= v <= LIMIT  # False for nan


# ----------------------------------------------------------------------------- drawing

FEW = 30  # a curve of at most this many records marks every one of them
WIDTH, PANEL_H, ENTRY_H = 9.0, 2.6, 0.22  # inches: figure width, least panel height, legend row
NAME_CHARS = 32  # longer run names are cut in the legend (the file name says the rest)
# Text stays text in an SVG; no dates or random ids, so the same records give the same file.
_RC = {"svg.fonttype": "none", "svg.hashsalt": "distbp"}
_UNDATED = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


def figure(runs: Sequence[Run], metrics: Sequence[str], log: Sequence[str] = ()) -> Figure:
    """One panel per metric (stacked in the given order, sharing x = step, spanning every
    record's step), every run's curves of that metric overlaid, coloured by run order. `log`:
    metrics drawn on a log y axis. UsageError if a metric is in no record, or if matplotlib is
    not installed."""
    panels = []
    for metric in metrics:
        series = series_of(runs, metric)
        if not series:
            files = ", ".join(f"'{r.path}'" for r in runs)
            raise UsageError(f"no train or val records with '{metric}' in {files}")
        panels.append((metric, series))
    matplotlib, figure_class = _matplotlib()
    colours = {r.name: f"C{i % 10}" for i, r in enumerate(runs)}
    heights = [max(PANEL_H, 0.7 + ENTRY_H * len(series)) for _, series in panels]
    with matplotlib.rc_context(_RC):
        fig = figure_class(figsize=(WIDTH, sum(heights)), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                            gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, (metric, series) in zip(axes, panels):
            _panel(ax, metric, series, metric in log, colours)
        axes[-1].set_xlabel("step")
    steps = [t for _, series in panels for s in series for t in s.steps]
    if min(steps) < max(steps):  # every record's step, drawn or not (one step: matplotlib's)
        pad = 0.03 * (max(steps) - min(steps))
        axes[0].set_xlim(min(steps) - pad, max(steps) + pad)
    return fig


def require_matplotlib() -> None:
    """UsageError with the install line unless matplotlib can be imported (check before work
    whose result would be drawn)."""
    _matplotlib()


def _matplotlib():
    """(matplotlib, its Figure class), imported now; UsageError with the install line if absent.
    A Figure made directly, not through pyplot, draws with Agg and needs no display."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(NEEDS_MATPLOTLIB) from None
    return matplotlib, Figure


def _panel(ax, metric: str, series: Sequence[Series], log: bool,
           colours: dict[str, str]) -> None:
    """Title, curves, axes and legend of one metric's panel."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(METRICS[metric] + (" (log scale)" if log else ""), loc="left")
    drawn = []
    for s in series:
        values = [v if drawable(v, log) else math.nan for v in s.values]
        hidden = sum(math.isnan(v) for v in values)
        drawn += [v for v in values if not math.isnan(v)]
        kind = "train" if s.kind == "train" else "validation"
        label = f"{_shorten(s.run)} {kind}" + (f" ({hidden} not drawn)" if hidden else "")
        few = len(values) <= FEW
        ax.plot(s.steps, values, color=colours[s.run], linewidth=1.6, label=label,
                linestyle="-" if s.kind == "train" else "--", marker="o" if few else "None",
                markersize=3.5)
        alone = [] if few else _alone(values)
        if alone:  # their own unlabelled markers: the legend shows the curve's style alone
            ax.plot([s.steps[i] for i in alone], [values[i] for i in alone], linestyle="",
                    marker="o", markersize=3.5, color=colours[s.run], label="_alone")
    if log:
        _log_y(ax, drawn)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(True, color="#ddd", linewidth=0.6)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                       fontsize="small")
    for text in legend.get_texts():  # a "$" in a run name is a dollar, not mathematics
        text.set_parse_math(False)


def _log_y(ax, drawn: Sequence[float]) -> None:
    """A log y axis labelled in plain numbers (0.2, 1, 1e-05), also at 2 and 5 of each decade
    when the values span at most 2.5 decades; [1, 10] when there is nothing to scale it to."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if not drawn:  # matplotlib would warn that it has no positive values to scale to
        ax.set_ylim(1.0, 10.0)
    elif max(drawn) <= 300 * min(drawn):
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, which="minor", color="#eee", linewidth=0.6)


def _alone(values: Sequence[float]) -> list[int]:
    """Indices of the drawable values between two undrawable ones (or the ends): a line needs
    two points, so without a marker these would not show."""
    def ok(i: int) -> bool:
        return 0 <= i < len(values) and not math.isnan(values[i])

    return [i for i in range(len(values)) if ok(i) and not (ok(i - 1) or ok(i + 1))]


def _shorten(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


def save(fig: Figure, file: IO[bytes], fmt: str) -> None:
    """Write `fig` to the open binary `file` as `fmt`, one of FORMATS."""
    matplotlib, _ = _matplotlib()
    with matplotlib.rc_context(_RC):
        fig.savefig(file, format=fmt, dpi=120, metadata=_UNDATED[fmt])
