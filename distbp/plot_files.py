"""The files of `distbp plot`: which metrics files the inputs name, where the picture goes and in
which format (by its extension: .png, .svg or .pdf), and writing it. The drawing is distbp.plot's.

    out = plot_files(["runs/a", "runs/b/metrics.jsonl"], "compare.svg", ["loss", "accuracy"])

The picture is written under a temporary name in the output's directory and renamed onto it
(distbp.durable.replace_durably): a viewer never sees half a picture, and a failed write leaves
the previous one. The output may replace an earlier picture of its format, never an input nor
any other file (a typo in -o must not turn a metrics file or a checkpoint into a drawing).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from distbp.durable import replace_durably, umask
from distbp.errors import UsageError
from distbp.paths import check_output, check_regular, check_regular_or_absent
from distbp.plot import FORMATS, display_name, figure, read_run, save

__all__ = ["DEFAULT_NAME", "check_picture", "picture_format", "plot_files", "run_names",
           "write_picture"]

DEFAULT_NAME = "metrics.png"
# How each format's files begin (an SVG after an optional BOM and white space).
SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF-",), "svg": (b"<?xml", b"<svg")}


def plot_files(inputs: Sequence[str], out: str | None, metrics: Sequence[str],
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


def check_picture(out: Path, option: str) -> str:
    """The format a picture written to `out` will have, after refusing (UsageError, one line)
    what `distbp plot -o` refuses; call it before the work that draws the picture."""
    return _check_target(out, (), option)


def write_picture(fig, out: Path, option: str) -> None:
    """Matplotlib Figure `fig` into `out` (checked again: time has passed), atomically."""
    _write(out, fig, _check_target(out, (), option), option)


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
    check_output(out, f"{option} '{out}'")  # no symlink, no shared directory
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
    """Save the Figure `fig` as `fmt` to a new temporary file beside `out`, then
    replace_durably onto it."""
    tmp = None
    try:  # an exclusive, unpredictable name: a planted symlink is never followed
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        tmp = Path(name)
        os.fchmod(fd, 0o666 & ~umask())  # a new file's usual mode, unlike mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            save(fig, f, fmt)
        replace_durably(tmp, out)
    except OSError as e:
        raise UsageError(f"{option} '{out}': cannot write there ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # gone already after the rename
