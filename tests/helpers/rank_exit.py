"""Run the `distbp` command exactly as given, then tell on stderr how THIS rank ended.

    mpiexec -n 2 python tests/helpers/rank_exit.py -m distbp train --data d.h5 ...
    mpiexec -n 2 python tests/helpers/rank_exit.py path/to/distbp-script train ...

`-m distbp` runs distbp/__main__.py as `python -m distbp` does (runpy); a path runs that console
script's code. Either way the process stays the rank (signals sent to it reach distbp, hydra's
forwarding too) and nothing of distbp is imported before the command's own code runs. When the
command ends (SystemExit or return) this prints `distbp-test: rank R exit C` (R: PMI_RANK) and
exits with C: mpiexec reports one code for the job (hydra: 75 even when another rank exited 0),
this line gives each rank's own. A rank killed by a signal prints no line.
"""

from __future__ import annotations

import os
import runpy
import sys

MARK = "distbp-test: rank"


def main() -> None:
    if sys.argv[1] == "-m":
        module, args = sys.argv[2], sys.argv[3:]
        sys.argv = [module, *args]
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script, args = sys.argv[1], sys.argv[2:]
        sys.argv = [script, *args]
        run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
    try:
        run()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    # one write: print() writes the newline separately (unbuffered under PYTHONUNBUFFERED), and
    # hydra would splice the other rank's output in between
    sys.stderr.write(f"{MARK} {os.environ.get('PMI_RANK', '?')} exit {code}\n")
    sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
