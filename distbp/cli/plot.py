"""`distbp plot`: training curves of one or more runs, drawn from their metrics, as one picture.

    distbp plot runs/default                                 # -> runs/default/metrics.png
    distbp plot runs/a runs/b/metrics.jsonl -o compare.svg   # two runs overlaid, as SVG
    distbp plot runs/a --metric loss lr --log-y loss         # chosen panels, log-scale loss

The drawing is distbp.plot's (matplotlib, the `plot` extra), the files distbp.plot_files'. The
command reads files and writes one, so it creates no communicator: under mpiexec only rank 0
acts, as in `distbp data`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distbp.errors import EXIT_OK, UsageError
from distbp.plot import METRICS, display_name
from distbp.plot_files import DEFAULT_NAME, plot_files

__all__ = ["add_command"]

DESCRIPTION = """Draw metrics of one or more runs against the step from their JSON-lines metrics
files: one panel per metric, train solid, validation dashed, every run in its own colour, named
after the file's directory. Writes a PNG, SVG or PDF (by the output's extension) and prints its
path. Needs matplotlib: pip install 'distbp[plot]'. Bad input (a missing file, a line that is
not JSON, no record with a metric, an unwritable output, another extension, an output that is an
input or an existing file other than a picture of its format) exits with code 2 and one line."""


def add_command(sub) -> None:
    """Register `plot` on the `distbp` subparsers."""
    p = sub.add_parser("plot", help="draw the metric curves of runs as a PNG, SVG or PDF",
                       description=DESCRIPTION)
    p.add_argument("inputs", nargs="+", metavar="METRICS",
                   help="a metrics.jsonl file, or a run directory holding one")
    p.add_argument("-o", "--out", metavar="FILE",
                   help="the picture to write, FILE.png, FILE.svg or FILE.pdf (default: "
                   f"{DEFAULT_NAME} beside the first input's metrics file)")
    p.add_argument("--metric", nargs="+", choices=tuple(METRICS), default=["loss", "accuracy"],
                   metavar="METRIC", help="panels, top to bottom, from: " + ", ".join(METRICS)
                   + " (default: loss accuracy; val records carry loss and accuracy only, "
                   "train records grad_norm only with --clip-grad-norm)")
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
    out = plot_files(args.inputs, args.out, metrics, args.log_y)
    _print_path(out)
    return EXIT_OK


def _print_path(path: Path) -> None:
    """The path and a newline on stdout, as the file system's bytes: a name that is not valid
    UTF-8 prints as it is (as `ls` does), not as an encoding error."""
    sys.stdout.flush()
    raw = getattr(sys.stdout, "buffer", None)
    if raw is None:  # a text-only stream (an embedding): the undecodable bytes as U+FFFD
        print(display_name(str(path)), flush=True)
        return
    raw.write(os.fsencode(path) + b"\n")
    raw.flush()
