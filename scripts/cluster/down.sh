#!/usr/bin/env bash
# Stops what up.sh started (process groups from $DIR/run/*.pid, then the pod processes node_agent.py left
# behind: they run in their own sessions, like containers outliving a kubelet).
# Usage: scripts/cluster/down.sh [--purge]   (--purge also deletes the state dir $KUBETUNE_CLUSTER_DIR)
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
purge=0
[[ ${1:-} == --purge ]] && purge=1
[[ -d $DIR ]] || { log "nothing to stop: $DIR does not exist"; exit 0; }

stop_component() {
  running "$1" && stop_group "$1" "$(pid_of "$1")" 15
  rm -f "$RUN/$1.pid" "$RUN/$1.cmd"
}
# Prometheus and the node agent first, then the pod processes (an operator run as a pod holds watches),
# then the control plane; etcd last.
stop_component prometheus
stop_component node-agent
shopt -s nullglob
for f in "$DIR"/pods/*/pid; do
  pg=$(cat "$f" 2>/dev/null) || continue
  # only if it is still the node agent's wrapper (`sh -c ... kubetune-pod ...`), not a reused pid
  [[ -n $pg && $(cmdline_of "$pg") == *kubetune-pod* ]] && stop_group "pod $(basename "$(dirname "$f")")" "$pg" 5
done
for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
  stop_component "${COMPONENTS[i]}"
done

if ((purge)); then
  # guard against an accidental KUBETUNE_CLUSTER_DIR=/ or $HOME
  [[ -f $DIR/tokens.csv || -d $DIR/run ]] || die "$DIR does not look like a cluster state dir; not deleting"
  rm -rf "$DIR"
  log "purged $DIR"
fi
log "cluster down"
