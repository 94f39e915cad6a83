#!/usr/bin/env bash
# cluster-local.sh: a throw-away multi-node Slurm cluster emulated on one Linux host, to run
# hpc/slurm/*.sbatch across "nodes" whose MPI traffic really goes over a (shapeable) network.
#
#   sudo scripts/cluster-local.sh up 2          # nodes node1, node2; slurmctld on "head"
#   sudo scripts/cluster-local.sh x head sbatch -N 2 -n 2 hpc/slurm/train.sbatch --steps 200
#   sudo scripts/cluster-local.sh x head squeue # Slurm's clients run on the head node
#   sudo scripts/cluster-local.sh x node1 bash  # a shell on node1 (its hostname, eth0, /dev/shm)
#   sudo scripts/cluster-local.sh shape 1gbit   # cap every link (tbf, both directions); 'shape off'
#   sudo scripts/cluster-local.sh counters      # bytes through each node's eth0
#   sudo scripts/cluster-local.sh kill node2    # SIGKILL every process of node2: a node failure
#   sudo scripts/cluster-local.sh revive node2  # start node2's slurmd again
#   sudo scripts/cluster-local.sh status
#   sudo scripts/cluster-local.sh down          # idempotent: jobs, daemons, namespaces, mounts
#
# A node is a set of namespaces, each kept in a file so that every command can enter it again:
#   network  eth0 (one end of a veth pair whose other end is on a bridge) with its own address;
#   IPC      UCX (MPICH's transport) takes peers that share System V IPC for the same host and
#            uses shared memory instead of the network;
#   UTS      its own hostname (slurmctld must find its own name; readable logs and reports);
#   mount    its own /dev/shm (MPICH's segments stay on their node), /etc/hosts naming every node
#            (MPICH's hydra connects back by name), a /sys for its network namespace and a stub
#            /sys/fs/cgroup (slurmd 22.05 will not start without one).
# Everything else, /tmp and the repository included, is the host's: the nodes share it as a
# cluster shares its parallel file system. The head (slurmctld, the clients) lives in the
# switch's network namespace with a UTS namespace of its own.
#
# CPUs: each node's slurmd is pinned (taskset) to its own share of the host's CPUs, and the
# ranks it starts inherit that set (no task plugin binds them), so two nodes do not put their
# ranks on one core (Slurm's default binding on an emulated node does: forward+backward 8x
# slower); slurm.conf's CPUs= is the size of that share. With more nodes than CPUs, nodes share
# CPUs round-robin, and `up` says so. More ranks than a node's CPUs: sbatch --overcommit (-O).
#
# Root only. Needs ip and tc (iproute2), unshare, nsenter and taskset (util-linux) and Debian's
# slurmctld, slurmd, slurm-client and munge (installed with apt-get when missing). Daemons run in
# the foreground as children of this script's shell and are stopped by their saved PIDs; only
# processes inside this cluster's own namespaces are ever killed.
#
# Settings (environment):
#   CLUSTERLAB_DIR   config, state, logs, PIDs, namespace files (default /tmp/distbp-cluster);
#                    short: the munge socket path inside it must stay under 108 bytes
#   CLUSTER_NAME     prefix of the network namespaces (default distbp): NAME-sw, NAME-n1, ...;
#                    clusters that run side by side need different names (their subnets may be
#                    the same: each lives in its own namespaces)
#   CLUSTER_NET      the /24 the nodes live in (default 10.87.0): nodeI is .I, head is .254
#   CLUSTER_NODE_CPUS  CPUs= each node advertises (default: the CPUs it is pinned to)
#   SLURM_CRED_EXPIRE  seconds before a requeued job may start again (default 120)
#   SLURM_FIRST_JOB_ID first job id (default: random). MPICH names its shared memory after the
#                    job and step ids; a cluster restarted from id 1 would meet the segments of
#                    killed jobs of an earlier one
#   SLURM_UP_TIMEOUT seconds to wait for every node to become idle (default 60)
#   SLURMD_TIMEOUT   seconds before slurmctld declares a silent node down (default 30)
set -euo pipefail

DIR=${CLUSTERLAB_DIR:-/tmp/distbp-cluster}
NAME=${CLUSTER_NAME:-distbp}
NET=${CLUSTER_NET:-10.87.0}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-120}
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}
SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-30}
CONF=$DIR/etc/slurm.conf
PIDS=$DIR/pids
NS=$DIR/ns
SOCK=$DIR/munge/sock
SW=$NAME-sw
SHM_CLEAN=$(cd "$(dirname "$0")" && pwd)/mpich-shm-clean.sh
# shellcheck source=scripts/slurm-common.sh
. "$(dirname "$0")/slurm-common.sh"

