"""The `distbp` command.

    mpiexec -n 2 distbp train                      # the bundled digits data, 2 ranks
    distbp train --config run.toml --steps 1000    # one process, no MPI needed
    distbp gradcheck --layers 784,30,10 --activation sigmoid --output sigmoid --loss mse
    python -m distbp train --help

Exit codes: 0 done · 2 bad input or configuration (one line on stderr) · 75 preempted, a
checkpoint was written: run the same command with --resume auto to continue · 141 stdout was
closed by its reader (`distbp ... | head`), as a shell reports SIGPIPE · 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

import numpy as np

from distbp import __version__, bench, gradcheck
from distbp.errors import (
    EXIT_ERROR,
    EXIT_STDOUT_CLOSED,
    EXIT_USAGE,
    CollectiveTimeout,
    NonFiniteError,
    UsageError,
)

__all__ = ["agree", "build_parser", "main", "set_threads"]

EPILOG = """exit codes: 0 done; 2 bad input or configuration (one line on stderr naming the
problem); 75 preempted (SIGTERM/SIGUSR1): a checkpoint was written, run the same command with
--resume auto to continue; 141 stdout was closed by its reader (`distbp ... | head`), as for
SIGPIPE; 1 anything else (the failing rank prints its traceback and every rank stops)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage through UsageError (exit 2, one line) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distbp", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    # Other commands live in their own modules, each with add_commands(sub); imported here
    # because cli_eval and cli_inspect import agree from this module.
    from distbp import cli_data, cli_eval, cli_inspect, cli_plot
    for module in (gradcheck, cli_eval, cli_inspect, cli_data, bench, cli_plot):
        module.add_commands(sub)
    return parser


