#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests (issue 22, item 5).
#
#   scripts/slurm-local.sh up       install slurm-wlm + munge if missing (apt, as root), write slurm.conf, start
#                                   munged, slurmctld and slurmd, wait until the node is idle; prints the client
#                                   environment as `export ...` lines, so `eval "$(scripts/slurm-local.sh up)"` works
#   scripts/slurm-local.sh env      print those `export ...` lines only (starts nothing)
#   scripts/slurm-local.sh status   print sinfo/squeue and exit 0, or "not running" and exit 1
#   scripts/slurm-local.sh down     cancel the cluster's jobs and stop the daemons (the state dir stays, logs included)
#
# Every subcommand is idempotent: `up` on a healthy cluster only prints the environment, `down` on a stopped one
# does nothing. There is no systemd here: the daemons are started directly and daemonize themselves; their pid
# files, logs, spool, state and the munge key/socket all live under one state dir.
#
# Settings (environment):
#   SLURM_LOCAL_DIR    state dir (default /tmp/slurm-local)
#   SLURM_LOCAL_PORT   slurmctld port; slurmd uses the next one (default 6817, Slurm's own default)
#   SLURM_LOCAL_CPUS   CPUs the node advertises (default: what `slurmd -C` detects); more than the machine has is
#                      allowed (SlurmdParameters=config_overrides), e.g. to run several small jobs at once
#   SLURM_LOCAL_WAIT   seconds `up` waits for the node to become idle (default 60)
#
# Messages go to stderr; stdout carries only the `export ...` lines.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
PORT="${SLURM_LOCAL_PORT:-6817}"
WAIT_S="${SLURM_LOCAL_WAIT:-60}"
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket.2"
# the Slurm daemons live in /usr/sbin, which a non-login PATH may lack
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "slurm-local: $*" >&2; }

# The exports a client (sbatch, squeue, submitit) needs: the config file; the munge socket is named inside it.
print_env() {
    echo "export SLURM_CONF=$CONF"
}

# pid_alive NAME: the daemon NAME runs with the pid of its pid file (the command name is checked too, so a pid
# reused by another process does not count).
pid_alive() {
    local pidfile="$DIR/run/$1.pid" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]
}

# stop_daemon NAME: TERM, up to 10 s grace, then KILL; removes the pid file.
stop_daemon() {
    local pidfile="$DIR/run/$1.pid" pid i
    if pid_alive "$1"; then
        pid="$(<"$pidfile")"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$1 ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $1 ($pid)"
    fi
    rm -f "$pidfile"
}

munge_ok() { pid_alive munged && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }
# the controller answers (scontrol ping talks to slurmctld through munge)
ctld_ok() { pid_alive slurmctld && SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q 'is UP'; }

# node_state: the node's state as sinfo prints it (idle, mixed, allocated, down*, drained, ...), or nothing.
node_state() { SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true; }

# The last lines of every daemon log, for an error message.
dump_logs() {
    local f
    for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
        [[ -s "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

die() {
    log "ERROR: $*"
    dump_logs
    exit 1
}

# Install Debian's slurm-wlm and munge when a daemon binary is missing (never otherwise: apt is slow).
install_if_missing() {
    local missing=() b start
    for b in slurmctld slurmd munged sbatch sinfo; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ "$(id -u)" != 0 ]]; then
        die "missing ${missing[*]}; run as root to install them, or: apt-get install slurm-wlm munge"
    fi
    log "installing slurm-wlm and munge (missing: ${missing[*]}) ..."
    start=$SECONDS
    # policy-rc.d (present in Debian container images) keeps the packages' init scripts from starting daemons
    apt-get update -qq >&2 ||
        die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 ||
        die "apt-get install slurm-wlm munge failed"
    log "installed in $((SECONDS - start)) s ($(slurmctld -V 2>/dev/null || echo 'slurmctld -V failed'))"
}

# The node's name: the short hostname (slurmctld refuses to run unless SlurmctldHost names this host).
node_name() {
    local n
    n="$(hostname -s 2>/dev/null || true)"
    [[ -n "$n" ]] || n="$(hostname)"
    echo "${n%%.*}"
}

# Write slurm.conf (to a temp file first; the caller compares it with the running one).
write_conf() {
    local out="$1" hw mem node_hw
    # slurmd -C prints the hardware line: NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=23000
    hw="$(slurmd -C 2>/dev/null | head -n 1)" || true
    [[ "$hw" == NodeName=* ]] || die "slurmd -C printed no hardware line: '$hw'"
    mem="$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)"
    # advertise a little less memory than detected (about 90 %), so that the node is never drained for "low memory"
    mem=$((mem * 9 / 10))
    if [[ -n "${SLURM_LOCAL_CPUS:-}" ]]; then
        node_hw="CPUs=$SLURM_LOCAL_CPUS"
    else
        # the detected topology as is (CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore)
        node_hw="$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' |
            paste -sd ' ')"
    fi
    cat >"$out" <<EOF
# Written by scripts/slurm-local.sh: a single-node test cluster on this machine, state under $DIR.
ClusterName=local
# the controller is this host, reached on the loopback address whatever the hostname resolves to
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged, not the system one
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no accounting (sacct does not work; squeue/scontrol show finished jobs for MinJobAge seconds)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# no mail (the default /usr/bin/mail is not installed and slurmctld logs an error for it)
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# start a submitted job at once (the default batch_sched_delay=3 starts at most one batch job per 3 s)
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# refuse at submission a job the node can never run (e.g. more CPUs than it has) instead of leaving it pending
EnforcePartLimits=ALL
# a node that was down comes back by itself when slurmd registers
ReturnToService=2
# the node may advertise more CPUs than it has (SLURM_LOCAL_CPUS)
SlurmdParameters=config_overrides
# seconds between SIGTERM and SIGKILL for a cancelled or timed-out job
KillWait=30
# finished jobs stay visible to squeue -t all / scontrol show job for an hour
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $node_hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    munge_ok && return 0
    stop_daemon munged
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$DIR/munge/munge.key" >&2
        else
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        fi
        chmod 0600 "$DIR/munge/munge.key"
    fi
    munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        </dev/null >>"$DIR/log/munged.out" 2>&1 9>&- || die "munged did not start"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && { log "munged running"; return 0; }
        sleep 0.1
    done
    die "munged does not answer on $MUNGE_SOCKET"
}

