"""`distbp`, with a test-only failure injected into one rank: the trainer is wrapped from outside,
so nothing of it sits in distbp's step loop.

    DISTBP_FAULT=KIND:RANK:STEP mpiexec -n 2 python tests/helpers/faults.py train --data d.h5 ...

Right after optimizer step STEP (counted from 1) rank RANK fails the chosen way: `raise` an
exception, `kill` itself with SIGKILL, `hang` (sleep an hour), `perturb` its parameters (the
replica check must repair them) or `exit0` (leave "successfully" mid-run, which must not look
like success). Without DISTBP_FAULT it is exactly `python -m distbp`.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from distbp.entry import command_of
from distbp.stopflag import install_early

ENV = "DISTBP_FAULT"


def inject(spec: str) -> None:
    """Wrap Trainer.step so that rank RANK fails as KIND right after step STEP."""
    from distbp.trainer import Trainer

    kind, rank, at = spec.split(":")
    rank, at = int(rank), int(at)
    step = Trainer.step

    def faulty(self: Trainer, i: int) -> float:
        lr = step(self, i)
        if self.comm.rank == rank and i + 1 == at:
            act(kind, self, at)
        return lr

    Trainer.step = faulty


def act(kind: str, trainer, at: int) -> None:
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {at}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind == "perturb":
        trainer.s.net.params[0] += 1e-3
    if kind == "exit0":
        raise SystemExit(0)


def main(argv: list[str]) -> int:
    if command_of(argv) == "train":
        install_early()  # as the distbp entry point does, before the heavy imports
    if os.environ.get(ENV):
        inject(os.environ[ENV])
    from distbp.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
