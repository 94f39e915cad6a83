"""Which launcher started this process, and how many ranks it started, from the variables it
sets in every rank: read before MPI is initialized (distbp.comm decides from it whether to load
mpi4py at all). Knows nothing of MPI itself.

    launcher_world_size(os.environ)      # 4 under `mpiexec -n 4`, None under plain python
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from distbp.errors import ConfigError

__all__ = ["launcher_world_size", "mismatch_error"]

# Ranks the launcher started, by the variable it sets in every rank: PMI_SIZE (MPICH/Intel MPI
# hydra, and Slurm's pmi2 plugin), OMPI_COMM_WORLD_SIZE (Open MPI's mpirun), PMIX_SIZE (some
# PMIx launchers). These win over Slurm's counts: hydra inside a batch job starts its proxies with
# srun, so its ranks see SLURM_STEP_ID=0 with SLURM_STEP_NUM_TASKS = nodes, not ranks.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_SLURM_SIZE_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")


def _positive_int(value: str | None) -> int | None:
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is not None and n > 0 else None


def _launcher_count(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(variable, ranks) the launcher set, by the precedence documented in launcher_world_size."""
    slurm_vars = _SLURM_SIZE_VARS if "SLURM_STEP_ID" in environ else ()
    for var in (*_LAUNCHER_SIZE_VARS, *slurm_vars):
        n = _positive_int(environ.get(var))
        if n is not None:
            return var, n
    return None


def launcher_world_size(environ: Mapping[str, str]) -> int | None:
    """Ranks the launcher says it started, or None when no MPI launcher or srun step started us.

    MPI launcher variables come first (PMI_SIZE, OMPI_COMM_WORLD_SIZE, PMIX_SIZE); Slurm's task
    count (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS) counts only inside an srun step
    (SLURM_STEP_ID set), not in the batch script itself.
    """
    found = _launcher_count(environ)
    return None if found is None else found[1]


def _srun_tasks(environ: Mapping[str, str], launched: int) -> str | None:
    """The Slurm variable that counts `launched` tasks when srun itself started the ranks, else
    None. Inside an srun step that holds whatever the PMI variables say: srun's pmi2 plugin sets
    PMI_SIZE even when mpi4py's MPI cannot use it (the Open MPI wheel under --mpi=pmi2). Hydra
    started by mpiexec inside a batch job has its proxies started by srun: one task per node,
    not one per rank, so its ranks see a Slurm count that differs from PMI_SIZE."""
    if "SLURM_STEP_ID" not in environ:
        return None
    for var in _SLURM_SIZE_VARS:
        n = _positive_int(environ.get(var))
        if n is not None:
            return var if n == launched else None
    return None


def mismatch_error(environ: Mapping[str, str], launched: int, size: int) -> ConfigError:
    """The error for a launch whose MPI world (`size` ranks) is not what the launcher started."""
    source = _srun_tasks(environ, launched) or _launcher_count(environ)[0]
    if source.startswith("SLURM_"):
        return ConfigError(
            f"srun started {launched} tasks ({source}={launched}) but the MPI world has {size} "
            f"rank(s): srun did not wire the tasks into one MPI world -- use srun --mpi=pmi2 "
            f"(MPICH) or srun --mpi=pmix (Open MPI), or mpiexec inside the job")
    return ConfigError(
        f"the MPI launcher started {launched} ranks ({source}={launched}) but the MPI world has "
        f"{size} rank(s): mpiexec and mpi4py use different MPI libraries -- use the mpiexec that "
        f"belongs to mpi4py's MPI ({sys.executable} -m mpi4py --mpi-library)")
