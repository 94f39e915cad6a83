#!/usr/bin/env python3
"""Draw a `distbp train --trace` file as a timeline picture (PNG, SVG or PDF): one row per rank
and lane, a bar per span, for a look at a run without a browser (Perfetto or chrome://tracing
show the same file interactively).

    python scripts/trace_timeline.py trace.json timeline.png                # steps 2 to 4
    python scripts/trace_timeline.py trace.json timeline.png --steps 10:13  # steps 10, 11, 12

Rows, top to bottom: each rank's computation (data, forward, backward layer by layer, the wait
for the allreduce, the update) and then its allreduces (each bucket from its start to the moment
the rank saw it complete). Where a bucket's bar lies under a backward bar of the same rank, the
communication overlapped the computation. Exit 2 with one line for a file that is no trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLOURS = {"data": "#9e9e9e", "forward": "#4c72b0", "backward": "#55a868", "wait": "#c44e52",
           "update": "#8172b2", "allreduce": "#dd8452", "step": None}


def fail(message: str) -> None:
    """One line on stderr and exit 2, as distbp's own commands do with bad input."""
    print(f"trace_timeline: {message}", file=sys.stderr)
    sys.exit(2)


def colour(name: str) -> str | None:
    """The bar colour of a span, by the first word of its name (None: not drawn)."""
    return COLOURS.get(name.split()[0], "#bbbbbb")


def load(path: Path) -> list[dict]:
    """The complete ("X") events of a trace file; exit 2 naming what is wrong."""
    try:
        events = json.loads(path.read_text())["traceEvents"]
        spans = [e for e in events if e.get("ph") == "X"]
        for e in spans:
            float(e["ts"]), float(e["dur"]), int(e["pid"]), int(e["tid"]), str(e["name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a distbp trace ({type(e).__name__}: {e})")
    return spans


def window(spans: list[dict], first: int, stop: int) -> tuple[float, float]:
    """[start, end] microseconds of steps first..stop-1 (1-based, as the trace names them),
    over every rank; exit 2 when the trace holds none of them."""
    inside = [e for e in spans if e["name"].startswith("step ")
              and first <= int(e["name"].split()[1]) < stop]
    if not inside:
        fail(f"the trace has no step in {first}..{stop - 1}")
    return (min(e["ts"] for e in inside), max(e["ts"] + e["dur"] for e in inside))


def draw(spans: list[dict], lo: float, hi: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = sorted({(e["pid"], e["tid"]) for e in spans if e["tid"] in (0, 1)})
    y_of = {row: i for i, row in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(rows) + 1.6))
    for e in spans:
        c, row = colour(e["name"]), (e["pid"], e["tid"])
        if c is None or row not in y_of or e["ts"] + e["dur"] < lo or e["ts"] > hi:
            continue
        ax.broken_barh([((e["ts"] - lo) / 1e3, e["dur"] / 1e3)], (y_of[row] - 0.4, 0.8),
                       facecolors=c, edgecolors="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)),
                  [f"rank {p}: {'compute' if t == 0 else 'allreduce'}" for p, t in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, (hi - lo) / 1e3)
    ax.set_xlabel("ms")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items() if c],
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=6, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="a file written by distbp train --trace")
    p.add_argument("out", type=Path, help="the picture: .png, .svg or .pdf")
    p.add_argument("--steps", default="2:5", help="FIRST:STOP, 1-based steps FIRST..STOP-1 "
                   "(default 2:5, after the first step's warm-up)")
    args = p.parse_args(argv)
    try:
        first, stop = (int(v) for v in args.steps.split(":"))
    except ValueError:
        p.error(f"--steps: FIRST:STOP, two integers, got {args.steps!r}")
    if not 1 <= first < stop:
        p.error(f"--steps: need 1 <= FIRST < STOP, got {args.steps!r}")
    if args.out.suffix.lower() not in (".png", ".svg", ".pdf"):
        p.error(f"{args.out}: the picture's name must end in .png, .svg or .pdf")
    spans = load(args.trace)
    lo, hi = window(spans, first, stop)
    draw(spans, lo, hi, args.out, f"{args.trace.name}: steps {first}-{stop - 1}")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
