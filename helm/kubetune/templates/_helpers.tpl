{{/*
Chart name (63 characters at most: label values and DNS names).
*/}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the operator pods (immutable in a Deployment: never add to these).
*/}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount of the operator.
*/}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository:tag, the tag defaulting to the chart's appVersion.
Usage: include "kubetune.image" (dict "image" .Values.operator.image "context" $)
*/}}
{{- define "kubetune.image" -}}
{{- printf "%s:%s" .image.repository (default .context.Chart.AppVersion .image.tag | toString) }}
{{- end }}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.image" (dict "image" .Values.operator.image "context" .) }}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.image" (dict "image" .Values.trainer.image "context" .) }}
{{- end }}

{{/*
Whether kopf peering is on: always with several replicas (kopf pauses all but the highest-priority peer),
on request with one.
*/}}
{{- define "kubetune.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.operator.replicas) 1) }}true{{ end }}
{{- end }}

{{/*
Whether the operator is cluster-wide (no watchNamespaces) or restricted to a list.
*/}}
{{- define "kubetune.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
Whether monitoring.coreos.com kinds may be rendered: the API is served, or monitoring.force.
*/}}
{{- define "kubetune.monitoringAPI" -}}
{{- if or .Values.monitoring.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
The operator's RBAC scope: `auto` is namespaced Roles when watchNamespaces lists namespaces, else cluster-wide.
*/}}
{{- define "kubetune.rbacScope" -}}
{{- if eq .Values.rbac.scope "auto" }}{{ if .Values.watchNamespaces }}namespaced{{ else }}cluster{{ end }}
{{- else }}{{ .Values.rbac.scope }}{{ end }}
{{- end }}

{{/*
Configuration checks that the schema cannot express; called from the Deployment.
*/}}
{{- define "kubetune.validate" -}}
{{- if and (eq .Values.rbac.scope "namespaced") (not .Values.watchNamespaces) }}
{{- fail "rbac.scope=namespaced needs watchNamespaces (the namespaces the operator may act in); use rbac.scope=cluster to watch all namespaces" }}
{{- end }}
{{- if ne (len .Values.watchNamespaces) (len (uniq .Values.watchNamespaces)) }}
{{- fail (printf "watchNamespaces lists a namespace twice: %v" .Values.watchNamespaces) }}
{{- end }}
{{- end }}

{{/*
Rules the operator needs in every namespace it reconciles. Shared by the ClusterRole (scope cluster) and
the per-namespace Roles (scope namespaced), so both grant exactly the same. No Secrets: the operator only
names them in secretKeyRef; the kubelet resolves them for the trainer pods.
*/}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs: kopf lists and watches them and merge-patches its finalizer and progress annotations onto them
# (never PUT: no update); delete: spec.ttlSecondsAfterFinished removes finished FineTuneJobs
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# status: phase, conditions and progress are merge-patched on the status subresource
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# Children carry blockOwnerDeletion owner references; the OwnerReferencesPermissionEnforcement admission
# plugin (e.g. OpenShift) requires update on the owner's finalizers subresource for that.
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# FineTunePipelines: watched like FineTuneJobs; patch for kopf's annotations and to clear a handled retry
- apiGroups: ["kubetune.dev"]
  resources: ["finetunepipelines"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunepipelines/status"]
  verbs: ["get", "patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunepipelines/finalizers"]
  verbs: ["update"]
# A pipeline's stages are FineTuneJobs it creates (owned by it) and replaces on a retry
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["create"]
# The trainer Job: created and deleted with its FineTuneJob, watched for completion, patched for spec.suspend
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Multi-node jobs (spec.resources.nodes > 1): the JobSet that runs the gang. Created, watched for its status
# (Completed, Failed, restarts), patched for spec.suspend, deleted when a suspended job's spec changes. Harmless
# on a cluster without JobSet (kopf then skips the watch; such jobs fail with reason JobSetNotInstalled).
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The Job's ConfigMap (resolved config): read back by name, created, patched when the config changes, deleted.
# Services: only to delete the headless Service operator versions before JobSet made for multi-node jobs (JobSet
# now creates its own). Neither is listed or watched
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "create", "patch", "delete"]
# Trainer pods: read-only, for termination messages (exit codes, reasons), pod IPs and the /progress poll
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events on FineTuneJobs (kopf and the operator POST core/v1 events); list: the Job controller's FailedCreate
# events explain pods Kubernetes will not create (quota, PriorityClass, ...)
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# A job's FineTuneRuntime (spec.runtimeRef): read once, at the job's first reconcile, and recorded in its status
- apiGroups: ["kubetune.dev"]
  resources: ["finetuneruntimes"]
  verbs: ["get", "list", "watch"]
# Kueue Workloads of queued jobs (spec.queueName): read for status (Queued/Admitted/Preempted); patched only to
# set spec.active for the FineTuneJob's spec.suspend (Kueue restarts an admitted Job that anyone else suspends)
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "patch"]
{{- end }}

{{/*
Cluster-scoped reads the runtimes need, in both RBAC scopes: ClusterFineTuneRuntimes (a job's runtimeRef) and
namespaces (get: the labels a ClusterFineTuneRuntime's namespaceSelector matches).
*/}}
{{- define "kubetune.runtimeRules" -}}
- apiGroups: ["kubetune.dev"]
  resources: ["clusterfinetuneruntimes"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
{{- end }}

{{/*
kopf's peering keep-alives: it reads and patches the peering object's status (no subresource).
*/}}
{{- define "kubetune.peeringVerbs" -}}
["get", "list", "watch", "patch"]
{{- end }}

{{/*
The operator's environment: the names operator/kubetune_operator/settings.py reads (its docstring lists them
all; anything not set here keeps the operator's default and can be set with operator.extraEnv).
*/}}
{{- define "kubetune.operatorEnv" -}}
# kopf's peer identity (shown in the peering object and in "Pausing operations in favour of ..." logs)
- name: POD_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: KUBETUNE_TRAINER_IMAGE
  value: {{ include "kubetune.trainerImage" . | quote }}
- name: KUBETUNE_TRAINER_IMAGE_PULL_POLICY
  value: {{ .Values.trainer.image.pullPolicy | quote }}
{{- /* quantities as strings: `cpu: 8` in values is a number, the operator wants "8" */}}
{{- $resources := dict }}
{{- range $kind, $quantities := .Values.trainer.resources }}
{{- $strings := dict }}
{{- range $name, $q := $quantities }}
{{- $_ := set $strings $name (toString $q) }}
{{- end }}
{{- $_ := set $resources $kind $strings }}
{{- end }}
- name: KUBETUNE_TRAINER_RESOURCES
  value: {{ $resources | toJson | quote }}
{{- with .Values.trainer.s3Endpoint }}
- name: KUBETUNE_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.trainer.s3Region }}
- name: KUBETUNE_S3_REGION
  value: {{ . | quote }}
{{- end }}
- name: KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS
  value: {{ .Values.trainer.terminationGracePeriodSeconds | quote }}
- name: KUBETUNE_DEFAULT_CREDENTIALS_SECRET
  value: {{ .Values.trainer.defaultCredentialsSecret | quote }}
- name: KUBETUNE_WATCH_NAMESPACES
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: KUBETUNE_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: KUBETUNE_HEALTH_PORT
  value: {{ .Values.operator.healthPort | quote }}
{{- if include "kubetune.peering" . }}
- name: KUBETUNE_PEERING_NAME
  value: {{ .Values.peering.name | quote }}
{{- end }}
{{- end }}
