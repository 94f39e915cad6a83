#!/usr/bin/env bash
# slurm-local.sh: a throw-away single-node Slurm cluster (Debian's slurmctld + slurmd + munge) for
# the test suite, CI, and anyone who wants to try hpc/slurm/*.sbatch without a real cluster.
#
#   sudo scripts/slurm-local.sh up       # install the packages if missing, start munged, slurmctld
#                                        # and slurmd, wait until the node is idle
#   export SLURM_CONF=$SLURMLAB_DIR/etc/slurm.conf   # or: source "$SLURMLAB_DIR/env.sh"
#   sbatch -n 2 hpc/slurm/train.sbatch --steps 200; squeue; sinfo
#   sudo scripts/slurm-local.sh status
#   sudo scripts/slurm-local.sh down     # cancel every job, stop the daemons by their saved PIDs
#   sudo scripts/slurm-local.sh purge    # down, then delete $SLURMLAB_DIR (config, state, logs)
#
# Needs root (slurmd launches jobs as the submitting user) and Debian/Ubuntu packages slurmctld,
# slurmd, slurm-client and munge, and libpmix-dev for srun --mpi=pmix (installed with apt-get
# when missing). Needs no systemd and no cgroups: every daemon runs in the foreground as our
# child, its PID saved under $SLURMLAB_DIR/pids, and is stopped by that PID; process tracking is proctrack/linuxproc. The node is "localhost",
# so the machine's hostname does not matter. Nothing outside $SLURMLAB_DIR is written, except by
# apt and a munge key in /etc/munge when there is none.
#
# Settings (environment):
#   SLURMLAB_DIR       config, state, logs, PIDs, munge socket (default /tmp/distbp-slurm). Keep it
#                      short: the munge socket path inside it must stay under 108 bytes.
#   SLURM_CPUS         CPUs the node advertises (default 4; may exceed the real cores)
#   SLURMCTLD_PORT, SLURMD_PORT   TCP ports (default 6817, 6818); checked to be free first
#   SLURM_CRED_EXPIRE  seconds before a requeued job may start again (default 120, Slurm's own;
#                      tests use a few seconds)
#   SLURM_SCHED_INTERVAL  seconds between scheduler passes (default 2)
#   SLURM_FIRST_JOB_ID first job id (default: random, 1000 to 50 million). MPICH names its PMI key
#                      space and its shared memory (/dev/shm/mpich_shm_*) after the job and step
#                      ids, and killed ranks leave that memory behind: a cluster that counted
#                      from 1 again, or another one beside it, would meet old segments under its
#                      new jobs' names (MPI_Init fails or hangs). The Prolog/Epilog
#                      scripts/mpich-shm-clean.sh removes each job's own, for its requeues.
#   SLURM_UP_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   SLURM_MESSAGE_TIMEOUT  seconds a client (sbatch, scancel, squeue) waits for slurmctld's answer
#                      (default 30; Slurm's own 10 s is too short when the jobs keep every core
#                      busy: scancel then fails with "Socket timed out on send/recv operation")
set -euo pipefail

DIR=${SLURMLAB_DIR:-/tmp/distbp-slurm}
CPUS=${SLURM_CPUS:-4}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
D_PORT=${SLURMD_PORT:-6818}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-120}
SCHED_INTERVAL=${SLURM_SCHED_INTERVAL:-2}
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}
MESSAGE_TIMEOUT=${SLURM_MESSAGE_TIMEOUT:-30}
FIRST_JOB_ID=${SLURM_FIRST_JOB_ID:-$(( (RANDOM * 32768 + RANDOM) % 50000000 + 1000 ))}
SHM_CLEAN=$(cd "$(dirname "$0")" && pwd)/mpich-shm-clean.sh
# shellcheck source=scripts/slurm-common.sh
. "$(dirname "$0")/slurm-common.sh"
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/pids
SOCK=$DIR/munge/sock
DAEMONS=(munged slurmctld slurmd)

say() { printf '[slurm-local] %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

need_packages() {
  local b
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
    [ -x "$b" ] || return 0
  done
  return 1
}

# srun --mpi=pmix (Open MPI) needs the unversioned libpmix.so, which only libpmix-dev ships
have_pmix() { compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null; }

install_packages() {
  export DEBIAN_FRONTEND=noninteractive
  if need_packages; then
    command -v apt-get >/dev/null || fail "slurmctld/slurmd/munge missing and no apt-get to install them"
    say "installing slurmctld slurmd slurm-client munge libpmix-dev with apt-get"
    apt-get update -qq
    # Without systemd the packages' service starts are refused (policy-rc.d): what we want.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
      libpmix-dev >/dev/null
  elif ! have_pmix && command -v apt-get >/dev/null; then
    # optional: without it only srun --mpi=pmix fails (MPICH's pmi2 and mpiexec still work)
    say "installing libpmix-dev with apt-get (for srun --mpi=pmix)"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends libpmix-dev >/dev/null; } \
      || say "warning: libpmix-dev could not be installed: srun --mpi=pmix will fail"
  fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }


