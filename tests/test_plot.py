"""`distbp plot`, the drawing: the matplotlib Figure drawn from real training runs' metrics has
one panel per metric and one line per (run, kind) holding exactly the records' (step, value);
long curves are plain lines, short ones marked; diverged values break a curve without breaking
the plot and a point left alone still shows; the written file is a PNG, SVG or PDF as its
extension says, with the legend's run names shown literally."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.plotruns import SIGNATURE, plot_ok, svg_texts, train_two_runs
from helpers.trainruns import clean_env, metrics

from distbp.plot import figure, read_run, save

LABEL = re.compile(r"(.*) (train|validation)(?: \((\d+) not drawn\))?")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    return train_two_runs(tmp_path_factory.mktemp("plot"))


def _figure(dirs, metric_names=("loss", "accuracy"), log=()):
    return figure([read_run(d / "metrics.jsonl", d.name) for d in dirs], metric_names, log)


def _curves(fig) -> dict[tuple[int, str, str], tuple]:
    """(panel index, run, "train"|"validation") -> (Line2D, count of values not drawn), for the
    labelled lines; asserts one line per key and that the legend lists exactly them."""
    curves = {}
    for i, ax in enumerate(fig.axes):
        labels = [line.get_label() for line in ax.get_lines() if line.get_label()[0] != "_"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
        for line in ax.get_lines():
            if line.get_label()[0] != "_":
                run, kind, hidden = LABEL.fullmatch(line.get_label()).groups()
                assert (i, run, kind) not in curves
                curves[(i, run, kind)] = (line, int(hidden or 0))
    return curves


def _assert_holds(line, records: list[dict], metric: str, log: bool) -> None:
    """The line's data are the records' (step, value), an undrawable value (non-finite, beyond
    ±1e300, or below 1e-300 on a log axis) as NaN."""
    assert list(line.get_xdata()) == [r["step"] for r in records]
    expected = [r[metric] if abs(r[metric]) <= 1e300 and (r[metric] >= 1e-300 or not log)
                else math.nan for r in records]
    assert [repr(float(v)) for v in line.get_ydata()] == [repr(float(v)) for v in expected]


@pytest.mark.parametrize("log", [False, True], ids=["linear", "log-loss"])
def test_every_line_holds_its_records_steps_and_values(runs, log):
    names = ("loss", "accuracy", "lr", "grad_norm")
    logged = ("loss", "grad_norm") if log else ()
    fig = _figure(runs, names, logged)
    curves = _curves(fig)
    expected = set()
    for run in runs:
        for i, metric in enumerate(names):
            for kind, shown in (("train", "train"), ("val", "validation")):
                rows = [r for r in metrics(run) if r["kind"] == kind and metric in r]
                if rows:
                    expected.add((i, run.name, shown))
                    line, hidden = curves[(i, run.name, shown)]
                    _assert_holds(line, rows, metric, metric in logged)
                    assert hidden == 0
                    assert line.get_linestyle() == ("-" if kind == "train" else "--")
    # 2 runs x (train + val loss, train + val accuracy, train lr), b's train grad_norm
    assert set(curves) == expected and len(expected) == 11 and (3, "b", "train") in expected
    assert [ax.get_yscale() for ax in fig.axes] == (
        ["log", "linear", "linear", "log"] if log else ["linear"] * 4)
    assert [ax.get_title(loc="left") for ax in fig.axes] == [
        "loss" + " (log scale)" * log, "accuracy", "learning rate",
        "gradient norm before clipping" + " (log scale)" * log]
    colours = {run: {curves[k][0].get_color() for k in curves if k[1] == run} for run in "ab"}
    assert all(len(c) == 1 for c in colours.values()) and colours["a"] != colours["b"]


def _val_records(n: int) -> list[dict]:
    return [{"kind": "val", "step": 10 * (i + 1), "loss": 1 / (i + 1)} for i in range(n)]


@pytest.mark.parametrize("n,marker", [(12, "o"), (400, "None")])
def test_many_validation_points_draw_a_plain_line_few_get_markers(tmp_path, n, marker):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                    for r in _val_records(n)))
    line, = _figure([tmp_path], ["loss"]).axes[0].get_lines()
    assert (line.get_linestyle(), line.get_marker(), len(line.get_xdata())) == ("--", marker, n)


def _assert_draws(fig, fmt: str) -> None:
    buffer = io.BytesIO()
    save(fig, buffer, fmt)
    assert buffer.getvalue().startswith(SIGNATURE[fmt])


def _with_lines(src: Path, dst: Path, edit) -> list[dict]:
    """dst/metrics.jsonl: src's records passed through edit(records) -> records; returned."""
    records = edit(metrics(src))
    dst.mkdir()
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_nan_and_inf_losses_break_the_curve_are_counted_and_a_lone_point_shows(runs, tmp_path):
    def diverge(records):
        rows = [r for r in records if r["kind"] == "train"]
        for r, bad in zip((rows[2], rows[4], rows[-1]), (math.nan, math.inf, -math.inf)):
            r["loss"] = bad
        return records + [{"kind": "train", "step": 1000 + i, "loss": 0.5} for i in range(40)]

    records = _with_lines(runs[0], tmp_path / "diverged", diverge)
    rows = [r for r in records if r["kind"] == "train"]
    assert "NaN" in (tmp_path / "diverged" / "metrics.jsonl").read_text()  # as json.dumps writes
    for log in ((), ("loss",)):
        fig = _figure([tmp_path / "diverged"], ["loss"], log)
        line, hidden = _curves(fig)[(0, "diverged", "train")]
        _assert_holds(line, rows, "loss", bool(log))
        assert hidden == 3 and line.get_marker() == "None"  # over 30 records: a plain line
        alone, = [line for line in fig.axes[0].get_lines() if line.get_label() == "_alone"]
        assert (list(alone.get_xdata()), alone.get_marker()) == ([rows[3]["step"]], "o")
        _assert_draws(fig, "png")


