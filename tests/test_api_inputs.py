"""distbp.fit with what users of other tools pass it: a validation fraction of in-memory arrays,
each rank its own part of the data (refused on every rank, no hang), and a process whose BLAS
threads must be as it left them. Programs: tests/helpers/api_prog.py."""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT, child_env, run_mpi, run_py
from helpers.trainruns import clean_env, write_data

PROG = str(ROOT / "tests" / "helpers" / "api_prog.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_data(tmp_path_factory.mktemp("api") / "d.h5", 64))


def outputs(out, mode: str, ranks: int) -> list[dict]:
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def test_val_fraction_splits_in_memory_arrays_as_it_splits_a_file(tmp_path, data):
    proc = run_mpi(2, [PROG, "split", str(tmp_path), data], timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    for got in outputs(tmp_path, "split", 2):
        vals = [r for r in got["records"] if r["kind"] == "val"]
        assert vals and all(r["samples"] == 16 for r in vals)  # a quarter of 64 rows held out


def test_ranks_passing_different_arrays_are_refused_on_every_rank_without_a_hang(tmp_path,
                                                                                  data):
    proc = run_mpi(2, [PROG, "apart", str(tmp_path), data], timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    rank0, rank1 = (g["error"] for g in outputs(tmp_path, "apart", 2))
    assert rank0["setup_refused"] and rank1["setup_refused"]
    assert "the same full arrays" in rank0["message"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: BLAS has one thread anyway")
def test_the_api_leaves_the_processes_blas_threads_as_it_found_them(tmp_path, data):
    env = child_env(OMP_NUM_THREADS="2")
    proc = run_py([PROG, "threads", str(tmp_path), data], timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    (got,) = outputs(tmp_path, "threads", 1)
    assert got["before"] and got["after_fit"] == got["before"] == got["after_evaluate"]
    assert max(got["before"]) == 2  # fit ran with threads=1, then gave the two back
