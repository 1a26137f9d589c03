"""Build the child objects of a FineTuneJob from its spec. Pure functions: no API calls, no clock, no
randomness, so the same FineTuneJob always renders the same objects (creating them twice is a no-op) and every
rule here is unit-testable without a cluster.

Children (all in the FineTuneJob's namespace, labelled with `kubetune.dev/job-name=<name>` and owned by the
FineTuneJob with `controller: true`, so the garbage collector deletes them with it):

- ConfigMap `<name>-config`: `job.yaml` = the resolved FineTuneJob (defaults applied by the API models, which
  the trainer parses with the same models), mounted at /etc/kubetune.
- single node: Job `<name>-trainer` (batch/v1, Indexed, completions = parallelism = 1).
  With a Kueue queue (spec.queueName) it is created suspended with Kueue's labels (queueing.py decides both).
  Its podFailurePolicy fails the Job at once on the trainer's permanent exit codes (bad config or data, NaN
  loss, forgetting with action fail: retrying only burns GPU hours) and ignores disruptions (preemption,
  node drain: DisruptionTarget) and SIGTERM ends (exit 143: checkpoint saved, e.g. a deleted pod), so those do
  not use up spec.retryLimit (the Job's backoffLimit). The Job controller still delays the replacement of an
  ignored pod by its exponential pod-failure backoff; the reconciler replaces the Job instead (see
  docs/restarts.md), and a replacement Job's backoffLimit is what is left of spec.retryLimit
  (RETRIES_USED_ANNOTATION).
- multi-node (`spec.resources.nodes > 1`): JobSet `<name>` (render_jobset.py: whole-gang restarts, DNS
  hostnames; Kueue labels and initial suspend from queueing.py as for the Job).

Rank 0 is on pod index 0: torchrun's static rendezvous makes pod index i node rank i (`--node-rank` from the
Indexed Job's completion index) and rank 0's TCPStore listens at its stable DNS name (rendezvous_host). The
operator therefore reads progress from pod index 0, where the trainer's rank 0 serves /progress.
"""

from __future__ import annotations

import copy
import hashlib
import re
import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import kopf
import yaml

from kubetune_api import constants as C
from kubetune_api.defaults import processes_per_node
from kubetune_api.finetunejob import FineTuneJob, FineTuneJobSpec, uri_fields
from kubetune_api.finetuneruntime import FineTuneRuntimeSpec

from . import queueing
from . import render_jobset as JS
from .settings import OperatorSettings

WORK_DIR = "/var/lib/kubetune"
CACHE_DIR = "/var/cache/kubetune"  # spec.resources.cacheClaim, when set (downloads that outlive the pod)
PVC_ROOT = "/mnt/pvc"
CONTAINER_NAME = "trainer"
TEMPLATE_HASH_ANNOTATION = f"{C.GROUP}/template-hash"
# The FineTuneJob generation the live Job reflects (status.observedGeneration follows it, not the spec).
GENERATION_ANNOTATION = f"{C.GROUP}/spec-generation"
# Failures earlier Jobs of this run counted against spec.retryLimit: a Job that replaces one gets the rest.
RETRIES_USED_ANNOTATION = f"{C.GROUP}/retries-used"
# On trainer pods: the FineTuneJob's uid (the run id), so the pods of a run's replaced Jobs are still told
# apart from those of an earlier FineTuneJob of the same name (status.restarts counts them).
RUN_ID_LABEL = f"{C.GROUP}/run-id"
# Job fields batch/v1 lets the operator change on a live Job; everything else needs a new Job.
MUTABLE_JOB_FIELDS = ("backoffLimit", "activeDeadlineSeconds")
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
RUN_AS = 1000  # the trainer image's USER (trainer-image/Dockerfile)

# The component label value of each child kind.
COMPONENT_TRAINER = "trainer"
COMPONENT_CONFIG = "config"
PART_OF = "kubetune"


@dataclass(frozen=True)
class ChildNames:
    job: str
    service: str  # the headless Service: JobSet's subdomain (operator versions before JobSet created it)
    config_map: str


def child_names(name: str) -> ChildNames:
    """Deterministic names (the CRD limits FineTuneJob names to 50 characters, so these stay within 63)."""
    return ChildNames(job=f"{name}-trainer", service=f"{name}-workers", config_map=f"{name}-config")


