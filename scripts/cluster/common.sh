# Shared settings of up.sh / down.sh / status.sh (sourced, not run). Every value can be overridden by env.
# shellcheck shell=bash
CLUSTER_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$CLUSTER_SCRIPTS/../.." && pwd)
DIR=${KUBETUNE_CLUSTER_DIR:-/tmp/kubetune-cluster}
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
BIN=${KUBETUNE_BIN_DIR:-$CACHE/bin/current}
PYBIN=${KUBETUNE_PYTHON_BIN_DIR:-$REPO_ROOT/.venv/bin}

ETCD_PORT=${KUBETUNE_ETCD_PORT:-2379}
ETCD_PEER_PORT=${KUBETUNE_ETCD_PEER_PORT:-2380}
APISERVER_PORT=${KUBETUNE_APISERVER_PORT:-6443}
KCM_PORT=${KUBETUNE_KCM_PORT:-10257}
SCHEDULER_PORT=${KUBETUNE_SCHEDULER_PORT:-10259}
S3_PORT=${KUBETUNE_S3_PORT:-9000}
# SeaweedFS also listens on each HTTP port + 10000 for gRPC (19333, 19340, 18888, 19000)
S3_MASTER_PORT=${KUBETUNE_S3_MASTER_PORT:-9333}
S3_VOLUME_PORT=${KUBETUNE_S3_VOLUME_PORT:-9340}
S3_FILER_PORT=${KUBETUNE_S3_FILER_PORT:-8888}
S3_BUCKET=${KUBETUNE_S3_BUCKET:-kubetune}
PROMETHEUS_PORT=${KUBETUNE_PROMETHEUS_PORT:-9090}
OPERATOR_METRICS_PORT=${KUBETUNE_OPERATOR_METRICS_PORT:-18080}
# JobSet and Kueue controllers (webhook server, health probes) next to the apiserver's port, so a cluster on other
# ports (KUBETUNE_APISERVER_PORT) moves them along without more settings.
JOBSET_WEBHOOK_PORT=${KUBETUNE_JOBSET_WEBHOOK_PORT:-$((APISERVER_PORT + 1))}
JOBSET_HEALTH_PORT=${KUBETUNE_JOBSET_HEALTH_PORT:-$((APISERVER_PORT + 2))}
KUEUE_WEBHOOK_PORT=${KUBETUNE_KUEUE_WEBHOOK_PORT:-$((APISERVER_PORT + 3))}
KUEUE_HEALTH_PORT=${KUBETUNE_KUEUE_HEALTH_PORT:-$((APISERVER_PORT + 4))}
# Loopback /24 the node agent takes pod IPs from: a second cluster on the same machine needs its own.
POD_IP_PREFIX=${KUBETUNE_POD_IP_PREFIX:-127.0.1}
SERVICE_CIDR=${KUBETUNE_SERVICE_CIDR:-10.96.0.0/16}
SERVICE_FIRST_IP=${KUBETUNE_SERVICE_FIRST_IP:-10.96.0.1}

PKI=$DIR/pki
RUN=$DIR/run
LOGS=$DIR/logs
# down.sh stops them in reverse order. Prometheus goes before the apiserver: an open watch keeps a
# terminating kube-apiserver waiting for it to drain (15 s+ instead of <1 s).
COMPONENTS=(etcd s3 kube-apiserver kube-controller-manager kube-scheduler kwok node-agent jobset kueue prometheus)

