#!/usr/bin/env bash
# Start a private single-node Slurm (munged, slurmctld, slurmd) and an sshd on 127.0.0.1 for the
# cluster tests (tests/test_cluster.py). Idempotent: a cluster already started here is reused.
#
#   tests/cluster/start.sh            # installs missing packages (apt-get), starts, checks
#   . /tmp/spingen-cluster/env        # SLURM_CONF and the SSH settings for clients
#   tests/cluster/stop.sh             # stops exactly the processes started here
#
# Everything lives in $SPINGEN_CLUSTER_DIR (default /tmp/spingen-cluster): configs, keys, logs,
# the munge socket, Slurm state, and `pids` (one "name pid" line per daemon). Nothing under /etc
# is changed; the daemons do not touch a Slurm or sshd of the host. On failure: exit 1 and one
# line on stderr that starts with "start.sh: cannot start the test cluster:".
set -u
STATE=${SPINGEN_CLUSTER_DIR:-/tmp/spingen-cluster}
SSH_PORT=${SPINGEN_CLUSTER_SSH_PORT:-2222}
HERE=$(cd "$(dirname "$0")" && pwd)

fail() { echo "start.sh: cannot start the test cluster: $*" >&2; exit 1; }
say() { echo "start.sh: $*"; }

# ---------------------------------------------------------------- already running?
alive() {  # every recorded daemon still runs
    [ -s "$STATE/pids" ] || return 1
    local name pid
    while read -r name pid; do
        [ -d "/proc/$pid" ] || return 1
    done < "$STATE/pids"
}
if alive && [ -s "$STATE/env" ]; then
    # shellcheck disable=SC1091
    . "$STATE/env"
    if [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] || [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = mixed ] \
        || [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = allocated ]; then
        say "already running (state in $STATE)"
        exit 0
    fi
fi
[ -s "$STATE/pids" ] && "$HERE/stop.sh" >/dev/null 2>&1  # a half-dead earlier start

# ---------------------------------------------------------------- root and packages
[ "$(id -u)" = 0 ] || fail "needs root (apt-get, munged, slurmd and sshd run as root); running as uid $(id -u)"
mkdir -p "$STATE" || fail "cannot create $STATE"
chmod 755 "$STATE"
missing=()
for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged /usr/sbin/mungekey \
           /usr/sbin/sshd /usr/lib/openssh/sftp-server /usr/bin/ssh-keygen /usr/bin/ssh; do
    [ -x "$bin" ] || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || fail "no apt-get to install slurm/munge/openssh (missing: ${missing[*]})"
    say "installing slurmctld slurmd slurm-client munge openssh-server (missing: ${missing[*]})"
    pkgs=(slurmctld slurmd slurm-client munge openssh-server openssh-client)
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 150 apt-get install -y --no-install-recommends "${pkgs[@]}" >"$STATE/apt.log" 2>&1; then
        timeout 90 apt-get update >>"$STATE/apt.log" 2>&1
        timeout 150 apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE/apt.log" 2>&1 \
            || fail "apt-get install ${pkgs[*]} failed: see $STATE/apt.log"
    fi
    for bin in "${missing[@]}"; do [ -x "$bin" ] || fail "$bin is still missing after apt-get install"; done
fi

# ---------------------------------------------------------------- free ports on 127.0.0.1
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {  # the first free port of $1..$1+99, skipping $2...
    local p=$1 last=$(($1 + 99)); shift
    while ! port_free "$p" || [[ " $* " == *" $p "* ]]; do
        p=$((p + 1)); [ "$p" -le "$last" ] || return 1
    done
    echo "$p"
}
SSH_PORT=$(free_port "$SSH_PORT") || fail "no free port for sshd"
CTLD_PORT=$(free_port 6817 "$SSH_PORT") || fail "no free port for slurmctld"
SLURMD_PORT=$(free_port 6818 "$SSH_PORT" "$CTLD_PORT") || fail "no free port for slurmd"

: > "$STATE/pids"
record() { echo "$1 $2" >> "$STATE/pids"; }

# ---------------------------------------------------------------- munge (own key and socket)
MUNGE=$STATE/munge
rm -rf "$MUNGE"; mkdir -p "$MUNGE"
mungekey --create --keyfile="$MUNGE/munge.key" 2>"$STATE/munge.err" || fail "mungekey failed: $(head -c 300 "$STATE/munge.err")"
chown -R munge:munge "$MUNGE" && chmod 711 "$MUNGE" && chmod 400 "$MUNGE/munge.key" || fail "cannot chown $MUNGE to munge"
SOCKET=$MUNGE/munge.socket
runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --key-file="$MUNGE/munge.key" \
    --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" \
    </dev/null >"$STATE/munge.err" 2>&1 || fail "munged did not start: $(tail -n 1 "$STATE/munge.err")"
for _ in $(seq 50); do [ -s "$MUNGE/munged.pid" ] && break; sleep 0.1; done
[ -s "$MUNGE/munged.pid" ] || fail "munged wrote no pid file; see $MUNGE/munged.log"
record munged "$(cat "$MUNGE/munged.pid")"
munge -S "$SOCKET" -n 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1 || fail "munge -n | unmunge fails; see $MUNGE/munged.log"

