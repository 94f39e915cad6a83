"""The suite leaves /dev/shm as it found it. A job whose ranks are killed leaves MPICH's
shared-memory segments behind (MPI never gets to remove them), and a later job whose id hashes
to the same name fails or hangs in MPI_Init; conftest's autouse fixture removes, after every
test, the segments the test left. Here: a real killed job, and that removal."""

from __future__ import annotations

import os
import signal

from conftest import remove_segments_since, shm_segments
from helpers.mpijob import TAG, command, finish, job_env, rank_pids, start, teacher_file


def test_a_killed_jobs_segments_are_found_and_removed(mpiexec, tmp_path):
    before = shm_segments()
    data = teacher_file(tmp_path / "d.h5")
    env = job_env()
    cmd = command(mpiexec, data, tmp_path / "run", "--steps", "100000", "--log-every", "1",
                  "--collective-timeout", "60")
    proc = start(cmd, env, tmp_path / "stderr")
    pids = rank_pids(env[TAG])
    for pid in pids.values():  # both ranks at once: nothing of MPI runs its cleanup
        os.kill(pid, signal.SIGKILL)
    finish(proc)
    left = shm_segments() - before
    assert left, "the killed job left no segment: nothing here tests the removal"
    assert sorted(remove_segments_since(before)) == sorted(left)
    assert shm_segments() - before == set()
