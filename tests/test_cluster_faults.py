"""Failures and preemption across nodes (issue 12), on an emulated 4-node cluster of
scripts/cluster-local.sh, started for this module and always torn down:

- a whole node dies (every process in its namespaces SIGKILLed) mid-run: the ranks on the
  surviving node end within --collective-timeout + 10 s, Slurm requeues the job (NODE_FAIL), and
  once the node is back the job resumes from the last checkpoint and ends bitwise equal to an
  uninterrupted run; no MPI segment stays on either node (the Prolog/Epilog);
- on 4 nodes, the time-limit warning (--signal=B:USR1@80 under -t 2, forwarded by the batch
  shell) reaches the task on every node once: checkpoint, exit 75, requeue, `--resume auto`,
  and the end bitwise like `mpiexec -n 4`; then evaluate and predict run across the 4 nodes
  and agree with one process.

Needs root (skipped otherwise). The time-limit test waits for slurmctld's once-a-minute check.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BIN
from helpers.cluster import MODEL, host_train, node_cluster, unavailable, work_dir
from helpers.slurmlab import (
    TRAIN,
    assert_same_state,
    final_checkpoint,
    finish_requeued,
    read_log,
    shown,
)

pytestmark = pytest.mark.slurm

TIMEOUT = 10  # --collective-timeout of the node-failure run
TINY = ("--layers", "32,8,4", "--dtype", "float64", "--batch-size", "64", "--seed", "1",
        "--collective-timeout", "60")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    # SLURMD_TIMEOUT: how soon slurmctld declares the killed node down and requeues its job
    with node_cluster(4, tmp_path_factory.mktemp("cluster-logs"), SLURM_CRED_EXPIRE="5",
                      SLURMD_TIMEOUT="15") as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return work_dir(tmp_path_factory, "cluster-faults")


def _wait_until(what: str, ok, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_a_dead_node_ends_the_job_and_the_requeued_job_resumes_bitwise(cluster, work):
    run_dir, out, steps = work / "nodefail", work / "nodefail.out", 1200
    options = (*MODEL, "--collective-timeout", str(TIMEOUT), "--checkpoint-every", "100")
    job = cluster.sbatch("-N", "2", "-n", "2", "--nodelist=node1,node2", f"--output={out}",
                         f"--chdir={work}", str(TRAIN), "--data", str(work / "data.h5"),
                         "--run-dir", str(run_dir), *options, "--steps", str(steps),
                         "--log-every", "50")
    cluster.wait_for_output(job, out, r"^step 300/", 120)
    assert cluster.pids("node2", "distbp train")
    cluster.kill_node("node2")
    killed = time.monotonic()
    _wait_until("node1's rank ended", lambda: not cluster.pids("node1", "distbp train"),
                TIMEOUT + 10)
    ended = time.monotonic() - killed
    newest = max(int(p.stem[5:]) for p in (run_dir / "checkpoints").glob("ckpt-*.h5"))
    _wait_until("Slurm requeued the job", lambda: cluster.show(job).get("Restarts") == "1", 120)
    # hold it until node2 is back and settled: it must not start on a half-registered node
    cluster.control("scontrol", "hold", job,
                    took_effect=lambda: cluster.show(job).get("Priority") == "0")
    cluster.revive("node2")
    cluster.control("scontrol", "release", job,
                    took_effect=lambda: cluster.show(job).get("Priority") != "0")
    info = cluster.wait(job, timeout=240)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        shown(log)
    run1, run2 = log.split(f"job {job} run 2 ")
    # node1's rank ends by the collective deadline, or earlier: MPICH sometimes crashes
    # (SIGSEGV inside Iallreduce) when it starts a collective over a connection whose node
    # is gone. Either way within the deadline + 10 s (waited for above), never a hang.
    timed_out = f"did not complete within {TIMEOUT} s" in run1
    crashed = "node1: task 0: Segmentation fault" in run1
    assert timed_out or crashed, f"ended after {ended:.1f} s\n" + shown(run1)
    assert re.search(rf"resumed from \S+ckpt-{newest:08d}\.h5 at step {newest}\n", run2), \
        shown(run2)
    assert "distbp exited with 0" in run2
    reference = host_train(2, work / "data.h5", work / "nodefail-host", steps, *options)
    assert_same_state(final_checkpoint(run_dir, steps), reference)
    assert cluster.shm("node1") == cluster.shm("node2") == set()


EXTRA = 200  # steps the requeued run trains past its checkpoint


def _wrapper(path: Path, run_dir: Path, marks: Path) -> Path:
    """DISTBP for train.sbatch: notes on which node each task got USR1 (slurmstepd signals the
    task's process group: distbp, its child, gets it too; forwarding it would make two) and
    outlives a TERM (srun's --kill-on-bad-exit, when another task exits 75 first) as distbp
    does; in a requeued run, asks for EXTRA steps past the newest checkpoint and no brake."""
    path.write_text(
        "#!/bin/bash\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then\n'
        f'  ckpts=("{run_dir}"/checkpoints/ckpt-*.h5)\n'
        '  k=${ckpts[-1]##*/ckpt-}; k=$((10#${k%.h5}))\n'
        f'  set -- "$@" --steps $((k + {EXTRA})) --checkpoint-every 10000000\n'
        "fi\n"
        f'"{BIN / "distbp"}" "$@" &\n'
        "child=$!\n"
        f"trap 'echo \"$(hostname) task $SLURM_PROCID\" >>\"{marks}\"' USR1\n"
        "trap : TERM\n"
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; done\n'
        'wait "$child"\n')
    path.chmod(0o755)
    return path


def test_four_nodes_time_limit_requeue_resume_then_evaluate_and_predict_across_nodes(
        cluster, work):
    run_dir, out, marks = work / "four", work / "four.out", work / "four.usr1"
    wrapper = _wrapper(work / "distbp-four", run_dir, marks)
    job = cluster.sbatch("-N", "4", "-n", "4", "--time=2", "--signal=B:USR1@80",
                         f"--output={out}", f"--chdir={work}", str(TRAIN),
                         "--data", str(work / "data.h5"), "--run-dir", str(run_dir), *TINY,
                         "--steps", "10000000", "--checkpoint-every", "1", "--log-every", "1000",
                         env={**cluster.env, "DISTBP": str(wrapper)})
    cluster.wait_for_output(job, out, r"^\[train\.sbatch [\d:]+\] requeueing job", 150)
    run1, run2 = finish_requeued(cluster, job, out, timeout=180)
    log = read_log(out)
    assert "hosts: 4: node1 rank 0, node2 rank 1, node3 rank 2, node4 rank 3" in run1
    assert run1.count("got USR1: forwarding it to the ranks") == 1, shown(run1)
    assert sorted(read_log(marks).splitlines()) == [f"node{i} task {i - 1}" for i in (1, 2, 3, 4)]
    k = int(re.search(r"^preempted by a signal: checkpoint at step (\d+) written; run again "
                      r"with --resume auto to continue \(USR1 received 1 time\(s\) on rank 0\)$",
                      run1, re.M)[1])
    assert "received the stop signal" not in log, shown(log)
    assert re.search(rf"resumed from \S+ckpt-{k:08d}\.h5 at step {k}\n", run2), shown(run2)
    assert "distbp exited with 0" in run2 and "got USR1" not in run2, shown(run2)
    final = run_dir / "checkpoints" / f"ckpt-{k + EXTRA:08d}.h5"
    reference = host_train(4, work / "data.h5", work / "four-host", k + EXTRA, *TINY,
                           "--checkpoint-every", "10000000")
    assert_same_state(final_checkpoint(run_dir, k + EXTRA), reference)
    _evaluate_and_predict_across_nodes(cluster, work, final)


def _evaluate_and_predict_across_nodes(cluster, work: Path, ckpt: Path) -> None:
    """`srun -N 4 -n 4 distbp evaluate|predict` against one process on the host."""
    data = str(work / "data.h5")
    cluster.wait_idle()
    spread = cluster.run("srun", "-N", "4", "-n", "4", "distbp", "evaluate", str(ckpt),
                         "--data", data, "--json", cwd=work).stdout
    alone = subprocess.run([sys.executable, "-m", "distbp", "evaluate", str(ckpt), "--data",
                            data, "--json"], capture_output=True, text=True, timeout=120,
                           check=True).stdout
    got, want = json.loads(spread.strip().splitlines()[-1]), json.loads(alone.strip())
    assert got["samples"] == want["samples"] == 512 and got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    cluster.wait_idle()
    cluster.run("srun", "-N", "4", "-n", "4", "distbp", "predict", str(ckpt), "--data", data,
                "--out", str(work / "pred-4nodes.h5"), cwd=work)
    subprocess.run([sys.executable, "-m", "distbp", "predict", str(ckpt), "--data", data,
                    "--out", str(work / "pred-1.h5")], capture_output=True, timeout=120,
                   check=True)
    with h5py.File(work / "pred-4nodes.h5") as a, h5py.File(work / "pred-1.h5") as b:
        np.testing.assert_allclose(a["prediction"][...], b["prediction"][...], rtol=1e-12)
