#!/usr/bin/env bash
# Shows the state of the local cluster's processes (pid, RSS) and, if the apiserver answers, its nodes.
set -uo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
total=0
printf '%-24s %-8s %-8s %s\n' COMPONENT PID RSS_MB STATE
# RSS of a whole process group (a component may fork helpers)
group_rss_kb() { ps -eo pgid=,rss= | awk -v g="$1" '$1 == g {s += $2} END {print s + 0}'; }
for name in "${COMPONENTS[@]}"; do
  if running "$name"; then
    pg=$(pid_of "$name"); kb=$(group_rss_kb "$pg"); total=$((total + kb))
    printf '%-24s %-8s %-8s %s\n' "$name" "$pg" "$((kb / 1024))" running
  else
    printf '%-24s %-8s %-8s %s\n' "$name" - - stopped
  fi
done
shopt -s nullglob
for f in "$DIR"/pods/*/pid; do
  pg=$(cat "$f"); group_alive "$pg" || continue
  kb=$(group_rss_kb "$pg"); total=$((total + kb))
  printf '%-24s %-8s %-8s %s\n' "pod:$(basename "$(dirname "$f")")" "$pg" "$((kb / 1024))" running
done
echo "total RSS: $((total / 1024)) MiB"
if [[ -s $DIR/kubeconfig ]] && running kube-apiserver; then
  KUBECONFIG=$DIR/kubeconfig kubectl get nodes -o wide 2>/dev/null
fi
