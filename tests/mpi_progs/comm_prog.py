"""Test program for distbp.comm, run by tests/test_comm.py as a real (multi-)process job.

    mpiexec -n 3 python tests/mpi_progs/comm_prog.py ops          # every collective, checked
    python tests/mpi_progs/comm_prog.py ops                       # the same body, serial
    python tests/mpi_progs/comm_prog.py detect '{}' '{"PMI_SIZE": "2"}'   # get_comm(environ=...)
    mpiexec -n 2 python tests/mpi_progs/comm_prog.py deadline sleep|exit
    mpiexec -n 2 python tests/mpi_progs/comm_prog.py bench        # blocking vs deadline, µs/call
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from distbp.comm import get_comm
from distbp.errors import CollectiveTimeout, ConfigError

N = 1001  # odd, so no reduction algorithm splits it evenly
DTYPES = (np.float64, np.float32, np.int64)


def base(dtype) -> np.ndarray:
    """Values in [-12, 12] in steps of 1/4: sums of a few of them are exact in every dtype."""
    i = np.arange(N)
    step = 4 if np.issubdtype(dtype, np.floating) else 1
    return ((i % 97 - 48) / step).astype(dtype)


def mixed(rank: int, dtype) -> np.ndarray:
    """A per-element winner that changes with the element, for max/min."""
    return ((np.arange(N) * 7 + rank * 13) % 11 - 5).astype(dtype)


def check_ops(comm) -> None:
    """Every collective of `comm` against a result computed here without communication."""
    r, p = comm.rank, comm.size
    for dtype in DTYPES:
        buf = base(dtype) + dtype(1000 * r)
        address = buf.ctypes.data
        assert comm.allreduce_sum(buf) is None
        # sum over q of (base + 1000 q) = p base + 1000 p (p - 1) / 2
        expected = p * base(dtype) + dtype(1000 * p * (p - 1) // 2)
        assert buf.ctypes.data == address and buf.dtype == dtype
        np.testing.assert_array_equal(buf, expected)

        stacked = np.stack([mixed(q, dtype) for q in range(p)])
        hi, lo = mixed(r, dtype), mixed(r, dtype)
        comm.allreduce_max(hi)
        comm.allreduce_min(lo)
        np.testing.assert_array_equal(hi, stacked.max(axis=0))
        np.testing.assert_array_equal(lo, stacked.min(axis=0))

        for root in sorted({0, min(1, p - 1)}):
            got = mixed(r, dtype)
            comm.bcast(got, root=root)
            np.testing.assert_array_equal(got, mixed(root, dtype))
    comm.barrier()
    try:
        comm.allreduce_sum(np.zeros(8)[::2])
    except ValueError:
        pass
    else:
        raise AssertionError("a strided buffer was accepted")
    assert comm.local_size == p, "one node: every rank is node-local"
    check_gather(comm)


def rows_of(rank: int, dtype) -> np.ndarray:
    """Rank `rank`'s rows for gather: rank + 1 rows (uneven shares) of 3 values, −0.0 among
    them (a sum-based gather would turn it into +0.0)."""
    rows = (np.arange(3 * (rank + 1)).reshape(rank + 1, 3) * 0.25 + rank).astype(dtype)
    rows[0, 0] = -0.0 if np.issubdtype(dtype, np.floating) else 0
    return rows


def check_gather(comm) -> None:
    """gather to every root and to all ranks, bit for bit, in rank order."""
    r, p = comm.rank, comm.size
    counts = [q + 1 for q in range(p)]
    for dtype in DTYPES:
        expected = np.concatenate([rows_of(q, dtype) for q in range(p)])
        for root in [*range(p), None]:
            recv = np.full_like(expected, 7) if root in (None, r) else None
            comm.gather(rows_of(r, dtype), recv, counts, root=root)
            if recv is not None:
                assert recv.tobytes() == expected.tobytes(), (root, recv, expected)
    try:
        comm.gather(rows_of(r, np.float64)[:0], None, counts, root=None)
    except ValueError:
        pass
    else:
        raise AssertionError("a send of the wrong row count was accepted")


def run_ops() -> None:
    for timeout in (None, 10.0):
        comm = get_comm(timeout=timeout)
        check_ops(comm)
    print(f"ok rank={comm.rank} size={comm.size} name={comm.name} "
          f"mpi4py_loaded={'mpi4py' in sys.modules}", flush=True)


def run_detect(environs: list[str]) -> None:
    """One JSON line per environ mapping: what get_comm made of it."""
    for text in environs:
        try:
            comm = get_comm(environ=json.loads(text))
            out = {"result": type(comm).__name__, "size": comm.size}
        except ConfigError as exc:
            out = {"result": "ConfigError", "message": str(exc)}
        out["mpi4py_loaded"] = "mpi4py" in sys.modules
        print(json.dumps(out), flush=True)


def run_deadline(how: str) -> None:
    """Rank 1 stops taking part (sleeps, or exits without MPI_Finalize); rank 0 must time out."""
    comm = get_comm(timeout=2.0)
    buf = np.ones(1000)
    comm.allreduce_sum(buf)  # both ranks alive: the deadline path completes normally
    assert buf[0] == comm.size
    if comm.rank == 1:
        if how == "exit":
            os._exit(0)
        time.sleep(120)
    start = time.perf_counter()
    try:
        comm.allreduce_sum(buf)
    except CollectiveTimeout as exc:
        print(f"timeout after {time.perf_counter() - start:.3f} s: {exc}", flush=True)
        comm.abort(3)
    print("allreduce completed although a peer is gone", flush=True)


def per_call_us(comm, buf: np.ndarray, reps: int) -> float:
    comm.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        comm.allreduce_sum(buf)
    return (time.perf_counter() - start) / reps * 1e6


def run_bench(n: int = 100_000, reps: int = 300, rounds: int = 5) -> None:
    blocking, deadline = get_comm(), get_comm(timeout=60.0)
    for dtype in (np.float32, np.float64):
        buf = np.zeros(n, dtype)
        per_call_us(blocking, buf, 20)  # warm-up
        b = [per_call_us(blocking, buf, reps) for _ in range(rounds)]
        d = [per_call_us(deadline, buf, reps) for _ in range(rounds)]
        if blocking.rank == 0:
            print(f"{n} x {np.dtype(dtype).name} on {blocking.size} ranks: blocking Allreduce "
                  f"{min(b):.1f} us/call, Iallreduce+Test deadline {min(d):.1f} us/call "
                  f"(best of {rounds} x {reps})", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "ops":
        run_ops()
    elif mode == "detect":
        run_detect(sys.argv[2:])
    elif mode == "deadline":
        run_deadline(sys.argv[2])
    elif mode == "bench":
        run_bench(*(int(a) for a in sys.argv[2:]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
