"""`python -m distbp`, with every checkpoint write delayed: it prints `distbp-test: saving` on
stdout, then sleeps DISTBP_SLOW_SAVE seconds (interruptibly) before the real write. The delay is
wrapped around distbp.checkpoint.save from outside, so nothing of it sits in distbp.

    DISTBP_SLOW_SAVE=30 python tests/helpers/slow_save.py train --data d.h5 ...

tests/test_interrupt.py sends the second Ctrl-C after the line, while the first one's checkpoint
is due: it must abort at once, with no checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from distbp.entry import command_of
from distbp.stopflag import install_early

MARK = "distbp-test: saving"


def main(argv: list[str]) -> int:
    if command_of(argv) == "train":
        install_early()  # as the distbp entry point does, before the heavy imports
    from distbp import checkpoint
    from distbp.cli import main as cli_main

    save, delay = checkpoint.save, float(os.environ.get("DISTBP_SLOW_SAVE", "0"))

    def slow_save(*args, **kwargs):
        print(MARK, flush=True)
        time.sleep(delay)
        return save(*args, **kwargs)

    checkpoint.save = slow_save
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
