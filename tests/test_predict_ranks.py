"""`distbp predict` writes the same bits on any number of ranks: each rank predicts whole batches
of the one-process split, so every row meets the same rows in its forward pass."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import run_mpi, run_py
from helpers.trainruns import clean_env

from distbp.evaluation import batch_share, gather_plan, round_bounds


@pytest.mark.parametrize("n,batch,size", [(37, 5, 3), (360, 32, 2), (7, 10, 4), (64, 8, 4)])
def test_batch_shares_are_whole_batches_covering_every_row_once(n, batch, size):
    shares = [batch_share(n, batch, r, size) for r in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert all(lo % batch == 0 for lo, hi in shares if hi > lo)
    chunk, rounds = gather_plan(n, size, 3, 8, batch)
    assert chunk % batch == 0
    rows = [r for t in range(rounds) for rank in range(size)
            for r in range(*round_bounds(n, rank, size, chunk, t, batch))]
    assert sorted(rows) == list(range(n))


def test_predict_on_1_2_and_3_ranks_writes_the_same_bits(tmp_path):
    # the bundled digits (360 test rows), float32, batches of 32 (the last one of 8 rows)
    env = clean_env()
    trained = run_py(["-m", "distbp", "train", "--steps", "30", "--run-dir", str(tmp_path / "run")],
                     timeout=120, env=env)
    assert trained.returncode == 0, trained.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000030.h5"
    outputs = []
    for ranks in (1, 2, 3):
        out = tmp_path / f"pred{ranks}.h5"
        args = ["-m", "distbp", "predict", str(ckpt), "--out", str(out), "--batch-size", "32"]
        proc = run_py(args, timeout=120, env=env) if ranks == 1 else \
            run_mpi(ranks, args, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        with h5py.File(out, "r") as f:
            outputs.append((f["prediction"][()], f["label"][()]))
    assert outputs[0][0].dtype == np.float32 and outputs[0][0].shape == (360, 10)
    for pred, label in outputs[1:]:
        assert pred.tobytes() == outputs[0][0].tobytes()
        np.testing.assert_array_equal(label, outputs[0][1])
