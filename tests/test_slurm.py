"""hpc/slurm/*.sbatch on a real single-node Slurm (issue 7), started for this module by
scripts/slurm-local.sh in a temp dir (free ports, cred_expire 5 s so a requeued job runs again
within seconds) and always stopped at the end.

- train.sbatch with 2 tasks trains to completion, bitwise like a plain `mpiexec -n 2` run;
- `scancel --signal=USR1` (to the srun ranks): checkpoint, exit 75, the job requeues itself,
  resumes with --resume auto and ends bitwise like the uninterrupted run;
- the time-limit warning (`--signal=B:USR1@80` under `-t 2`, forwarded by the batch shell's
  trap), requeue and resume; then a plain `scancel` (TERM) checkpoints without a requeue;
- USR1 forwarded by the batch shell while the ranks are still starting: requeue, no step lost;
- a plain srun whose tasks form no MPI world fails with one clear line and exit 2;
- sweep.sbatch runs one training per learning rate as a job array.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (slurm-local.sh installs them
with apt when missing); skipped when neither is possible. Jobs are polled with squeue.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BIN, ROOT, child_env, mpiexec_path

from distbp import checkpoint

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
TRAIN = ROOT / "hpc" / "slurm" / "train.sbatch"
SWEEP = ROOT / "hpc" / "slurm" / "sweep.sbatch"
DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/munged")
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "PRTE_", "SLURM_", "SRUN_", "HYDRA_", "MPI_LOCAL")

# A model big enough that 800 steps (1.5-2 ms each on an idle 2-core machine) outlast the
# ~0.3 s a signal sent with scancel takes to arrive, small enough for a few seconds a run.
ROWS, FEATURES, CLASSES = 512, 32, 4
STEPS = 800
MODEL = ("--layers", "32,256,256,4", "--dtype", "float64", "--batch-size", "128", "--lr", "0.1",
         "--seed", "5", "--checkpoint-every", "200", "--collective-timeout", "60")
# The tiny model for runs whose final state is not compared (time limit, sweep).
TINY = ("--layers", "32,8,4", "--dtype", "float64", "--batch-size", "64", "--seed", "1",
        "--collective-timeout", "60")


def _unavailable() -> str | None:
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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _job_env(conf: Path, **extra: str) -> dict[str, str]:
    """The submitting shell: no launcher variables, our cluster, this venv's distbp on PATH."""
    env = {k: v for k, v in child_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class Cluster:
    """The running local Slurm: submit, poll, inspect."""

    def __init__(self, lab: Path):
        self.lab = lab
        self.env = _job_env(lab / "etc" / "slurm.conf")

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, **kw
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=kw.pop("env", self.env), **kw)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n" \
                                         f"{proc.stdout}{proc.stderr}"
        return proc

    def sbatch(self, *args: str, **kw) -> str:
        return self.run("sbatch", "--parsable", *args, **kw).stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        """squeue's state of the job ('' once it has left the queue); retries a busy slurmctld."""
        for _ in range(20):
            proc = self.run("squeue", "-h", "-j", job, "-o", "%T", check=False)
            if proc.returncode == 0:
                return proc.stdout.strip()
            time.sleep(0.5)
        raise AssertionError(f"squeue keeps failing: {proc.stderr}")

    def wait(self, job: str, timeout: float = 120) -> dict[str, str]:
        """Poll squeue (sbatch --wait polls coarsely) until the job is gone; scontrol's record."""
        deadline = time.monotonic() + timeout
        while self.state(job):
            if time.monotonic() > deadline:
                self.run("scancel", job, check=False)
                raise AssertionError(f"job {job} still queued after {timeout} s")
            time.sleep(0.2)
        return self.show(job)

    def show(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job).stdout.splitlines()[0]
        return dict(f.split("=", 1) for f in out.split() if "=" in f)