# ---------------------------------------------------------------- slurm.conf for this host
SL=$STATE/slurm
rm -rf "$SL"; mkdir -p "$SL/state" "$SL/spool"
CPUS=$(nproc)
MEM_MB=$(awk '/MemAvailable/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # half of what is free now
[ "${MEM_MB:-0}" -gt 4096 ] && MEM_MB=$((MEM_MB > 16384 ? 16384 : MEM_MB))
[ "${MEM_MB:-0}" -ge 256 ] || fail "only ${MEM_MB:-?} MB of memory free for slurmd"
export SLURM_CONF=$SL/slurm.conf
cat > "$SLURM_CONF" <<CONF
# written by tests/cluster/start.sh for $(hostname) at $(date -u +%FT%TZ)
ClusterName=spingentest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$SL/state
SlurmdSpoolDir=$SL/spool
SlurmctldPidFile=$SL/slurmctld.pid
SlurmdPidFile=$SL/slurmd.pid
SlurmctldLogFile=$SL/slurmctld.log
SlurmdLogFile=$SL/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SL/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

/usr/sbin/slurmctld -D -c -f "$SLURM_CONF" </dev/null >>"$SL/slurmctld.out" 2>&1 &
record slurmctld $!
/usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" </dev/null >>"$SL/slurmd.out" 2>&1 &
record slurmd $!
state=
for _ in $(seq 150); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null)
    [ "$state" = idle ] && break
    alive || break
    sleep 0.2
done
if [ "$state" != idle ]; then
    why=$(tail -n 1 "$SL/slurmctld.log" "$SL/slurmd.log" 2>/dev/null | grep -v '^==' | grep . | tail -n 1)
    "$HERE/stop.sh" >/dev/null 2>&1
    fail "node not idle (sinfo: '${state:-no answer}'); last log line: $why"
fi

# ---------------------------------------------------------------- sshd on 127.0.0.1:$SSH_PORT
SSHD=$STATE/ssh
rm -rf "$SSHD"; mkdir -p "$SSHD" /run/sshd; chmod 700 "$SSHD"
ssh-keygen -q -t ed25519 -N '' -C spingen-test-host -f "$SSHD/host_ed25519_key" || fail "ssh-keygen (host key) failed"
ssh-keygen -q -t ed25519 -N '' -C spingen-test-user -f "$SSHD/id_ed25519" || fail "ssh-keygen (user key) failed"
cp "$SSHD/id_ed25519.pub" "$SSHD/authorized_keys"
USER_NAME=$(id -un)
cat > "$SSHD/sshd_config" <<CONF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSHD/host_ed25519_key
PidFile $SSHD/sshd.pid
AuthorizedKeysFile $SSHD/authorized_keys
AllowUsers $USER_NAME
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
SetEnv SLURM_CONF=$SLURM_CONF
CONF
/usr/sbin/sshd -t -f "$SSHD/sshd_config" 2>"$SSHD/check.err" || fail "sshd config rejected: $(head -n 1 "$SSHD/check.err")"
/usr/sbin/sshd -D -e -f "$SSHD/sshd_config" </dev/null >>"$SSHD/sshd.log" 2>&1 &
record sshd $!
SSH=(ssh -i "$SSHD/id_ed25519" -p "$SSH_PORT" -o BatchMode=yes -o StrictHostKeyChecking=no
     -o UserKnownHostsFile="$SSHD/known_hosts" -o ConnectTimeout=5 "$USER_NAME@127.0.0.1")
ok=
for _ in $(seq 50); do
    if [ "$("${SSH[@]}" sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]; then ok=1; break; fi
    sleep 0.2
done
if [ -z "$ok" ]; then
    why=$("${SSH[@]}" true 2>&1 | tail -n 1)
    "$HERE/stop.sh" >/dev/null 2>&1
    fail "ssh to $USER_NAME@127.0.0.1:$SSH_PORT does not reach Slurm: ${why:-sinfo gave no 'idle'}"
fi

# ---------------------------------------------------------------- what clients need
cat > "$STATE/env" <<ENV
export SLURM_CONF=$SLURM_CONF
export SPINGEN_CLUSTER_PARTITION=debug
export SPINGEN_CLUSTER_CPUS=$CPUS
export SPINGEN_CLUSTER_JOBCOMP=$SL/jobcomp.txt
export SPINGEN_CLUSTER_SSH_HOST=127.0.0.1
export SPINGEN_CLUSTER_SSH_PORT=$SSH_PORT
export SPINGEN_CLUSTER_SSH_USER=$USER_NAME
export SPINGEN_CLUSTER_SSH_KEY=$SSHD/id_ed25519
ENV
say "Slurm partition debug on localhost ($CPUS CPUs, ${MEM_MB} MB), sshd on 127.0.0.1:$SSH_PORT; state in $STATE"
say "clients: . $STATE/env"
