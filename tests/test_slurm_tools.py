"""What the Slurm tests rely on, tested without a cluster: `Cluster` (tests/helpers/slurmlab.py)
asks a squeue that timed out again until its deadline, and sends a scancel slurmctld did not
answer again only if it had no effect (fake squeue/scancel on PATH); the stop flag counts every
delivery, so a signal that reached a rank twice shows.

The tests that run jobs on a real local Slurm: tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers.slurmlab import Cluster

from distbp.stopflag import catch_stop_signals

pytestmark = pytest.mark.slurm


def test_a_squeue_that_times_out_is_asked_again_until_the_deadline(tmp_path):
    # a CI run failed with "squeue timed out after 30 seconds" while another Slurm instance
    # shared the machine; a fake squeue hangs twice, then answers (no cluster needed)
    fake, calls = tmp_path / "bin", tmp_path / "calls"
    fake.mkdir()
    (fake / "squeue").write_text(
        "#!/bin/sh\n"
        f'echo call >> "{calls}"\n'
        f'if [ "$(wc -l < "{calls}")" -le 2 ]; then exec sleep 60; fi\n'
        "echo RUNNING\n")
    (fake / "squeue").chmod(0o755)
    cluster = Cluster(tmp_path)
    cluster.env["PATH"] = f"{fake}{os.pathsep}{cluster.env['PATH']}"
    cluster.query_timeout = 0.3
    assert cluster.state("42", deadline=time.monotonic() + 30) == "RUNNING"
    assert calls.read_text().count("call") == 3
    calls.write_text("")  # hangs again, and the deadline passes: a clear failure
    with pytest.raises(AssertionError, match=r"squeue -h -j 42 -o %T kept failing until the "
                                             r"deadline: timed out after 0\.3 s"):
        cluster.state("42", deadline=time.monotonic() + 0.5)


def test_a_scancel_that_slurmctld_did_not_answer_is_sent_again_only_if_it_did_nothing(tmp_path):
    # a CI run failed with "scancel: error: Kill job error on job id N: Socket timed out on
    # send/recv operation"; a fake scancel times out twice, then succeeds (no cluster needed)
    fake, calls = tmp_path / "bin", tmp_path / "calls"
    fake.mkdir()
    (fake / "scancel").write_text(
        "#!/bin/sh\n"
        f'echo call >> "{calls}"\n'
        f'if [ "$(wc -l < "{calls}")" -le 2 ]; then\n'
        '  echo "scancel: error: Kill job error on job id 42: Socket timed out on send/recv '
        'operation" >&2; exit 140\n'
        "fi\n")
    (fake / "scancel").chmod(0o755)
    cluster = Cluster(tmp_path)
    cluster.env["PATH"] = f"{fake}{os.pathsep}{cluster.env['PATH']}"
    cluster.settle = 0.3
    cluster.control("scancel", "42", took_effect=lambda: False)
    assert calls.read_text().count("call") == 3
    calls.write_text("")  # it timed out, but the job did get the signal: not sent twice
    cluster.control("scancel", "42", took_effect=lambda: True)
    assert calls.read_text().count("call") == 1
    calls.write_text("call\ncall\ncall\n")  # any other failure is reported at once
    (fake / "scancel").write_text("#!/bin/sh\necho 'scancel: error: Invalid job id' >&2; exit 1\n")
    with pytest.raises(AssertionError, match=r"scancel 42: exit 1: scancel: error: Invalid job"):
        cluster.control("scancel", "42", took_effect=lambda: False)


def test_stop_flag_counts_every_delivery_so_a_double_one_shows():
    # what the preemption line and the warning of ranks > 0 report (no cluster needed)
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        flag = catch_stop_signals()
        assert (flag.count, flag.signum) == (0, None)
        for n, sig in enumerate((signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM), start=1):
            os.kill(os.getpid(), sig)
            deadline = time.monotonic() + 5
            while flag.count < n and time.monotonic() < deadline:
                time.sleep(0.001)  # the Python-level handler runs between bytecodes
            assert (flag.count, flag.signum) == (n, sig)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
