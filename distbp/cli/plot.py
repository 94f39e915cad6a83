"""`distbp plot`: training curves of one or more runs, drawn from their metrics, as one picture.

    distbp plot runs/default                                 # -> runs/default/metrics.png
    distbp plot runs/a runs/b/metrics.jsonl -o compare.svg   # two runs overlaid, as SVG
    distbp plot runs/a --metric loss lr --log-y loss         # chosen panels, log-scale loss

The reading and drawing are distbp.plot's (matplotlib, the `plot` extra); this module holds the
command: which files, which panels, where the picture goes and in which format (the output's
extension: .png, .svg or .pdf). It reads files and writes one, so it creates no communicator:
under mpiexec only rank 0 acts, as in `distbp data`. The picture is written under a temporary
name in the output's directory and renamed onto it (distbp.durable.replace_durably): a viewer
never sees half a picture, and a failed write leaves the previous one. The output may replace an
earlier picture of its format, never an input nor any other file (a typo in -o must not turn a
metrics file or a checkpoint into a drawing).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from distbp.durable import replace_durably
from distbp.errors import EXIT_OK, UsageError
from distbp.paths import check_regular, check_regular_or_absent
from distbp.plot import FORMATS, METRICS, display_name, figure, read_run, save

__all__ = ["DEFAULT_NAME", "add_command", "picture_format", "plot", "run_names"]

DESCRIPTION = """Draw metrics of one or more runs against the step from their JSON-lines metrics
files: one panel per metric, train solid, validation dashed, every run in its own colour, named
after the file's directory. Writes a PNG, SVG or PDF (by the output's extension) and prints its
path. Needs matplotlib: pip install 'distbp[plot]'. Bad input (a missing file, a line that is
not JSON, no record with a metric, an unwritable output, another extension, an output that is an
input or an existing file other than a picture of its format) exits with code 2 and one line."""

DEFAULT_NAME = "metrics.png"
# How each format's files begin (an SVG after an optional BOM and white space).
SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF-",), "svg": (b"<?xml", b"<svg")}


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
    out = plot(args.inputs, args.out, metrics, args.log_y)
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


def plot(inputs: Sequence[str], out: str | None, metrics: Sequence[str],
         log: Sequence[str] = ()) -> Path:
    """Read every input's metrics, draw them, write the picture atomically; returns its path.

    `inputs`: metrics files or run directories; `out`: None for DEFAULT_NAME beside the first
    metrics file; its extension picks the format. UsageError (one line) for bad input, a missing
    matplotlib or an output that cannot be written; no file is written then."""
    files = [_metrics_file(p) for p in inputs]
    target = Path(out) if out is not None else files[0].parent / DEFAULT_NAME
    option = "-o" if out is not None else "output"
    fmt = _check_target(target, files, option)
    runs = [read_run(f, name) for f, name in zip(files, run_names(files))]
    _write(target, figure(runs, metrics, log), fmt, option)
    return target


def picture_format(out: Path, option: str = "-o") -> str:
    """The format `out` names by its extension (any case): one of plot.FORMATS, else
    UsageError."""
    fmt = out.suffix[1:].lower()
    if fmt not in FORMATS:
        raise UsageError(f"{option} '{out}': give a name ending in "
                         f"{', '.join('.' + f for f in FORMATS)} (the format of the picture)")
    return fmt


def _metrics_file(given: str) -> Path:
    """The metrics file an input names: itself, or <dir>/metrics.jsonl for a run directory."""
    path = Path(given)
    if path.is_dir():
        if not (path / "metrics.jsonl").is_file():
            raise UsageError(f"run directory '{given}' has no metrics.jsonl")
        return path / "metrics.jsonl"
    check_regular(path, f"metrics file '{given}'")  # a FIFO would block the read forever
    return path


def run_names(files: Sequence[Path]) -> list[str]:
    """Legend names: each file's directory name; where different directories share a name,
    the directory as given; where one file comes twice, a " #n" suffix. Always distinct, and
    fit for a legend and SVG text (plot.display_name: undecodable bytes and control characters
    as U+FFFD)."""
    dirs = [f.resolve().parent for f in files]
    names = [display_name(d.name or str(d)) for d in dirs]
    shared = {n for n, d in zip(names, dirs) if any(m == n and e != d for m, e in zip(names, dirs))}
    names = [display_name(str(f.parent)) if n in shared else n for f, n in zip(files, names)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} #{seen[n]}"
    return names


def _check_target(out: Path, inputs: Sequence[Path], option: str) -> str:
    """The format `out` is written in, after a UsageError (one line) unless it may be written:
    a name with a picture's extension in an existing directory, not one of the `inputs` (by
    inode: links and other spellings too), and, if it exists, a picture in that format (or
    empty): an earlier picture may be replaced, nothing else."""
    if out.is_dir():
        raise UsageError(f"{option} '{out}' is a directory; give a file name, e.g. "
                         f"'{out / DEFAULT_NAME}'")
    if not out.parent.is_dir():
        raise UsageError(f"{option} '{out}': directory '{out.parent}' does not exist")
    exists = check_regular_or_absent(out, f"{option} '{out}'")  # never read a FIFO
    for given in inputs if exists else ():
        if os.path.samefile(out, given):
            raise UsageError(f"{option} '{out}' is the metrics file '{given}' being plotted; "
                             "give another file name")
    fmt = picture_format(out, option)
    if not exists:
        return fmt
    head = _head(out, fmt, option)
    if fmt == "svg":
        head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head and not head.startswith(SIGNATURES[fmt]):
        raise UsageError(f"{option} '{out}' exists and is not a {fmt.upper()} (it starts with "
                         f"{head[:16]!r}); not overwriting it: give another file name")
    return fmt


def _head(path: Path, fmt: str, option: str) -> bytes:
    """The first bytes of an existing output, enough to recognise a picture."""
    try:
        with open(path, "rb") as f:
            return f.read(256)
    except OSError as e:
        raise UsageError(f"{option} '{path}': cannot read it to check that it is a "
                         f"{fmt.upper()} ({e.strerror or e})") from None


def _write(out: Path, fig, fmt: str, option: str) -> None:
    """Save the Figure `fig` as `fmt` to a temporary file beside `out`, then replace_durably
    onto it."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a new file's usual mode, unlike mkstemp
            save(fig, f, fmt)
        replace_durably(tmp, out)
    except OSError as e:
        raise UsageError(f"{option} '{out}': cannot write there ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
