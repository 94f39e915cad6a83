# Sourced by scripts/slurm-local.sh and scripts/cluster-local.sh: what both throw-away clusters
# share. The caller defines DIR, SOCK, PIDS (a directory of NAME.pid files), say and alive.
#
#   slurm_conf_common DIR SCHED_INTERVAL SHM_CLEAN SOCK CRED_EXPIRE >>"$CONF"  # common settings
#   start_munged                                               # one munged on our own socket
#   stop slurmctld munged                                      # TERM, up to 10 s, then KILL

slurm_conf_common() {
  local dir=$1 interval=$2 shm_clean=$3 sock=$4 cred_expire=$5
  cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged socket; cred_expire is also how long a requeued job waits before it may run
AuthInfo=socket=$sock,cred_expire=$cred_expire
StateSaveLocation=$dir/state/ctld
SlurmctldPidFile=$dir/state/slurmctld.pid
SlurmctldLogFile=$dir/logs/slurmctld.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# one line per finished job (state, exit code): sacct needs a database we do not run
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/logs/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=$interval,bf_interval=$interval
# plain srun wires MPICH ranks with PMI2 (Open MPI needs srun --mpi=pmix)
MpiDefault=pmi2
ReturnToService=2
KillWait=30
# killed ranks leave MPICH's shared memory in /dev/shm; a requeued job (same id) would attach to
# its killed run's: remove the job's segments before and after it runs
Prolog=$shm_clean
Epilog=$shm_clean
# a node may claim more CPUs than the machine has (slurm-local: -n 4 runs on 2 cores)
SlurmdParameters=config_overrides
EOF
}

start_munged() {
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    say "creating $key"
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chmod 0400 "$key"
  fi
  chown munge:munge "$key"   # munged refuses a key that is not its own
  install -d -o munge -g munge -m 0755 "$DIR/munge"
  if ! setpriv --reuid=munge --regid=munge --clear-groups test -w "$DIR/munge"; then
    say "the munge user cannot reach $DIR/munge: make $DIR and its parents world-searchable"
    return 1
  fi
  # setpriv execs munged, so $! is munged's own PID (runuser would leave a wrapper in between);
  # a UNIX socket by path is reachable from every network namespace: one munged for all nodes
  setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged --foreground \
    --socket="$SOCK" --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/seed" \
    >"$DIR/logs/munged.log" 2>&1 &
  echo $! >"$PIDS/munged.pid"
  local _
  for _ in $(seq 100); do
    if munge -n -S "$SOCK" 2>/dev/null | unmunge -S "$SOCK" >/dev/null 2>&1; then return 0; fi
    alive munged || break
    sleep 0.1
  done
  cat "$DIR/logs/munged.log" >&2
  return 1
}

pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

stop() { # stop NAMES...: TERM, wait up to 10 s, then KILL
  local n pid i any waiting=()
  for n in "$@"; do
    pid=$(pid_of "$n")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      waiting+=("$pid")
    fi
  done
  for i in $(seq 100); do
    any=0
    for pid in "${waiting[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ "$any" = 1 ] || break
    sleep 0.1
  done
  for pid in "${waiting[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      say "pid $pid ignored TERM: KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for n in "$@"; do rm -f "$PIDS/$n.pid"; done
}
