#!/usr/bin/env bash
# Builds (once) and caches the binaries of the local test cluster from the Go module proxy / Debian.
#
# Usage:
#   scripts/cluster/build-binaries.sh            # build whatever is missing, print the bin dir
#   scripts/cluster/build-binaries.sh --print    # only print the bin dir (exit 1 if incomplete)
#
# Why a wrapper module for Kubernetes: k8s.io/kubernetes' go.mod replaces its ~30 staging modules with
# ./staging/... paths, so `go install k8s.io/kubernetes/cmd/...@v` is refused. A throwaway module that
# requires k8s.io/kubernetes and re-points each staging module at its published v0.Y.Z works.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
BIN="$CACHE/bin/current"
mkdir -p "$CACHE/bin" "$CACHE/build"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0
LDFLAGS_STRIP="-s -w"

log() { printf '[build-binaries] %s\n' "$*" >&2; }

# One build at a time per cache: a second caller (another checkout's up.sh) waits, then finds the binaries built.
if [[ ${1:-} != --print ]]; then
  exec 9>"$CACHE/build.lock"
  flock -n 9 || { log "another build-binaries.sh is running on $CACHE: waiting for it"; flock 9; }
fi

build_kubernetes() {
  local v=$KUBERNETES_VERSION out="$CACHE/bin/kubernetes-$KUBERNETES_VERSION"
  [[ -x $out/kube-apiserver && -x $out/kube-controller-manager && -x $out/kube-scheduler ]] && return 0
  log "building kube-apiserver, kube-controller-manager, kube-scheduler $v (cold: 20-35 min on 2 cores)"
  local w="$CACHE/build/kubernetes-$v"; rm -rf "$w"; mkdir -p "$w"
  ( cd "$w"
    go mod init kubetune.local/k8s-wrapper >/dev/null 2>&1
    go mod download -json "k8s.io/kubernetes@$v" >/dev/null
    local gomod; gomod=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$v.mod
    local minor=${v#v1.}; minor=${minor%%.*}; local patch=${v##*.}
    {
      echo "module kubetune.local/k8s-wrapper"; echo; echo "go $(awk '/^go /{print $2}' "$gomod")"; echo
      echo "require k8s.io/kubernetes $v"; echo
      echo "replace ("
      # every staging module the upstream go.mod points at ./staging -> its published v0.<minor>.<patch>
      grep -E '^\s*k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk -v ver="v0.$minor.$patch" '{print "\t" $1 " => " $1 " " ver}'
      echo ")"
    } > go.mod
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
    go mod tidy -e >/dev/null 2>&1 || true
    go get "k8s.io/kubernetes@$v" >/dev/null
    local vpkg=k8s.io/component-base/version
    local ld="$LDFLAGS_STRIP -X $vpkg.gitVersion=$v -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
    ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    mkdir -p "$out.tmp"
    # one `go build` for all three so the shared packages compile once
    go build -trimpath -ldflags "$ld" -o "$out.tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_etcd() {
  local v=$ETCD_VERSION out="$CACHE/bin/etcd-$ETCD_VERSION"
  [[ -x $out/etcd ]] && return 0
  log "building etcd $v"
  local w="$CACHE/build/etcd-$v"; rm -rf "$w"; mkdir -p "$w"
  ( cd "$w"
    go mod init kubetune.local/etcd-wrapper >/dev/null 2>&1
    go mod download -json "go.etcd.io/etcd/server/v3@$v" >/dev/null
    local gomod; gomod=$(go env GOMODCACHE)/cache/download/go.etcd.io/etcd/server/v3/@v/$v.mod
    {
      echo "module kubetune.local/etcd-wrapper"; echo; echo "go $(awk '/^go /{print $2}' "$gomod")"; echo
      echo "require go.etcd.io/etcd/server/v3 $v"; echo
      echo "replace ("
      for m in go.etcd.io/etcd/api/v3 go.etcd.io/etcd/client/pkg/v3 go.etcd.io/etcd/client/v3 go.etcd.io/etcd/pkg/v3; do
        echo "	$m => $m $v"
      done
      echo ")"
    } > go.mod
    cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
    go mod tidy -e >/dev/null 2>&1 || true
    mkdir -p "$out.tmp"
    go build -trimpath -ldflags "$LDFLAGS_STRIP" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_go_install() { # name module version
  local name=$1 mod=$2 v=$3 out="$CACHE/bin/$1-$3"
  [[ -x $out/$name ]] && return 0
  log "building $name $v"
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" go install -trimpath -ldflags "$LDFLAGS_STRIP" "$mod@$v"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# Debian's prometheus package is built without the kubernetes service discovery (kubernetes_sd_configs is
# "field not found" in 2.42+ds), which the test cluster needs; the module proxy has the real thing. Only the
# file/http (always built in) and kubernetes discoveries are compiled in: much faster, smaller binary. No web UI
# assets (tag builtinassets): the HTTP API, /-/ready and /-/reload work, the React UI does not.
build_prometheus() {
  local v=$PROMETHEUS_VERSION out="$CACHE/bin/prometheus-$PROMETHEUS_VERSION"
  [[ -x $out/prometheus && -x $out/promtool ]] && return 0
  local n=${v#v0.}; n=${n%%.*}; local pv="$((n / 100)).$((n % 100)).${v##*.}"   # v0.316.0 is Prometheus 3.16.0
  log "building prometheus and promtool $pv ($v)"
  local vp=github.com/prometheus/common/version
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" go install -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "$LDFLAGS_STRIP -X $vp.Version=$pv -X $vp.Branch=HEAD -X $vp.BuildUser=kubetune" \
    "github.com/prometheus/prometheus/cmd/prometheus@$v" "github.com/prometheus/prometheus/cmd/promtool@$v"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

# JobSet and Kueue controllers, plus the release's own manifests, rendered from the module's config/default with
# kubectl's built-in kustomize. up.sh takes the CRDs, RBAC and webhook configurations from that file (never the
# Deployment: the controllers run as local processes). Their go.mod has no replace directives, but
# `go install mod@v` is refused for JobSet: it reads the module's version list (for deprecations), which the proxy
# does not serve for sigs.k8s.io/jobset. A wrapper module that requires the exact version builds the same binary
# (same dependency versions: the wrapper has no requirements of its own).
build_controller() { # name module-root package version
  local name=$1 mod=$2 pkg=$3 v=$4 out="$CACHE/bin/$1-$4"
  [[ -x $out/$name && -s $out/$name-manifests.yaml ]] && return 0
  log "building $name controller $v"
  local w="$CACHE/build/$name-$v"; rm -rf "$w"; mkdir -p "$w" "$out.tmp"
  ( cd "$w"
    go mod download -json "$mod@$v" >/dev/null
    local gomod; gomod=$(go env GOMODCACHE)/cache/download/$mod/@v/$v.mod
    printf 'module kubetune.local/%s-wrapper\n\ngo %s\n\nrequire %s %s\n' "$name" "$(awk '/^go /{print $2}' "$gomod")" "$mod" "$v" > go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    nice go build -trimpath -ldflags "$LDFLAGS_STRIP -X $mod/pkg/version.GitVersion=$v" -o "$out.tmp/$name" "$pkg"
    kubectl kustomize "$(go env GOMODCACHE)/$mod@$v/config/default" > "$out.tmp/$name-manifests.yaml"
  )
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_jobset() { build_controller jobset sigs.k8s.io/jobset sigs.k8s.io/jobset "$JOBSET_VERSION"; }
build_kueue() { build_controller kueue sigs.k8s.io/kueue sigs.k8s.io/kueue/cmd/kueue "$KUEUE_VERSION"; }

link_current() {
  # link only what is built: a missing component must not leave a dangling or literal-'*' link behind
  mkdir -p "$BIN"
  local f
  for f in "$CACHE/bin/kubernetes-$KUBERNETES_VERSION/"* "$CACHE/bin/etcd-$ETCD_VERSION/etcd" \
           "$CACHE/bin/kwok-$KWOK_VERSION/kwok" "$CACHE/bin/helm-$HELM_VERSION/helm" "$CACHE/bin/prometheus-$PROMETHEUS_VERSION/"* \
           "$CACHE/bin/jobset-$JOBSET_VERSION/"* "$CACHE/bin/kueue-$KUEUE_VERSION/"*; do
    [[ -x $f || $f == *-manifests.yaml ]] && [[ -e $f ]] && ln -sfn "$f" "$BIN/$(basename "$f")"
  done
  return 0
}

complete() {
  for b in kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm prometheus promtool jobset kueue; do
    [[ -x $BIN/$b ]] || return 1
  done
  [[ -s $BIN/jobset-manifests.yaml && -s $BIN/kueue-manifests.yaml ]]
}

if [[ ${1:-} == --print ]]; then complete && echo "$BIN"; exit $?; fi
only=${1:-all}
case $only in
  all)
    build_prometheus
    build_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
    GOTOOLCHAIN=${KWOK_GOTOOLCHAIN:-auto} build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
    build_etcd
    build_kubernetes
    build_jobset
    build_kueue
    link_current ;;
  kubernetes) build_kubernetes ;;
  etcd) build_etcd ;;
  kwok) GOTOOLCHAIN=${KWOK_GOTOOLCHAIN:-auto} build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" ;;
  helm) build_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" ;;
  prometheus) build_prometheus ;;
  jobset) build_jobset ;;
  kueue) build_kueue ;;
  *) echo "unknown component $only" >&2; exit 2 ;;
esac
# single-component builds refresh the links too (they used to be made only by a full build)
[[ $only == all ]] || link_current
complete || true
echo "$BIN"
