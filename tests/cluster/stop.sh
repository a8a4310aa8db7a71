#!/usr/bin/env bash
# Stop the test cluster of tests/cluster/start.sh: cancel its jobs, then end exactly the processes
# recorded in $SPINGEN_CLUSTER_DIR/pids (default /tmp/spingen-cluster/pids), nothing found by name.
set -u
STATE=${SPINGEN_CLUSTER_DIR:-/tmp/spingen-cluster}
[ -s "$STATE/pids" ] || { echo "stop.sh: nothing to stop (no $STATE/pids)"; exit 0; }
if [ -s "$STATE/env" ]; then
    # shellcheck disable=SC1091
    . "$STATE/env"
    # jobs of this private cluster only (its own SLURM_CONF); wait a little for them to leave
    scancel --user="$(id -un)" 2>/dev/null
    for _ in $(seq 25); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.2
    done
fi
is_ours() {  # pid $2 still runs program $1 (guards against a reused pid)
    [ -r "/proc/$2/comm" ] && [ "$(cat "/proc/$2/comm")" = "$1" ]
}
pids=()
while read -r name pid; do
    if is_ours "$name" "$pid"; then
        kill -TERM "$pid" 2>/dev/null && pids+=("$name:$pid")
    fi
done < <(tac "$STATE/pids")  # sshd, slurmd, slurmctld, then munged
for _ in $(seq 50); do
    left=()
    for entry in "${pids[@]}"; do is_ours "${entry%%:*}" "${entry#*:}" && left+=("$entry"); done
    [ ${#left[@]} -eq 0 ] && break
    sleep 0.2
done
for entry in "${left[@]}"; do
    is_ours "${entry%%:*}" "${entry#*:}" && kill -KILL "${entry#*:}" 2>/dev/null && echo "stop.sh: killed ${entry%%:*} ${entry#*:}"
done
rm -f "$STATE/pids" "$STATE/env"
echo "stop.sh: stopped ${#pids[@]} process(es) of $STATE"
