#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on localhost, for trying and testing kcd's SLURM path
# (`launcher: {kind: slurm}`, `python -m kcd.launch --launcher slurm`) on a workstation or in CI.
#
#   sudo scripts/slurm-cluster.sh start /tmp/kcd-slurm      # install if needed, (re)start, wait idle
#   eval "$(scripts/slurm-cluster.sh env /tmp/kcd-slurm)"   # SLURM_CONF + the sacct wrapper on PATH
#   sinfo; sbatch --wrap hostname; squeue                   # ... or: snakemake --profile slurm ...
#   sudo scripts/slurm-cluster.sh stop /tmp/kcd-slurm       # cancel all jobs, kill the daemons
#
# What it does (Debian/Ubuntu, run as root; tested with Slurm 22.05 on Debian 12):
#   * installs slurmctld, slurmd, slurm-client and munge with apt-get when they are missing
#     (apt-get update only when the first install attempt fails);
#   * writes DIR/etc/slurm.conf and DIR/etc/gres.conf: one node "localhost" with all CPUs, ~90% of
#     the RAM and two fake GPUs (character devices DIR/dev/nvidia0-1 made with mknod, so
#     `--gres=gpu:1` / `--gpus-per-node=1` works and sets CUDA_VISIBLE_DEVICES), one partition
#     "debug", no accounting database: finished jobs are logged by jobcomp/filetxt in
#     DIR/jobcomp.log;
#   * every state, spool, log and PID file lives in DIR; the state is wiped on each start (a DRAIN
#     state would otherwise survive a restart);
#   * starts munged as user munge with its own socket in DIR/munge (no systemd needed), then
#     slurmctld and `slurmd -N localhost`, and waits (60 s at most) until `sinfo` shows the node idle;
#   * writes DIR/bin/sacct, a wrapper that runs `sacct --completion` (reads the jobcomp log), because
#     plain sacct fails without slurmdbd and submitit/snakemake rely on it to notice dead jobs.
# `env DIR` prints the export lines clients need; every client (sbatch, squeue, submitit, snakemake)
# must see SLURM_CONF. `start` on a running cluster restarts it; `stop` on a stopped one does nothing.
# DIR must be reachable by the munge user (e.g. a folder under /tmp, not under a 0700 home).
# The daemons listen on the default ports 6817/6818: one such cluster per machine at a time.
# Exit status of `start`: 0 up; 3 SLURM cannot be had here (not root, no apt-get, the install
# failed, another slurmctld/slurmd runs); 1 any other failure (the cluster did not come up).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_S=60

die() { echo "slurm-cluster.sh: error: $*" >&2; exit 1; }
unavailable() { echo "slurm-cluster.sh: error: $*" >&2; exit 3; }
say() { echo "slurm-cluster.sh: $*" >&2; }

usage() {
    echo "usage: $0 start|stop|env DIR" >&2
    exit 2
}