@dataclass(frozen=True)
class Children:
    config_map: dict
    job: dict  # the workload: a batch/v1 Job, or a JobSet for multi-node jobs


# ------------------------------------------------------------------------------------------------ helpers
def is_multi_node(spec: FineTuneJobSpec) -> bool:
    return spec.resources.nodes > 1


def uses_torchrun(spec: FineTuneJobSpec) -> bool:
    """Several processes, or DeepSpeed (which joins a process group even with one process: without torchrun
    there is none and it fails with "Default process group has not been initialized")."""
    deepspeed = spec.distributed is not None and spec.distributed.deepspeed is not None
    return spec.resources.nodes > 1 or processes_per_node(spec) > 1 or deepspeed


def spec_uri_fields(spec: FineTuneJobSpec) -> list[tuple[str, str, bool]]:
    """Every URI the job reads or writes, as (field path in the manifest, uri, writable)."""
    return uri_fields(spec)


def spec_uris(spec: FineTuneJobSpec) -> list[tuple[str, bool]]:
    """Every URI the job reads or writes, as (uri, writable)."""
    return [(uri, writable) for _, uri, writable in spec_uri_fields(spec)]


def pvc_claim(uri: str) -> Optional[str]:
    """`pvc://claim/path` -> `claim`; None for other schemes."""
    if not uri.startswith("pvc://"):
        return None
    return uri[len("pvc://"):].split("/", 1)[0] or None


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """claim -> writable (a claim is mounted read-write only if the output goes to it)."""
    claims: dict[str, bool] = {}
    for uri, writable in spec_uris(spec):
        claim = pvc_claim(uri)
        if claim:
            claims[claim] = claims.get(claim, False) or writable
    return dict(sorted(claims.items()))


def _pvc_volume_name(claim: str) -> str:
    # Claim names are DNS subdomains (dots, up to 253 chars); volume names must be DNS labels.
    return "pvc-" + hashlib.sha256(claim.encode()).hexdigest()[:12]


def _uses_scheme(spec: FineTuneJobSpec, scheme: str) -> bool:
    return any(uri.startswith(f"{scheme}://") for uri, _ in spec_uris(spec))


def child_labels(job: FineTuneJob, component: str) -> dict[str, str]:
    spec = job.spec
    return {
        C.Label.JOB_NAME: job.metadata.name,
        C.Label.STAGE: str(spec.stage),
        C.Label.ADAPTER: str(spec.adapter.type),
        C.Label.COMPONENT: component,
        C.Label.MANAGED_BY: C.Label.MANAGED_BY_VALUE,
        C.Label.PART_OF: PART_OF,
    }


def pod_selector(name: str) -> dict[str, str]:
    """Selects exactly the trainer pods of FineTuneJob `name`."""
    return {C.Label.JOB_NAME: name, C.Label.COMPONENT: COMPONENT_TRAINER}


def owner_reference(job: FineTuneJob, body: dict | None = None) -> dict:
    owner = body or {"apiVersion": C.API_VERSION, "kind": C.KIND,
                     "metadata": {"name": job.metadata.name, "uid": job.metadata.uid}}
    return dict(kopf.build_owner_reference(owner, controller=True, block_owner_deletion=True))


def _metadata(job: FineTuneJob, body: dict | None, name: str, component: str) -> dict:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": child_labels(job, component),
        "ownerReferences": [owner_reference(job, body)],
    }


def _settings(settings: OperatorSettings | None) -> OperatorSettings:
    return settings if settings is not None else OperatorSettings()


def _runtime(runtime: FineTuneRuntimeSpec | None, s: OperatorSettings) -> FineTuneRuntimeSpec:
    """The job's runtime; without one (unit tests, tools), the one the operator settings describe."""
    if runtime is not None:
        return runtime
    from .runtimes import settings_runtime  # runtimes imports this module

    return settings_runtime(s)


# ------------------------------------------------------------------------------------------------ ConfigMap
def resolved_job(job: FineTuneJob) -> dict:
    """What the trainer reads: the FineTuneJob with defaults applied (no status)."""
    meta = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    if job.metadata.uid:
        meta["uid"] = job.metadata.uid
    if job.metadata.generation is not None:
        meta["generation"] = job.metadata.generation
    return {"apiVersion": C.API_VERSION, "kind": C.KIND, "metadata": meta, "spec": job.spec.to_k8s()}


