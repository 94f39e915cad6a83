"""Shared by tests/test_cluster*.py: the emulated multi-node Slurm that scripts/cluster-local.sh
builds on this host, driven from Python.

    with node_cluster(4) as cluster:          # up; always down (idempotent) however it ends
        job = cluster.sbatch("-N", "2", "-n", "2", "train.sbatch", ...)   # on the head node
        cluster.wait(job)
        cluster.counters()                    # {"node1": (rx_bytes, tx_bytes), ...}
        cluster.kill_node("node2"); cluster.revive("node2")

`NodeCluster` is slurmlab's `Cluster` (submit, poll, inspect) whose Slurm commands run on the
emulated head node (`cluster-local.sh x head ...`); the rest are the script's own commands.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from conftest import ROOT, SHM_PREFIXES, mpiexec_path
from helpers.slurmlab import LAUNCHER_PREFIXES, Cluster, final_checkpoint, job_env
from helpers.slurmlab import unavailable as slurm_unavailable

from distbp import checkpoint

__all__ = ["MODEL", "SCRIPT", "NodeCluster", "host_train", "node_cluster", "mpi_files",
           "unavailable", "work_dir", "write_data"]

SCRIPT = ROOT / "scripts" / "cluster-local.sh"
TOOLS = ("ip", "tc", "nsenter", "unshare", "taskset")


# 75,268 float64 parameters: a 0.6 MB gradient per step, a few ms a step across two nodes.
MODEL = ("--layers", "32,256,256,4", "--dtype", "float64", "--batch-size", "128", "--lr", "0.1",
         "--seed", "5", "--collective-timeout", "60")
GRADIENT_BYTES = (32 * 256 + 256 + 256 * 256 + 256 + 256 * 4 + 4) * 8


def write_data(path: Path) -> Path:
    """512 rows of a linearly separable 4-class task with 32 features (HDF5)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 32))
    y = np.argmax(x[:, :4] + 0.5 * x[:, 4:8], axis=1)
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y.astype(np.int64)
    return path


def host_train(ranks: int, data: Path, run_dir: Path, steps: int, *options: str
               ) -> checkpoint.Checkpoint:
    """`mpiexec -n RANKS distbp train` on this host, outside every cluster: the reference."""
    env = {k: v for k, v in job_env(Path("/nonexistent")).items()
           if not k.startswith(LAUNCHER_PREFIXES)}
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m", "distbp", "train",
           "--data", str(data), "--run-dir", str(run_dir), *options, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return final_checkpoint(run_dir, steps)


def unavailable() -> str | None:
    """Why this machine cannot emulate a multi-node cluster, or None."""
    why = slurm_unavailable()
    if why:
        return why.replace("a local Slurm", "an emulated cluster")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} missing: apt-get install iproute2 util-linux"
    return None


def mpi_files(listing: str) -> set[str]:
    """The MPI libraries' files among `listing`'s names (a node's /dev/shm, one name a line)."""
    return {n for n in listing.split() if n.startswith(SHM_PREFIXES)}


