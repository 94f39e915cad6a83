#!/bin/bash
# mpich-shm-clean.sh: Slurm Prolog and Epilog of scripts/slurm-local.sh and cluster-local.sh.
# Removes the shared memory that MPICH's ranks of this job leave on the node when they are
# killed (scancel, a requeue, a time limit, a dead peer).
#
# MPICH 5 names a step's node-shared segments /dev/shm/mpich_shm_<h>_<node index> and
# mpich_vci_<h>_<node index>, h the 32-bit FNV-1a hash (hex) of its PMI key space, which under
# Slurm's pmi2 is "<job id>.<step id>". Nobody removes those of killed ranks, and a requeued job
# keeps its id: its next run would attach to its killed run's segments and fail ("Message
# truncated") or hang in MPI_Init. So before (Prolog) and after (Epilog) every job, remove the
# segments of its steps 0-63 and of its batch, extern and interactive steps.
#
# Slurm sets SLURM_JOB_ID; DISTBP_SHM_DIR (default /dev/shm) is for the tests.
[ -n "${SLURM_JOB_ID:-}" ] || exit 0
dir=${DISTBP_SHM_DIR:-/dev/shm}

fnv1a() {  # the 32-bit FNV-1a hash of $1 (ASCII), in lowercase hex without leading zeros
  local text=$1 h=2166136261 k byte
  for ((k = 0; k < ${#text}; k++)); do
    printf -v byte '%d' "'${text:k:1}"
    h=$(( ((h ^ byte) * 16777619) & 0xFFFFFFFF ))
  done
  printf '%x' "$h"
}

# 4294967290-4294967294: Slurm's pending, extern, batch, interactive and "none" step ids
for step in $(seq 0 63) $(seq 4294967290 4294967294); do
  h=$(fnv1a "$SLURM_JOB_ID.$step")
  rm -f "$dir"/mpich_shm_"$h"_* "$dir"/mpich_vci_"$h"_*
done
exit 0
