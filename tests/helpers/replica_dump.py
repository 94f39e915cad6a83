"""`distbp train`, with every rank's parameters saved around each replica check.

    mpiexec -n 3 python tests/helpers/replica_dump.py OUT_DIR train --data d.h5 --steps 20 ...

The replica check compares 8-byte hashes and repairs what it finds, so from outside only rank 0's
replica is visible. Here each call of Trainer.check_replicas on each rank first saves the rank's
flat parameters to OUT_DIR/call<NNN>-step<8 digits>-rank<R>-before.npy, then runs the check, then
saves ...-after.npy: a test can compare the replicas bitwise, before and after a repair. Every
rank makes the same sequence of calls (the check is a collective), so NNN lines up across ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from faults import ENV, inject

from distbp import cli
from distbp.trainer import Trainer


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    check = Trainer.check_replicas
    calls = [0]

    def check_and_dump(self: Trainer, step: int) -> bool:
        stem = out / f"call{calls[0]:03d}-step{step:08d}-rank{self.comm.rank}"
        calls[0] += 1
        np.save(f"{stem}-before.npy", self.s.net.params)
        same = check(self, step)
        np.save(f"{stem}-after.npy", self.s.net.params)
        return same

    Trainer.check_replicas = check_and_dump
    if os.environ.get(ENV):
        inject(os.environ[ENV])
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
