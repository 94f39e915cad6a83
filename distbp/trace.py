"""A timeline of the run (`--trace FILE`): every rank's steps as Chrome trace events, for
Perfetto (ui.perfetto.dev) or chrome://tracing. Rank 0 writes one file with every rank in it.

    tracer = Tracer(enabled=True, layers=net.depth)
    t = tracer.span("forward", t0, time.perf_counter())     # returns the span's end
    tracer.span("allreduce bucket 1", start, end, lane=ALLREDUCE)
    tracer.write(comm, "trace.json", hosts)                  # a collective; rank 0 writes

Each rank is a process of the trace (pid = rank), with lanes (threads): the step's computation
(data, forward, backward per layer, the wait for the allreduce, the update), the allreduces
(each bucket from its start to the moment this rank saw it complete), and the run's other work
(validation, checkpoints). Times are microseconds since the rank's trace began, after a barrier,
so the ranks' clocks line up to within that barrier's skew. A disabled tracer records nothing;
an enabled one keeps at most MAX_EVENTS per rank (a long run's first steps).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from distbp.durable import replace_durably, umask
from distbp.errors import ConfigError

__all__ = ["ALLREDUCE", "COMPUTE", "MAX_EVENTS", "RUN", "Tracer"]

COMPUTE, ALLREDUCE, RUN = 0, 1, 2
LANES = {COMPUTE: "step: compute", ALLREDUCE: "step: allreduce", RUN: "validation, checkpoints"}
MAX_EVENTS = 200_000


class Tracer:
    """The spans of one rank; `span` is all the hot path calls."""

    def __init__(self, enabled: bool, layers: int = 0):
        self.on = enabled
        self.events: list[tuple] = []
        self.start = time.perf_counter()
        self.layer_names = [f"backward layer {j}" for j in range(layers + 1)]

    def begin(self, comm) -> None:
        """Align the ranks' clocks: every rank's zero is the end of one barrier."""
        comm.barrier()
        self.start = time.perf_counter()

    def span(self, name: str, start: float, end: float, lane: int = COMPUTE) -> float:
        """Record [start, end] (perf_counter seconds) as `name` in `lane`; returns `end`."""
        if self.on and len(self.events) < MAX_EVENTS:
            self.events.append((name, lane, start, end))
        return end

    def trace_events(self, rank: int, host: str) -> list[dict]:
        """This rank's spans as Chrome trace events, with the names of its process and lanes."""
        meta = [{"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
                 "args": {"name": f"rank {rank} ({host})"}}]
        meta += [{"ph": "M", "name": "thread_name", "pid": rank, "tid": lane,
                  "args": {"name": name}} for lane, name in LANES.items()]
        return meta + [{"ph": "X", "name": name, "cat": LANES[lane], "pid": rank, "tid": lane,
                        "ts": round(1e6 * (a - self.start), 3),
                        "dur": round(1e6 * (b - a), 3)} for name, lane, a, b in self.events]

    def write(self, comm, path: str | Path, host: str) -> None:
        """Gather every rank's events to rank 0, which writes them to `path` as one JSON object
        (written beside it first, then renamed). A collective: every rank calls it."""
        text = json.dumps(self.trace_events(comm.rank, host)).encode()
        sizes = np.zeros(comm.size, np.int64)
        sizes[comm.rank] = len(text)
        comm.allreduce_sum(sizes)
        mine = np.frombuffer(text, np.uint8).copy()
        every = np.empty(int(sizes.sum()), np.uint8) if comm.rank == 0 else None
        comm.gather(mine, every, [int(n) for n in sizes], root=0)
        if comm.rank != 0:
            return
        events, at = [], 0
        for n in sizes:
            events += json.loads(every[at:at + n].tobytes())
            at += int(n)
        path, tmp = Path(path), None
        try:  # an exclusive, unpredictable name: a planted symlink is never followed
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            os.fchmod(fd, 0o666 & ~umask())
            with os.fdopen(fd, "w") as f:
                json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
            replace_durably(tmp, path)
        except OSError as e:  # a full disk: one line (exit 2), no file left
            raise ConfigError(f"--trace '{path}': cannot write ({e.strerror or e})") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)  # gone already after the rename
