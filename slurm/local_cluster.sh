#!/usr/bin/env bash
# A one-node SLURM on this machine, for the `slurm` tests and for trying fne-launch without a cluster.
#
#   slurm/local_cluster.sh up       install (Debian packages, only if missing), configure, start; wait until idle
#   slurm/local_cluster.sh down     stop slurmctld, slurmd and munged
#   slurm/local_cluster.sh status   show the node and the queue; exit 0 only when the node takes jobs
#
# Run as root on a Debian machine without systemd (CI, containers).  Every command is idempotent: `up` on a
# running cluster and `down` on a stopped one do nothing.  It never overwrites a slurm.conf it did not write.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by fne-dist slurm/local_cluster.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
PARTITION=debug
WAIT_S=${LOCAL_SLURM_WAIT_S:-60}

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n1; }

# A trailing * (not responding), ~ (powered off) or # (powering up) means the node does not take jobs yet.
is_up() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not answer; see /var/log/munge/munged.log"
}

write_config() {
    if [ -e "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    local host node
    host=$(hostname -s)
    # `slurmd -C` reports this machine as slurmd will register it (CPUs, sockets, cores, RealMemory).
    node=$(slurmd -C | head -n1)
    [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    # Jobs meet at the first node's name (MASTER_ADDR): it must resolve, here to this machine.
    getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts
    install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >"$CONF" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
ReturnToService=2
# Refuse at submission what this node can never run, with sbatch's message, instead of pending forever.
EnforcePartLimits=ALL
# Seconds between SIGTERM and SIGKILL when a job is requeued, preempted or cancelled: the window in which
# every rank of a training job saves its checkpoint.
KillWait=30
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
}

daemon_running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    if command -v sinfo >/dev/null && is_up; then
        log "already up"; sinfo; return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts daemons)"
    install_packages
    start_munge
    write_config
    daemon_running /run/slurmctld.pid || slurmctld
    daemon_running /run/slurmd.pid || slurmd
    local host
    host=$(hostname -s)
    for _ in $(seq $((WAIT_S * 2))); do
        is_up && { sinfo; return 0; }
        # A node left DOWN/DRAINED by an earlier run comes back here.
        case "$(node_state)" in down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;; esac
        sleep 0.5
    done
    die "the node is not idle after ${WAIT_S}s (state: $(node_state)); see /var/log/slurm/slurmctld.log and slurmd.log"
}

stop_pidfile() {
    local pidfile=$1 pid
    daemon_running "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    die "process $pid ($pidfile) did not stop"
}

down() {
    stop_pidfile /run/slurmd.pid
    stop_pidfile /run/slurmctld.pid
    stop_pidfile "$MUNGE_PID"
    log "down"
}

status() {
    command -v sinfo >/dev/null || { log "SLURM is not installed"; return 1; }
    sinfo || true
    squeue || true
    is_up
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
