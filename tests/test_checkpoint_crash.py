"""Checkpoint crash safety: a child killed at each point of a save (mid-write, before the
fsync, before the rename, before the directory fsync) or by SIGKILL at random moments of a save
loop never leaves a broken checkpoint where load or latest_valid would find it.

Shared helpers: tests/helpers/ckptstate.py."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import child_env, run_py
from helpers.ckptstate import run_state

from distbp import checkpoint as ck

# ------------------------------------------------------------------------------ crash safety

CRASH_SCRIPT = """
import os, sys
import h5py
import numpy as np
from distbp import checkpoint as ck

directory, point = sys.argv[1], sys.argv[2]
layers = [4, 5, 3]
state = dict(step=2, epoch=0, step_in_epoch=2, seed=0, layers=layers, activation="tanh",
             output="identity", loss="mse", params=np.zeros(43), optimizer_name="sgd",
             optimizer_state={}, config={}, metrics=[], world_size=1,
             interval={"steps": 0, "loss_sum": 0.0, "correct": 0.0, "samples": 0.0})
die = lambda *a, **k: os._exit(9)
if point == "write":  # die in the middle of writing datasets
    create, calls = h5py.Group.create_dataset, []
    def create_dataset(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            os._exit(9)
        return create(self, *a, **k)
    h5py.Group.create_dataset = create_dataset
elif point == "fsync":  # die before the file is durable
    os.fsync = die
elif point == "replace":  # die just before the rename
    os.replace = die
elif point == "dir-fsync":  # die after the rename, before the directory fsync
    fsync, calls = os.fsync, []
    def fsync_second_dies(fd):
        calls.append(fd)
        if len(calls) == 2:
            os._exit(9)
        fsync(fd)
    os.fsync = fsync_second_dies
ck.save(directory, **state)
"""


@pytest.mark.parametrize("point,survivor", [("write", 1), ("fsync", 1), ("replace", 1),
                                            ("dir-fsync", 2)])
def test_crash_during_save_leaves_only_complete_checkpoints(tmp_path, point, survivor):
    first = ck.save(tmp_path, **run_state(step=1))
    script = tmp_path.parent / f"crash_{point}.py"
    script.write_text(CRASH_SCRIPT)
    proc = run_py([str(script), str(tmp_path), point], timeout=60)
    assert proc.returncode == 9, proc.stderr
    names = ck.list_checkpoints(tmp_path)
    assert names == [first, ck.checkpoint_path(tmp_path, 2)][:survivor]
    for path in names:
        ck.load(path)
    assert ck.latest_valid(tmp_path) == (names[-1], [])
    # HDF5 builds the file in memory: a crash while it writes leaves no file at all; one
    # after the temporary file exists leaves it, invisible, until the next save
    if point != "write" and survivor == 1:
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    ck.save(tmp_path, **run_state(step=3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


LOOP_SCRIPT = """
import sys
import numpy as np
from distbp import checkpoint as ck

directory, start = sys.argv[1], int(sys.argv[2])
layers = [200, 300, 10]
n = 200 * 300 + 300 + 300 * 10 + 10
rng = np.random.default_rng(start)
for step in range(start, start + 10**6):
    params = rng.standard_normal(n)
    ck.save(directory, step=step, epoch=0, step_in_epoch=step, seed=0, layers=layers,
            activation="relu", output="softmax", loss="cross_entropy", params=params,
            optimizer_name="adam",
            optimizer_state={"m": params * 0.5, "v": params**2, "t": np.int64(step)},
            config={"step": step}, metrics=[{"step": s} for s in range(step)],
            interval={"steps": 0, "loss_sum": 0.0, "correct": 0.0, "samples": 0.0},
            world_size=1, keep=2)
    print("saved", step, flush=True)
"""


def test_kill_9_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP_SCRIPT)
    directory = tmp_path / "ck"
    chooser = random.Random(1234)
    start = 0
    for _ in range(5):
        child = subprocess.Popen([sys.executable, str(script), str(directory), str(start)],
                                 stdout=subprocess.PIPE, text=True, env=child_env())
        try:
            assert child.stdout.readline().startswith("saved")
            time.sleep(chooser.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            child.stdout.close()
        present = ck.list_checkpoints(directory)
        assert present, "at least the first save of each child completed"
        for path in present:
            assert ck.load(path).step == int(path.name[5:13])
        assert ck.latest_valid(directory) == (present[-1], [])
        start = ck.load(present[-1]).step + 1