@pytest.fixture(scope="module")
def slurm():
    """A fresh single-node cluster for this module, stopped (by PID) however the module ends."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    # Short and world-searchable: munged runs as the munge user, and its socket path must stay
    # under 108 bytes (pytest's tmp dirs are private to root).
    lab = Path(tempfile.mkdtemp(prefix="distbp-slurm-", dir="/tmp"))
    lab.chmod(0o755)
    ctld, slurmd = _free_ports(2)
    env = _job_env(lab / "etc" / "slurm.conf", SLURMLAB_DIR=str(lab), SLURMCTLD_PORT=str(ctld),
                   SLURMD_PORT=str(slurmd), SLURM_CRED_EXPIRE="5", SLURM_SCHED_INTERVAL="1",
                   # job ids unlike those of a cluster another test session may run beside this
                   # one: MPICH names its PMI key space and shared memory after job.step
                   SLURM_FIRST_JOB_ID=str(random.randrange(1000, 60_000_000)))
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True,
                            timeout=300, env=env)
        if up.returncode != 0:
            if not all(Path(p).exists() for p in DAEMONS):
                pytest.skip(f"Slurm packages could not be installed: {up.stderr.strip()[-300:]}")
            pytest.fail(f"slurm-local.sh up failed (exit {up.returncode}):\n{up.stderr}")
        yield Cluster(lab)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(lab, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Data and runs of this module; the data: 512 rows of a linearly separable 4-class task."""
    d = tmp_path_factory.mktemp("slurm-work")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((ROWS, FEATURES))
    y = np.argmax(x[:, :CLASSES] + 0.5 * x[:, CLASSES:2 * CLASSES], axis=1)
    with h5py.File(d / "data.h5", "w") as f:
        f["x"], f["y"] = x, y.astype(np.int64)
    return d


def _train_args(work: Path, run_dir: Path, *options: str) -> list[str]:
    return ["--data", str(work / "data.h5"), "--run-dir", str(run_dir), *options]


@pytest.fixture(scope="module")
def reference(slurm, work) -> checkpoint.Checkpoint:
    """The uninterrupted run, as a plain `mpiexec -n 2` job outside Slurm."""
    run_dir = work / "reference"
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "distbp", "train",
           *_train_args(work, run_dir, *MODEL, "--steps", str(STEPS))]
    env = {k: v for k, v in slurm.env.items() if k != "SLURM_CONF"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _final(run_dir, STEPS)


def _final(run_dir: Path, step: int) -> checkpoint.Checkpoint:
    return checkpoint.load(checkpoint.checkpoint_path(run_dir / "checkpoints", step))


def assert_same_state(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    """Parameters and every optimizer buffer bitwise equal, at the same step."""
    assert (a.step, a.epoch, a.step_in_epoch) == (b.step, b.epoch, b.step_in_epoch)
    assert a.params.dtype == b.params.dtype == np.float64
    np.testing.assert_array_equal(a.params, b.params)
    assert a.optimizer_state.keys() == b.optimizer_state.keys()
    for key, value in a.optimizer_state.items():
        np.testing.assert_array_equal(value, b.optimizer_state[key], err_msg=key)


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(path: Path, pattern: str, timeout: float, slurm: Cluster, job: str) -> re.Match:
    """Poll the job's output file until `pattern` appears (or the job ends, or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, _log(path), re.M)
        if m:
            return m
        if not slurm.state(job):
            break
        time.sleep(0.05)
    slurm.run("scancel", job, check=False)
    raise AssertionError(f"no /{pattern}/ in the output of job {job}:\n{_log(path)}")


def test_sbatch_template_with_two_tasks_equals_mpiexec_bitwise(slurm, work, reference):
    run_dir, out = work / "sbatch", work / "sbatch.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *MODEL, "--steps", str(STEPS)))
    info = slurm.wait(job)
    log = _log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert re.search(r"^distbp \S+: 2 rank\(s\), mpi", log, re.M), log
    assert "--resume auto: no valid checkpoint" in log  # the template always resumes
    assert_same_state(_final(run_dir, STEPS), reference)


def test_scancel_usr1_checkpoints_requeues_and_resumes_to_the_same_state(slurm, work, reference):
    run_dir, out = work / "preempted", work / "preempted.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *MODEL, "--steps", str(STEPS),
                                    "--log-every", "1"))
    # A progress line means both ranks passed step 1: their handlers are installed.
    _wait_for(out, r"step \d+/\d+ epoch", 60, slurm, job)
    slurm.run("scancel", "--signal=USR1", job)
    info = slurm.wait(job, timeout=180)
    log = _log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stopped = re.search(r"checkpoint at step (\d+) written", log)
    assert stopped, f"the run ended before the signal arrived (make it longer):\n{log}"
    k = int(stopped[1])
    assert 0 < k < STEPS
    assert "preempted: checkpoint written (exit 75)" in log and "requeueing job" in log
    assert re.search(rf"resumed from \S+ckpt-{k:08d}\.h5 at step {k}\n", log), log
    assert log.count("job " + job + " run 2 ") == 1 and " run 3 " not in log
    assert_same_state(_final(run_dir, STEPS), reference)


def test_time_limit_warning_checkpoints_requeues_resumes_and_scancel_is_final(slurm, work):
    """The time-limit warning as Slurm sends it: USR1 to the batch shell only (B:), forwarded by
    the template's trap. slurmctld checks time limits about once a minute and sends the warning
    at the first check at or after end - lead - 30 s: with -t 2 and @80 that is 10 to 70 s after
    the start (after the ranks' start-up), a minute or more before the limit itself."""
    run_dir, out = work / "timelimit", work / "timelimit.out"
    job = slurm.sbatch("--ntasks=2", "--time=2", "--signal=B:USR1@80", f"--output={out}",
                       f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *TINY, "--steps", "100000000",
                                    "--checkpoint-every", "100000000", "--log-every", "1000"))
    _wait_for(out, r"^\[train\.sbatch [\d:]+\] requeueing job", 120, slurm, job)
    # The next run gets a 10-minute limit, so its warning is not due while this test runs.
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    resumed = _wait_for(out, r"resumed from \S+ckpt-(\d+)\.h5 at step (\d+)\n", 60, slurm, job)
    slurm.run("scancel", job)  # TERM to every process: checkpoint, exit 75, and no requeue
    info = slurm.wait(job, timeout=90)
    log = _log(out)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "1"), log
    run1, run2 = log.split(f"job {job} run 2 ")
    assert run1.count("got USR1: forwarding it to the ranks") == 1, log
    assert "got TERM" not in run1 and "preempted: checkpoint written (exit 75)" in run1, log
    k = int(resumed[2])
    assert re.search(rf"checkpoint at step {k} written", run1), log
    assert "got USR1" not in run2 and " run 3 " not in run2, log
    assert "stopped by TERM (scancel or preemption): checkpoint written, not requeueing" in run2
    end = int(re.search(r"checkpoint at step (\d+) written", run2)[1])
    assert end > k and _final(run_dir, end).step == end


def test_warning_during_rank_start_up_requeues_without_losing_a_step(slurm, work, tmp_path):
    """`scancel --batch --signal=USR1` while the ranks are still starting (a wrapper holds them
    before Python, so before any handler): they die of USR1 (exit 138), nothing was trained, and
    the job requeues itself and then trains to the end."""
    wrapper = tmp_path / "distbp-slow-start"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then echo "wrapper: starting"; sleep 60; fi\n'
        f'exec "{BIN / "distbp"}" "$@"\n')
    wrapper.chmod(0o755)
    run_dir, out = work / "startup", work / "startup.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *TINY, "--steps", "20"),
                       env={**slurm.env, "DISTBP": str(wrapper)})
    deadline = time.monotonic() + 60
    while _log(out).count("wrapper: starting") < 2:  # both tasks are in their start-up
        assert time.monotonic() < deadline and slurm.state(job), _log(out)
        time.sleep(0.05)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm.wait(job, timeout=120)
    log = _log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    run1, run2 = log.split(f"job {job} run 2 ")
    assert run1.count("got USR1: forwarding it to the ranks") == 1, log
    assert "the ranks were still starting when USR1 came (exit 138)" in run1, log
    assert "--resume auto: no valid checkpoint" in run2 and "distbp exited with 0" in run2, log
    assert _final(run_dir, 20).step == 20


