"""Shared by tests/test_slurm.py and tests/test_slurm_tools.py: the local Slurm those tests
start with scripts/slurm-local.sh, and `Cluster`, the client that submits, polls and inspects
jobs on it. Separate so that the client's own tests (fake squeue/scancel) need no cluster.

    cluster = Cluster(lab)                  # lab: the directory slurm-local.sh set up
    job = cluster.sbatch("--ntasks=2", "train.sbatch", ...)
    info = cluster.wait(job)                # scontrol's record once the job left the queue

Jobs are polled with squeue, which is asked again when it fails or times out (a busy slurmctld,
another cluster on the machine) until the wait's own deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import BIN, ROOT, OpenMPILauncher, child_env, mpiexec_path

from distbp import checkpoint

__all__ = ["DAEMONS", "LAUNCHER_PREFIXES", "SCRIPT", "TRAIN", "TRANSIENT", "Cluster",
           "assert_same_state", "final_checkpoint", "finish_requeued", "free_ports", "job_env",
           "job_segments", "mpich_hash", "read_log", "shown", "unavailable"]

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
TRAIN = ROOT / "hpc" / "slurm" / "train.sbatch"  # the job script users submit

DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/munged")
# What a Slurm client prints when slurmctld did not answer in time: the request may have been
# carried out, or not.
TRANSIENT = ("Socket timed out", "Unable to contact slurm controller",
             "Zero Bytes were transmitted")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "PRTE_", "SLURM_", "SRUN_", "HYDRA_", "MPI_LOCAL")


def unavailable() -> str | None:
    """Why this machine cannot run a local Slurm, or None."""
    if not sys.platform.startswith("linux"):
        return "a local Slurm needs Linux"
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts the jobs); run the tests as root"
    if not all(Path(p).exists() for p in DAEMONS) and shutil.which("apt-get") is None:
        return "slurmctld/slurmd/munge are not installed and there is no apt-get"
    if mpiexec_path() is None:
        return "no mpiexec for the reference run: pip install '.[mpi]'"
    return None


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def job_env(conf: Path, **extra: str) -> dict[str, str]:
    """The submitting shell: no launcher variables, our cluster, this venv's distbp on PATH."""
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def mpich_hash(kvsname: str) -> str:
    """MPICH's name for a PMI key space's shared memory: '_<32-bit FNV-1a, hex>_', as in
    /dev/shm/mpich_shm_<hash>_<node> (scripts/mpich-shm-clean.sh computes it alike)."""
    h = 2166136261
    for byte in kvsname.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return f"_{h:x}_"


def job_segments(lab: Path, shm: Path = Path("/dev/shm")) -> set[str]:
    """MPICH's segments in `shm` named after a step (0-63) of a job that the cluster in `lab`
    ran (its logs/jobcomp.txt): what the Prolog/Epilog must have removed."""
    jobs = set(re.findall(r"JobId=(\d+)", (lab / "logs" / "jobcomp.txt").read_text()))
    names = {mpich_hash(f"{job}.{step}") for job in jobs for step in range(64)}
    return {n for n in os.listdir(shm) if n.startswith("mpich_")
            and any(h in n for h in names)}


def final_checkpoint(run_dir: Path, step: int) -> checkpoint.Checkpoint:
    """The checkpoint of `step` in `run_dir`/checkpoints, verified."""
    return checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", step))