[[ $# -eq 2 ]] || usage
CMD=$1
DIR=$(realpath -m -- "$2")
CONF="$DIR/etc/slurm.conf"

have_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null
}

install_packages() {
    have_packages && return 0
    [[ $EUID -eq 0 ]] || unavailable "SLURM is not installed and installing it needs root (apt-get install ${PACKAGES[*]})"
    command -v apt-get >/dev/null || unavailable "SLURM is not installed and there is no apt-get; install ${PACKAGES[*]} yourself"
    say "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$DIR/apt.log" 2>&1; then
        apt-get update >>"$DIR/apt.log" 2>&1 || unavailable "apt-get update failed, see $DIR/apt.log"
        apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1 \
            || unavailable "apt-get install failed, see $DIR/apt.log"
    fi
    have_packages || die "installed ${PACKAGES[*]} but slurmctld/slurmd/sbatch/munged are not on PATH"
}

# Kill the daemon whose PID is in file $1 and wait (10 s) until it is gone.
kill_pidfile() {
    local file=$1 pid i
    [[ -f $file ]] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

# Cancel every job (10 s for them to end): killing slurmd would leave their processes running.
cancel_jobs() {
    local pid i
    pid=$(cat "$DIR/run/slurmctld.pid" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 0
    SLURM_CONF="$CONF" timeout 10 scancel --partition=debug >/dev/null 2>&1 || return 0
    for i in $(seq 20); do
        [[ -z $(SLURM_CONF="$CONF" timeout 10 squeue -h -o %i 2>/dev/null || echo x) ]] && break
        sleep 0.5
    done
}

stop_cluster() {
    cancel_jobs
    kill_pidfile "$DIR/run/slurmd.pid"
    kill_pidfile "$DIR/run/slurmctld.pid"
    kill_pidfile "$DIR/munge/munged.pid"
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$DIR/etc" "$DIR/bin" "$DIR/dev" "$DIR/run" "$DIR/log"
    for i in 0 1; do
        # fake GPUs: Slurm 22.05 ignores count-only GPU gres and rejects plain files
        [[ -c $DIR/dev/nvidia$i ]] || { rm -f "$DIR/dev/nvidia$i"; mknod "$DIR/dev/nvidia$i" c 1 3; }
    done
    cat >"$CONF" <<EOF
# Written by scripts/slurm-cluster.sh: a single-node test cluster on localhost.
ClusterName=kcdtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/gres.conf" <<EOF
NodeName=localhost Name=gpu File=$DIR/dev/nvidia[0-1]
EOF
    cat >"$DIR/bin/sacct" <<'EOF'
#!/bin/sh
# No slurmdbd on this test cluster: read finished jobs from the jobcomp/filetxt log.
exec /usr/bin/sacct --completion "$@"
EOF
    chmod 0755 "$DIR/bin/sacct"
}

start_munge() {
    local m="$DIR/munge"
    mkdir -p "$m"
    [[ -s $m/munge.key ]] || dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$m"
    chmod 0755 "$m"
    chmod 0400 "$m/munge.key"
    runuser -u munge -- test -r "$m/munge.key" \
        || die "user munge cannot read $m (is a parent folder of $DIR private?); use a folder such as /tmp/kcd-slurm"
    runuser -u munge -- munged --socket="$m/munge.socket.2" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
        || die "munged did not start, see $m/munged.log"
}

start_cluster() {
    [[ $EUID -eq 0 ]] || unavailable "start needs root (slurmd runs jobs as their users)"
    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    install_packages
    stop_cluster
    local other
    # (two patterns: pgrep matches nothing with a pattern longer than 15 characters)
    other=$( { pgrep -x slurmctld; pgrep -x slurmd; } 2>/dev/null | tr '\n' ' ' || true)
    [[ -z $other ]] || unavailable "another slurmctld/slurmd is running (PID $other); stop it first (ports 6817/6818)"
    rm -rf "$DIR/state" "$DIR/log"
    mkdir -p "$DIR/state/ctld" "$DIR/state/d"
    write_conf
    rm -f "$DIR/jobcomp.log"
    start_munge
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF" || die "slurmctld did not start, see $DIR/log/slurmctld.log"
    slurmd -f "$CONF" -N localhost || die "slurmd did not start, see $DIR/log/slurmd.log"
    local state="" i
    for i in $(seq $((WAIT_S * 2))); do
        state=$(sinfo -h -N -n localhost -o %t 2>/dev/null | head -n1 || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        say "node localhost is '${state:-unknown}' after ${WAIT_S} s, not idle; last log lines:"
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
        stop_cluster
        die "the cluster did not come up"
    fi
    say "cluster up in $DIR; now run: eval \"\$($0 env $DIR)\""
}

case $CMD in
    start) start_cluster ;;
    stop) stop_cluster; say "stopped (if it was running) in $DIR" ;;
    env)
        [[ -f $CONF ]] || die "no cluster config in $DIR; run: $0 start $DIR"
        printf 'export SLURM_CONF=%q\n' "$CONF"
        printf 'export PATH=%q:"$PATH"\n' "$DIR/bin"
        ;;
    *) usage ;;
esac
