"""Rank 0's progress: a bar on a terminal (or on request), plain lines in logs."""

from __future__ import annotations

import io

from conftest import run_mpi

from distbp.metrics import Progress


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_draws_a_bar_only_on_a_terminal_or_on_request():
    for mode, bar in (("auto", False), ("lines", False), ("bar", True)):
        out = _Pipe()
        p = Progress(total=10, every=5, stream=out, mode=mode)
        for step in range(1, 11):
            p.step(step, "loss 0.1")
            if step % 5 == 0:
                p.line(f"step {step}/10")
        text = out.getvalue()
        assert text.count("step 5/10\n") == 1 and text.count("step 10/10\n") == 1
        assert ("\r[" in text) is bar and ("10/10 loss 0.1" in text) is bar


def test_train_prints_the_start_up_summary_once_under_mpi(tmp_path):
    proc = run_mpi(2, ["-m", "distbp", "train", "--steps", "3", "--run-dir", str(tmp_path)],
                   timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("distbp 0.1.0: 2 rank(s), mpi") == 1
    assert "BLAS thread(s) per rank" in out and "per-rank shard 16 rows" in out
    assert out.count("config: {") == 1 and "steps 0 -> 3" in out
