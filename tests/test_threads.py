"""BLAS threads per rank: never more than the CPUs, the user's choice wins, printed at start."""

from __future__ import annotations

import os

import pytest
from conftest import child_env, run_py
from threadpoolctl import threadpool_info, threadpool_limits

from distbp.launch import set_threads

VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_CPUS_PER_TASK",
        "SLURM_CPUS_ON_NODE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    before = _blas_threads()
    yield monkeypatch
    if before:
        threadpool_limits(max(before))  # leave this test process as it was


def _fake_cpus(monkeypatch, total: int, mine: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: total)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(mine)))


def _blas_threads() -> set[int]:
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


@pytest.mark.parametrize("total,mine,local,expected", [
    (16, 16, 4, 4),   # unbound: the node's CPUs shared by its ranks
    (16, 16, 32, 1),  # more ranks than CPUs: one thread each, never zero
    (16, 4, 4, 4),    # the launcher bound each rank to its own 4 CPUs
    (16, 8, 4, 2),    # a job cpuset of 8 CPUs shared by 4 ranks: 8 / 4
    (2, 1, 2, 1),     # mpiexec -bind-to core on 2 cores
])
def test_default_threads_divide_the_cpus_without_oversubscribing(clean_env, total, mine, local,
                                                                  expected):
    _fake_cpus(clean_env, total, mine)
    text = set_threads(None, local)
    assert text.startswith(f"{expected} BLAS thread(s) per rank")
    if _blas_threads():
        assert _blas_threads() == {expected}


def test_a_node_smaller_than_its_host_counts_its_own_cpus(clean_env):
    # an emulated (or container) node of 2 CPUs on a 4-CPU host, its 2 ranks both on those 2:
    # they are not bound to shares of their own, each gets one thread
    _fake_cpus(clean_env, 4, 2)
    assert set_threads(None, 2).startswith("2 BLAS thread(s) per rank")  # the host's view
    clean_env.setenv("SLURM_CPUS_ON_NODE", "2")
    assert set_threads(None, 2).startswith("1 BLAS thread(s) per rank (2 CPUs / 2 rank(s)")


def test_threads_option_and_environment_variables_win(clean_env):
    _fake_cpus(clean_env, 16, 16)
    assert set_threads(3, 2).startswith("3 BLAS thread(s) per rank (--threads)")
    clean_env.setenv("MKL_NUM_THREADS", "2")
    assert set_threads(None, 1) == "2 BLAS thread(s) per rank (from MKL_NUM_THREADS)"
    if _blas_threads():
        assert _blas_threads() == {2}  # applied to OpenBLAS too, not only reported
    clean_env.setenv("SLURM_CPUS_PER_TASK", "5")
    clean_env.delenv("MKL_NUM_THREADS")
    assert set_threads(None, 2).startswith("5 BLAS thread(s) per rank (SLURM_CPUS_PER_TASK)")


def test_train_and_fit_apply_the_threads_setting(tmp_path):
    """--threads on the command line, `threads` in a config file and in fit() reach the BLAS
    limit: the start report says so, and fit gives the caller's limit back afterwards."""
    toml = tmp_path / "run.toml"
    toml.write_text("threads = 1\n")
    for args in (["--threads", "1"], ["--config", str(toml)]):
        proc = run_py(["-m", "distbp", "train", "--epochs", "1", "--run-dir",
                       str(tmp_path / args[0].strip("-")), *args])
        assert proc.returncode == 0, proc.stderr
        assert "1 BLAS thread(s) per rank (--threads)" in proc.stdout, proc.stdout
    script = ("import io, contextlib, distbp; from threadpoolctl import threadpool_info\n"
              "out = io.StringIO()\n"
              "with contextlib.redirect_stdout(out):\n"
              f"    distbp.fit(epochs=1, threads=1, run_dir={str(tmp_path / 'fit')!r})\n"
              "print('(--threads)' in out.getvalue())\n"
              "print({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'})\n")
    env = child_env()
    env["OMP_NUM_THREADS"] = "2"
    proc = run_py(["-c", script], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-3:] == ["True", "{2}", ""], proc.stdout