def assert_same_state(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    """Parameters and every optimizer buffer bitwise equal, at the same step."""
    assert (a.step, a.epoch, a.step_in_epoch) == (b.step, b.epoch, b.step_in_epoch)
    assert a.params.dtype == b.params.dtype == np.float64
    np.testing.assert_array_equal(a.params, b.params)
    assert a.optimizer_state.keys() == b.optimizer_state.keys()
    for key, value in a.optimizer_state.items():
        np.testing.assert_array_equal(value, b.optimizer_state[key], err_msg=key)


class Cluster:
    """The running local Slurm: submit, poll, inspect."""

    query_timeout = 30.0  # seconds one squeue/scontrol may take before it is asked again
    settle = 15.0  # seconds an unanswered control command is given to show its effect

    def __init__(self, lab: Path):
        self.lab = lab
        self.env = job_env(lab / "etc" / "slurm.conf")

    def run(self, *cmd: str, timeout: float = 120, check: bool = True, **kw
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=kw.pop("env", self.env), **kw)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n" \
                                         f"{proc.stdout}{proc.stderr}"
        return proc

    def control(self, *cmd: str, took_effect: Callable[[], bool], deadline: float | None = None
                ) -> None:
        """Run a command that changes the cluster (scancel, scontrol update). When slurmctld is
        too busy to answer in time ("Socket timed out on send/recv operation": a CI run failed
        so), the command may or may not have been carried out: wait up to `settle` seconds for
        `took_effect()`, and send it again only if it did not, until `deadline` (default 120 s
        from now). Any other failure fails at once."""
        deadline = time.monotonic() + 120 if deadline is None else deadline
        while True:
            try:
                proc = self.run(*cmd, check=False,
                                timeout=max(min(60.0, deadline - time.monotonic()), 5.0))
            except subprocess.TimeoutExpired as exc:
                why = f"timed out after {exc.timeout:g} s"
            else:
                if proc.returncode == 0:
                    return
                why = f"exit {proc.returncode}: {proc.stderr.strip()}"
                if not any(t in proc.stderr for t in TRANSIENT):
                    raise AssertionError(f"{' '.join(cmd)}: {why}")
            wait_until = min(time.monotonic() + self.settle, deadline)
            while time.monotonic() < wait_until:
                if took_effect():
                    return
                time.sleep(0.2)
            if time.monotonic() >= deadline:
                raise AssertionError(f"{' '.join(cmd)} kept failing until the deadline: {why}")

    def sbatch(self, *args: str, **kw) -> str:
        return self.run("sbatch", "--parsable", *args, **kw).stdout.strip().split(";")[0]

    def query(self, *cmd: str, deadline: float | None = None) -> str:
        """stdout of a read-only command (squeue, scontrol show), asked again while it fails or
        times out (a busy slurmctld: another cluster may share the machine) until `deadline`
        (time.monotonic(); default 60 s from now)."""
        deadline = time.monotonic() + 60 if deadline is None else deadline
        while True:
            left = deadline - time.monotonic()
            try:
                proc = self.run(*cmd, check=False,
                                timeout=min(self.query_timeout, max(left, 5.0)))
            except subprocess.TimeoutExpired as exc:
                why = f"timed out after {exc.timeout:g} s"
            else:
                if proc.returncode == 0:
                    return proc.stdout
                why = f"exit {proc.returncode}: {proc.stderr.strip()}"
            if time.monotonic() >= deadline:
                raise AssertionError(f"{' '.join(cmd)} kept failing until the deadline: {why}")
            time.sleep(0.5)

    def state(self, job: str, deadline: float | None = None) -> str:
        """squeue's state of the job ('' once it has left the queue)."""
        return self.query("squeue", "-h", "-j", job, "-o", "%T", deadline=deadline).strip()

    def wait(self, job: str, timeout: float = 120) -> dict[str, str]:
        """Poll squeue (sbatch --wait polls coarsely) until the job is gone; scontrol's record."""
        deadline = time.monotonic() + timeout
        try:
            while self.state(job, deadline):
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job} still queued after {timeout} s")
                time.sleep(0.2)
        except AssertionError:
            self.run("scancel", job, check=False, timeout=60)
            raise
        return self.show(job)

    def openmpi_env(self, launcher: OpenMPILauncher, scratch: Path) -> dict[str, str]:
        """sbatch's environment for train.sbatch with Open MPI ranks under `srun --mpi=pmix`:
        the cluster's, with Open MPI's own settings from conftest's `launcher` (root allowed, no
        ofi BTL: its OMPI_/PRTE_/PMIX_ variables, settings there, not an outer launcher's), no
        PYTHONPATH (the ranks import that venv's mpi4py, numpy and h5py), DISTBP_SRUN_MPI=pmix
        and DISTBP a wrapper written to `scratch` that runs the venv's `python -m distbp` (the
        venv gets distbp through a .pth: no distbp script). PMIX_MCA_psec is train.sbatch's."""
        wrapper = scratch / "distbp-openmpi"
        wrapper.write_text(f'#!/bin/sh\nexec "{launcher.python}" -m distbp "$@"\n')
        wrapper.chmod(0o755)
        own = {k: v for k, v in launcher.env.items() if k.startswith(("OMPI_", "PRTE_", "PMIX_"))}
        base = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        return {**base, **own, "DISTBP": str(wrapper), "DISTBP_SRUN_MPI": "pmix"}

    def pmix_unavailable(self) -> str | None:
        """Why `srun --mpi=pmix` cannot start a step here (Slurm's mpi/pmix plugin loads the
        unversioned libpmix.so of libpmix-dev, which Debian's Slurm packages do not pull in), or
        None."""
        proc = self.run("srun", "--mpi=pmix", "-n", "1", "true", check=False, timeout=60)
        if proc.returncode == 0:
            return None
        return (f"srun --mpi=pmix fails here (exit {proc.returncode}; apt-get install "
                f"libpmix-dev?): " + " | ".join(proc.stderr.strip().splitlines()[:2]))

    def wait_for_output(self, job: str, path: Path, pattern: str, timeout: float) -> re.Match:
        """Poll the job's output file until `pattern` (re.M) appears; fail, cancelling the job,
        when the job ends or `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout

        def log() -> str:
            return path.read_text() if path.exists() else ""

        try:
            while True:
                m = re.search(pattern, log(), re.M)
                if m:
                    return m
                if time.monotonic() >= deadline or not self.state(job, deadline):
                    m = re.search(pattern, log(), re.M)  # written just before the end?
                    if m:
                        return m
                    raise AssertionError(f"no /{pattern}/ in the output of job {job}:\n{log()}")
                time.sleep(0.05)
        except AssertionError:
            self.run("scancel", job, check=False, timeout=60)
            raise

    def show(self, job: str) -> dict[str, str]:
        out = self.query("scontrol", "-o", "show", "job", job).splitlines()[0]
        return dict(f.split("=", 1) for f in out.split() if "=" in f)


def read_log(path: Path) -> str:
    """A job's output file so far ("" before it exists)."""
    return path.read_text() if path.exists() else ""


def shown(log: str) -> str:
    """A job log for an assertion message: without the per-step checkpoint lines, its end."""
    return "\n".join(ln for ln in log.splitlines() if not ln.startswith("checkpoint /"))[-6000:]


def finish_requeued(cluster: Cluster, job: str, out: Path, timeout: float) -> tuple[str, str]:
    """After a time-limit requeue: give the next run a 10-minute limit (its warning is not due
    while a test runs), wait for it, check the job completed after one requeue; the log's two
    runs."""
    cluster.control("scontrol", "update", f"JobId={job}", "TimeLimit=10",
                    took_effect=lambda: cluster.show(job).get("TimeLimit") == "00:10:00")
    info = cluster.wait(job, timeout=timeout)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        shown(log)
    run1, run2 = log.split(f"job {job} run 2 ")
    return run1, run2