log() { printf '[kubetune-cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_of() { cat "$RUN/$1.pid" 2>/dev/null; }
# Does process group $1 still have a live (non-zombie) member? Zombies matter here: processes whose parent
# (up.sh) is gone are reaped by PID 1 only now and then, and `kill -0` counts a zombie as alive.
group_alive() {
  [[ -n ${1:-} ]] && ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}
cmdline_of() { tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline"; }  # 2> first: it also silences a missing file
# A component counts as running when the process group recorded in its pid file is alive and its leader is
# still the command up.sh started (a stale pid file from an earlier session may name a reused pid).
running() {
  local p; p=$(pid_of "$1") || return 1
  group_alive "$p" && [[ "$(cmdline_of "$p")" == "$(cat "$RUN/$1.cmd" 2>/dev/null)"* ]]
}
# ended_how NAME: sets ENDED to why NAME does not count as running: its exit status or signal (when this shell
# started it), or what its pid runs now. A component killed before it wrote a line has an empty log: this names
# the signal. Not in a $(subshell): only this shell holds its children's exit statuses.
ended_how() {
  local p rc
  p=$(pid_of "$1") || { ENDED="no pid file"; return 0; }
  if kill -0 "$p" 2>/dev/null; then ENDED="pid $p runs: $(cmdline_of "$p" | cut -c1-160 || true)"; return 0; fi
  if [[ " ${STARTED_PIDS:-} " != *" $p "* ]]; then ENDED="pid $p exited (started by an earlier run: status unknown)"; return 0; fi
  wait "$p" 2>/dev/null && rc=0 || rc=$?   # a child's status, kept by bash after it was reaped
  if (( rc > 128 && rc < 160 )); then
    ENDED="pid $p killed by SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128))) (status $rc)"
  else ENDED="pid $p exited with status $rc"; fi
}
# diagnose: to stderr, which components run and, for each one started but no longer running, its log tail.
diagnose() {
  local n
  for n in "${COMPONENTS[@]}"; do
    [[ -e $RUN/$n.pid ]] || continue
    if running "$n"; then log "  $n: running (pid $(pid_of "$n"))"; continue; fi
    ended_how "$n"
    log "  $n: NOT running ($ENDED); last lines of $LOGS/$n.log:"
    tail -n 15 "$LOGS/$n.log" 2>/dev/null | sed 's/^/      /' >&2 || true
  done
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# stop_group NAME PGID [GRACE_S]: SIGTERM the process group, SIGKILL what is left after GRACE_S seconds.
stop_group() {
  local name=$1 pg=$2 grace=${3:-10} i
  group_alive "$pg" || return 0
  kill -TERM -- "-$pg" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    group_alive "$pg" || { log "stopped $name"; return 0; }
    sleep 0.1
  done
  log "$name did not stop in ${grace}s: SIGKILL"
  kill -KILL -- "-$pg" 2>/dev/null || true
}

# start NAME PORT CMD...: runs CMD in its own session (so down.sh can signal the whole process group),
# output to $LOGS/NAME.log, pid (= process group id) to $RUN/NAME.pid.
start() {
  local name=$1 port=$2; shift 2
  if running "$name"; then log "$name already running (pid $(pid_of "$name"))"; return 0; fi
  [[ $port == - ]] || ! port_busy "$port" || die "$name: port $port is in use by a process this script did not start"
  printf '\n=== %s starting: %s\n' "$(date -Is)" "$*" >> "$LOGS/$name.log"
  setsid "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null &
  local pid=$! i
  STARTED_PIDS="${STARTED_PIDS:-} $pid"   # ended_how: only this shell's children have a status to tell
  echo "$pid" > "$RUN/$name.pid"
  printf '%s %s' "$1" "${2:-}" > "$RUN/$name.cmd"
  # `running` knows a component by its process group and command line, and both are right only once setsid has
  # made the group and exec'd the command: until then the child is a copy of this shell. Wait for that (ms; more
  # on a loaded machine) so that check_alive right after does not take a component still starting for one that
  # died. Bounded: a command that cannot start ends the loop by exiting.
  for ((i = 0; i < 200; i++)); do
    running "$name" || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.05
  done
  log "started $name (pid $pid, log $LOGS/$name.log)"
}
# a component that died right after start shows up here instead of as a timeout much later
check_alive() {
  local n; for n in "$@"; do running "$n" || { diagnose; die "$n exited (log: $LOGS/$n.log)"; }; done
}