@pytest.mark.parametrize("log", [(), ("loss",)], ids=["linear", "log-loss"])
def test_values_beyond_1e300_are_not_drawn_and_steps_up_to_1e300_are(tmp_path, log):
    records = [{"kind": "train", "step": t, "loss": v} for t, v in
               zip((-1e300, 0, 1, 2, 1e300), (0.5, 1.7e308, -1.7e308, 5e-324, 0.25))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = _figure([tmp_path], ["loss"], log)
    line, hidden = _curves(fig)[(0, tmp_path.name, "train")]
    _assert_holds(line, records, "loss", bool(log))  # (±1e300, 0.5 and 0.25), 5e-324 linear only
    assert hidden == (3 if log else 2)
    _assert_draws(fig, "svg")
    ax = fig.axes[0]
    assert all(math.isfinite(v) and abs(v) < 1e301 for v in (*ax.get_xlim(), *ax.get_ylim()))


def test_a_panel_with_nothing_drawable_still_spans_every_records_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 10, "loss": NaN}\n'
                                            '{"kind": "val", "step": 40, "loss": -1}\n')
    for log in ((), ("loss",)):
        fig = _figure([tmp_path], ["loss"], log)
        _assert_draws(fig, "png")
        lo, hi = fig.axes[0].get_xlim()
        assert lo < 10 and 40 < hi < 42


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])  # IHDR: width, height


def test_the_extension_picks_the_format_and_the_picture_has_a_panel_per_metric(runs, capsys,
                                                                              tmp_path):
    for name in ("p.png", "p.svg", "p.pdf", "P.PNG"):
        out = plot_ok(capsys, *map(str, runs), "-o", str(tmp_path / name))
        assert out.read_bytes().startswith(SIGNATURE[name[2:].lower()]), name
    legend = [t for t in svg_texts(tmp_path / "p.svg") if LABEL.fullmatch(t)]
    assert legend == ["a train", "a validation", "b train", "b validation"] * 2  # 2 panels
    two = _png_size(tmp_path / "p.png")
    four = _png_size(plot_ok(capsys, *map(str, runs), "-o", str(tmp_path / "q.png"), "--metric",
                           "loss", "accuracy", "lr", "comm_ms"))
    assert four[0] == two[0] and four[1] > 1.8 * two[1]


def test_a_log_axis_is_labelled_in_plain_numbers(runs, capsys, tmp_path):
    texts = svg_texts(plot_ok(capsys, str(runs[0]), "-o", str(tmp_path / "p.svg"),
                             "--metric", "loss", "--log-y", "loss"))
    numbers = [t for t in texts if re.fullmatch(r"[0-9.e+-]+", t)]
    assert not any("mathdefault" in t or "$" in t for t in texts), texts
    assert {"0.5", "1"} <= set(numbers), numbers  # loss spans under 2.5 decades: 1-2-5 ticks


def test_other_kinds_and_a_partial_last_line_are_skipped(runs, capsys, tmp_path):
    plain = plot_ok(capsys, str(runs[0]), "-o", str(tmp_path / "plain.svg"))
    run = tmp_path / "a"
    shutil.copytree(runs[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "checkpoint", "step": 999, "loss": "n/a"}\n{"note": 1}\n'
                '{"kind": "train", "step": 1000, "lo')  # a record still being written
    extra = plot_ok(capsys, str(run), "-o", str(tmp_path / "extra.svg"))
    assert extra.read_bytes() == plain.read_bytes()  # no dates: the same records, the same file


def test_run_names_are_shown_literally_even_not_utf8_or_with_control_characters(runs, tmp_path):
    dirs = [Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + raw)) for raw in
            (b"bad\xffbytes", b"ctl\x01\x1bx", b"cost $x^2$ \\frac")]
    for d in dirs:
        d.mkdir()
        shutil.copy(runs[0] / "metrics.jsonl", d)
    out = dirs[0] / "m.svg"
    proc = subprocess.run([sys.executable, "-m", "distbp", "plot", *map(str, dirs), "-o",
                           str(out)], capture_output=True, timeout=60, env=clean_env())
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout == os.fsencode(out) + b"\n"  # the name's own bytes
    assert {t.rsplit(" ", 1)[0] for t in svg_texts(out) if LABEL.fullmatch(t)} == {
        "bad\ufffdbytes", "ctl\ufffd\ufffdx", "cost $x^2$ \\frac"}
