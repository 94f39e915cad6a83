"""Test program for distbp.overlap, run by tests/test_overlap.py under mpiexec: the same run
trained with the whole buffer in one allreduce and with one bucket per layer (allreduces
started while backward runs), final parameters of both saved by rank 0.

    mpiexec -n 3 python tests/mpi_progs/overlap_prog.py DATA.h5 OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from distbp.comm import get_comm
from distbp.config_schema import TrainConfig
from distbp.session import build_session
from distbp.trainer import Trainer


def run(data: str, out: Path, overlap: str, comm) -> np.ndarray:
    cfg = TrainConfig.from_dict({
        "data": data, "layers": [8, 32, 16, 3], "activation": "tanh", "dtype": "float64",
        "batch_size": 16, "steps": 12, "momentum": 0.9, "seed": 5, "check_every": 4,
        "run_dir": str(out), "progress": "lines", "overlap": overlap,
        "bucket_mb": 1e-6}, "overlap_prog")  # 1 byte: every layer is a bucket of its own
    s = build_session(cfg, local_size=comm.local_size, rank=comm.rank, size=comm.size)
    trainer = Trainer(s, comm, log=lambda *_: None)
    assert len(trainer.stepper.buckets.bounds) == (3 if overlap == "on" else 1)
    assert trainer.train() == 0
    return s.net.params.copy()


def main(data: str, out: Path) -> None:
    comm = get_comm(timeout=60)
    whole = run(data, out / "whole", "auto", comm)  # one node: auto is one allreduce
    layered = run(data, out / "buckets", "on", comm)
    if comm.rank == 0:
        np.save(out / "whole.npy", whole)
        np.save(out / "buckets.npy", layered)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
