"""The preemption flag: SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) only set it; the training
loop reads it at each step. A second SIGINT raises KeyboardInterrupt at once (the job aborts).

Deliberately tiny (no NumPy, no h5py, no MPI): `distbp.entry` installs the handler before any of
those are imported, so a preemption signal that arrives while a rank is still starting (imports,
MPI initialization, data checks) is caught instead of killing the rank: there is nothing to save
yet, so as soon as the rank has its communicator (and can MPI_Abort the others) it ends the
command with exit 75 (StopBeforeTraining), however long the rest of the setup would have taken.
Once the trainer is about to write, it only sets the flag.

    install_early()                    # distbp.entry, before importing NumPy, h5py, MPI
    flag = catch_stop_signals()        # the trainer: takes that flag (else installs one)
    if flag.signum is not None: ...    # at a step boundary: checkpoint and exit 75
    restore_signals(flag)              # the handlers from before `catch_stop_signals`
"""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "StopBeforeTraining", "StopFlag", "catch_stop_signals",
           "install_early", "restore_signals", "stop_at_once"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopBeforeTraining(BaseException):
    """A stop signal during start-up, raised by the handler itself: there is nothing to save
    yet, so the command ends at once (exit 75, distbp.launch) instead of after the rest of its
    setup. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def line(self, rank: int) -> str:
        """What the rank says before it exits 75."""
        return (f"distbp: rank {rank}: stopped by {self} before training began: nothing was "
                f"trained or saved; run the same command again to start (with --resume auto "
                f"it continues from the last checkpoint)")


class StopFlag:
    """Set by SIGTERM/SIGUSR1; read at each step boundary (never acted on inside the handler),
    except while `at_once` (a command's start-up, before anything is trained or written): then
    the handler raises StopBeforeTraining. `count` counts the deliveries: a launcher or job
    script must give each rank the signal once, and a count above 1 at the preemption checkpoint
    shows it did not (see distbp.trainer)."""

    signum: int | None = None
    count: int = 0
    pending: bool = False  # installed by install_early, not yet taken by catch_stop_signals
    at_once: bool = False  # start-up: stop now (the trainer clears it before its first write)
    early: bool = False    # made by install_early: stop_at_once applies

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}  # the handlers it replaced

        def handler(signum, frame):
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
            self.signum = signum
            self.count += 1
            if self.at_once:
                raise StopBeforeTraining(signum)

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
    and `python -m distbp` do before importing anything heavy. From `stop_at_once` until the
    trainer clears `at_once`, a stop signal ends the command at once (StopBeforeTraining)."""
    flag = _install()
    flag.pending = flag.early = True
    return flag


def stop_at_once() -> None:
    """Called once the command has its communicator (distbp.launch.Job.start): from now until
    the trainer clears `at_once`, a stop signal ends the command at once; one that came during
    the imports or MPI's start (held until now: a rank must not leave before it can MPI_Abort
    the others, which may wait for it in MPI_Init) raises StopBeforeTraining here. Only for the
    flag `install_early` made (a script calling distbp.fit keeps the plain flag)."""
    flag = getattr(signal.getsignal(signal.SIGTERM), "stop_flag", None)
    if flag is None or not flag.early:
        return
    flag.at_once = True
    if flag.signum is not None:
        raise StopBeforeTraining(flag.signum)


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
