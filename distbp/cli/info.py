"""`distbp info FILE`: a checkpoint (recognised by its header) as `distbp inspect` shows it, any
other file as `distbp data info` describes it (HDF5 or NPZ data).

    distbp info runs/mine/checkpoints/ckpt-00000100.h5
    distbp info data/fashion-mnist-train.h5 --json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distbp import checkpoint
from distbp.ckpt_integrity import MAGIC
from distbp.cli import data as data_command
from distbp.cli import inspect as inspect_command
from distbp.errors import UsageError
from distbp.paths import check_regular

__all__ = ["add_command"]


def add_command(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint (as inspect) or a data file (as "
                       "data info)", description="Describe FILE: a checkpoint (recognised by its "
                       "header) as `distbp inspect` does, any other file as `distbp data info` "
                       "(an HDF5 or NPZ data file).")
    p.add_argument("file", help="a checkpoint, or an HDF5 (.h5) or NPZ (.npz) data file")
    data_command.add_info_options(p)
    p.set_defaults(run=run)


def _is_checkpoint(path: str) -> bool:
    """Whether the file starts with a checkpoint's header (an unreadable one is not)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False  # `data info` names the problem


def run(args: argparse.Namespace, job) -> int:
    """`distbp info FILE`: inspect a checkpoint, describe anything else as a data file."""
    if Path(args.file).is_dir():
        raise UsageError(_directory_hint(Path(args.file)))
    if Path(args.file).exists():  # a FIFO would block the read below forever
        check_regular(args.file, f"data file {args.file!r}")
    if _is_checkpoint(args.file):
        return inspect_command.run(argparse.Namespace(checkpoint=args.file, json=args.json), job)
    return data_command.run_info(args, job)


def _directory_hint(path: Path) -> str:
    """The one-line error for `distbp info DIR`: what to give instead, naming the newest
    checkpoint and the plot command when DIR is a run directory (or its checkpoints/)."""
    hints = []
    for ckpt_dir in (path / "checkpoints", path):
        ckpts = checkpoint.list_checkpoints(ckpt_dir)
        if ckpts or (ckpt_dir.name == "checkpoints" and ckpt_dir.is_dir()):
            hints.append(f"`distbp info {ckpts[-1] if ckpts else ckpt_dir / 'ckpt-….h5'}`")
            break
    if (path / "metrics.jsonl").is_file():
        hints.append(f"`distbp plot {path}` for its curves")
    return (f"'{path}' is a directory; give a checkpoint or a data file (HDF5 or NPZ)"
            + (", e.g. " + " or ".join(hints) if hints else ""))