def _add_train(sub) -> None:
    from distbp.config import add_train_arguments

    p = sub.add_parser("train", help="train a network (under mpiexec/srun: data-parallel)",
                       description="Train a fully-connected network. Every option is also a key "
                       "of the TOML file given with --config (underscores for dashes); the "
                       "command line wins over the file, the file over the preset.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(run=_run_train)


class _Job:
    """What the failure path needs to know: the communicator, once there is one."""

    comm = None

    @property
    def rank(self) -> int:
        return self.comm.rank if self.comm is not None else _env_rank()


class _AgreedExit(Exception):
    """Every rank knows of the problem and exits with `code` normally (no abort needed); only
    the rank that carries `message` prints it, so the user reads it once."""

    def __init__(self, code: int, message: str | None = None):
        self.code, self.message = code, message


def _env_rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def agree(comm, build: Callable):
    """Run `build()` on every rank; if it raises UsageError anywhere, every rank stops (exit 2).

    Every rank raises _AgreedExit; the lowest failing rank's carries the message (printed once).
    One small collective, so a file readable on one node but not another cannot hang the job.
    """
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
    mine = failure is not None and first[0] == comm.rank
    raise _AgreedExit(EXIT_USAGE, str(failure) if mine else None)


def _agree_on_start(comm, session) -> None:
    """Every rank must resume from the same step: nodes that list a checkpoint directory
    differently (a stale NFS cache, a node-local path) would otherwise train apart."""
    span = np.array([session.start_step, -session.start_step], np.int64)
    comm.allreduce_max(span)  # [latest start, −earliest start]
    if span[0] != -span[1]:
        raise _AgreedExit(EXIT_USAGE, (
            f"ranks found different checkpoints to resume from (steps {-span[1]} to {span[0]}): "
            f"--checkpoint-dir must be the same shared directory on every node"
        ) if comm.rank == 0 else None)


def _run_train(args: argparse.Namespace, job: _Job) -> int:
    from distbp.comm import get_comm
    from distbp.config import resolve_config
    from distbp.session import build_session
    from distbp.trainer import Trainer, catch_stop_signals

    stop = catch_stop_signals()  # the entry point's flag, if it installed one at start-up
    # The communicator before the configuration: a --config file readable on one rank only
    # (relative to each rank's working directory) must stop every rank through `agree`, not
    # leave the others waiting in MPI_Init. get_comm's own ConfigErrors are alike on all ranks.
    job.comm = comm = get_comm(timeout=_setup_timeout(getattr(args, "collective_timeout", None)))
    cfg = agree(comm, lambda: resolve_config(args))
    comm.set_timeout(cfg.collective_timeout)  # the file may have set it
    threads = set_threads(cfg.threads, comm.local_size)
    session = agree(comm, lambda: build_session(cfg, local_size=comm.local_size,
                                                rank=comm.rank, size=comm.size))
    _agree_on_start(comm, session)
    if comm.rank == 0:
        _print_header(session, comm, threads)
    code = Trainer(session, comm, stop=stop).train()
    # Saved or done: from here a late SIGTERM/SIGUSR1 (a burst from scancel, hydra forwarding a
    # second one) is moot. Ignored, not defaulted: Python resets its handlers to the default
    # (terminate) while finalizing, which would turn this rank's 75 or 0 into "killed by signal".
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    return code


def _setup_timeout(raw) -> float | None:
    """--collective-timeout as given on the command line, read leniently for the collectives
    that check the configuration: a value that will not validate gives the default 600 s, and
    resolve_config reports it (once, through agree)."""
    if isinstance(raw, str) and raw.strip().lower() == "none":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return 600.0
    return value if 0 < value < float("inf") else 600.0


def set_threads(requested: int | None, local_size: int) -> str:
    """Set BLAS threads per rank and say why: --threads, else the user's OMP/OPENBLAS/MKL
    variable, else SLURM_CPUS_PER_TASK, else the CPUs this rank may use divided by the ranks on
    the node — unless the launcher pinned each rank to its own share of the node, then that
    share. That derived default is never more than the CPUs; --threads and the *_NUM_THREADS
    variables are taken as given (the user may mean to oversubscribe)."""
    from threadpoolctl import threadpool_limits

    if requested is not None:
        why = "--threads"
    else:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
                requested, why = int(os.environ[var]), f"from {var}"
                break
    if requested is None:
        total = os.cpu_count() or 1
        mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
        cpt = os.environ.get("SLURM_CPUS_PER_TASK", "")
        if cpt.isdigit() and int(cpt) > 0:
            requested, why = min(int(cpt), mine), "SLURM_CPUS_PER_TASK"
        elif mine * local_size <= total and mine < total:
            # bound by the launcher to a share of the node small enough to be ours alone
            requested, why = mine, f"{mine} CPUs this rank is bound to"
        else:
            requested = max(1, mine // max(local_size, 1))
            why = f"{mine} CPUs / {local_size} rank(s) on this node"
    threadpool_limits(requested)  # every BLAS/OpenMP pool, whichever variable was set
    return f"{requested} BLAS thread(s) per rank ({why})"


def _print_header(s, comm, threads: str) -> None:
    from distbp.data import shard_bounds

    cfg, net = s.cfg, s.net
    sizes = sorted({b - a for a, b in (shard_bounds(cfg.batch_size, r, comm.size)
                                       for r in range(comm.size))})
    print(f"distbp {__version__}: {comm.size} rank(s), {comm.name}; {threads}")
    print(f"data: {s.train.source} ({s.train.n} rows, {s.train.n_features} features)"
          + (f"; validation: {s.val.source} ({s.val.n} rows)" if s.val is not None else ""))
    print(f"model: {'-'.join(map(str, net.layers))} {net.activation}/{net.output}/{net.loss} "
          f"{net.dtype}, {net.params.size:,} parameters; optimizer {s.optimizer.name}")
    print(f"global batch {cfg.batch_size} -> per-rank shard {'..'.join(map(str, sizes))} rows; "
          f"{s.steps_per_epoch} steps per epoch; steps {s.start_step} -> {s.total_steps}")
    print("config: " + json.dumps(cfg.to_dict(), sort_keys=True))
    if s.resumed_from is not None:
        print(f"resumed from {s.resumed_from} at step {s.start_step}")
    for note in s.notes:
        print(note)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """The `distbp` command (distbp.entry, the console script, calls it); returns the exit code.

    A rank may return normally only when every rank returns (MPICH's MPI_Finalize waits for
    the others, so a lone early return hangs the job), and returns 0 only when the command
    finished. Hence:
      - bad input found at setup (the command line: identical everywhere; the config file,
        data, checkpoints and output directories: through `agree`, since a file may differ
        between ranks): one line on stderr, printed once, every rank exits 2;
      - a non-finite loss: every rank sees it in the same reduced buffer, exit 1, one line;
      - anything else once there is a communicator of several ranks (bad data read on one rank
        mid-run, a collective timeout, an exception, even SystemExit(0)): this rank prints its
        rank and the error (a traceback for unexpected errors) and aborts the whole job with
        MPI_Abort: exit 2 for bad input, else 1. A dead rank is the launcher's to clean up
        (hydra kills the rest) or, failing that, the collective deadline's.
    """
    job = _Job()
    try:
        args = build_parser().parse_args(argv)
        return args.run(args, job)
    except _AgreedExit as e:
        if e.message is not None:
            print(f"distbp: error: {e.message}", file=sys.stderr)
        return e.code
    except UsageError as e:
        return _bad_input(job, e)
    except NonFiniteError as e:
        if job.rank == 0:
            print(f"distbp: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except CollectiveTimeout as e:  # this rank is fine; the message names the step, not a bug
        return _abort(job, EXIT_ERROR, f"distbp: rank {job.rank}: error: {e}")
    except KeyboardInterrupt:
        return _abort(job, EXIT_ERROR, f"distbp: rank {job.rank}: interrupted")
    except BrokenPipeError:  # `distbp ... | head`: the reader has what it wanted
        return _stdout_closed(job)
    except BaseException as e:  # noqa: BLE001 -- the designed failure path
        if isinstance(e, SystemExit) and e.code in (0, None) and job.comm is None:
            raise  # --help, --version: nothing ran
        return _abort(job, EXIT_ERROR, _crash_report(job, e))


def _stdout_closed(job: _Job) -> int:
    """Exit 141 (EXIT_STDOUT_CLOSED) without a traceback when stdout's reader went away: quietly
    for one process; with several ranks the rest of the job is aborted with that code, like any
    failure of a rank (it cannot go on alone)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:  # so the interpreter's final flush does not fail again
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout
        pass
    finally:
        os.close(devnull)
    if not _ranks_may_diverge(job):
        return EXIT_STDOUT_CLOSED
    return _abort(job, EXIT_STDOUT_CLOSED, f"distbp: rank {job.rank}: error: stdout was closed")


def _bad_input(job: _Job, e: UsageError) -> int:
    """Exit 2 for bad input: one line, said once when every rank fails alike (before there is
    a communicator); once ranks may be apart, this rank says it and aborts the job."""
    if _ranks_may_diverge(job):
        return _abort(job, EXIT_USAGE, f"distbp: rank {job.rank}: error: {e}")
    if job.rank == 0:  # before the communicator every rank fails alike: say it once
        print(f"distbp: error: {e}", file=sys.stderr)
    return EXIT_USAGE


def _crash_report(job: _Job, e: BaseException) -> str:
    """'distbp: rank R: error: Type: message' and the traceback; call it in the except block."""
    return f"distbp: rank {job.rank}: error: {type(e).__name__}: {e}\n{traceback.format_exc()}"


def _ranks_may_diverge(job: _Job) -> bool:
    """True once other ranks may be at another point of the run than this one."""
    return job.comm is not None and job.comm.size > 1


def _abort(job: _Job, code: int, message: str) -> int:
    """Print `message`, then end every rank with `code` (never 0): MPI_Abort when other ranks
    may be waiting in a collective, a plain return otherwise."""
    print(message.rstrip("\n"), file=sys.stderr, flush=True)
    if _ranks_may_diverge(job):
        job.comm.abort(code or EXIT_ERROR)
    return code or EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
