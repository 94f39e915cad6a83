"""distbp evaluate / predict / inspect against a NumPy forward pass written out here, serially and
under real mpiexec; atomic, ordered prediction files; corrupt checkpoints and bad input (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import child_env, error_lines, run_mpi, run_py

from distbp import evaluation, launch
from distbp.cli import main

N_TEST = 37  # evaluation rows: divisible by neither 2 nor 3, so shards differ in size
FEATURES, CLASSES = 5, 3


def distbp(*args: str, n: int = 1):
    """`distbp ARGS` as a plain process (n = 1) or under `mpiexec -n n`."""
    cmd = ["-m", "distbp", *args]
    return run_py(cmd, timeout=60) if n == 1 else run_mpi(n, cmd, timeout=60)


def make_data(path: Path, rows: int, seed: int) -> None:
    """x far from zero mean / unit scale, so that missing preprocessing would show."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)) * 3.0 + 1.5
    y = (x[:, 0] + x[:, 1] > 3.0).astype(np.int64) + (x[:, 2] > 2.0)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny float64 run (scale + standardize, tanh) trained for 20 steps in a subprocess."""
    d = tmp_path_factory.mktemp("eval")
    make_data(d / "train.h5", 60, seed=1)
    make_data(d / "test.h5", N_TEST, seed=2)
    p = distbp("train", "--data", str(d / "train.h5"), "--steps", "20", "--dtype", "float64",
               "--run-dir", str(d / "run"), "--layers", "5,8,3", "--activation", "tanh",
               "--scale", "0.5", "--standardize", "--batch-size", "16")
    assert p.returncode == 0, p.stderr
    return {"dir": d, "ckpt": d / "run" / "checkpoints" / "ckpt-00000020.h5",
            "test": d / "test.h5"}


def reference(ckpt: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(softmax outputs (N, K), log-softmax (N, K), labels y) with plain h5py and NumPy:
    a_0 = (x·scale − mean)/std; a_j = tanh(a_k W_jᵀ + b_j); a_L = softmax(z_L)."""
    with h5py.File(ckpt, "r") as f, h5py.File(data, "r") as d:
        model, prep = f["model"], f["preprocess"]
        assert model.attrs["activation"] == "tanh" and model.attrs["output"] == "softmax"
        n_layers = len(model.attrs["layers"]) - 1
        weights = [(model[f"W{j}"][()], model[f"b{j}"][()]) for j in range(1, n_layers + 1)]
        a = (d["x"][()] * prep["scale"][()] - prep["mean"][()]) / prep["std"][()]
        y = d["y"][()]
    for W, b in weights[:-1]:
        a = np.tanh(a @ W.T + b)
    W, b = weights[-1]
    z = a @ W.T + b
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(log_p), log_p, y


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_evaluate_equals_numpy_forward_pass_serially_and_on_2_and_3_ranks(run):
    probs, log_p, y = reference(run["ckpt"], run["test"])
    want_loss = -log_p[np.arange(len(y)), y].mean()
    want_correct = int(np.count_nonzero(probs.argmax(axis=1) == y))
    assert 0 < want_correct < N_TEST  # a real accuracy, not a trivial 0 or 1
    for n in (1, 2, 3):
        p = distbp("evaluate", str(run["ckpt"]), "--data", str(run["test"]), "--json", n=n)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.strip().splitlines()) == 1  # one JSON line, from rank 0 only
        r = last_json(p.stdout)
        assert (r["samples"], r["correct"], r["ranks"], r["step"]) == (N_TEST, want_correct, n, 20)
        assert r["accuracy"] == want_correct / N_TEST
        assert abs(r["loss"] - want_loss) <= 1e-12 * abs(want_loss)


def test_evaluate_text_names_checkpoint_rows_loss_and_accuracy(run):
    p = distbp("evaluate", str(run["ckpt"]), "--data", str(run["test"]), "--batch-size", "4")
    assert p.returncode == 0, p.stderr
    assert f"on {run['test']}: {N_TEST} rows, loss " in p.stdout and "accuracy" in p.stdout


