"""`distbp plot`: the SVG drawn from real training runs' metrics is well-formed XML, has one curve
per (run, series), and every vertex, mapped back through the picture's own axis ticks, is a
record's (step, value); diverged values break a curve without breaking the plot; bad input exits
2 with one line and writes nothing; the output never replaces an input or a file that is not an
SVG; the write is atomic; under mpiexec one rank writes."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_mpi
from helpers.trainruns import clean_env, metrics, ok, train, write_data

from distbp import cli_plot
from distbp.cli import main
from distbp.plot import linear_axis, log_axis

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two real serial runs ('a', 'b': different learning rates, b with gradient clipping, so
    its train records carry grad_norm), 4 epochs of 7 steps, a validation record per epoch."""
    tmp = tmp_path_factory.mktemp("plot")
    data = write_data(tmp / "d.h5", 140)
    dirs = [tmp / "a", tmp / "b"]
    for run_dir, options in zip(dirs, (["--lr", "0.1"], ["--lr", "0.02", "--clip-grad-norm",
                                                          "0.5"])):
        ok(train(0, data, run_dir, "--epochs", "4", "--batch-size", "16", "--val-fraction",
                 "0.2", "--log-every", "2", "--progress", "lines", *options))
    return dirs


def _plot(capsys, *argv: str) -> ET.Element:
    """Run `distbp plot ARGV`, check it printed the path it wrote, parse that SVG."""
    assert main(["plot", *argv]) == 0
    out = Path(capsys.readouterr().out.strip())
    return ET.parse(out).getroot()  # raises on XML that is not well-formed


def _axis(panel: ET.Element, which: str):
    """(px -> value, value units per pixel: log10 units on a log axis) from the panel's own
    ticks (data-value at its line's pixel), after checking every tick lies on the line through
    the first and the last (linear, or log10 on a log axis)."""
    log = which == "y" and panel.get("data-scale") == "log"
    f = math.log10 if log else float
    ticks = [(float(g.find(f"{SVG}line").get("x1" if which == "x" else "y1")),
              f(float(g.get("data-value"))))
             for g in panel.iter(f"{SVG}g") if g.get("data-axis") == which]
    (p0, v0), (p1, v1) = ticks[0], ticks[-1]
    scale = (v1 - v0) / (p1 - p0)
    for p, v in ticks:  # pixels are written to 1/100: within 0.006 px
        assert v == pytest.approx(v0 + (p - p0) * scale, abs=0.006 * abs(scale))
    return (lambda p: v0 + (p - p0) * scale), abs(scale)


def _pieces(d: str) -> list[list[tuple[float, float]]]:
    """A path's pieces ("M" starts one), each its vertices; the zero-length line that makes a
    one-record piece visible is folded back into one vertex."""
    pieces: list[list[tuple[float, float]]] = []
    for cmd, x, y in re.findall(r"([ML])([-\d.]+) ([-\d.]+)", d):
        if cmd == "M":
            pieces.append([])
        pieces[-1].append((float(x), float(y)))
    return [p[:1] if len(p) == 2 and p[0] == p[1] else p for p in pieces]


def _curves(root: ET.Element) -> dict[tuple[str, str, str], tuple[ET.Element, ET.Element]]:
    """(metric, run, kind) -> (its panel, its path); asserts one path per key."""
    curves = {}
    for panel in root.iter(f"{SVG}g"):
        if panel.get("class") == "panel":
            for path in panel.iter(f"{SVG}path"):
                if path.get("class") == "series":
                    key = (panel.get("data-metric"), path.get("data-run"), path.get("data-kind"))
                    assert key not in curves, key
                    curves[key] = (panel, path)
    return curves


def _check_curve(panel, path, records: list[dict], metric: str) -> None:
    """The path's vertices, mapped back through the axes, are the drawable records' (step,
    value), in order; an undrawable value (non-finite, beyond ±1e300, or below 1e-300 on a log
    axis) starts a piece."""
    (x, x_per_px), (y, y_per_px) = _axis(panel, "x"), _axis(panel, "y")
    log = panel.get("data-scale") == "log"
    drawn = [(r["step"], math.log10(r[metric]) if log else r[metric]) for r in records
             if abs(r[metric]) <= 1e300 and (r[metric] >= 1e-300 or not log)]
    vertices = [v for piece in _pieces(path.get("d")) for v in piece]
    assert len(vertices) == len(drawn)
    for (px, py), (step, value) in zip(vertices, drawn):  # to the 1/100 px of the file
        assert x(px) == pytest.approx(step, abs=0.006 * x_per_px)
        assert y(py) == pytest.approx(value, abs=0.006 * y_per_px)