say() { printf '[cluster-local] %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

nodes() { cat "$DIR/nodes" 2>/dev/null || echo 0; }
netns_of() { echo "$NAME-n${1#node}"; }   # node3 -> NAME-n3

# ------------------------------------------------------------------------------ entering a node

# x NODE CMD...: run CMD in NODE's namespaces (head: network and hostname), with SLURM_CONF set.
# Entering a mount namespace moves to its root: --wdns keeps the caller's directory (shared).
x() {
  local node=${1:?x needs a node name}; shift
  [ $# -gt 0 ] || fail "x $node: no command"
  export SLURM_CONF=$CONF
  if [ "$node" = head ]; then
    exec nsenter --net="/run/netns/$SW" --uts="$NS/uts-head" "$@"
  fi
  [ -e "$NS/mnt-$node" ] || fail "no node '$node' (nodes: head node1..node$(nodes))"
  exec nsenter --net="/run/netns/$(netns_of "$node")" --uts="$NS/uts-$node" --ipc="$NS/ipc-$node" \
    --mount="$NS/mnt-$node" --wdns="$PWD" "$@"
}

# ------------------------------------------------------------------------------------- network

make_namespaces() {
  local n=$1 i node ns
  mkdir -p "$NS"
  # Namespace files can be bind-mounted only onto a private mount (ip netns does the same).
  mount --bind "$NS" "$NS"
  mount --make-private "$NS"
  ip netns add "$SW"
  ip -n "$SW" link set lo up
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" addr add "$NET.254/24" dev br0
  ip -n "$SW" link set br0 up
  touch "$NS/uts-head"
  unshare --uts="$NS/uts-head" hostname head
  for i in $(seq "$n"); do
    node=node$i ns=$(netns_of "$node")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$SW" link add "vn$i" type veth peer name eth0 netns "$ns"
    ip -n "$SW" link set "vn$i" master br0 up
    ip -n "$ns" addr add "$NET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    touch "$NS/uts-$node" "$NS/ipc-$node" "$NS/mnt-$node"
    unshare --uts="$NS/uts-$node" hostname "$node"
    unshare --ipc="$NS/ipc-$node" true
    # Made from inside the node's network namespace: a fresh sysfs shows the mounter's one.
    nsenter --net="/run/netns/$ns" unshare --mount="$NS/mnt-$node" --propagation private \
      /bin/sh -ec '
        umount -l /sys
        mount -t sysfs sysfs /sys
        mount -t tmpfs -o size=1m,mode=755 node-cgroup /sys/fs/cgroup
        mkdir /sys/fs/cgroup/systemd
        mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
        mount -t tmpfs -o mode=1777,size=25% node-shm /dev/shm
        mount --bind "$1" /etc/hosts' sh "$DIR/etc/hosts"
  done
}

remove_namespaces() {
  local f i
  for f in "$NS"/*; do
    [ -e "$f" ] || continue
    umount "$f" 2>/dev/null || umount -l "$f" 2>/dev/null || true
    rm -f "$f"
  done
  if mountpoint -q "$NS"; then umount "$NS" || umount -l "$NS"; fi
  for i in $(seq "$(nodes)"); do ip netns del "$(netns_of "node$i")" 2>/dev/null || true; done
  ip netns del "$SW" 2>/dev/null || true
}

shape() {
  local rate=${1:?shape needs a rate (e.g. 1gbit) or off} burst=${2:-256kb} i
  for i in $(seq "$(nodes)"); do
    if [ "$rate" = off ]; then
      tc -n "$(netns_of "node$i")" qdisc del dev eth0 root 2>/dev/null || true
      tc -n "$SW" qdisc del dev "vn$i" root 2>/dev/null || true
    else  # each end shapes what it sends: both directions of the node's link
      tc -n "$(netns_of "node$i")" qdisc replace dev eth0 root tbf rate "$rate" burst "$burst" \
        latency 50ms
      tc -n "$SW" qdisc replace dev "vn$i" root tbf rate "$rate" burst "$burst" latency 50ms
    fi
  done
  if [ "$rate" = off ]; then say "links: not shaped"; else say "links: tbf $rate, burst $burst"; fi
}

counters() {  # one line per node: NODE RX_BYTES TX_BYTES of its eth0
  local i
  for i in $(seq "$(nodes)"); do
    printf 'node%s %s %s\n' "$i" \
      "$( (x "node$i" cat /sys/class/net/eth0/statistics/rx_bytes) )" \
      "$( (x "node$i" cat /sys/class/net/eth0/statistics/tx_bytes) )"
  done
}

# --------------------------------------------------------------------------------- CPU shares

host_cpus() {  # the CPUs this script may use, one per line
  local part lo hi
  for part in $(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status | tr ',' ' '); do
    lo=${part%-*} hi=${part#*-}
    seq "$lo" "$hi"
  done
}

cpu_share() {  # cpu_share I N: the CPU list (taskset -c) of node I of N
  local i=$1 n=$2 cpus per
  mapfile -t cpus < <(host_cpus)
  if [ "${#cpus[@]}" -ge "$n" ]; then
    per=$(( ${#cpus[@]} / n ))
    echo "${cpus[@]:$(( (i - 1) * per )):$per}" | tr ' ' ','
  else
    echo "${cpus[$(( (i - 1) % ${#cpus[@]} ))]}"
  fi
}

# ------------------------------------------------------------------------------ configuration

write_config() {
  local n=$1 i share first
  first=${SLURM_FIRST_JOB_ID:-$(( (RANDOM * 32768 + RANDOM) % 50000000 + 1000 ))}
  mkdir -p "$DIR/etc" "$DIR/state/ctld" "$DIR/logs" "$PIDS"
  for i in $(seq "$n"); do mkdir -p "$DIR/state/node$i"; done  # slurmd does not make its spool
  cat >"$CONF" <<EOF
# Written by scripts/cluster-local.sh: $n emulated nodes, no cgroups, no accounting database.
ClusterName=$NAME
FirstJobId=$first
SlurmctldHost=head($NET.254)
SlurmdSpoolDir=$DIR/state/%n
SlurmdPidFile=$DIR/state/slurmd-%n.pid
SlurmdLogFile=$DIR/logs/slurmd-%n.log
MessageTimeout=30
SlurmdTimeout=$SLURMD_TIMEOUT
EOF
  slurm_conf_common "$DIR" 1 "$SHM_CLEAN" "$SOCK" "$CRED_EXPIRE" >>"$CONF"
  for i in $(seq "$n"); do
    share=$(cpu_share "$i" "$n")
    echo "$share" >"$DIR/state/cpus-node$i"
    echo "NodeName=node$i NodeAddr=$NET.$i CPUs=${CLUSTER_NODE_CPUS:-$(count_list "$share")} State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
  { echo "127.0.0.1 localhost"
    echo "$NET.254 head"
    for i in $(seq "$n"); do echo "$NET.$i node$i"; done; } >"$DIR/etc/hosts"
  printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env.sh"
}

count_list() { tr ',' '\n' <<<"$1" | grep -c .; }

# ------------------------------------------------------------------------------------ daemons

alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }


start_slurmd() {  # start_slurmd NODE: pinned to its CPUs; nsenter and taskset exec: $! is slurmd
  local node=$1
  taskset -c "$(cat "$DIR/state/cpus-$node")" \
    nsenter --net="/run/netns/$(netns_of "$node")" --uts="$NS/uts-$node" --ipc="$NS/ipc-$node" \
    --mount="$NS/mnt-$node" env SLURM_CONF="$CONF" /usr/sbin/slurmd -D -N "$node" -f "$CONF" \
    >>"$DIR/logs/slurmd-$node.out" 2>&1 &
  echo $! >"$PIDS/slurmd-$node.pid"
}

start_daemons() {
  local i
  # slurmctld must see its own name (head) as SlurmctldHost; -c: no old jobs
  nsenter --net="/run/netns/$SW" --uts="$NS/uts-head" env SLURM_CONF="$CONF" \
    /usr/sbin/slurmctld -D -c -f "$CONF" >"$DIR/logs/slurmctld.out" 2>&1 &
  echo $! >"$PIDS/slurmctld.pid"
  for i in $(seq "$(nodes)"); do start_slurmd "node$i"; done
}

daemon_names() { echo slurmctld; for i in $(seq "$(nodes)"); do echo "slurmd-node$i"; done; }

wait_idle() {  # wait_idle NODES...: every named node idle (after resuming it if it is down)
  local deadline=$((SECONDS + UP_TIMEOUT)) states="" d
  while [ "$SECONDS" -lt "$deadline" ]; do
    for d in slurmctld "${@/#/slurmd-}"; do
      alive "$d" || { say "$d exited:"; tail -n 20 "$DIR/logs/$d.out" >&2 || true; return 1; }
    done
    states=$( (x head sinfo -h -N -n "$(IFS=,; echo "$*")" -o '%N %T') 2>/dev/null || true)
    if [ -n "$states" ] && ! grep -qv ' idle$' <<<"$states"; then return 0; fi
    grep -E ' (down|drain)' <<<"$states" | while read -r d _; do
      (x head scontrol update NodeName="$d" State=RESUME) >/dev/null 2>&1 || true
    done
    sleep 0.3
  done
  say "nodes not idle after ${UP_TIMEOUT}s:" "$states"
  return 1
}


kill_namespace() {  # SIGKILL every process whose network namespace is NS (a node's, or the head's)
  local ns=$1 pid
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
}

# ------------------------------------------------------------------------------------ commands

up() {
  local n=${1:?up needs the number of nodes} i shared=""
  [[ $n =~ ^[1-9][0-9]?$ ]] || fail "up: the number of nodes must be 1 to 99, got '$n'"
  [ "$(id -u)" = 0 ] || fail "run as root: namespaces, and slurmd starts the jobs"
  [ ! -e "$DIR/nodes" ] || fail "a cluster is already set up in $DIR: '$0 down' first"
  ! ip netns list | grep -q "^$SW\b" || fail "namespace $SW exists: another cluster of this name"
  [ "${#SOCK}" -lt 100 ] || fail "CLUSTERLAB_DIR too long for a UNIX socket path: $SOCK"
  for b in ip tc nsenter unshare taskset; do
    command -v "$b" >/dev/null || fail "$b is missing (apt-get install iproute2 util-linux)"
  done
  install_packages
  mkdir -p "$DIR"
  echo "$n" >"$DIR/nodes"
  write_config "$n"
  # from here on, a failure (fail exits) leaves nothing behind
  trap 'say "up failed: tearing down"; down >/dev/null 2>&1 || true' EXIT
  make_namespaces "$n"
  start_munged || fail "munged did not start"
  start_daemons
  wait_idle $(seq -f 'node%g' "$n") || fail "the cluster did not come up (logs in $DIR/logs)"
  trap - EXIT
  [ "$(host_cpus | wc -l)" -ge "$n" ] || shared=" (more nodes than CPUs: nodes share CPUs)"
  for i in $(seq "$n"); do say "node$i: CPUs $(cat "$DIR/state/cpus-node$i")$shared"; done
  say "up: $n nodes idle; run clients with: $0 x head sbatch|srun|squeue ..."
}

install_packages() {
  local b missing=0
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
    [ -x "$b" ] || missing=1
  done
  [ "$missing" = 1 ] || return 0
  command -v apt-get >/dev/null || fail "slurmctld/slurmd/munge missing and no apt-get"
  say "installing slurmctld slurmd slurm-client munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

cancel_jobs() {
  alive slurmctld || return 0
  local jobs _
  jobs=$( (x head squeue -h -o %i) 2>/dev/null || true)
  [ -n "$jobs" ] || return 0
  # shellcheck disable=SC2086
  (x head scancel $jobs) >/dev/null 2>&1 || true
  for _ in $(seq 50); do
    [ -z "$( (x head squeue -h -o %i) 2>/dev/null || true)" ] && return 0
    sleep 0.2
  done
}

down() {
  local i
  if [ ! -e "$DIR/nodes" ] && [ ! -d "$NS" ]; then say "nothing to stop in $DIR"; return 0; fi
  cancel_jobs
  # shellcheck disable=SC2046
  stop $(daemon_names)
  stop munged
  # whatever is left in the cluster's namespaces (a job's processes) was started by the cluster
  for i in $(seq "$(nodes)"); do kill_namespace "$(netns_of "node$i")"; done
  kill_namespace "$SW"
  remove_namespaces
  rm -f "$DIR/nodes"
  say "down (logs kept in $DIR/logs)"
}

kill_node() {  # every process of NODE, at once: what a power failure does to its jobs
  local node=${1:?kill needs a node name}
  [ -e "$NS/mnt-$node" ] || fail "no node '$node'"
  kill_namespace "$(netns_of "$node")"
  rm -f "$PIDS/slurmd-$node.pid"
  say "$node: every process killed"
}

revive() {
  local node=${1:?revive needs a node name}
  [ -e "$NS/mnt-$node" ] || fail "no node '$node'"
  alive "slurmd-$node" || start_slurmd "$node"
  wait_idle "$node" || fail "$node did not come back (logs in $DIR/logs)"
  say "$node: idle again"
}

status() {
  local d
  for d in munged $(daemon_names); do
    if alive "$d"; then echo "$d: running, pid $(pid_of "$d")"; else echo "$d: stopped"; fi
  done
  if alive slurmctld; then (x head sinfo -N); (x head squeue); fi
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  x) shift; x "$@" ;;
  shape) shape "${2:-}" "${3:-256kb}" ;;
  counters) counters ;;
  kill) kill_node "${2:-}" ;;
  revive) revive "${2:-}" ;;
  status) status ;;
  purge) down; rm -rf "$DIR"; say "removed $DIR" ;;
  *) echo "usage: $0 up N | down | x NODE CMD... | shape RATE|off [BURST] | counters |" \
          "kill NODE | revive NODE | status | purge   (settings: the top of this script)" >&2
     exit 2 ;;
esac