_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render_config_map(job: FineTuneJob, body: dict | None = None,
                      settings: OperatorSettings | None = None) -> dict:
    names = child_names(job.metadata.name)
    # libyaml's emitter when present (same document, ~10x faster: the dump was ~5 % of the operator's CPU in a
    # burst of new jobs, bench/scale.py --py-spy)
    text = yaml.dump(resolved_job(job), Dumper=_YAML_DUMPER, sort_keys=False, width=120)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, body, names.config_map, COMPONENT_CONFIG),
        "data": {C.CONFIG_FILE_NAME: text},
    }


# ------------------------------------------------------------------------------------------------ rendezvous
def rendezvous_host(job: FineTuneJob) -> str:
    """Rank 0's stable address: pod index 0's DNS name (JobSet's enableDNSHostnames)."""
    name = job.metadata.name
    return f"{JS.pod_hostname(name, 0)}.{JS.subdomain(name)}.{job.metadata.namespace}.svc"


RENDEZVOUS_PORT_SPREAD = 1000


def rendezvous_port(job: FineTuneJob) -> int:
    """Rank 0's TCPStore port: 29500 + a number from the FineTuneJob's uid. In a cluster each pod has its own
    network namespace and any port would do; gangs that share one (hostNetwork pods, the local test cluster
    where pods are processes on one host) would otherwise find another gang's store listening on 29500."""
    key = job.metadata.uid or f"{job.metadata.namespace}/{job.metadata.name}"
    return C.DEFAULT_RENDEZVOUS_PORT + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % RENDEZVOUS_PORT_SPREAD


# ------------------------------------------------------------------------------------------------ Job
LAUNCHER = ["python", "-m", "kubetune_trainer.launch"]


def trainer_command(job: FineTuneJob) -> list[str]:
    """The container command. Single process: the image's ENTRYPOINT + CMD spelled out (the local node agent
    runs only `command`). Several processes: torchrun (via kubetune_trainer.launch), on one node standalone, across nodes with the
    static rendezvous: the gang has a fixed size and JobSet restarts it whole, so elastic (c10d) membership buys
    nothing, while static ranks pin rank 0 to pod index 0 (c10d orders nodes by host name, and pods sharing a
    host, as in the local cluster, would order by process id)."""
    config = f"{C.CONFIG_MOUNT_DIR}/{C.CONFIG_FILE_NAME}"
    spec = job.spec
    if not uses_torchrun(spec):
        return ["python", "-m", "kubetune_trainer", "--config", config]
    nproc = processes_per_node(spec)
    # kubetune_trainer.launch is torchrun that keeps the trainer's exit code (torchrun itself exits 1 for
    # every worker failure, which would turn permanent errors into retries and preemptions into failures).
    cmd = [*LAUNCHER, f"--nnodes={spec.resources.nodes}", f"--nproc-per-node={nproc}"]
    if is_multi_node(spec):
        cmd += [
            "--node-rank=$(JOB_COMPLETION_INDEX)",  # set by the Job controller in Indexed Jobs
            f"--master-addr={rendezvous_host(job)}",
            f"--master-port={rendezvous_port(job)}",
        ]
    else:
        cmd.append("--standalone")  # local rendezvous on a free port
    return cmd + ["-m", "kubetune_trainer", "--config", config]