class NodeCluster(Cluster):
    """The running emulated cluster: nodes node1..nodeN, clients on the head node."""

    def __init__(self, lab: Path, name: str, nodes: int):
        super().__init__(lab)
        self.name, self.nodes = name, [f"node{i}" for i in range(1, nodes + 1)]
        # MPICH 5.0.2's PMI2 wire-up under srun --mpi=pmi2 now and then sends Slurm a request
        # with bytes from beyond its buffer ("mpi/pmi2: value not properly terminated in client
        # request"), and MPI_Init fails or hangs; which steps it hits depends on the process's
        # memory (the same srun failed twice in a row here): its PMI-1 wire protocol, which
        # Slurm's pmi2 plugin speaks as well, does not.
        self.env = {**self.env, "CLUSTERLAB_DIR": str(lab), "CLUSTER_NAME": name,
                    "MPIR_CVAR_PMI_VERSION": "1"}

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, ...) on the head node."""
        return super().run("bash", str(SCRIPT), "x", "head", *cmd, **kw)

    def script(self, *args: str, timeout: float = 120) -> str:
        """cluster-local.sh ARGS; its stdout. Fails the test when it fails."""
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)
        assert proc.returncode == 0, f"cluster-local.sh {' '.join(args)}: exit " \
                                     f"{proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def on(self, node: str, *cmd: str, timeout: float = 120) -> str:
        """CMD's stdout, run on `node` (its namespaces)."""
        return self.script("x", node, *cmd, timeout=timeout)

    def counters(self) -> dict[str, tuple[int, int]]:
        """Bytes received and sent through each node's eth0 so far."""
        rows = (line.split() for line in self.script("counters").splitlines())
        return {node: (int(rx), int(tx)) for node, rx, tx in rows}

    def shape(self, rate: str) -> None:
        self.script("shape", rate)

    def wait_idle(self, timeout: float = 90) -> None:
        """Until every node is idle (a job's nodes stay 'completing' while its Epilog runs)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.query("sinfo", "-h", "-N", "-o", "%N %T", deadline=deadline)
            if all(line.split()[1] == "idle" for line in states.splitlines()):
                return
            assert time.monotonic() < deadline, f"nodes not idle after {timeout} s:\n{states}"
            time.sleep(0.3)

    def kill_node(self, node: str) -> None:
        """SIGKILL every process of `node`: its slurmd, slurmstepds and ranks."""
        self.script("kill", node)

    def revive(self, node: str) -> None:
        self.script("revive", node, timeout=180)

    def cpus(self, node: str) -> list[int]:
        """The host CPUs `node` is pinned to."""
        text = (self.lab / "state" / f"cpus-{node}").read_text()
        return [int(c) for c in text.strip().split(",")]

    def shm(self, node: str) -> set[str]:
        """MPI's files in `node`'s own /dev/shm."""
        return mpi_files(self.on(node, "ls", "-A", "/dev/shm"))

    def pids(self, node: str, needle: str) -> list[int]:
        """Processes of `node` (its network namespace) whose command line contains `needle`
        and does not start with srun or a shell: the ranks, not their launchers."""
        listed = subprocess.run(["ip", "netns", "pids", f"{self.name}-n{node[4:]}"],
                                capture_output=True, text=True, timeout=30).stdout.split()
        found = []
        for pid in listed:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            first = os.path.basename(argv[0].decode(errors="replace"))
            if first not in ("srun", "bash", "sh") and needle.encode() in b" ".join(argv):
                found.append(int(pid))
        return found


@contextlib.contextmanager
def node_cluster(nodes: int, logs: Path | None = None, **settings: str) -> Iterator[NodeCluster]:
    """An emulated cluster of `nodes` nodes for the duration of the block, torn down however
    the block ends (cluster-local.sh down is idempotent), its daemons' logs copied to `logs`.
    `settings`: the script's environment (SLURM_CRED_EXPIRE, SLURMD_TIMEOUT, ...). A name of
    its own, so that clusters of test sessions running side by side do not meet."""
    # world-searchable and short: munged runs as the munge user; socket paths < 108 bytes
    lab = Path(tempfile.mkdtemp(prefix="distbp-nodes-", dir="/tmp"))
    lab.chmod(0o755)
    name = f"dbp{uuid.uuid4().hex[:6]}"
    env = job_env(lab / "etc" / "slurm.conf", CLUSTERLAB_DIR=str(lab), CLUSTER_NAME=name,
                  **settings)
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up", str(nodes)], capture_output=True,
                            text=True, timeout=300, env=env)
        assert up.returncode == 0, f"cluster-local.sh up {nodes} failed:\n{up.stderr}"
        yield NodeCluster(lab, name, nodes)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=180, env=env)
        if logs is not None and (lab / "logs").is_dir():
            shutil.copytree(lab / "logs", logs, dirs_exist_ok=True)
        shutil.rmtree(lab, ignore_errors=True)


def work_dir(tmp_path_factory, name: str) -> Path:
    """A directory every node's jobs may enter (mode 755), holding data.h5."""
    d = tmp_path_factory.mktemp(name)
    d.chmod(0o755)
    write_data(d / "data.h5")
    return d
