"""Launch-time logic shared by the Python API and every command: the communicator, BLAS threads,
agreement across ranks at setup, and the failure path that turns an exception into an exit code.

    job = Job()
    comm = job.start(timeout=600.0, threads=None)     # the communicator; BLAS threads set
    cfg = agree(comm, lambda: resolve_config(args))   # bad input anywhere: every rank stops, exit 2
    code = guarded(job, lambda: work(job))            # any failure: one message, every rank ends

Contract: a rank may return normally only when every rank returns (MPICH's MPI_Finalize waits for
the others, so a lone early return hangs the job), and returns 0 only when the work finished:
  - bad input found at setup goes through `agree`: one line on stderr, printed once, every rank
    raises SetupRefused (exit 2);
  - a non-finite loss: every rank sees it in the same reduced buffer, exit 1, one line;
  - anything else once there is a communicator of several ranks (bad data read on one rank
    mid-run, a collective timeout, an exception, even SystemExit(0)): this rank prints its rank
    and the error (a traceback for unexpected errors) and aborts the whole job with MPI_Abort:
    exit 2 for bad input, else 1. A dead rank is the launcher's to clean up (hydra kills the
    rest) or, failing that, the collective deadline's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from distbp.comm import get_comm
from distbp.config_schema import DEFAULT_COLLECTIVE_TIMEOUT_S
from distbp.errors import (
    EXIT_ERROR,
    EXIT_PREEMPTED,
    EXIT_STDOUT_CLOSED,
    EXIT_USAGE,
    CollectiveTimeout,
    NonFiniteError,
    OutputError,
    SetupRefused,
    UsageError,
    env_rank,
)
from distbp.stopflag import StopBeforeTraining, stop_at_once

__all__ = ["Job", "agree", "exit_code", "guarded", "ranks_may_diverge",
           "set_threads", "setup_timeout"]


class Job:
    """A command's or script's hold on the job: the communicator, once there is one (the failure
    path needs it to abort the other ranks), and the BLAS-threads line said at start."""

    comm = None
    threads = ""

    @property
    def rank(self) -> int:
        return self.comm.rank if self.comm is not None else env_rank()

    def start(self, timeout: float | None, threads: int | None = None):
        """The communicator (MPI under a launcher, else serial), with BLAS threads set (`end`
        puts back what they were: a library call must not change its caller's process)."""
        self.comm = get_comm(timeout=timeout)
        stop_at_once()  # a stop signal from now (or held until now) ends start-up: exit 75
        self._blas = threadpool_limits(limits=None)  # remembers the limits in force
        self.threads = set_threads(threads, self.comm.local_size)
        return self.comm

    def end(self) -> None:
        """BLAS threads as they were before `start`."""
        if getattr(self, "_blas", None) is not None:
            self._blas.restore_original_limits()


def agree(comm, build: Callable):
    """Run `build()` on every rank; if it raises UsageError anywhere, every rank raises
    SetupRefused, the lowest failing rank's carrying the message. One small collective, so a
    file readable on one node but not another cannot hang the job."""
    result, failure = None, None
    try:
        result = build()
    except UsageError as e:
        failure = e
    first = np.array([comm.rank if failure is not None else comm.size], np.int64)
    try:
        comm.allreduce_min(first)
    except CollectiveTimeout as e:
        raise CollectiveTimeout(f"{e} (at setup: opening the data and checkpoint)") from None
    if first[0] == comm.size:
        return result
    if failure is not None and first[0] == comm.rank:
        raise SetupRefused(str(failure), carrier=True)
    raise SetupRefused(f"rank {int(first[0])} refused the setup (its message is printed there)",
                       carrier=False)


def setup_timeout(raw) -> float | None:
    """--collective-timeout as typed, read leniently for the collectives that check the
    configuration: a value that will not validate gives the default, and resolve_config
    reports it (once, through agree)."""
    if isinstance(raw, str) and raw.strip().lower() == "none":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    return value if 0 < value < float("inf") else DEFAULT_COLLECTIVE_TIMEOUT_S


def set_threads(requested: int | None, local_size: int, reproducible: bool = False) -> str:
    """Set BLAS threads per rank and say why: `requested` (--threads), else the user's
    OMP/OPENBLAS/MKL variable, else SLURM_CPUS_PER_TASK, else the CPUs this rank may use divided
    by the ranks on the node — unless the launcher pinned each rank to its own share of the node,
    then that share. That derived default is never more than the CPUs; --threads and the
    *_NUM_THREADS variables are taken as given (the user may mean to oversubscribe).
    `reproducible`: one thread, whatever else says (a GEMM's bits depend on the count)."""
    if reproducible:
        requested, why = 1, "--reproducible"
    elif requested is not None:
        why = "--threads"
    else:
        requested, why = _threads_from_env()
    if requested is None:
        requested, why = _threads_from_cpus(local_size)
    threadpool_limits(requested)  # every BLAS/OpenMP pool, whichever variable was set
    return f"{requested} BLAS thread(s) per rank ({why})"


def _threads_from_env() -> tuple[int | None, str]:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var]), f"from {var}"
    return None, ""