def _env(job: FineTuneJob, s: OperatorSettings, rt: FineTuneRuntimeSpec) -> list[dict]:
    spec = job.spec
    storage = rt.storage
    env: list[dict] = [
        {"name": "KUBETUNE_JOB_NAME", "value": job.metadata.name},
        {"name": "KUBETUNE_NAMESPACE", "value": job.metadata.namespace},
        # The run id: this FineTuneJob's uid. Restarted, preempted and resumed pods keep it (they resume the run's
        # own checkpoints); a re-created job of the same name gets a new one and starts fresh beside the old run.
        *([{"name": "KUBETUNE_RUN_ID", "value": job.metadata.uid}] if job.metadata.uid else []),
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # $(POD_IP) expands only because POD_IP is defined above it.
        {"name": "KUBETUNE_METRICS_HOST", "value": "$(POD_IP)"},
        {"name": "KUBETUNE_METRICS_PORT", "value": str(s.trainer_metrics_port)},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": C.TERMINATION_LOG},
        # kubetune_trainer.launch gives torchrun's workers this long (less a margin) to checkpoint on SIGTERM;
        # torchrun's own default (30 s) would kill them mid-upload. The pod cannot read its own grace period.
        {"name": "KUBETUNE_TERMINATION_GRACE_SECONDS", "value": str(s.trainer_termination_grace_seconds)},
        {"name": "KUBETUNE_WORK_DIR", "value": WORK_DIR},
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
        *([{"name": "KUBETUNE_CACHE_DIR", "value": CACHE_DIR}] if spec.resources.cache_claim else []),
        {"name": "HOME", "value": "/tmp"},  # caches (HF, torch, matplotlib) need a writable home
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},  # read-only root filesystem
    ]
    if not _uses_scheme(spec, "hf"):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    # The runtime's policy on code the job brings along (custom rewards, code_execution): the trainer's
    # rewards.policy reads it; a FineTuneJob cannot set trainer env itself.
    env.append({"name": "KUBETUNE_ALLOW_CUSTOM_CODE", "value": "true" if rt.policy.allow_custom_code else "false"})
    if rt.gpu is not None and rt.gpu.memory_gib:
        # the trainer's pre-flight memory check uses the smaller of this and the device's own figure
        env.append({"name": "KUBETUNE_GPU_MEMORY", "value": f"{int(rt.gpu.memory_gib * 1024)}Mi"})
    endpoint = storage.endpoint or s.s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    region = storage.region or s.s3_region
    if region:
        env.append({"name": "AWS_REGION", "value": region})
    # Credentials only as Secret references named by the runtime: the operator never reads them (it has no
    # access to Secrets) and a FineTuneJob cannot name a Secret or a key.
    if storage.credentials:
        creds = storage.credentials
        env += [
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {
                "name": creds.secret_name, "key": creds.access_key_id_key}}},
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
                "name": creds.secret_name, "key": creds.secret_access_key_key}}},
        ]
    elif s.default_credentials_secret and _uses_scheme(spec, "s3"):
        # optional: a cluster without the default Secret (IRSA, workload identity) still starts the pod
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {
                "name": s.default_credentials_secret, "key": key, "optional": True}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    if is_multi_node(spec):
        # torchrun sets these for its workers; exported for tools that read them before torchrun runs.
        env += [
            {"name": "MASTER_ADDR", "value": rendezvous_host(job)},
            {"name": "MASTER_PORT", "value": str(rendezvous_port(job))},
        ]
    return env


def _resources(spec: FineTuneJobSpec, s: OperatorSettings, rt: FineTuneRuntimeSpec) -> dict:
    r = spec.resources
    gpu_name = rt.resources.gpu_resource_name
    requests = dict(s.trainer_resources.get("requests", {}))
    limits = dict(s.trainer_resources.get("limits", {}))
    if r.cpu is not None:
        requests["cpu"] = str(r.cpu)
    if r.memory is not None:
        requests["memory"] = limits["memory"] = str(r.memory)
    if r.gpus > 0:
        # extended resources: requests must equal limits
        requests[gpu_name] = limits[gpu_name] = str(r.gpus)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _tolerations(spec: FineTuneJobSpec, rt: FineTuneRuntimeSpec) -> list[dict]:
    r = spec.resources
    tolerations = [t.to_k8s() for t in rt.template.tolerations or []]
    tolerations += [t for t in (t.to_k8s() for t in r.tolerations or []) if t not in tolerations]
    if r.gpus > 0:
        # GPU nodes are usually tainted with the resource name (NVIDIA GPU operator, cloud node pools).
        auto = {"key": rt.resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}
        if auto not in tolerations:
            tolerations.append(auto)
    return tolerations


