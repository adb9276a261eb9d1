#!/usr/bin/env bash
# A private single-node SLURM cluster in one folder, for the queue tests (../shared/reference/slurm.md).
#
#   scripts/slurm_cluster.sh install        apt-get install slurm-wlm + munge (root, Debian)
#   scripts/slurm_cluster.sh start DIR      write DIR/etc/slurm.conf, start munged, slurmctld, slurmd; wait idle
#   scripts/slurm_cluster.sh stop DIR       stop the three daemons by their PID files
#
# No cgroups, no slurmdbd: proctrack/linuxproc, task/none, finished jobs in DIR/jobcomp.txt. Clients find the
# cluster through SLURM_CONF=DIR/etc/slurm.conf (printed by start). Needs root (SlurmUser=root, munged as munge).
# CPUS (default 8) is what the node offers, more than a 2-core machine has (config_overrides), so jobs that ask
# several CPUs still run side by side.
set -euo pipefail

install() {
    if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
        return 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 node ctld_port d_port memory_mb
    node=$(hostname -s)
    ctld_port=$(free_port)
    d_port=$(free_port)
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
    cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=mspecies-test
SlurmctldHost=$node
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MinJobAge=600
DefMemPerCPU=1000
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
NodeName=$node CPUs=${CPUS:-8} RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    local dir=$1
    mkdir -p "$dir"/{etc,munge,state,spool,run,log}
    chmod 755 "$dir"  # munged (user munge) must reach its socket folder
    chown munge:munge "$dir/munge"
    chmod 755 "$dir/munge"  # 700: munged stops with "Socket is inaccessible"
    write_conf "$dir"
    if [ ! -f /etc/munge/munge.key ]; then  # the Debian package makes one; a trimmed image may not
        runuser -u munge -- /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged --socket="$dir/munge/munge.socket" --key-file=/etc/munge/munge.key \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
    export SLURM_CONF=$dir/etc/slurm.conf
    /usr/sbin/slurmctld -f "$SLURM_CONF" -i
    /usr/sbin/slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm_cluster.sh: the node did not become idle in 30 s; logs in $dir/log" >&2
    sinfo >&2 || true
    return 1
}

stop() {
    local dir=$1 pidfile pids=()
    for pidfile in "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid" "$dir/munge/munged.pid"; do
        if [ -f "$pidfile" ]; then
            pids+=("$(cat "$pidfile")")
        fi
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 60); do  # up to 15 s for them to write their state and exit
        local alive=0 pid
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        [ "$alive" = 1 ] || return 0
        sleep 0.25
    done
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: slurm_cluster.sh start DIR}" ;;
    stop) stop "${2:?usage: slurm_cluster.sh stop DIR}" ;;
    *) echo "usage: slurm_cluster.sh install | start DIR | stop DIR" >&2; exit 2 ;;
esac
