"""The Python API with real processes, serially and under `mpiexec -n 2`: scripts/example_api.py
ends bitwise where `distbp train` of the same settings ends (one code path), `fit` gives the same
records on every rank, trains a Network in place, is preempted and resumed bitwise, `evaluate`
and `predict` agree between one process and two ranks, bad options raise UsageError on every rank
without a hang, and `help(distbp)` names the public API. Each rank's side runs
tests/helpers/api_prog.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_mpi, run_py
from helpers.mpijob import TAG, finish, job_env, rank_pids, start
from helpers.trainruns import clean_env, final, ok, train, write_data

from distbp import checkpoint

EXAMPLE = ROOT / "scripts" / "example_api.py"
PROG = str(ROOT / "tests" / "helpers" / "api_prog.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "d.h5", n=64)


def outputs(out: Path, mode: str, ranks: int) -> list[dict]:
    """What each rank of an api_prog.py run wrote, by rank."""
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def prog(ranks: int, mode: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """api_prog.py MODE OUT ARGS: plain python (ranks 0) or under mpiexec -n ranks."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [PROG, mode, str(out), *map(str, args)]
    proc = run_py(cmd, env=clean_env(), timeout=90) if ranks == 0 else \
        run_mpi(ranks, cmd, env=clean_env(), timeout=90)
    return ok(proc)


def params(run_dir: Path, step: int) -> bytes:
    return final(run_dir, step).params.tobytes()


# ----------------------------------------------------------------------------- the example


@pytest.mark.parametrize("mode", [(), ("--arrays",)], ids=["digits", "arrays"])
def test_example_script_ends_bitwise_where_distbp_train_of_the_same_settings_ends(
        tmp_path, mode):
    # no --data: fit and distbp train both take the bundled digits with their preset; with
    # --arrays the script passes the same rows (and the file's scale) as NumPy arrays
    script = ok(run_mpi(2, [str(EXAMPLE), *mode, "--epochs", "1", "--run-dir",
                            str(tmp_path / "api")], env=clean_env(), cwd=tmp_path))
    cli = ok(run_mpi(2, ["-m", "distbp", "train", "--epochs", "1", "--run-dir",
                         str(tmp_path / "cli")], env=clean_env(), cwd=tmp_path))
    assert params(tmp_path / "api", 45) == params(tmp_path / "cli", 45)
    assert "fit: exit code 0, checkpoint" in script.stdout
    evaluated = [ln for ln in script.stdout.splitlines() if ln.startswith("evaluate: ")]
    assert len(evaluated) == 1  # printed by rank 0 only
    # evaluate() on the test split gives the run's last validation record
    last_val = [ln for ln in cli.stdout.splitlines() if ln.startswith("validation after")][-1]
    assert evaluated[0].split("(")[0].split()[1:] == ["loss", last_val.split()[5],
                                                       "accuracy", last_val.split()[7]]
    assert "predict: classes [" in script.stdout


def test_example_script_runs_serially_on_a_data_file(tmp_path, data):
    proc = ok(run_py([str(EXAMPLE), "--data", str(data), "--val-data", str(data), "--epochs",
                      "2", "--run-dir", str(tmp_path / "run")], env=clean_env(), cwd=tmp_path))
    assert "evaluate: loss" in proc.stdout and "(64 samples)" in proc.stdout
    assert checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def fit_records(data, tmp_path_factory) -> dict[int, list[dict]]:
    """api_prog.py records on 1 process and on 2 ranks: ranks -> each rank's output."""
    got = {}
    for ranks in (0, 2):
        out = tmp_path_factory.mktemp(f"records{ranks}")
        prog(ranks, "records", out, data)
        got[ranks] = outputs(out, "records", max(ranks, 1))
        on_disk = (out / "run" / "metrics.jsonl").read_text().splitlines()
        assert got[ranks][0]["records"] == [json.loads(ln) for ln in on_disk]
    return got


def test_fit_returns_the_same_records_on_every_rank(fit_records):
    rank0, rank1 = fit_records[2]
    assert rank0 == rank1
    assert rank0["exit_code"] == 0 and rank0["checkpoint"].endswith("ckpt-00000012.h5")
    kinds = [(r["kind"], r["step"]) for r in rank0["records"]]
    # 48 rows in batches of 16: 3 steps per epoch, a validation after each; record_every=2
    assert kinds == [("train", 2), ("val", 3), ("train", 4), ("train", 6), ("val", 6),
                     ("train", 8), ("val", 9), ("train", 10), ("train", 12), ("val", 12)]


def test_fit_on_one_and_two_ranks_gives_the_same_records_within_1e_10(fit_records):
    serial, mpi = fit_records[0][0]["records"], fit_records[2][0]["records"]
    assert [(r["kind"], r["step"], r["epoch"]) for r in serial] == \
        [(r["kind"], r["step"], r["epoch"]) for r in mpi]
    for a, b in zip(serial, mpi):
        assert abs(a["loss"] - b["loss"]) <= 1e-10 * abs(a["loss"])
        assert a["accuracy"] == b["accuracy"]