@pytest.mark.parametrize("log", [False, True], ids=["linear", "log-loss"])
def test_every_vertex_maps_back_to_its_record_through_the_drawn_axes(runs, capsys, tmp_path,
                                                                     log):
    out = tmp_path / "both.svg"
    root = _plot(capsys, str(runs[0]), str(runs[1] / "metrics.jsonl"), "-o", str(out),
                 "--metric", "loss", "accuracy", "lr", "grad_norm",
                 *(["--log-y", "loss", "grad_norm"] if log else []))
    curves = _curves(root)
    expected = set()
    for run in runs:
        records = metrics(run)
        for metric in ("loss", "accuracy", "lr", "grad_norm"):
            for kind in ("train", "val"):
                rows = [r for r in records if r["kind"] == kind and metric in r]
                if rows:
                    expected.add((metric, run.name, kind))
                    _check_curve(*curves[(metric, run.name, kind)], rows, metric)
    # 2 runs x (train + val loss, train + val accuracy, train lr), b's train grad_norm
    assert set(curves) == expected and len(expected) == 11
    assert ("grad_norm", "b", "train") in expected
    scales = {p.get("data-metric"): p.get("data-scale") for p in root.iter(f"{SVG}g")
              if p.get("class") == "panel"}
    scale = "log" if log else "linear"
    assert scales == {"loss": scale, "accuracy": "linear", "lr": "linear", "grad_norm": scale}


def test_legend_names_each_run_by_its_directory(runs, capsys, tmp_path):
    root = _plot(capsys, *map(str, runs), "-o", str(tmp_path / "p.svg"))
    legend = ["".join(t.itertext()) for g in root.iter(f"{SVG}g") if g.get("class") == "legend"
              for t in g.iter(f"{SVG}text")]
    assert legend == ["a train", "a validation", "b train", "b validation"] * 2  # 2 panels


def test_default_output_is_metrics_svg_beside_the_first_input(runs, capsys):
    for given in (runs[1], runs[1] / "metrics.jsonl"):
        assert main(["plot", str(given), str(runs[0])]) == 0
        assert capsys.readouterr().out == f"{runs[1] / 'metrics.svg'}\n"
        assert sorted(p.name for p in runs[1].iterdir() if p.is_file()) == [
            "metrics.jsonl", "metrics.svg"]  # and no temporary file left behind


def _with_lines(src: Path, dst: Path, edit) -> list[dict]:
    """dst/metrics.jsonl: src's records passed through edit(records) -> records; returned."""
    records = edit(metrics(src))
    dst.mkdir()
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_nan_and_inf_losses_break_the_curve_and_are_counted(runs, capsys, tmp_path):
    def diverge(records):
        train = [i for i, r in enumerate(records) if r["kind"] == "train"]
        for i, bad in zip((train[2], train[4], train[-1]), (math.nan, math.inf, -math.inf)):
            records[i] = {**records[i], "loss": bad}
        return records

    records = _with_lines(runs[0], tmp_path / "diverged", diverge)
    assert "NaN" in (tmp_path / "diverged" / "metrics.jsonl").read_text()  # as json.dumps writes
    for log in ([], ["--log-y", "loss"]):
        root = _plot(capsys, str(tmp_path / "diverged"), *log)
        panel, path = _curves(root)[("loss", "diverged", "train")]
        rows = [r for r in records if r["kind"] == "train"]
        _check_curve(panel, path, rows, "loss")
        pieces = _pieces(path.get("d"))
        assert [len(p) for p in pieces] == [2, 1, len(rows) - 6]  # train[3] alone: a dot
        texts = ["".join(t.itertext()) for t in panel.iter(f"{SVG}text")]
        assert any(t.startswith("diverged train (3 not drawn)") for t in texts), texts
        assert all(math.isfinite(float(g.get("data-value"))) for g in panel.iter(f"{SVG}g")
                   if g.get("data-axis"))


@pytest.mark.parametrize("log", [[], ["--log-y", "loss"]], ids=["linear", "log-loss"])
def test_values_beyond_1e300_are_not_drawn_and_steps_up_to_1e300_are(capsys, tmp_path, log):
    records = [{"kind": "train", "step": t, "loss": v} for t, v in
               zip((-1e300, 0, 1, 2, 1e300), (0.5, 1.7e308, -1.7e308, 5e-324, 0.25))]
    run = tmp_path / "huge"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    panel, path = _curves(_plot(capsys, str(run), "--metric", "loss", *log))[
        ("loss", "huge", "train")]
    _check_curve(panel, path, records, "loss")  # (±1e300, 0.5 and 0.25), 5e-324 linear only
    assert all(abs(float(g.get("data-value"))) <= 1e300 for g in panel.iter(f"{SVG}g")
               if g.get("data-axis"))
    texts = ["".join(t.itertext()) for t in panel.iter(f"{SVG}text")]
    assert any(t.startswith(f"huge train ({3 if log else 2} not drawn)") for t in texts), texts


