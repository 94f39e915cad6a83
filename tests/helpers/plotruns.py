"""Shared by tests/test_plot.py and tests/test_plot_cli.py: two real training runs to draw, and
`distbp plot` run in-process with what it wrote.

    dirs = train_two_runs(tmp_path)                  # tmp_path/a, tmp_path/b
    out = plot_ok(capsys, str(dirs[0]), "-o", str(tmp_path / "p.svg"))
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from helpers.trainruns import ok, train, write_data

from distbp.cli import main

__all__ = ["SIGNATURE", "plot_ok", "svg_texts", "train_two_runs"]

# How a file of each format begins.
SIGNATURE = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-", "svg": b"<?xml"}


def train_two_runs(tmp: Path) -> list[Path]:
    """Two real serial runs, tmp/a and tmp/b (different learning rates, b with gradient
    clipping, so its train records carry grad_norm): 4 epochs of 7 steps, a train record every
    2 steps, a validation record per epoch."""
    data = write_data(tmp / "d.h5", 140)
    dirs = [tmp / "a", tmp / "b"]
    for run_dir, options in zip(dirs, (["--lr", "0.1"], ["--lr", "0.02", "--clip-grad-norm",
                                                          "0.5"])):
        ok(train(0, data, run_dir, "--epochs", "4", "--batch-size", "16", "--val-fraction",
                 "0.2", "--log-every", "2", "--progress", "lines", *options))
    return dirs


def plot_ok(capsys, *argv: str) -> Path:
    """Run `distbp plot ARGV` in this process, check it exited 0 and printed only a path; that
    path."""
    assert main(["plot", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and not captured.err, captured
    return Path(captured.out.strip())


def svg_texts(path: Path) -> list[str]:
    """Every <text> element's text in the SVG file, in document order."""
    return ["".join(t.itertext()) for t in ET.parse(path).getroot().iter(
        "{http://www.w3.org/2000/svg}text")]