def test_plain_srun_without_an_mpi_world_fails_loudly(slurm, work):
    proc = slurm.run("srun", "--mpi=none", "-n", "2", sys.executable, "-m", "distbp", "train",
                     *_train_args(work, work / "no-world", *TINY, "--steps", "3"),
                     check=False, timeout=60, cwd=work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("distbp: error:")]
    assert len(lines) == 1, proc.stderr  # printed once (by task 0), not once per task
    assert "srun started 2 tasks (SLURM_STEP_NUM_TASKS=2) but the MPI world has 1 rank(s)" \
           in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (work / "no-world" / "checkpoints").exists()


def test_sweep_array_trains_one_run_per_learning_rate(slurm, work):
    sweep = work / "sweep"
    job = slurm.sbatch("--array=0-1", "--ntasks=1", f"--chdir={work}",
                       f"--output={work}/sweep-%a.out", str(SWEEP),
                       *_train_args(work, work / "ignored", *TINY, "--steps", "10"),
                       env={**slurm.env, "SWEEP_DIR": str(sweep)}, cwd=ROOT)
    slurm.wait(job)
    finals = {}
    for task, lr in enumerate(("0.3", "0.1")):
        log = _log(work / f"sweep-{task}.out")
        assert "distbp exited with 0" in log, log
        final = _final(sweep / f"lr-{lr}", 10)
        assert final.config["lr"] == float(lr) and final.config["steps"] == 10
        finals[lr] = final.params
    assert not (work / "ignored").exists()  # the sweep's run dir wins over the caller's
    assert not np.array_equal(finals["0.3"], finals["0.1"])
