"""Rank 0's progress: a bar on a terminal (or on request), plain lines in logs; the sums of a
train record carried over a resume."""

from __future__ import annotations

import io

from conftest import run_mpi

from distbp.ckpt_integrity import INTERVAL_KEYS
from distbp.metrics import Interval, Progress


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_draws_a_bar_only_on_a_terminal_or_on_request():
    for mode, bar in (("auto", False), ("lines", False), ("bar", True)):
        out = _Pipe()
        p = Progress(total=10, every=5, stream=out, mode=mode)
        for step in range(1, 11):
            p.step(step, 0.1)
            if step % 5 == 0:
                p.line(f"step {step}/10")
        text = out.getvalue()
        assert text.count("step 5/10\n") == 1 and text.count("step 10/10\n") == 1
        assert ("\r[" in text) is bar and ("10/10 loss 0.1000" in text) is bar


def test_train_prints_the_start_up_summary_once_under_mpi(tmp_path):
    proc = run_mpi(2, ["-m", "distbp", "train", "--steps", "3", "--run-dir", str(tmp_path)],
                   timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("distbp 0.1.0: 2 rank(s), mpi") == 1
    assert "BLAS thread(s) per rank" in out and "per-rank shard 16 rows" in out
    assert out.count("config: {") == 1 and "steps 0 -> 3" in out


def test_an_interval_carried_over_a_resume_gives_the_same_record_but_times_only_its_own_steps():
    # (loss sum, correct, samples, compute s, comm s) of three steps; the stop falls after the first
    steps = [(2.5, 1.0, 2.0, 0.010, 0.001), (20.0, 9.0, 16.0, 0.030, 0.002),
             (18.25, 12.0, 16.0, 0.050, 0.004)]
    whole, first = Interval(), Interval()
    for s in steps:
        whole.add(*s)
    first.add(*steps[0])
    resumed = Interval(first.state())
    for s in steps[1:]:
        resumed.add(*s)
    a, b = whole.record(8, 1, 0.1, 1.0), resumed.record(8, 1, 0.1, 1.0)
    assert b["loss"] == (2.5 + 20.0 + 18.25) / 34.0 and b["accuracy"] == 22.0 / 34.0
    assert all(a[k] == b[k] for k in ("kind", "step", "epoch", "loss", "accuracy", "lr"))
    assert b["compute_ms"] == round(1e3 * (0.030 + 0.050) / 2, 4)  # the 2 steps timed here
    assert b["comm_ms"] == round(1e3 * (0.002 + 0.004) / 2, 4)
    assert resumed.state() == {"steps": 3, "loss_sum": 40.75, "correct": 22.0, "samples": 34.0}
    assert tuple(resumed.state()) == INTERVAL_KEYS  # what checkpoints store
    for fresh in (Interval(None), Interval({})):  # a fresh run: no sums carried
        assert fresh.state() == {"steps": 0, "loss_sum": 0.0, "correct": 0.0, "samples": 0.0}
