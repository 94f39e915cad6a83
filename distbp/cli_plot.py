"""`distbp plot`: training curves of one or more runs, drawn from their metrics, as one SVG.

    distbp plot runs/default                                 # -> runs/default/metrics.svg
    distbp plot runs/a runs/b/metrics.jsonl -o compare.svg   # two runs overlaid
    distbp plot runs/a --metric loss lr --log-y loss         # chosen panels, log-scale loss

The reading and drawing are distbp.plot's; this module holds the command: which files, which
panels, where the picture goes. It reads files and writes one, so it creates no communicator:
under mpiexec only rank 0 acts, as in `distbp data`. The SVG is written under a temporary name in
the output's directory and renamed onto it (distbp.durable.replace_durably): a viewer never
sees half a picture, and a failed write leaves the previous one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from distbp.durable import replace_durably
from distbp.errors import EXIT_OK, UsageError
from distbp.plot import METRICS, read_run, render_svg

__all__ = ["add_commands", "plot", "run_names"]


def add_commands(sub) -> None:
    """Register `plot` on the `distbp` subparsers."""
    p = sub.add_parser("plot", help="draw the loss and accuracy curves of runs as an SVG",
                       description="Draw metrics of one or more runs against the step from "
                       "their JSON-lines metrics files: one panel per metric, train solid, "
                       "validation dashed, every run in its own colour, named after the file's "
                       "directory. Writes a self-contained SVG and prints its path. Bad input "
                       "(a missing file, a line that is not JSON, no record with a metric, an "
                       "unwritable output) exits with code 2 and one line.")
    p.add_argument("inputs", nargs="+", metavar="METRICS",
                   help="a metrics.jsonl file, or a run directory holding one")
    p.add_argument("-o", "--out", metavar="FILE.svg",
                   help="the SVG to write (default: metrics.svg beside the first input's "
                   "metrics file)")
    p.add_argument("--metric", nargs="+", choices=tuple(METRICS), default=["loss", "accuracy"],
                   metavar="METRIC", help="panels, top to bottom, from: " + ", ".join(METRICS)
                   + " (default: loss accuracy; val records carry loss and accuracy only)")
    p.add_argument("--log-y", nargs="+", choices=tuple(METRICS), default=[], metavar="METRIC",
                   help="draw these panels on a log-scale y axis (values <= 0 are not drawn)")
    p.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace, job) -> int:
    if job.rank != 0:  # one picture per job, not per rank
        return EXIT_OK
    metrics = list(dict.fromkeys(args.metric))  # in order, once each
    stray = [m for m in args.log_y if m not in metrics]
    if stray:
        raise UsageError(f"--log-y {' '.join(stray)}: not among the panels drawn "
                         f"(--metric {' '.join(metrics)})")
    out = plot(args.inputs, args.out, metrics, args.log_y)
    print(out, flush=True)
    return EXIT_OK


def plot(inputs: Sequence[str], out: str | None, metrics: Sequence[str],
         log: Sequence[str] = ()) -> Path:
    """Read every input's metrics, draw them, write the SVG atomically; returns its path.

    `inputs`: metrics files or run directories; `out`: None for metrics.svg beside the first
    metrics file. UsageError (one line) for bad input or an output that cannot be written; no
    file is written then."""
    files = [_metrics_file(p) for p in inputs]
    runs = [read_run(f, name) for f, name in zip(files, run_names(files))]
    svg = render_svg(runs, metrics, log)
    target = Path(out) if out is not None else files[0].parent / "metrics.svg"
    _write(target, svg, "-o" if out is not None else "output")
    return target


def _metrics_file(given: str) -> Path:
    """The metrics file an input names: itself, or <dir>/metrics.jsonl for a run directory."""
    path = Path(given)
    if path.is_dir():
        if not (path / "metrics.jsonl").is_file():
            raise UsageError(f"run directory '{given}' has no metrics.jsonl")
        return path / "metrics.jsonl"
    if not path.exists():
        raise UsageError(f"metrics file '{given}': not found")
    return path


def run_names(files: Sequence[Path]) -> list[str]:
    """Legend names: each file's directory name; where different directories share a name,
    the directory as given; where one file comes twice, a " #n" suffix. Always distinct."""
    dirs = [f.resolve().parent for f in files]
    names = [d.name or str(d) for d in dirs]
    shared = {n for n, d in zip(names, dirs) if any(m == n and e != d for m, e in zip(names, dirs))}
    names = [str(f.parent) if n in shared else n for f, n in zip(files, names)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} #{seen[n]}"
    return names


def _write(out: Path, text: str, option: str) -> None:
    """Write `text` to a temporary file beside `out`, then replace_durably onto it."""
    if out.is_dir():
        raise UsageError(f"{option} '{out}' is a directory; give a file name, e.g. "
                         f"'{out / 'metrics.svg'}'")
    if not out.parent.is_dir():
        raise UsageError(f"{option} '{out}': directory '{out.parent}' does not exist")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # a new file's usual mode, unlike mkstemp
            f.write(text)
        replace_durably(tmp, out)
    except OSError as e:
        raise UsageError(f"{option} '{out}': cannot write there ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