def _volumes(job: FineTuneJob) -> tuple[list[dict], list[dict]]:
    spec = job.spec
    names = child_names(job.metadata.name)
    volumes = [
        {"name": "config", "configMap": {"name": names.config_map,
                                         "items": [{"key": C.CONFIG_FILE_NAME, "path": C.CONFIG_FILE_NAME}]}},
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        {"name": "config", "mountPath": C.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.resources.shared_memory is not None:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                     "sizeLimit": str(spec.resources.shared_memory)}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.resources.cache_claim:
        volumes.append({"name": "download-cache", "persistentVolumeClaim": {"claimName": spec.resources.cache_claim}})
        mounts.append({"name": "download-cache", "mountPath": CACHE_DIR})
    for claim, writable in pvc_claims(spec).items():
        vol = _pvc_volume_name(claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    return volumes, mounts


def render_pod_template(job: FineTuneJob, settings: OperatorSettings | None = None,
                        runtime: FineTuneRuntimeSpec | None = None) -> dict:
    """The trainer pod template. Image, ServiceAccount, scheduling and credentials come from the runtime; the
    job adds only what the runtime's policy.overrides lets it (runtimes.violations refused the rest)."""
    s = _settings(settings)
    rt = _runtime(runtime, s)
    tmpl = rt.template
    spec = job.spec
    r = spec.resources
    name = job.metadata.name
    # ours win (selectors use them), then the runtime's (cost allocation), then the job's
    labels = {**(r.pod_labels or {}), **(tmpl.pod_labels or {}), **child_labels(job, COMPONENT_TRAINER)}
    if job.metadata.uid:
        labels[RUN_ID_LABEL] = job.metadata.uid
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(s.trainer_metrics_port),
        "prometheus.io/path": "/metrics",
        **(r.pod_annotations or {}),  # the user's win (e.g. to turn annotation-based scraping off)
        **(tmpl.pod_annotations or {}),  # and the runtime's over the user's
    }
    volumes, mounts = _volumes(job)
    ports = [{"name": "metrics", "containerPort": s.trainer_metrics_port, "protocol": "TCP"}]
    if is_multi_node(spec):
        ports.append({"name": "rendezvous", "containerPort": rendezvous_port(job), "protocol": "TCP"})
    container = {
        "name": CONTAINER_NAME,
        "image": tmpl.image,
        "imagePullPolicy": tmpl.image_pull_policy or s.image_pull_policy,
        "command": trainer_command(job),
        "workingDir": WORK_DIR,
        "env": _env(job, s, rt),
        "ports": ports,
        "resources": _resources(spec, s, rt),
        "volumeMounts": mounts,
        "terminationMessagePath": C.TERMINATION_LOG,
        # The trainer writes a TrainerReport there; a crash before it can still explain itself via the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are new pods, counted by the Job against backoffLimit
        "terminationGracePeriodSeconds": s.trainer_termination_grace_seconds,
        "automountServiceAccountToken": False,  # the trainer needs no Kubernetes API access
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    node_selector = {**(r.node_selector or {}), **(tmpl.node_selector or {})}  # the runtime's keys win
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = _tolerations(spec, rt)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = tmpl.affinity or r.affinity
    if affinity:
        pod_spec["affinity"] = affinity.to_k8s()
    priority = r.priority_class_name or tmpl.priority_class_name
    if priority:
        pod_spec["priorityClassName"] = priority
    if tmpl.runtime_class_name:
        pod_spec["runtimeClassName"] = tmpl.runtime_class_name
    if tmpl.service_account_name:
        pod_spec["serviceAccountName"] = tmpl.service_account_name
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}


def pod_failure_policy() -> dict:
    """First match wins: permanent exit codes fail the Job; a SIGTERM end (143: the trainer saved a checkpoint,
    or was stopped before it had anything to save) and a disruption are not failures."""
    return {"rules": [
        {"action": "FailJob",
         # batch/v1 refuses values that are not in increasing order ("must be ordered")
         "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": sorted(C.ExitCode.PERMANENT)}},
        {"action": "Ignore",
         "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [C.ExitCode.PREEMPTED]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def retries_left(spec: FineTuneJobSpec, retries_used: int) -> int:
    """The backoffLimit of a Job that replaces earlier ones of the same run: retryLimit less their failures."""
    return max(0, spec.retry_limit - max(0, retries_used))


def mutable_fields(workload: dict) -> tuple[str, ...]:
    """Spec fields the operator patches on a live workload besides `suspend` (a JobSet's failurePolicy and
    Job template are immutable: nothing)."""
    return () if JS.is_jobset(workload) else MUTABLE_JOB_FIELDS


def template_hash(job_spec: dict, mutable: tuple[str, ...] = MUTABLE_JOB_FIELDS) -> str:
    """Digest of everything in the workload's spec the operator cannot patch in place (all but `suspend` and
    `mutable`): when it differs, the spec change needs a new Job/JobSet."""
    data = {k: v for k, v in job_spec.items() if k != "suspend" and k not in mutable}
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _workload_metadata(job: FineTuneJob, body: dict | None, name: str, spec: dict, mutable: tuple[str, ...]) -> dict:
    meta = _metadata(job, body, name, COMPONENT_TRAINER)
    meta["labels"].update(queueing.workload_labels(job))
    meta["annotations"] = {TEMPLATE_HASH_ANNOTATION: template_hash(spec, mutable)}
    if job.metadata.generation is not None:
        meta["annotations"][GENERATION_ANNOTATION] = str(job.metadata.generation)
    return meta


def render_job(job: FineTuneJob, body: dict | None = None, settings: OperatorSettings | None = None,
               runtime: FineTuneRuntimeSpec | None = None, retries_used: int = 0) -> dict:
    """The workload that runs the trainer pods: a JobSet for multi-node jobs (render_jobset.py; JobSet counts
    its own restarts, so `retries_used` does not apply), else a batch/v1 Job. retries_used: failures earlier
    Jobs of this run counted (a replacement Job, see the module docstring)."""
    if is_multi_node(job.spec):
        s = _settings(settings)
        jobset = JS.render_jobset(job, child_labels(job, COMPONENT_TRAINER), render_pod_template(job, s, runtime),
                                  queueing.initial_suspend(job), CONTAINER_NAME)
        jobset["metadata"] = _workload_metadata(job, body, JS.jobset_name(job.metadata.name), jobset["spec"], ())
        return jobset
    s = _settings(settings)
    spec = job.spec
    names = child_names(job.metadata.name)
    nodes = spec.resources.nodes
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": retries_left(spec, retries_used),
        "suspend": queueing.initial_suspend(job),  # with a Kueue queue: Kueue unsuspends it on admission
        "podFailurePolicy": pod_failure_policy(),
        # A replacement pod starts only after the failed one is gone: no two ranks with one hostname, and
        # a pod that is still writing its SIGTERM checkpoint is not raced by its successor.
        "podReplacementPolicy": "Failed",
        "template": render_pod_template(job, s, runtime),
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    meta = _workload_metadata(job, body, names.job, job_spec, MUTABLE_JOB_FIELDS)
    if retries_used:
        meta["annotations"][RETRIES_USED_ANNOTATION] = str(retries_used)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def retries_used_by(job: dict | None) -> int:
    """Failures a live Job's predecessors counted (its annotation; 0 for the run's first Job)."""
    value = (((job or {}).get("metadata") or {}).get("annotations") or {}).get(RETRIES_USED_ANNOTATION)
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        return 0


def render_children(job: FineTuneJob, body: dict | None = None, settings: OperatorSettings | None = None,
                    runtime: FineTuneRuntimeSpec | None = None, retries_used: int = 0) -> Children:
    return Children(config_map=render_config_map(job, body, settings),
                    job=render_job(job, body, settings, runtime, retries_used))


def workload_name(job: FineTuneJob) -> str:
    return JS.jobset_name(job.metadata.name) if is_multi_node(job.spec) else child_names(job.metadata.name).job


def iter_children(children: Children) -> Iterable[dict]:
    """In creation order: the ConfigMap before the workload whose pods mount it."""
    yield children.config_map
    yield children.job


# ------------------------------------------------------------------------------------------------ field origin
_PATH_TOKEN = re.compile(r"\.?([^.\[\]]+)|\[([^\]]*)\]")

# Where the rendered pod spec takes each user-controlled field from (pod-spec key -> FineTuneJob field).
_POD_SPEC_ORIGIN = {
    "nodeSelector": "spec.resources.nodeSelector",
    "tolerations": "spec.resources.tolerations",
    "affinity": "spec.resources.affinity",
    "priorityClassName": "spec.resources.priorityClassName",
    "serviceAccountName": "spec.runtimeRef",
    "runtimeClassName": "spec.runtimeRef",
    "subdomain": "metadata.name",
}
_JOB_SPEC_ORIGIN = {"backoffLimit": "spec.retryLimit", "activeDeadlineSeconds": "spec.activeDeadlineSeconds",
                    "completions": "spec.resources.nodes", "parallelism": "spec.resources.nodes"}


def _path_tokens(path: str) -> list[str]:
    """`spec.template.spec.containers[0].resources.requests[nvidia.com/g pu]` ->
    ['spec', 'template', 'spec', 'containers', '0', 'resources', 'requests', 'nvidia.com/g pu']"""
    return [a or b for a, b in _PATH_TOKEN.findall(path or "")]


def _at(obj: Any, tokens: list[str]) -> Any:
    for t in tokens:
        if isinstance(obj, list) and t.isdigit() and int(t) < len(obj):
            obj = obj[int(t)]
        elif isinstance(obj, dict) and t in obj:
            obj = obj[t]
        else:
            return None
    return obj


def _rest(tokens: list[str]) -> str:
    return "".join(f"[{t}]" if t.isdigit() else f".{t}" for t in tokens)


def spec_field_of(job: FineTuneJob, child: dict, path: str) -> str:
    """The FineTuneJob field that produced `path` of a rendered child, where the API server found a problem
    (the `field` of a metav1.Status cause). Falls back to `spec` when the path is not user-controlled."""
    t = _path_tokens(path)
    kind = child.get("kind")
    if kind == JS.KIND:
        if t[:4] == ["spec", "replicatedJobs", "0", "template"] and len(t) > 4:
            # the child Job's template: the same origins as a single-node Job's
            inner = ((child.get("spec") or {}).get("replicatedJobs") or [{}])[0].get("template") or {}
            return spec_field_of(job, {**inner, "kind": "Job"}, _rest(t[4:]).lstrip("."))
        if t[:3] == ["spec", "failurePolicy", "maxRestarts"]:
            return "spec.retryLimit"
        if t[:1] == ["metadata"]:
            return "metadata.name"
        return "spec.resources.nodes"
    if t[:1] == ["metadata"]:
        return "metadata.name"
    if kind == "ConfigMap":
        return "spec"  # the whole resolved spec is the ConfigMap's one key
    if kind == "Service":
        return "metadata.name"
    if t[:2] != ["spec", "template"]:
        return _JOB_SPEC_ORIGIN.get(t[1], "spec") if len(t) > 1 else "spec"
    pod = t[2:]
    if pod[:2] == ["metadata", "labels"]:
        return "spec.resources.podLabels" + _rest(pod[2:])
    if pod[:2] == ["metadata", "annotations"]:
        return "spec.resources.podAnnotations" + _rest(pod[2:])
    if pod[:1] != ["spec"] or len(pod) < 2:
        return "spec.resources"
    key, rest = pod[1], pod[2:]
    if key in _POD_SPEC_ORIGIN:
        return _POD_SPEC_ORIGIN[key] + _rest(rest)
    if key == "volumes" and rest and rest[0].isdigit():
        volume = _at(child, t[:5]) or {}
        if "emptyDir" in volume and volume.get("name") == "dshm":
            return "spec.resources.sharedMemory"
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        for field, uri, _ in spec_uri_fields(job.spec):
            if claim and pvc_claim(uri) == claim:
                return field
        return "spec.resources"
    if key == "containers" and len(rest) >= 2:
        sub = rest[1]
        if sub == "image":
            return "spec.runtimeRef"
        if sub == "resources" and len(rest) >= 4:
            resource = rest[3]
            return {"cpu": "spec.resources.cpu", "memory": "spec.resources.memory"}.get(
                resource, "spec.resources.gpus")
        if sub == "env" and len(rest) >= 3:
            env = _at(child, t[:4] + rest[:3]) or {}
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref is not None:
                return "spec.runtimeRef"  # the runtime names the Secret and its keys
            if env.get("name") in ("AWS_ENDPOINT_URL", "AWS_REGION"):
                return "spec.runtimeRef"
    return "spec.resources"
