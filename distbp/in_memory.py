"""`--in-memory auto|yes|no`: whether a data file is loaded whole into a rank's memory or read
batch by batch, judged against what the node (cgroup, RLIMIT_AS, physical memory shared by its
ranks) lets one rank use.

    ds, note = place_in_memory(open_dataset("train.h5"), "auto", local_size=2)
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from distbp import data
from distbp.errors import DataError

__all__ = ["IN_MEMORY_MAX_BYTES", "in_memory_budget", "place_in_memory"]

IN_MEMORY_MAX_BYTES = 1 << 30  # auto: never load more than this (x and y) into one rank
_BUDGET_SHARE = 4              # auto: and at most 1/4 of the memory a rank may use


def _cgroup_limit() -> int | None:
    """The memory limit of this job's cgroup (v2 or v1), if any: SLURM and containers set one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _address_space_left() -> int | None:
    """Bytes left under RLIMIT_AS (ulimit -v), if one is set."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(0, soft - used)


def in_memory_budget(local_size: int) -> int | None:
    """Bytes one rank may plan to use: physical memory (or the cgroup limit, if lower) shared by
    the `local_size` ranks of this node, and no more than RLIMIT_AS leaves; None if unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        total = None
    limits = [v for v in (total, _cgroup_limit()) if v is not None and v > 0]
    per_rank = min(limits) // max(1, local_size) if limits else None
    left = _address_space_left()
    candidates = [v for v in (per_rank, left) if v is not None]
    return min(candidates) if candidates else None


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""  # not reached


def _auto_limit(local_size: int) -> tuple[int, str]:
    budget = in_memory_budget(local_size)
    if budget is None:
        return IN_MEMORY_MAX_BYTES, f"{_size(IN_MEMORY_MAX_BYTES)}; memory size unknown"
    limit = min(IN_MEMORY_MAX_BYTES, budget // _BUDGET_SHARE)
    return limit, (f"min({_size(IN_MEMORY_MAX_BYTES)}, 1/{_BUDGET_SHARE} of {_size(budget)} "
                   f"per rank for {local_size} rank(s) on this node)")


def place_in_memory(ds: data.Dataset, mode: str, local_size: int = 1
                    ) -> tuple[data.Dataset, str | None]:
    """Apply `--in-memory MODE` to an opened source: (the source to train from, a note or None).

    "yes": an HDF5 file is loaded whole (DataError if it does not fit); "no": it is read on
    demand, batch by batch; "auto": loaded when x+y take at most min(IN_MEMORY_MAX_BYTES,
    in_memory_budget / 4), else read on demand, and the note says which and why. Sources that
    are in memory already (NPZ, bundled, synthetic) are returned as they are.
    """
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"--in-memory must be auto, yes or no, got {mode!r}")
    if not isinstance(ds, data.HDF5Dataset):
        note = (f"--in-memory no: {ds.source!r} is not HDF5 and is held in memory whole"
                if mode == "no" and Path(ds.source).exists() else None)
        return ds, note
    if mode == "no":
        return ds, None
    what = f"{ds.source!r} (x+y {_size(ds.nbytes)})"
    note = None
    if mode == "auto":
        limit, why = _auto_limit(local_size)
        if ds.nbytes > limit:
            return ds, (f"--in-memory auto: {what} is read from disk batch by batch, in the "
                        f"background (in memory up to {why})")
        note = f"--in-memory auto: {what} is loaded into memory (up to {why})"
    try:
        loaded = ds.load()
    except MemoryError:
        if mode == "auto":
            return ds, (f"--in-memory auto: {what} did not fit in memory; it is read from disk "
                        f"batch by batch")
        ds.close()
        raise DataError(f"data file {ds.source!r}: --in-memory yes: x and y need "
                        f"{_size(ds.nbytes)}, more than this process can allocate; use "
                        f"--in-memory no (or auto) to read batches from disk") from None
    return loaded, note
