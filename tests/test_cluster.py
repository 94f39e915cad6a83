"""hpc/slurm/train.sbatch across nodes (issue 12), on an emulated 4-node cluster that
scripts/cluster-local.sh builds for this module (each node its own network, IPC, UTS and mount
namespaces, its own CPUs where the host has enough) and always tears down.

- `sbatch -N 2 -n 2` (one rank per node) and `-N 2 -n 4` (two) end bitwise equal to
  `mpiexec -n 2` / `-n 4` on one host, and their allreduces really crossed the links: each
  node's eth0 sent at least the gradient's bytes times the steps;
- ranks per node, BLAS threads per rank and the start report's hosts come from the node;
- only rank 0 writes: the job trains with the run directory read-only on node2 (rank 0 is on
  node1), and every rank reads the HDF5 data file at once, with HDF5's file locking on;
- the cluster leaves nothing behind: no namespace, mount, daemon, and no MPI segment in the
  host's /dev/shm nor in any node's (the Prolog/Epilog removes a job's).

Node failures, the time-limit warning across nodes, and 4-node training with requeue,
evaluation and prediction: tests/test_cluster_faults.py. Needs root (skipped otherwise).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from helpers.cluster import (
    GRADIENT_BYTES,
    MODEL,
    host_train,
    node_cluster,
    unavailable,
    work_dir,
)
from helpers.slurmlab import (
    TRAIN,
    assert_same_state,
    final_checkpoint,
    job_segments,
    mpich_hash,
    read_log,
)

from distbp.api import placement
from distbp.comm import SerialComm, host_names

pytestmark = pytest.mark.slurm

STEPS = 300
# Jobs of two nodes run on these (each pinned to its own CPU where the host has two): a node
# still completing the previous job would otherwise send the job elsewhere.
PAIR = "--nodelist=node1,node2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with node_cluster(4, tmp_path_factory.mktemp("cluster-logs"), SLURM_CRED_EXPIRE="5") as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return work_dir(tmp_path_factory, "cluster-work")


def _submit(cluster, work: Path, name: str, *sbatch: str, steps: int = STEPS) -> str:
    """train.sbatch with MODEL for `steps` steps; the job's log, after it completed."""
    out = work / f"{name}.out"
    job = cluster.sbatch(*sbatch, f"--output={out}", f"--chdir={work}", str(TRAIN),
                         "--data", str(work / "data.h5"), "--run-dir", str(work / name),
                         *MODEL, "--steps", str(steps), "--checkpoint-every", "100")
    info = cluster.wait(job, timeout=240)
    log = read_log(out)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    return log


@pytest.mark.parametrize("ranks", [2, 4])
def test_two_nodes_train_bitwise_like_one_host_and_the_traffic_crosses_the_links(
        cluster, work, ranks):
    before = cluster.counters()
    # two ranks per node on nodes of one CPU: more tasks than CPUs, so --overcommit
    log = _submit(cluster, work, f"nodes2-ranks{ranks}", "-N", "2", "-n", str(ranks), PAIR,
                  *(["--overcommit"] if ranks > 2 else []))
    after = cluster.counters()
    per_node = ranks // 2
    spans = ("rank 0", "rank 1") if per_node == 1 else ("ranks 0-1", "ranks 2-3")
    assert f"hosts: 2: node1 {spans[0]}, node2 {spans[1]}" in log, log[-4000:]
    for node in ("node1", "node2"):
        sent = after[node][1] - before[node][1]
        assert sent >= GRADIENT_BYTES * STEPS, f"{node} sent {sent} bytes in {STEPS} steps"
    idle = after["node3"][1] - before["node3"][1]
    assert idle < GRADIENT_BYTES, f"node3 ran no rank but sent {idle} bytes"
    reference = host_train(ranks, work / "data.h5", work / f"host-{ranks}", STEPS, *MODEL,
                           "--checkpoint-every", "100")
    assert_same_state(final_checkpoint(work / f"nodes2-ranks{ranks}", STEPS), reference)


def test_overlap_auto_across_nodes_measures_both_modes_and_keeps_the_bits(cluster, work):
    """Across nodes, --overlap auto times steps with and without buckets during backward and
    keeps overlap only if it was clearly faster; a layer of 300,000 weights (over 2^18) has its
    ΔW computed in two blocks of rows, buckets end inside it, and on two ranks the run has the
    bits of the same run with --overlap off (a + b; the blocks are used either way)."""
    cluster.wait_idle()
    big = ("--layers", "32,600,500,4", "--dtype", "float64", "--batch-size", "128", "--seed",
           "5", "--collective-timeout", "60", "--steps", "30", "--data", str(work / "data.h5"))
    runs = {}
    for mode in ("auto", "off"):
        proc = cluster.run("srun", "-N", "2", "-n", "2", PAIR, "distbp", "train", *big,
                           "--run-dir", str(work / f"overlap-{mode}"), "--overlap", mode,
                           "--bucket-mb", "0.5", "--trace", str(work / f"overlap-{mode}.json"),
                           timeout=180, cwd=work)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[mode] = proc.stdout
    chosen = re.findall(r"^overlap auto: (on|off) \(measured ([\d.]+) ms a step with buckets "
                        r"during backward, ([\d.]+) ms with one allreduce after it\)$",
                        runs["auto"], re.M)
    assert len(chosen) == 1, runs["auto"]
    mode, with_buckets, without = chosen[0]
    assert (mode == "on") == (float(with_buckets) < 0.95 * float(without))
    assert "overlap auto" not in runs["off"]
    events = json.loads((work / "overlap-auto.json").read_text())["traceEvents"]
    buckets = {e["name"] for e in events if e.get("tid") == 1}  # the trial's steps with buckets
    assert "allreduce of layers 2-3 (part)" in buckets, buckets
    assert_same_state(final_checkpoint(work / "overlap-auto", 30),
                      final_checkpoint(work / "overlap-off", 30))