@pytest.mark.parametrize("ranks", [1, 2])
def test_predict_writes_numpy_forward_pass_rows_in_input_order(run, tmp_path, ranks):
    out = tmp_path / "pred.h5"
    p = distbp("predict", str(run["ckpt"]), "--data", str(run["test"]), "--out", str(out),
               n=ranks)
    assert p.returncode == 0, p.stderr
    probs, _, _ = reference(run["ckpt"], run["test"])
    with h5py.File(out, "r") as f:
        pred, label = f["prediction"][()], f["label"][()]
    assert pred.dtype == np.float64 and pred.shape == (N_TEST, CLASSES)
    np.testing.assert_allclose(pred, probs, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(label, probs.argmax(axis=1))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["pred.h5"]  # no temporary left


def test_predict_in_many_gather_rounds_writes_the_same_rows(run, tmp_path, monkeypatch):
    # 5 rows of 3 float64 outputs per round: 8 rounds for 37 rows, in-process and serial
    monkeypatch.setattr(evaluation, "GATHER_BYTES", 5 * CLASSES * 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "pred.h5"
    assert main(["predict", str(run["ckpt"]), "--data", str(run["test"]), "--out", str(out),
                 "--batch-size", "2"]) == 0
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["prediction"][()], reference(run["ckpt"], run["test"])[0],
                                   rtol=0, atol=1e-12)


def inputs_only(labelled: Path, d: Path) -> dict[str, Path]:
    """The x of `labelled` alone, as HDF5 and as NPZ: files without labels."""
    with h5py.File(labelled, "r") as f:
        x = f["x"][()]
    with h5py.File(d / "x-only.h5", "w") as f:
        f["x"] = x
    np.savez(d / "x-only.npz", x=x)
    return {"h5": d / "x-only.h5", "npz": d / "x-only.npz"}


@pytest.mark.parametrize("ranks", [1, 2])
def test_predict_on_files_without_labels_writes_what_the_labelled_file_gives(run, tmp_path,
                                                                            ranks):
    def predict(data: Path) -> dict[str, np.ndarray]:
        out = tmp_path / f"pred-{data.name}.h5"
        p = distbp("predict", str(run["ckpt"]), "--data", str(data), "--out", str(out), n=ranks)
        assert p.returncode == 0, p.stderr
        with h5py.File(out, "r") as f:
            return {name: f[name][()] for name in ("prediction", "label")}

    want = predict(run["test"])
    np.testing.assert_allclose(want["prediction"], reference(run["ckpt"], run["test"])[0],
                               rtol=0, atol=1e-12)
    for data in inputs_only(run["test"], tmp_path).values():
        got = predict(data)
        for name in ("prediction", "label"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{data.name} {name}")


def test_a_file_without_labels_is_exit_2_naming_the_missing_y_for_evaluate_and_train(run,
                                                                                   tmp_path):
    files = inputs_only(run["test"], tmp_path)
    for argv, ranks, missing in (
            (["evaluate", str(run["ckpt"]), "--data", str(files["h5"])], 2,
             "dataset 'y' not found (datasets: x)"),
            (["evaluate", str(run["ckpt"]), "--data", str(files["npz"])], 1,
             "array 'y' not found (arrays: x)"),
            (["train", "--data", str(files["h5"]), "--steps", "1", "--run-dir",
              str(tmp_path / "run")], 1, "dataset 'y' not found (datasets: x)")):
        p = distbp(*argv, n=ranks)
        assert p.returncode == 2, (argv, p.stderr)
        data = argv[argv.index("--data") + 1]
        assert error_lines(p.stderr) == [f"distbp: error: data file '{data}': {missing}"], argv


def test_predict_without_labels_still_checks_x(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with h5py.File(tmp_path / "wide.h5", "w") as f:
        f["x"] = np.zeros((4, 7))
    with h5py.File(tmp_path / "labels.h5", "w") as f:
        f["y"] = np.zeros(4, np.int64)
    with h5py.File(tmp_path / "text.h5", "w") as f:
        f["x"] = np.array([[b"a"] * FEATURES] * 4)
    for name, message in (("wide.h5", "x has 7 features but the network's input layer has 5"),
                          ("labels.h5", "dataset 'x' not found (datasets: y)"),
                          ("text.h5", "x has dtype |S1; expected a float or integer dtype")):
        argv = ["predict", str(run["ckpt"]), "--data", str(tmp_path / name),
                "--out", str(tmp_path / "p.h5")]
        assert main(argv) == 2, argv
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0], (name, err)
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize("n", [1, 2, 7, 37])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_gather_rounds_cover_every_row_once(n, size, monkeypatch):
    monkeypatch.setattr(evaluation, "GATHER_BYTES", size * 2 * 8)  # 2 rows per rank per round
    chunk, rounds = evaluation.gather_plan(n, size, n_out=1, itemsize=8)
    assert chunk == 2
    rows = [r for t in range(rounds) for rank in range(size)
            for r in range(*evaluation.round_bounds(n, rank, size, chunk, t))]
    assert sorted(rows) == list(range(n))


def test_inspect_prints_the_checkpoint_fields_and_verifies_checksums(run):
    p = distbp("inspect", str(run["ckpt"]))
    assert p.returncode == 0, p.stderr
    for text in ("datasets verified (SHA-256)", "step 20, epoch 5", "seed 0",
                 "model: 5-8-3 tanh/softmax/cross_entropy float64, 75 parameters",
                 "preprocess: mean (5,), scale 0.5, std (5,)", "optimizer: sgd",
                 "written by distbp", "on 1 rank(s)", '"standardize": true'):
        assert text in p.stdout
    r = last_json(distbp("inspect", str(run["ckpt"]), "--json").stdout)
    with h5py.File(run["ckpt"], "r") as f:
        assert r["step"] == f.attrs["step"] and r["world_size"] == f.attrs["world_size"]
        assert r["layers"] == f["model"].attrs["layers"].tolist() == [5, 8, 3]
        assert r["distbp_version"] == f.attrs["distbp_version"]
        assert r["config"] == json.loads(f["config/json"][()])
    assert r["parameters"] == 5 * 8 + 8 + 8 * 3 + 3 and r["verified"] is True
    digests = []  # every dataset that carries a digest is one that load() checked
    with h5py.File(run["ckpt"], "r") as f:
        f.visititems(lambda name, obj: digests.append(name)
                     if isinstance(obj, h5py.Dataset) and "sha256" in obj.attrs else None)
    assert "metrics/interval/loss_sum" in digests
    assert r["datasets_verified"] == len(digests)


def test_corrupt_checkpoint_is_exit_2_with_one_line_for_inspect_and_on_2_ranks(run, tmp_path):
    bad = tmp_path / "ckpt-00000020.h5"
    bad.write_bytes(run["ckpt"].read_bytes())
    with h5py.File(bad, "r+") as f:
        f["model/W1"][0, 0] += 1.0  # neither the file's nor W1's sha256 matches any more
    p = distbp("inspect", str(bad))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"distbp: error: checkpoint '{bad}': file checksum mismatch (corrupt or truncated): "
        f"SHA-256 of the file differs from its header"]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(run["ckpt"].read_bytes()[:3000])
    p = distbp("evaluate", str(truncated), "--data", str(run["test"]), n=2)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and str(truncated) in p.stderr


def test_bad_input_is_exit_2_with_one_line_naming_the_problem(run, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    wide = tmp_path / "wide.h5"
    with h5py.File(wide, "w") as f:
        f["x"], f["y"] = np.zeros((4, 7)), np.zeros(4, np.int64)
    ckpt, test = str(run["ckpt"]), str(run["test"])
    cases = [(["evaluate", ckpt, "--data", str(wide)], "x has 7 features but the network's "
                                                        "input layer has 5"),
             (["evaluate", ckpt], "--data is required"),
             (["evaluate", str(tmp_path / "nope.h5"), "--data", test], "not found"),
             (["predict", ckpt, "--data", test, "--out", str(tmp_path / "no" / "p.h5")],
              "does not exist"),
             (["predict", ckpt, "--data", test, "--out", str(tmp_path)], "is a directory"),
             (["evaluate", ckpt, "--data", test, "--batch-size", "0"], "positive integer")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0], (argv, err)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["wide.h5"]  # no output, no temp


def test_evaluate_of_the_default_digits_run_matches_the_trainers_last_validation(tmp_path):
    p = distbp("train", "--epochs", "2", "--run-dir", str(tmp_path / "digits"))
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in
               (tmp_path / "digits" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"][-1]
    ckpt = sorted((tmp_path / "digits" / "checkpoints").glob("ckpt-*.h5"))[-1]
    p = distbp("evaluate", str(ckpt), "--json")  # no --data: the bundled digits test split
    assert p.returncode == 0, p.stderr
    r = last_json(p.stdout)
    assert r["step"] == val["step"] and r["data"] == "bundled digits (test)"
    assert (r["samples"], r["accuracy"]) == (val["samples"], val["accuracy"])
    assert r["loss"] == pytest.approx(val["loss"], rel=1e-6)


def test_info_describes_a_checkpoint_as_inspect_and_a_data_file_as_data_info(run, tmp_path):
    as_inspect = last_json(distbp("inspect", str(run["ckpt"]), "--json").stdout)
    p = distbp("info", str(run["ckpt"]), "--json")
    assert p.returncode == 0, p.stderr
    assert last_json(p.stdout) == as_inspect and as_inspect["step"] == 20
    as_data_info = json.loads(distbp("data", "info", str(run["test"]), "--json").stdout)
    p = distbp("info", str(run["test"]), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == as_data_info and as_data_info["datasets"]
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not a checkpoint, not HDF5\n")
    for path, problem in ((garbage, "not an HDF5 or NPZ file"),
                          (tmp_path / "none.h5", "not found")):
        p = distbp("info", str(path))
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.strip().splitlines() == [f"distbp: error: data file '{path}': {problem}"]


def test_output_piped_into_a_reader_that_closed_ends_without_a_traceback(run):
    # `distbp inspect ckpt | head -1`: the reader is gone before distbp writes
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "distbp", "inspect", str(run["ckpt"])],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                              env=child_env())
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""  # 128 + SIGPIPE, as a shell reports


def test_a_closed_stdout_on_one_of_several_ranks_aborts_the_job_with_141(monkeypatch, capsys):
    aborted = []

    class TwoRanks:  # what the abort path uses of a communicator
        rank, size = 1, 2

        def abort(self, code):
            aborted.append(code)

    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    job = launch.Job()
    job.comm = TwoRanks()
    try:
        assert launch.exit_code(job, BrokenPipeError()) == 141 and aborted == [141]
    finally:
        sys.stdout.close()
        os.close(read_end)
    assert capsys.readouterr().err == "distbp: rank 1: error: stdout was closed\n"


def test_info_of_a_directory_says_so_and_names_what_to_give(run, tmp_path):
    ckpt = run["ckpt"]
    for given, hints in ((run["dir"] / "run", [f"`distbp info {ckpt}`",
                                              f"`distbp plot {run['dir'] / 'run'}`"]),
                         (ckpt.parent, [f"`distbp info {ckpt}`"]), (tmp_path, [])):
        p = distbp("info", str(given))
        assert p.returncode == 2 and p.stdout == "", p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"distbp: error: '{given}' is a directory; give a checkpoint or a data file"), lines
        assert all(h in lines[0] for h in hints) and lines[0].count("`") == 2 * len(hints)


def test_info_describes_an_npz_data_file(run, tmp_path):
    with h5py.File(run["test"], "r") as f:
        x, y = f["x"][()], f["y"][()]
    np.savez(tmp_path / "test.npz", x=x, y=y)
    p = distbp("info", str(tmp_path / "test.npz"), "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["datasets"]["x"]["shape"] == [N_TEST, FEATURES]
    assert info["class_counts"] == {str(k): int(n) for k, n in enumerate(np.bincount(y)) if n}