def _threads_from_cpus(local_size: int) -> tuple[int, str]:
    total = os.cpu_count() or 1  # the host's; Slurm knows what this node's job may use
    on_node = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if on_node.isdigit() and int(on_node) > 0:
        total = min(total, int(on_node))
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    cpt = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpt.isdigit() and int(cpt) > 0:
        return min(int(cpt), mine), "SLURM_CPUS_PER_TASK"
    if mine * local_size <= total and mine < total:
        # bound by the launcher to a share of the node small enough to be ours alone
        return mine, f"{mine} CPUs this rank is bound to"
    return max(1, mine // max(local_size, 1)), f"{mine} CPUs / {local_size} rank(s) on this node"


# A file system that is full or a file size limit: the user's environment, one line (exit 2).
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def guarded(job: Job, work: Callable[[], int]) -> int:
    """Run `work()` and return its exit code; a failure becomes `exit_code(job, e)`."""
    try:
        return work()
    except BaseException as e:  # noqa: BLE001 -- the designed failure path
        if isinstance(e, SystemExit) and e.code in (0, None) and job.comm is None:
            raise  # --help, --version: nothing ran
        return exit_code(job, e)


def exit_code(job: Job, e: BaseException) -> int:
    """Say what went wrong as the module docstring's contract asks and return the exit code,
    aborting every rank (MPI_Abort: no return) where the others may be waiting in a collective.
    Call it from an except block (tracebacks are formatted from the exception being handled)."""
    if isinstance(e, SetupRefused):
        if e.carrier:
            print(f"distbp: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, UsageError):
        return _bad_input(job, e)
    if isinstance(e, NonFiniteError):
        if job.rank == 0:
            print(f"distbp: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(e, CollectiveTimeout):  # this rank is fine; the message names the step
        return _abort(job, EXIT_ERROR, f"distbp: rank {job.rank}: error: {e}")
    if isinstance(e, KeyboardInterrupt):
        return _abort(job, EXIT_ERROR, f"distbp: rank {job.rank}: interrupted")
    if isinstance(e, StopBeforeTraining):  # no step was taken anywhere: end every rank now
        return _abort(job, EXIT_PREEMPTED, e.line(job.rank))
    if isinstance(e, BrokenPipeError):  # `distbp ... | head`: the reader has what it wanted
        return _stdout_closed(job)
    if isinstance(e, OSError) and e.errno in _DISK_FULL:  # e.g. stdout into a full file system
        _quiet_stdout()  # its buffered rest would fail again at exit
        where = f" '{e.filename}'" if e.filename else ""
        return _bad_input(job, UsageError(f"cannot write{where}: {os.strerror(e.errno)}"))
    return _abort(job, EXIT_ERROR, _crash_report(job, e))


def ranks_may_diverge(job: Job) -> bool:
    """True once other ranks may be at another point of the run than this one."""
    return job.comm is not None and job.comm.size > 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout
        pass
    finally:
        os.close(devnull)


def _stdout_closed(job: Job) -> int:
    """Exit 141 (EXIT_STDOUT_CLOSED) without a traceback when stdout's reader went away: quietly
    for one process; with several ranks the rest of the job is aborted with that code, like any
    failure of a rank (it cannot go on alone)."""
    _quiet_stdout()
    if not ranks_may_diverge(job):
        return EXIT_STDOUT_CLOSED
    return _abort(job, EXIT_STDOUT_CLOSED, f"distbp: rank {job.rank}: error: stdout was closed")


def _bad_input(job: Job, e: UsageError) -> int:
    """Exit 2 for bad input: one line, said once when every rank fails alike (before there is
    a communicator); once ranks may be apart, this rank says it and aborts the job."""
    if ranks_may_diverge(job):
        return _abort(job, EXIT_USAGE, f"distbp: rank {job.rank}: error: {e}")
    if job.rank == 0:  # before the communicator every rank fails alike: say it once
        print(f"distbp: error: {e}", file=sys.stderr)
    if isinstance(e, OutputError):  # HDF5 may crash at exit over the file it failed to write
        _flush_and_exit(EXIT_USAGE)
    return EXIT_USAGE


def _flush_and_exit(code: int) -> None:
    """End the process now with `code`, skipping the interpreter's and libraries' exit
    handlers (as MPI_Abort does for several ranks)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _crash_report(job: Job, e: BaseException) -> str:
    """'distbp: rank R: error: Type: message' and the traceback; call it in the except block."""
    return f"distbp: rank {job.rank}: error: {type(e).__name__}: {e}\n{traceback.format_exc()}"


def _abort(job: Job, code: int, message: str) -> int:
    """Print `message`, then end every rank with `code` (never 0): MPI_Abort when other ranks
    may be waiting in a collective, a plain return otherwise."""
    print(message.rstrip("\n"), file=sys.stderr, flush=True)
    if ranks_may_diverge(job):
        job.comm.abort(code or EXIT_ERROR)
    return code or EXIT_ERROR