def test_other_kinds_and_a_partial_last_line_are_skipped(runs, capsys, tmp_path):
    plain = _plot(capsys, str(runs[0]), "-o", str(tmp_path / "plain.svg"))
    run = tmp_path / "a"
    shutil.copytree(runs[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "checkpoint", "step": 999, "loss": "n/a"}\n{"note": 1}\n'
                '{"kind": "train", "step": 1000, "lo')  # a record still being written
    extra = _plot(capsys, str(run), "-o", str(tmp_path / "extra.svg"))
    assert [p.get("d") for p in extra.iter(f"{SVG}path")] == [
        p.get("d") for p in plain.iter(f"{SVG}path")]


def test_runs_in_same_named_directories_get_distinct_names(tmp_path):
    files = [tmp_path / "x" / "run" / "metrics.jsonl", tmp_path / "y" / "run" / "metrics.jsonl",
             tmp_path / "z" / "metrics.jsonl"]
    assert cli_plot.run_names(files) == [str(files[0].parent), str(files[1].parent), "z"]
    assert cli_plot.run_names([files[2], files[2]]) == ["z", "z #2"]


TRAIN = '{"kind": "train", "step": 1, "loss": 0.5, "accuracy": 0.5, "lr": 0.1}\n'
BAD = {  # name -> (metrics file text or None for no file, extra argv, fragments of the error)
    "missing_file": (None, [], ["metrics file", "not found"]),
    "not_json": (TRAIN + "{oops\n" + TRAIN, [], ["line 2 is not JSON"]),
    "not_an_object": (TRAIN + "[1, 2]\n", [], ["line 2 is not a JSON object"]),
    "step_not_a_number": ('{"kind": "val", "step": "7", "loss": 1}\n', [],
                          ["line 1: val record without a numeric 'step'"]),
    "value_not_a_number": ('{"kind": "train", "step": 7, "loss": "low"}\n', [],
                           ["line 1: 'loss' is not a number"]),
    "step_beyond_a_float": (TRAIN + '{"kind": "train", "step": 1' + "0" * 400 + "}\n", [],
                            ["line 2: 'step' is too large for a float (1000"]),
    "value_beyond_a_float": ('{"kind": "val", "step": 1, "loss": 1' + "0" * 400 + "}\n", [],
                             ["line 1: 'loss' is too large for a float"]),
    "step_beyond_1e300": ('{"kind": "train", "step": -1e308, "loss": 1}\n', [],
                          ["line 1: 'step' is not a finite number within ±1e+300 (-1e+308)"]),
    "step_nan": ('{"kind": "train", "step": NaN, "loss": 1}\n', [], ["line 1: 'step' is not a"]),
    "no_record_with_metric": (TRAIN, ["--metric", "samples_per_s"],
                              ["no train or val records with 'samples_per_s'"]),
    "empty_file": ("", [], ["no train or val records with 'loss'"]),
    "log_of_a_panel_not_drawn": (TRAIN, ["--log-y", "lr"], ["--log-y lr: not among the panels"]),
    "bad_metric_name": (TRAIN, ["--metric", "speed"], ["invalid choice: 'speed'"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    text, argv, fragments = BAD[case]
    run = tmp_path / "r"
    run.mkdir()
    if text is not None:
        (run / "metrics.jsonl").write_text(text)
    _fails(capsys, ["plot", str(run / "metrics.jsonl"), *argv], *fragments)
    assert not (run / "metrics.svg").exists()


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("distbp: error:") and "\n" not in err and not captured.out, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_unwritable_output_exits_2_with_one_line(runs, capsys, tmp_path):
    src = str(runs[0])
    _fails(capsys, ["plot", src, "-o", str(tmp_path)], "is a directory")
    _fails(capsys, ["plot", src, "-o", str(tmp_path / "no" / "p.svg")], "does not exist")
    _fails(capsys, ["plot", str(tmp_path)], f"run directory '{tmp_path}' has no metrics.jsonl")


def test_output_never_replaces_an_input_or_a_file_that_is_not_an_svg(runs, capsys, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(runs[0], run)
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.h5"))[-1]
    (run / "link.svg").symlink_to("metrics.jsonl")
    (tmp_path / "notes.svg").write_text("my notes\n")
    kept = {p: p.read_bytes() for p in (run / "metrics.jsonl", ckpt, tmp_path / "notes.svg")}
    for out in (run / "metrics.jsonl", run / "link.svg"):
        _fails(capsys, ["plot", str(run), "-o", str(out)], f"-o '{out}' is the metrics file "
               f"'{run / 'metrics.jsonl'}' being plotted")
    for out in (ckpt, tmp_path / "notes.svg"):
        _fails(capsys, ["plot", str(run), "-o", str(out)], f"-o '{out}' exists and is not an SVG")
    (run / "metrics.svg").write_bytes(b"\x89PNG")  # the default output too
    _fails(capsys, ["plot", str(run)], f"output '{run / 'metrics.svg'}' exists and is not an SVG "
           "(it starts with b'\\x89PNG')")
    assert {p: p.read_bytes() for p in kept} == kept
    for _ in range(2):  # an earlier picture is replaced
        _plot(capsys, str(run), "-o", str(tmp_path / "p.svg"))


def test_run_names_that_are_not_utf8_or_hold_control_characters_give_valid_xml(runs, tmp_path):
    dirs = [Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + raw)) for raw in
            (b"bad\xffbytes", b"ctl\x01\x1bx")]
    for d in dirs:
        d.mkdir()
        shutil.copy(runs[0] / "metrics.jsonl", d)
    proc = subprocess.run([sys.executable, "-m", "distbp", "plot", *map(str, dirs)],
                          capture_output=True, timeout=60, env=clean_env())
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout == os.fsencode(dirs[0] / "metrics.svg") + b"\n"  # the name's own bytes
    root = ET.parse(dirs[0] / "metrics.svg").getroot()
    assert {p.get("data-run") for p in root.iter(f"{SVG}path") if p.get("class") == "series"} \
        == {"bad\ufffdbytes", "ctl\ufffd\ufffdx"}


def test_a_failed_write_keeps_the_old_picture_and_leaves_no_temporary_file(runs, capsys,
                                                                          tmp_path, monkeypatch):
    out = tmp_path / "p.svg"
    out.write_text("<svg>old</svg>")

    def refuse(tmp, final):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_plot, "replace_durably", refuse)
    _fails(capsys, ["plot", str(runs[0]), "-o", str(out)], f"-o '{out}': cannot write there "
           "(Read-only file system)")
    assert out.read_text() == "<svg>old</svg>" and [p.name for p in tmp_path.iterdir()] == [
        "p.svg"]


def test_under_mpiexec_only_rank_0_writes_and_prints(runs, tmp_path):
    out = tmp_path / "p.svg"
    proc = ok(run_mpi(2, ["-m", "distbp", "plot", str(runs[0]), "-o", str(out)], timeout=60,
                      env=clean_env()))
    assert proc.stdout == f"{out}\n" and not proc.stderr
    ET.parse(out)


@pytest.mark.parametrize("lo,hi", [(0.31, 1.24), (0.0, 0.0), (-2.5, 7.1), (1e-5, 3e-5),
                                   (52000, 61000), (0.9, 0.9), (0.3, 0.30000000000000004)])
def test_linear_ticks_are_even_1_2_5_steps_that_just_cover_the_data(lo, hi):
    axis = linear_axis(lo, hi)
    steps = {round(b - a, 12) for a, b in zip(axis.ticks, axis.ticks[1:])}
    assert len(steps) == 1 and 3 <= len(axis.ticks) <= 11
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 9) in (1, 2, 5)
    if hi - lo < 1e-12:  # a constant (up to rounding): widened, drawn inside the frame
        assert axis.lo < lo < axis.hi
    else:
        assert axis.lo <= lo and axis.hi >= hi and axis.lo > lo - step and axis.hi < hi + step
    assert (axis.lo, axis.hi) == (axis.ticks[0], axis.ticks[-1])


@pytest.mark.parametrize("lo,hi,ticks", [(0.31, 1.24, (0.2, 0.5, 1.0, 2.0)),
                                         (1.0, 1.0, (1.0, 2.0)),
                                         (1e-5, 3.0, (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0))])
def test_log_ticks_are_on_the_1_2_5_grid_or_whole_decades(lo, hi, ticks):
    # derived by hand: the largest 1/2/5 x 10^k at or below lo to the smallest at or above hi
    # within two decades; whole decades beyond
    assert log_axis(lo, hi).ticks == ticks