alive() {
  local pid; pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

write_config() {
  mkdir -p "$DIR/etc" "$DIR/state/ctld" "$DIR/state/d" "$DIR/logs" "$PIDS"
  cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: one node, no cgroups, no accounting database.
ClusterName=distbp
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmdSpoolDir=$DIR/state/d
SlurmdPidFile=$DIR/state/slurmd.pid
SlurmdLogFile=$DIR/logs/slurmd.log
# how long a client waits for slurmctld: the node's cores are all the jobs', so it may be slow
MessageTimeout=$MESSAGE_TIMEOUT
EOF
  slurm_conf_common "$DIR" "$SCHED_INTERVAL" "$SHM_CLEAN" "$SOCK" "$CRED_EXPIRE" >>"$CONF"
  printf '%s\n' "NodeName=localhost CPUs=$CPUS State=UNKNOWN" \
    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
  printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env.sh"
}


start_slurm() {
  # -D: foreground, so the saved PID is the daemon itself; -c: start with no old jobs
  SLURM_CONF=$CONF /usr/sbin/slurmctld -D -c -f "$CONF" >"$DIR/logs/slurmctld.out" 2>&1 &
  echo $! >"$PIDS/slurmctld.pid"
  SLURM_CONF=$CONF /usr/sbin/slurmd -D -N localhost -f "$CONF" >"$DIR/logs/slurmd.out" 2>&1 &
  echo $! >"$PIDS/slurmd.pid"
}

both_alive() {
  local d
  for d in slurmctld slurmd; do
    alive "$d" || { say "$d exited:"; tail -n 20 "$DIR/logs/$d.out" "$DIR/logs/$d.log" >&2 || true; return 1; }
  done
}

wait_idle() {
  local state="" deadline=$((SECONDS + UP_TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    both_alive || return 1
    state=$(SLURM_CONF=$CONF sinfo -h -n localhost -o %T 2>/dev/null || true)
    case "$state" in
      idle) sleep 0.3; both_alive || return 1; return 0 ;;
      down*|drain*) SLURM_CONF=$CONF scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  say "node still '$state' after ${UP_TIMEOUT}s"
  return 1
}

up() {
  [ "$(id -u)" = 0 ] || fail "run as root: slurmd must be root to start jobs"
  local d p
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then fail "$d is already running (pid $(pid_of "$d")): '$0 down' first"; fi
  done
  # A daemon that cannot bind its port dies, and an old cluster on that port would answer for it.
  for p in "$CTLD_PORT" "$D_PORT"; do
    if port_busy "$p"; then fail "port $p is in use: set SLURMCTLD_PORT / SLURMD_PORT"; fi
  done
  [ "${#SOCK}" -lt 100 ] || fail "SLURMLAB_DIR too long for a UNIX socket path: $SOCK"
  install_packages
  write_config
  if ! start_munged; then stop_all; fail "munged did not start"; fi
  start_slurm
  if ! wait_idle; then stop_all; fail "the node did not become idle (logs in $DIR/logs)"; fi
  say "up: node localhost idle with $CPUS CPUs; export SLURM_CONF=$CONF"
}


cancel_jobs() {
  alive slurmctld || return 0
  local jobs _
  jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
  [ -n "$jobs" ] || return 0
  say "cancelling jobs:" $jobs
  # shellcheck disable=SC2086
  SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
  for _ in $(seq 150); do
    [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.2
  done
}

stop_all() {
  stop slurmd slurmctld
  stop munged
}

down() {
  if [ ! -d "$PIDS" ]; then say "nothing to stop in $DIR"; return 0; fi
  cancel_jobs
  stop_all
  say "down (logs kept in $DIR/logs)"
}

status() {
  local d
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d: running, pid $(pid_of "$d")"; else echo "$d: stopped"; fi
  done
  if alive slurmctld; then SLURM_CONF=$CONF sinfo; SLURM_CONF=$CONF squeue; fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  purge) down; rm -rf "$DIR"; say "removed $DIR" ;;
  *) echo "usage: $0 up|down|status|purge   (settings: see the top of this script)" >&2; exit 2 ;;
esac