def test_a_network_passed_to_fit_is_trained_in_place_from_rank_0s_parameters(tmp_path, data):
    prog(2, "inplace", tmp_path, data)
    got = outputs(tmp_path, "inplace", 2)
    assert all(g["same_object"] for g in got)  # FitResult.network is the Network passed in
    assert all(g["preprocess"] == ["mean", "std"] for g in got)
    trained = [np.load(tmp_path / f"inplace-rank{r}.npy") for r in range(2)]
    stored = final(tmp_path / "run", 6)
    assert trained[0].tobytes() == trained[1].tobytes() == stored.params.tobytes()
    assert not np.array_equal(trained[0], np.load(tmp_path / "initial-rank0.npy"))


def test_fit_preempted_by_ctrl_c_returns_75_and_resume_auto_continues_bitwise(
        tmp_path, data):
    reference = tmp_path / "reference"
    ok(train(2, data, reference, "--batch-size", "16", "--dtype", "float64", "--steps", "600",
             "--checkpoint-every", "100000"))
    out = tmp_path / "out"
    out.mkdir()
    env = job_env()
    pids: dict[int, int] = {}
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", "2", sys.executable, PROG,
           "preempt", str(out), str(data)]
    proc = start(cmd, env, tmp_path / "stderr", meanwhile=lambda: pids.update(rank_pids(env[TAG])))
    for pid in pids.values():  # Ctrl-C in a terminal reaches every rank once
        _kill(pid, signal.SIGINT)
    code, stdout = finish(proc, timeout=90)
    assert code == 0, stdout[-2000:] + (tmp_path / "stderr").read_text()
    got = outputs(out, "preempt", 2)
    assert got[0]["codes"] == got[1]["codes"] == [75, 0], got
    assert "preempted by a signal: checkpoint at step" in stdout
    assert "resumed from" in stdout
    assert params(out / "run", 600) == params(reference, 600)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- evaluate, predict


def test_evaluate_and_predict_agree_between_one_process_and_two_ranks(tmp_path, data):
    ok(train(0, data, tmp_path / "run", "--dtype", "float64", "--steps", "5", "--standardize"))
    ckpt = checkpoint.checkpoint_path(tmp_path / "run" / "checkpoints", 5)
    odd = write_data(tmp_path / "odd.h5", n=67, seed=2)  # shares of 34 and 33 rows, batches of 8
    for ranks in (0, 2):
        prog(ranks, "evalpredict", tmp_path / f"out{ranks}", odd, ckpt)
    serial = outputs(tmp_path / "out0", "evalpredict", 1)[0]
    mpi = outputs(tmp_path / "out2", "evalpredict", 2)
    assert mpi[0] == mpi[1]
    assert serial["samples"] == mpi[0]["samples"] == 67
    assert abs(serial["loss"] - mpi[0]["loss"]) <= 1e-12 * abs(serial["loss"])
    assert serial["accuracy"] == mpi[0]["accuracy"]
    predicted = [np.load(tmp_path / "out2" / f"predict-rank{r}.npy") for r in range(2)]
    alone = np.load(tmp_path / "out0" / "predict-rank0.npy")
    assert alone.shape == (67, 3) and alone.dtype == np.float64
    assert alone.tobytes() == predicted[0].tobytes() == predicted[1].tobytes()


# ----------------------------------------------------------------------------- errors, help


def test_bad_options_raise_usage_error_on_every_rank_with_the_message_on_rank_0(tmp_path, data):
    prog(2, "bad", tmp_path, data)  # a hang would time out in run_mpi
    rank0, rank1 = (g["errors"] for g in outputs(tmp_path, "bad", 2))
    assert all(e is not None and e["setup_refused"] for e in rank0 + rank1)
    assert "learning_rate" in rank0[0]["message"] and "lr" in rank0[0]["message"]
    assert "batch_size" in rank0[1]["message"] or "batch-size" in rank0[1]["message"]
    assert all(e["message"].startswith("rank 0 refused the setup") for e in rank1)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("ckpt-*.h5"))


def test_help_of_the_package_names_every_public_function():
    code = ("import distbp, pydoc; print(pydoc.render_doc(distbp, renderer=pydoc.plaintext)); "
            "print('DIR', ' '.join(dir(distbp)))")
    proc = ok(run_py(["-c", code], env=clean_env()))
    text, listed = proc.stdout.split("\nDIR ")
    for name in ("fit", "load", "evaluate", "predict", "Network", "FitResult"):
        assert f"{name}(" in text or f"{name} " in text, name
        assert name in listed.split(), name
    assert "__version__" in listed.split()