# Start slurmctld and slurmd afresh (-c: no jobs or node states carried over from an earlier run).
# Every daemon is started with fd 9 (the lock of cmd_up) closed: slurmd would otherwise hold it for ever.
start_slurm() {
    stop_daemon slurmd
    stop_daemon slurmctld
    slurmctld -c -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 9>&- || die "slurmctld did not start"
    local i
    for ((i = 0; i < 100; i++)); do
        ctld_ok && break
        sleep 0.2
    done
    ctld_ok || die "slurmctld does not answer (scontrol ping)"
    slurmd -c -f "$CONF" -N "$NODE" </dev/null >>"$DIR/log/slurmd.out" 2>&1 9>&- || die "slurmd did not start"
    log "slurmctld and slurmd started (node $NODE)"
}

# Wait until the node takes jobs; a node left down or drained is resumed once.
wait_idle() {
    local state resumed=0 deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        state="$(node_state)"
        case "$state" in
        idle | mixed | allocated | completing) return 0 ;;
        down | drain* | fail) # a state without '*' (the node responds) that takes no jobs
            if ((!resumed)); then
                log "node $NODE is $state; resuming it"
                SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >&2 || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.5
    done
    SLURM_CONF="$CONF" sinfo -N -l >&2 || true
    die "node $NODE not idle after ${WAIT_S} s (state: '${state:-none}')"
}

cmd_up() {
    mkdir -p "$DIR"/{run,log,state,spool,munge}
    exec 9>"$DIR/.lock"
    flock 9 # one `up`/`down` at a time (parallel test processes; two apt-get at once would fail on apt's lock)
    install_if_missing
    NODE="$(node_name)"
    mkdir -p "$DIR/spool/$NODE"
    chmod 0755 "$DIR/munge" # munged wants its socket dir searchable by all (the key itself is 0600)
    export SLURM_CONF="$CONF"
    local new="$DIR/slurm.conf.new" changed=0
    write_conf "$new"
    if cmp -s "$new" "$CONF"; then rm -f "$new"; else mv "$new" "$CONF"; changed=1; fi
    start_munged
    if ((changed)) || ! ctld_ok || ! pid_alive slurmd; then
        ((changed)) && pid_alive slurmctld && log "slurm.conf changed; restarting"
        start_slurm
    else
        log "already running (node $NODE, $DIR)"
    fi
    wait_idle
    log "up: node $NODE $(node_state), state dir $DIR"
    print_env
}

cmd_down() {
    [[ -d "$DIR" ]] || return 0
    exec 9>"$DIR/.lock"
    flock 9
    if ctld_ok; then
        # cancel the jobs first: slurmd's exit leaves running jobs' slurmstepd behind
        SLURM_CONF="$CONF" scancel --partition=debug 2>/dev/null || true
        local i
        for ((i = 0; i < 30; i++)); do
            [[ -z "$(SLURM_CONF="$CONF" squeue -h -t running,completing -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
}

cmd_status() {
    if munge_ok && ctld_ok && pid_alive slurmd; then
        SLURM_CONF="$CONF" sinfo
        SLURM_CONF="$CONF" squeue
        return 0
    fi
    echo "not running"
    return 1
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) print_env ;;
*)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