@pytest.mark.parametrize("per_node", [1, 2])
def test_ranks_per_node_threads_and_hosts_come_from_the_node(cluster, work, per_node):
    """Plain srun without OMP_NUM_THREADS: each rank's threads are its node's CPUs divided by
    the ranks on that node (at least one), the node's rank count is the node's, and the
    report names the host of every rank."""
    cluster.wait_idle()
    proc = cluster.run("srun", "-N", "2", "-n", str(2 * per_node), "--overcommit", PAIR,
                       "env", "-u", "OMP_NUM_THREADS", "distbp", "train",
                       "--data", str(work / "data.h5"), "--run-dir",
                       str(work / f"threads-{per_node}"), "--layers", "32,8,4", "--steps", "2",
                       timeout=120, cwd=work)
    out = proc.stdout
    threads = max(1, len(cluster.cpus("node1")) // per_node)
    assert re.search(rf"^distbp \S+: {2 * per_node} rank\(s\), mpi .*; {threads} BLAS "
                     rf"thread\(s\) per rank \((\d+ CPUs this rank is bound to|"
                     rf"\d+ CPUs / {per_node} rank\(s\) on this node)\)$", out, re.M), out
    spans = ("rank 0", "rank 1") if per_node == 1 else ("ranks 0-1", "ranks 2-3")
    assert f"hosts: 2: node1 {spans[0]}, node2 {spans[1]}\n" in out, out
    assert f"per rank for {per_node} rank(s) on this node)" in out, out


def test_only_rank_0_writes_and_every_node_reads_the_data_file(cluster, work):
    """The work directory (data, run directory, log) is read-only on node2, which runs ranks
    2 and 3: the job still trains, checkpoints and ends, so no rank but 0 (on node1) wrote.
    The four ranks open the HDF5 file at once with HDF5's file locking on (the default;
    shared file systems without locks need HDF5_USE_FILE_LOCKING=FALSE, hpc/README.md)."""
    cluster.on("node2", "mount", "--bind", "-o", "ro", str(work), str(work))
    try:
        probe = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-local.sh"), "x", "node2",
                                "touch", str(work / "probe")], env=cluster.env,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
        log = _submit(cluster, work, "readonly", "-N", "2", "-n", "4", "--overcommit", PAIR,
                      steps=200)
    finally:
        cluster.on("node2", "umount", str(work))
    assert "HDF5_USE_FILE_LOCKING" not in cluster.env
    assert "hosts: 2: node1 ranks 0-1, node2 ranks 2-3" in log
    names = sorted(p.name for p in (work / "readonly" / "checkpoints").iterdir())
    assert names == ["ckpt-00000100.h5", "ckpt-00000200.h5"], names
    records = (work / "readonly" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == len(set(records)) > 0  # one writer: no record twice


def test_the_cluster_leaves_no_namespace_mount_daemon_or_segment(cluster):
    """Every job so far: no MPI segment left in any node's /dev/shm (the Prolog/Epilog removes
    a job's); then `down`, twice (idempotent): nothing of the cluster is left on the host."""
    for node in cluster.nodes:
        assert cluster.shm(node) == set(), node
    pids = [int((cluster.lab / "pids" / f).read_text()) for f in
            ("munged.pid", "slurmctld.pid", "slurmd-node1.pid")]
    cluster.script("down")
    cluster.script("down")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.name not in netns
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(cluster.lab) not in mounts
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            b"slurm" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    # The host's /dev/shm never saw this cluster's jobs (each node has its own): no segment
    # named after any of their job ids there (other MPI jobs of the host are not ours to judge).
    assert job_segments(cluster.lab) == set()


def test_mpich_hash_names_the_segments_the_prolog_removes(tmp_path):
    """scripts/mpich-shm-clean.sh removes exactly the job's segments (FNV-1a of 'job.step'),
    e.g. job 2 step 0 is mpich_shm_281e0ec3_<node>."""
    assert mpich_hash("2.0") == "_281e0ec3_"
    names = [f"mpich_shm{mpich_hash('41.0')}0", f"mpich_vci{mpich_hash('41.3')}1",
             f"mpich_shm{mpich_hash('41.4294967291')}0", f"mpich_shm{mpich_hash('42.0')}0"]
    for name in names:
        (tmp_path / name).touch()
    env = {"SLURM_JOB_ID": "41", "DISTBP_SHM_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run(["bash", str(ROOT / "scripts" / "mpich-shm-clean.sh")], check=True, env=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[3]]


def test_placement_names_each_hosts_ranks_in_spans():
    assert placement(["node1", "node1", "node2", "node2"]) == \
        "hosts: 2: node1 ranks 0-1, node2 ranks 2-3"
    assert placement(["a", "b", "a", "b", "a"]) == "hosts: 2: a ranks 0,2,4, b ranks 1,3"
    assert placement(["n1", "n1", "n1", "n2", "n1"]) == "hosts: 2: n1 ranks 0-2,4, n2 rank 3"


def test_host_names_of_one_process_is_its_own_host_name():
    comm = SerialComm()
    assert host_names(comm) == [socket.gethostname()] == [comm.hostname]
