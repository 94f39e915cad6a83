"""The preemption flag: SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) only set it; the training
loop reads it at each step. A second SIGINT raises KeyboardInterrupt at once (the job aborts).

Deliberately tiny (no NumPy, no h5py, no MPI): `distbp.entry` installs the handler before any of
those are imported, so a preemption signal that arrives while a rank is still starting (imports,
MPI initialization, data checks) sets the flag instead of killing the rank.

    install_early()                    # distbp.entry, before importing NumPy, h5py, MPI
    flag = catch_stop_signals()        # the trainer: takes that flag (else installs one)
    if flag.signum is not None: ...    # at a step boundary: checkpoint and exit 75
    restore_signals(flag)              # the handlers from before `catch_stop_signals`
"""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "StopFlag", "catch_stop_signals", "install_early", "restore_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; read at each step boundary (never acted on inside the handler).
    `count` counts the deliveries: a launcher or job script must give each rank the signal once,
    and a count above 1 at the preemption checkpoint shows it did not (see distbp.trainer)."""

    signum: int | None = None
    count: int = 0
    pending: bool = False  # installed by install_early, not yet taken by catch_stop_signals

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}  # the handlers it replaced

        def handler(signum, frame):
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
            self.signum = signum
            self.count += 1

        self.handler = handler


def catch_stop_signals() -> StopFlag:
    """Route SIGTERM and SIGUSR1 into a StopFlag and return it.

    If the entry point installed a flag first thing (`install_early`) and no one has taken it
    yet, that flag is returned, with the signals it counted during start-up: such a signal
    must still stop the run. Otherwise a new flag is installed for both signals, so a second
    run in one process does not inherit the first one's signal."""
    current = [signal.getsignal(sig) for sig in STOP_SIGNALS]
    flag = getattr(current[0], "stop_flag", None)
    if flag is not None and flag.pending and all(h is flag.handler for h in current):
        flag.pending = False
        return flag
    return _install()


def install_early() -> StopFlag:
    """Install a StopFlag for the next `catch_stop_signals()` call to take: what `distbp.entry`
    and `python -m distbp` do before importing anything heavy."""
    flag = _install()
    flag.pending = True
    return flag


def restore_signals(flag: StopFlag) -> None:
    """Put back the handlers `flag` replaced (what a script had before `distbp.fit`)."""
    for sig, previous in flag.previous.items():
        if signal.getsignal(sig) is flag.handler:
            signal.signal(sig, previous)


def _install() -> StopFlag:
    flag = StopFlag()
    flag.handler.stop_flag = flag  # lets catch_stop_signals find the installed flag
    for sig in STOP_SIGNALS:
        flag.previous[sig] = signal.signal(sig, flag.handler)
        # SA_RESTART: a signal (or a burst of them) must not fail a system call inside HDF5 or
        # MPI with EINTR, e.g. while rank 0 writes the checkpoint
        signal.siginterrupt(sig, False)
    return flag
