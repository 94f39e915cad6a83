"""Communication: one small interface, an MPI implementation and a serial fallback.

This is the only module of distbp that imports mpi4py, and it imports it lazily: only when an MPI
launcher (mpiexec/mpirun, srun) started this process. `import distbp.comm` works without mpi4py, and
a plain `python` run never initializes MPI (an Open MPI singleton would cost time and leave files
in /dev/shm).

    comm = get_comm(timeout=600.0)     # MPIComm under mpiexec/srun, SerialComm otherwise
    comm.allreduce_sum(grad)           # in place: every rank ends with the elementwise sum

Every collective acts IN PLACE on one C-contiguous, writeable numpy buffer with the buffer-based
(uppercase) mpi4py calls; nothing is pickled. With a `timeout`, collectives are nonblocking calls
polled until a deadline, so a dead or hung peer raises `CollectiveTimeout` instead of hanging the
job; the caller then calls `abort`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, Protocol

import numpy as np

from distbp.errors import CollectiveTimeout, ConfigError
from distbp.launcher_env import launcher_world_size, mismatch_error

__all__ = ["Comm", "MPIComm", "SerialComm", "get_comm", "host_names"]

# Deadline polling: spin on Test, yielding the CPU each turn (an oversubscribed peer needs it to
# progress), then sleep with exponential backoff so a long wait (straggler, hung peer) does not
# burn a core. MPICH progresses a nonblocking collective only inside Test, so sleeping while a
# large one is in flight slows it (+20% for 32 MB with a fixed 1 ms spin): the spin lasts
# max(3 ms, 2 x the longest recent collective), capped; "recent" fades by _SPIN_FADE a call, so
# a short collective (a barrier, a step's last bucket) between long ones does not cut the next
# long one's spin (it did: a 63 ms allreduce at 1 Gbit/s then slept between Tests, 3-5 % slower
# a step). At least 3 ms, over twice the longest sleep: a peer that slept through its last wait
# is up to _SLEEP_MAX_S late, and with a shorter spin two ranks fall into taking turns sleeping
# (measured with reproducible mode's two collectives a step: 2.5 ms a step instead of 0.4 with a
# 1 ms spin). A blocking call spins.
_SPIN_MIN_S = 3e-3
_SPIN_MAX_S = 0.1
_SPIN_FADE = 0.9
_SLEEP_FIRST_S = 2e-5
_SLEEP_MAX_S = 1e-3
_yield_cpu = getattr(os, "sched_yield", lambda: time.sleep(0))
# Before MPI_Abort, let the launcher forward what this rank just wrote: hydra's proxy may act on
# the abort first and drop the pipe's contents (measured: the error line lost in 3 of 30 jobs on
# 2 busy cores without a pause, in none of 170 with one).
_ABORT_GRACE_S = 0.1


class Comm(Protocol):
    """What the trainer needs from a communicator. Buffers: C-contiguous writeable ndarrays."""

    rank: int
    size: int
    local_size: int
    name: str
    hostname: str

    def allreduce_sum(self, buf: np.ndarray) -> None: ...
    def start_allreduce_sum(self, buf: np.ndarray) -> Any: ...
    def test(self, request: Any) -> bool: ...
    def wait_all(self, pending: Sequence[Any]) -> None: ...
    def allreduce_max(self, buf: np.ndarray) -> None: ...
    def allreduce_min(self, buf: np.ndarray) -> None: ...
    def bcast(self, buf: np.ndarray, root: int = 0) -> None: ...
    def gather(self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int],
               root: int | None = 0) -> None: ...
    def alltoallv(self, send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                  recv_counts: Sequence[int]) -> None: ...
    def swap(self, send: np.ndarray, recv: np.ndarray, peer: int) -> None: ...
    def barrier(self) -> None: ...
    def abort(self, code: int = 1) -> NoReturn: ...


def _check_swap(send: np.ndarray, recv: np.ndarray, peer: int, size: int) -> None:
    _check_buffer(recv)
    if not isinstance(send, np.ndarray) or send.shape != recv.shape or send.dtype != recv.dtype:
        raise ValueError("swap: send and recv must be arrays of one shape and dtype")
    if not 0 <= peer < size:
        raise ValueError(f"swap: peer {peer} out of range for {size} rank(s)")


def _check_buffer(buf: Any) -> None:
    """Reject what MPI cannot reduce in place, serially too (the same bug fails the same way)."""
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"collective buffer must be a numpy array, got {type(buf).__name__}")
    if not (buf.flags.c_contiguous and buf.flags.writeable):
        raise ValueError("collective buffer must be C-contiguous and writeable (used in place)")


def _check_gather(send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int], rank: int,
                  size: int, receiving: bool) -> None:
    """Rows of `send` (counts[rank] of them) and, where they arrive, `recv` (sum(counts) rows of
    the same width and dtype): checked alike serially and under MPI."""
    _check_buffer(send)
    if len(counts) != size:
        raise ValueError(f"gather needs one count per rank ({size}), got {len(counts)}")
    if len(send) != counts[rank]:
        raise ValueError(f"gather: rank {rank} sends {len(send)} rows, counts say {counts[rank]}")
    if receiving:
        _check_buffer(recv)
        if recv.shape != (sum(counts), *send.shape[1:]) or recv.dtype != send.dtype:
            raise ValueError(f"gather: receive buffer {recv.shape} {recv.dtype} does not hold "
                             f"{sum(counts)} rows of {send.shape[1:]} {send.dtype}")


def _check_alltoallv(send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                     recv_counts: Sequence[int], size: int) -> None:
    """Flat buffers of one dtype holding what the counts (one per rank) say, serially and under
    MPI alike."""
    for buf, counts, what in ((send, send_counts, "send"), (recv, recv_counts, "receive")):
        _check_buffer(buf)
        if len(counts) != size or buf.ndim != 1 or buf.size != sum(counts):
            raise ValueError(f"alltoallv: {what} buffer of {buf.shape} for counts {counts} "
                             f"({size} rank(s))")
    if send.dtype != recv.dtype:
        raise ValueError(f"alltoallv: send {send.dtype} and receive {recv.dtype} differ")


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said anyway
            pass


class SerialComm:
    """One process: every collective is the identity (after the same buffer checks as MPI)."""

    rank = 0
    size = 1
    local_size = 1
    name = "serial"

    def __init__(self):
        self.hostname = socket.gethostname()

    def allreduce_sum(self, buf: np.ndarray) -> None:
        _check_buffer(buf)

    def allreduce_max(self, buf: np.ndarray) -> None:
        _check_buffer(buf)

    def allreduce_min(self, buf: np.ndarray) -> None:
        _check_buffer(buf)

    def start_allreduce_sum(self, buf: np.ndarray) -> None:
        _check_buffer(buf)

    def test(self, request: Any) -> bool:
        return True

    def wait_all(self, pending: Sequence[Any]) -> None:
        pass

    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        _check_buffer(buf)
        if root != 0:
            raise ValueError(f"bcast root {root} out of range for 1 rank")

    def gather(self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int],
               root: int | None = 0) -> None:
        _check_gather(send, recv, counts, 0, 1, True)
        if root not in (0, None):
            raise ValueError(f"gather root {root} out of range for 1 rank")
        recv[...] = send

    def alltoallv(self, send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                  recv_counts: Sequence[int]) -> None:
        _check_alltoallv(send, send_counts, recv, recv_counts, 1)
        recv[...] = send

    def swap(self, send: np.ndarray, recv: np.ndarray, peer: int) -> None:
        _check_swap(send, recv, peer, 1)
        recv[...] = send

    def barrier(self) -> None:
        pass

    def set_timeout(self, timeout: float | None) -> None:
        """No collective can wait here; accepted so callers need not tell the kinds apart."""

    def abort(self, code: int = 1) -> NoReturn:
        """Exit now with `code` (0 becomes 1: an abort is never a success), skipping atexit
        handlers and finalizers, like MPI_Abort."""
        _flush_std_streams()
        os._exit(code or 1)


class MPIComm:
    """An mpi4py communicator (default COMM_WORLD) behind the `Comm` interface.

    `timeout` (seconds, or None for blocking calls) bounds each collective: past it the call raises
    `CollectiveTimeout` and leaves the buffer in an undefined state still owned by MPI; the only
    safe next step is `abort`.
    """

    def __init__(self, comm: Any = None, timeout: float | None = None):
        from mpi4py import MPI

        if timeout is not None and not timeout > 0:
            raise ConfigError(f"collective timeout must be positive seconds, got {timeout!r}")
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if comm is None else comm
        self._timeout = timeout
        self._spin_s = _SPIN_MIN_S  # adapted by _wait to the collectives' duration
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = node.Get_size()
        node.Free()
        self._pairs = self._comm.Dup()  # `swap`'s messages only
        self.name = f"mpi ({_library_name(MPI.Get_library_version())})"
        self.hostname = socket.gethostname()

    def set_timeout(self, timeout: float | None) -> None:
        """Bound the collectives from now on by `timeout` seconds (None: blocking calls), e.g.
        once the configuration is known; the communicator is created before it is read."""
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"collective timeout must be positive seconds, got {timeout!r}")
        self._timeout = timeout

    def allreduce_sum(self, buf: np.ndarray) -> None:
        self._allreduce(buf, self._MPI.SUM)

    def start_allreduce_sum(self, buf: np.ndarray) -> Any:
        """Begin an in-place sum of `buf` across ranks and return its pending request: `buf`
        belongs to MPI until `wait_all` has returned (the overlap of a bucket with backward)."""
        _check_buffer(buf)
        return self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def test(self, request: Any) -> bool:
        """Whether `request` is complete; lets MPI move it on meanwhile (MPICH advances a
        nonblocking collective only inside MPI calls). Nothing is waited for."""
        return request.Test()

    def wait_all(self, pending: Sequence[Any]) -> None:
        """Until every request of `pending` is complete (deadline: as for any collective)."""
        if self._timeout is None:
            self._MPI.Request.Waitall(list(pending))
            return
        for req in pending:
            self._wait(req)

    def allreduce_max(self, buf: np.ndarray) -> None:
        self._allreduce(buf, self._MPI.MAX)

    def allreduce_min(self, buf: np.ndarray) -> None:
        self._allreduce(buf, self._MPI.MIN)

    def bcast(self, buf: np.ndarray, root: int = 0) -> None:
        _check_buffer(buf)
        if self._timeout is None:
            self._comm.Bcast(buf, root=root)
        else:
            self._wait(self._comm.Ibcast(buf, root=root))

    def gather(self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int],
               root: int | None = 0) -> None:
        receiving = root is None or root == self.rank
        _check_gather(send, recv, counts, self.rank, self.size, receiving)
        row = send[0].size if len(send) else int(np.prod(send.shape[1:], dtype=np.int64))
        spec = [recv, [c * row for c in counts]] if receiving else None
        if root is None:
            blocking, call, args = self._comm.Allgatherv, self._comm.Iallgatherv, (send, spec)
        else:
            blocking, call, args = self._comm.Gatherv, self._comm.Igatherv, (send, spec, root)
        if self._timeout is None:
            blocking(*args)
        else:
            self._wait(call(*args))

    def alltoallv(self, send: np.ndarray, send_counts: Sequence[int], recv: np.ndarray,
                  recv_counts: Sequence[int]) -> None:
        """Rank q receives the q-th run of `send` (send_counts[q] elements, runs in rank order)
        into the r-th run of its `recv` for each sender r: a personalized exchange."""
        _check_alltoallv(send, send_counts, recv, recv_counts, self.size)
        args = ([send, list(send_counts)], [recv, list(recv_counts)])
        if self._timeout is None:
            self._comm.Alltoallv(*args)
        else:
            self._wait(self._comm.Ialltoallv(*args))

    def swap(self, send: np.ndarray, recv: np.ndarray, peer: int) -> None:
        """Send `send` to rank `peer` and receive its `send` into `recv` (the same size), a
        point-to-point exchange on a communicator of its own (no other message can match)."""
        _check_swap(send, recv, peer, self.size)
        if self._timeout is None:
            self._pairs.Sendrecv(send, dest=peer, recvbuf=recv, source=peer)
            return
        receiving = self._pairs.Irecv(recv, source=peer)
        self._wait(self._pairs.Isend(send, dest=peer))
        self._wait(receiving)

    def barrier(self) -> None:
        if self._timeout is None:
            self._comm.Barrier()
        else:
            self._wait(self._comm.Ibarrier())

    def abort(self, code: int = 1) -> NoReturn:
        """Kill every rank of the job with exit status `code` (MPI_Abort on COMM_WORLD).

        `code` 0 becomes 1: under MPICH's hydra a rank that ends with 0 without MPI_Finalize
        makes mpiexec kill the other ranks and exit 0, so the job would look successful.
        """
        code = code or 1
        _flush_std_streams()
        time.sleep(_ABORT_GRACE_S)
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # not reached: Abort does not return

    def _allreduce(self, buf: np.ndarray, op: Any) -> None:
        _check_buffer(buf)
        if self._timeout is None:
            self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=op)
        else:
            self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=op))

    def _wait(self, req: Any) -> None:
        """Poll `req` until it completes or the deadline passes (then raise CollectiveTimeout)."""
        start = time.perf_counter()
        deadline = start + self._timeout
        spin_until = start + self._spin_s
        pause = _SLEEP_FIRST_S
        while not req.Test():
            now = time.perf_counter()
            if now >= deadline:
                raise CollectiveTimeout(f"collective did not complete within {self._timeout:g} s: "
                                        "a peer rank may have died or hung")
            if now < spin_until:
                _yield_cpu()  # lets an oversubscribed peer run: 10x faster at 4 ranks on 2 cores
            else:
                time.sleep(pause)
                pause = min(2 * pause, _SLEEP_MAX_S)
        took = time.perf_counter() - start
        self._spin_s = min(_SPIN_MAX_S, max(_SPIN_MIN_S, 2 * took, _SPIN_FADE * self._spin_s))


# Bytes of a host name in host_names' gather (a DNS name has at most 253).
_HOST_BYTES = 256


def host_names(comm: Comm, root: int = 0) -> list[str]:
    """Every rank's host name, by rank, on `root` ([] elsewhere): one small gather that every
    rank must call. Rows of bytes, so the names travel bitwise like any other buffer."""
    row = np.zeros((1, _HOST_BYTES), np.uint8)
    name = comm.hostname.encode()[:_HOST_BYTES]
    row[0, :len(name)] = np.frombuffer(name, np.uint8)
    table = np.empty((comm.size, _HOST_BYTES), np.uint8) if comm.rank == root else None
    comm.gather(row, table, [1] * comm.size, root=root)
    if table is None:
        return []
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in table]


def _library_name(version: str) -> str:
    """First line of Get_library_version, short: 'MPICH 5.0.2', 'Open MPI v5.0.11'."""
    first = " ".join(version.split("\n", 1)[0].split())
    return first.replace(" Version:", "").split(",", 1)[0].strip() or "unknown library"


def get_comm(timeout: float | None = None,
             environ: Mapping[str, str] | None = None) -> SerialComm | MPIComm:
    """MPIComm when an MPI launcher or srun started this process and mpi4py imports, else serial.

    `environ` (default os.environ) is read for launcher variables only. Raises ConfigError when
    the launcher started several ranks but mpi4py cannot be imported (each rank would train its
    own copy), or when the MPI world size differs from the launcher's count (e.g. plain `srun`
    without a PMI plugin gives N singletons of size 1).
    """
    env = os.environ if environ is None else environ
    launched = launcher_world_size(env)
    if launched is None:
        return SerialComm()
    try:
        from mpi4py import MPI  # noqa: F401  (load and initialize MPI once, here)
    except (ImportError, OSError, RuntimeError) as exc:
        if launched == 1:
            return SerialComm()
        raise ConfigError(
            f"started by an MPI launcher with {launched} ranks but mpi4py cannot be imported "
            f"({type(exc).__name__}: {exc}): install it with pip install 'distbp[mpi]' "
            f"-- refusing to train {launched} independent copies") from exc
    comm = MPIComm(timeout=timeout)
    if comm.size != launched:
        raise mismatch_error(env, launched, comm.size)
    return comm
