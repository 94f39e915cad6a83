"""`distbp plot`, the command: the default output, bad input exiting 2 with one line and writing
nothing, an output never replacing an input or a file that is not a picture of its format, an
atomic write, one writer under mpiexec, a one-line install hint without matplotlib, and training
that never imports matplotlib."""

from __future__ import annotations

import errno
import shutil

import pytest
from conftest import error_lines, run_mpi, run_py
from helpers.plotruns import SIGNATURE, plot_ok, train_two_runs
from helpers.trainruns import clean_env, ok, train_args, write_data

from distbp import plot_files
from distbp.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_two_runs(tmp_path_factory.mktemp("plot"))


def test_default_output_is_metrics_png_beside_the_first_input(runs, capsys):
    for given in (runs[1], runs[1] / "metrics.jsonl"):
        assert main(["plot", str(given), str(runs[0])]) == 0
        assert capsys.readouterr().out == f"{runs[1] / 'metrics.png'}\n"
        assert sorted(p.name for p in runs[1].iterdir() if p.is_file()) == [
            "metrics.jsonl", "metrics.png"]  # and no temporary file left behind


def test_runs_in_same_named_directories_get_distinct_names(tmp_path):
    files = [tmp_path / "x" / "run" / "metrics.jsonl", tmp_path / "y" / "run" / "metrics.jsonl",
             tmp_path / "z" / "metrics.jsonl"]
    assert plot_files.run_names(files) == [str(files[0].parent), str(files[1].parent), "z"]
    assert plot_files.run_names([files[2], files[2]]) == ["z", "z #2"]


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
    "other_extension": (TRAIN, ["-o", "p.jpg"], ["-o 'p.jpg': give a name ending in .png, "
                                                 ".svg, .pdf (the format of the picture)"]),
    "no_extension": (TRAIN, ["-o", "picture"], ["-o 'picture': give a name ending in .png"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch,
                                                            case):
    text, argv, fragments = BAD[case]
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    run.mkdir()
    if text is not None:
        (run / "metrics.jsonl").write_text(text)
    _fails(capsys, ["plot", str(run / "metrics.jsonl"), *argv], *fragments)
    assert {p.name for p in tmp_path.rglob("*")} == {"r", "metrics.jsonl"} - {
        "metrics.jsonl" for _ in [text] if text is None}


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = "\n".join(error_lines(captured.err))
    assert err.startswith("distbp: error:") and "\n" not in err and not captured.out, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_unwritable_output_exits_2_with_one_line(runs, capsys, tmp_path):
    src = str(runs[0])
    _fails(capsys, ["plot", src, "-o", str(tmp_path)], "is a directory")
    _fails(capsys, ["plot", src, "-o", str(tmp_path / "no" / "p.png")], "does not exist")
    _fails(capsys, ["plot", str(tmp_path)], f"run directory '{tmp_path}' has no metrics.jsonl")


def test_output_never_replaces_an_input_or_a_file_that_is_not_its_format(runs, capsys,
                                                                           tmp_path):
    run = tmp_path / "r"
    shutil.copytree(runs[0], run)
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.h5"))[-1]
    (run / "link.svg").symlink_to("metrics.jsonl")
    (tmp_path / "notes.svg").write_text("my notes\n")
    (tmp_path / "real.pdf").write_bytes(SIGNATURE["png"])  # a PNG named .pdf
    kept = {p: p.read_bytes() for p in (run / "metrics.jsonl", ckpt, tmp_path / "notes.svg",
                                        tmp_path / "real.pdf")}
    for out in (run / "metrics.jsonl", run / "link.svg"):
        _fails(capsys, ["plot", str(run), "-o", str(out)], f"-o '{out}' is the metrics file "
               f"'{run / 'metrics.jsonl'}' being plotted")
    for out, fmt in ((tmp_path / "notes.svg", "SVG"), (tmp_path / "real.pdf", "PDF")):
        _fails(capsys, ["plot", str(run), "-o", str(out)], f"-o '{out}' exists and is not a {fmt}")
    link = ckpt.with_suffix(".png")  # the checkpoint under a picture's name
    link.symlink_to(ckpt)
    _fails(capsys, ["plot", str(run), "-o", str(link)], "is a symbolic link")
    (run / "metrics.png").write_bytes(b"GIF89a")  # the default output too
    _fails(capsys, ["plot", str(run)], f"output '{run / 'metrics.png'}' exists and is not a PNG "
           "(it starts with b'GIF89a')")
    assert {p: p.read_bytes() for p in kept} == kept
    for name in ("p.png", "p.svg", "p.pdf", "p.png"):  # an earlier picture is replaced
        plot_ok(capsys, str(run), "-o", str(tmp_path / name))


def test_a_failed_write_keeps_the_old_picture_and_leaves_no_temporary_file(runs, capsys,
                                                                          tmp_path, monkeypatch):
    out = tmp_path / "p.svg"
    out.write_text("<svg>old</svg>")

    def refuse(tmp, final):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(plot_files, "replace_durably", refuse)
    _fails(capsys, ["plot", str(runs[0]), "-o", str(out)], f"-o '{out}': cannot write there "
           "(Read-only file system)")
    assert out.read_text() == "<svg>old</svg>" and [p.name for p in tmp_path.iterdir()] == [
        "p.svg"]


def test_under_mpiexec_only_rank_0_writes_and_prints(runs, tmp_path):
    out = tmp_path / "p.png"
    proc = ok(run_mpi(2, ["-m", "distbp", "plot", str(runs[0]), "-o", str(out)], timeout=60,
                      env=clean_env()))
    assert proc.stdout == f"{out}\n" and not proc.stderr
    assert out.read_bytes().startswith(SIGNATURE["png"])


# Runs distbp's main with every import of matplotlib failing, as where it is not installed.
WITHOUT_MATPLOTLIB = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Blocker())
from distbp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_matplotlib_plot_says_how_to_install_it_and_exits_2(runs, tmp_path):
    proc = run_py(["-c", WITHOUT_MATPLOTLIB, "plot", str(runs[0]), "-o", str(tmp_path / "p.png")],
                  timeout=60, env=clean_env())
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "distbp: error: distbp plot needs matplotlib: " \
        "pip install 'distbp[plot]'\n"
    assert list(tmp_path.iterdir()) == []


def test_training_never_imports_matplotlib(tmp_path):
    data = write_data(tmp_path / "d.h5", 40)
    args = train_args(data, tmp_path / "run", "--steps", "3")[2:]  # after "-m distbp"
    proc = ok(run_py(["-c", "import sys; from distbp.cli import main; rc = main(sys.argv[1:]); "
                      "print('matplotlib' in sys.modules)", *args], timeout=60, env=clean_env()))
    assert proc.stdout.splitlines()[-1] == "False"
