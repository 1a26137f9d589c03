"""A FineTuneJob's runtime: find it (spec.runtimeRef), check the job against it, and keep the copy the job's
pods are rendered from. The operator's half of the runtime contract; the ValidatingAdmissionPolicy
(kubetune_api.finetuneruntime.admission) refuses most of the same things at `kubectl apply`, and this module
catches the rest (and everything, on clusters without the policy) before any pod exists.

- `resolve`: GET the runtime the job names. Missing, or a ClusterFineTuneRuntime whose namespaceSelector does
  not match the job's namespace: a problem naming spec.runtimeRef (the job fails; no retry loop).
- `snapshot` / `from_snapshot`: the resolved runtime (kind, name, uid, generation, digest, spec) goes into
  status.runtime at the job's first reconcile, and every later render reads that copy: editing a runtime
  changes new jobs only. Status, because users who may edit FineTuneJobs and ConfigMaps cannot write it.
- `violations`: pure; what the job asks that the runtime forbids, each "field: what; fix".
- `apply_defaults`: the runtime's defaults (cpu, memory, /dev/shm, cache claim, deadline, storage patience) filled
  into the job; storage.patienceSeconds also caps the job's spec.output.storagePatienceSeconds.

    rt, problem = await runtimes.resolve(api, ftj)
    problems = runtimes.violations(job, rt.spec)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from kubetune_api import constants as C
from kubetune_api.finetunejob import FineTuneJob
from kubetune_api.finetuneruntime import FineTuneRuntimeSpec, parse_runtime
from pydantic import ValidationError

from .kube import KubeApi, collection_path
from .render import pvc_claim, spec_uri_fields
from .settings import OperatorSettings

CUSTOM_CODE_BUILTINS = ("code_execution",)  # built-ins that run code from the job's data


@dataclass(frozen=True)
class Resolved:
    kind: str
    name: str
    spec: FineTuneRuntimeSpec
    uid: Optional[str] = None
    generation: Optional[int] = None

    @property
    def digest(self) -> str:
        text = json.dumps(self.spec.to_k8s(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def snapshot(self) -> dict:
        """status.runtime."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "digest": self.digest, "spec": self.spec.to_k8s()}
        if self.uid:
            out["uid"] = self.uid
        if self.generation is not None:
            out["generation"] = self.generation
        return out


def ref_of(ftj: dict) -> tuple[str, str]:
    """(kind, name) of the job's runtime; the CRD defaults it, an older stored object may lack it."""
    ref = (ftj.get("spec") or {}).get("runtimeRef") or {}
    return ref.get("kind") or C.CLUSTER_RUNTIME_KIND, ref.get("name") or C.DEFAULT_RUNTIME_NAME


def runtime_path(kind: str, name: str, namespace: str) -> str:
    if kind == C.CLUSTER_RUNTIME_KIND:
        return f"/apis/{C.API_VERSION}/{C.CLUSTER_RUNTIME_PLURAL}/{name}"
    return f"{collection_path(C.API_VERSION, C.RUNTIME_PLURAL, namespace)}/{name}"


def from_snapshot(status: Optional[dict]) -> Optional[Resolved]:
    """The runtime recorded in a job's status, or None (never resolved, or unreadable)."""
    snap = (status or {}).get("runtime")
    if not isinstance(snap, dict) or not isinstance(snap.get("spec"), dict):
        return None
    try:
        spec = parse_runtime(snap["spec"])
    except ValidationError:
        return None
    return Resolved(kind=snap.get("kind", ""), name=snap.get("name", ""), spec=spec, uid=snap.get("uid"),
                    generation=snap.get("generation"))


def settings_runtime(settings: Optional[OperatorSettings] = None) -> FineTuneRuntimeSpec:
    """The runtime the operator's own settings describe (image, endpoint, optional default Secret): what render
    uses when called without a runtime (unit tests, tools). The reconciler always passes the job's runtime."""
    s = settings or OperatorSettings()
    storage: dict[str, Any] = {}
    if s.s3_endpoint:
        storage["endpoint"] = s.s3_endpoint
    if s.s3_region:
        storage["region"] = s.s3_region
    return FineTuneRuntimeSpec.model_validate({
        "template": {"image": s.trainer_image}, "storage": storage,
        "policy": {"allowTrustRemoteCode": True, "allowCustomCode": True,
                   "overrides": ["nodeSelector", "tolerations", "affinity", "priorityClassName"]},
    })


def namespace_problem(kind: str, name: str, spec: FineTuneRuntimeSpec, namespace: str,
                      labels: dict[str, str]) -> Optional[str]:
    """Whether a ClusterFineTuneRuntime is granted to `namespace` (its namespaceSelector.matchLabels)."""
    if kind != C.CLUSTER_RUNTIME_KIND or spec.namespace_selector is None:
        return None
    want = spec.namespace_selector.match_labels or {}
    missing = {k: v for k, v in want.items() if labels.get(k) != v}
    if not missing:
        return None
    need = ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
    return (f"spec.runtimeRef.name: the ClusterFineTuneRuntime {name!r} is not granted to namespace {namespace!r} "
            f"(its namespaceSelector needs the namespace labels {need}); use a runtime your namespace may use "
            "(`kubectl get clusterfinetuneruntimes,finetuneruntimes`) or ask the platform team")


async def resolve(api: KubeApi, ftj: dict, get: Optional[Callable[[str], Awaitable[Optional[dict]]]] = None
                  ) -> tuple[Optional[Resolved], Optional[str]]:
    """(the job's runtime, None) or (None, problem naming spec.runtimeRef). Raises kube.ApiError for anything but
    a missing runtime (403, 5xx: retried by the caller like any API failure). `get` reads the runtime (default
    api.get; the reconciler passes kube.RecentGets.get); the namespace, whose labels grant it, is always read."""
    get = get or api.get
    kind, name = ref_of(ftj)
    namespace = ftj["metadata"]["namespace"]
    obj = await get(runtime_path(kind, name, namespace))
    if obj is None:
        where = "" if kind == C.CLUSTER_RUNTIME_KIND else f" in namespace {namespace!r}"
        return None, (f"spec.runtimeRef: {kind} {name!r} does not exist{where}; name one that does "
                      "(`kubectl get clusterfinetuneruntimes,finetuneruntimes`) or ask the platform team to create it")
    try:
        spec = parse_runtime(obj.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return None, (f"spec.runtimeRef: {kind} {name!r} is invalid ({'.'.join(map(str, first.get('loc', ())))}: "
                      f"{first.get('msg')}); the platform team must fix it")
    meta = obj.get("metadata") or {}
    if kind == C.CLUSTER_RUNTIME_KIND and spec.namespace_selector is not None:
        ns = await api.get(f"/api/v1/namespaces/{namespace}") or {}  # fresh: its labels are the grant
        problem = namespace_problem(kind, name, spec, namespace, (ns.get("metadata") or {}).get("labels") or {})
        if problem:
            return None, problem
    return Resolved(kind=kind, name=name, spec=spec, uid=meta.get("uid"), generation=meta.get("generation")), None


def _custom_code_fields(job: FineTuneJob) -> list[tuple[str, str]]:
    out = []
    t = job.spec.training
    for stage, block in (("grpo", t.grpo), ("rloo", t.rloo)):
        for i, reward in enumerate((getattr(block, "rewards", None) or []) if block else []):
            if ":" in reward.name or reward.name in CUSTOM_CODE_BUILTINS or reward.source:
                out.append((f"spec.training.{stage}.rewards[{i}].name", reward.name))
    return out


def _prefixed(uri: str, prefixes: list[str]) -> bool:
    return any(uri.startswith(p) for p in prefixes)


def violations(job: FineTuneJob, rt: FineTuneRuntimeSpec, runtime_name: str = "") -> list[str]:
    """What `job` asks that its runtime does not allow, each as "field: problem; fix" (empty: allowed)."""
    spec, r, pol = job.spec, job.spec.resources, rt.policy
    who = f"the runtime {runtime_name!r}" if runtime_name else "the job's runtime"
    out: list[str] = []
    if pol.allowed_stages is not None and str(spec.stage) not in [str(s) for s in pol.allowed_stages]:
        out.append(f"spec.stage: {spec.stage!s} is not allowed by {who} (allowed: "
                   f"{', '.join(map(str, pol.allowed_stages)) or 'none'})")
    if pol.allowed_adapters is not None and str(spec.adapter.type) not in [str(a) for a in pol.allowed_adapters]:
        out.append(f"spec.adapter.type: {spec.adapter.type!s} is not allowed by {who} (allowed: "
                   f"{', '.join(map(str, pol.allowed_adapters)) or 'none'})")
    if spec.model.trust_remote_code and not pol.allow_trust_remote_code:
        out.append(f"spec.model.trustRemoteCode: {who} does not allow running code shipped with the model; set it "
                   "to false (use a model whose architecture transformers knows) or use another runtime")
    if not pol.allow_custom_code:
        for field, name in _custom_code_fields(job):
            out.append(f"{field}: {name!r} runs code that comes with the job, which {who} does not allow; use a "
                       "built-in reward or a runtime with policy.allowCustomCode")
    if pol.max_active_deadline_seconds is not None and spec.active_deadline_seconds is not None and \
            spec.active_deadline_seconds > pol.max_active_deadline_seconds:
        out.append(f"spec.activeDeadlineSeconds: {spec.active_deadline_seconds} is above {who}'s maximum "
                   f"{pol.max_active_deadline_seconds}")
    res = rt.resources
    if res.max_gpus_per_node is not None and r.gpus > res.max_gpus_per_node:
        out.append(f"spec.resources.gpus: {r.gpus} GPUs per node is above {who}'s maximum {res.max_gpus_per_node}")
    if res.max_nodes is not None and r.nodes > res.max_nodes:
        out.append(f"spec.resources.nodes: {r.nodes} nodes is above {who}'s maximum {res.max_nodes}")
    allowed = set(str(o) for o in pol.overrides or [])
    tmpl = rt.template
    if r.node_selector:
        if "nodeSelector" not in allowed:
            out.append(f"spec.resources.nodeSelector: {who} places the pods itself (policy.overrides does not list "
                       "nodeSelector); remove it")
        else:
            for key, value in sorted(r.node_selector.items()):
                if key in (tmpl.node_selector or {}) and tmpl.node_selector[key] != value:
                    out.append(f"spec.resources.nodeSelector.{key}: {value!r} selects nodes outside {who} (it "
                               f"requires {key}={tmpl.node_selector[key]}); remove the key")
    if r.tolerations and "tolerations" not in allowed:
        out.append(f"spec.resources.tolerations: {who} does not let jobs add tolerations (policy.overrides); remove "
                   "them")
    if r.affinity is not None and "affinity" not in allowed:
        out.append(f"spec.resources.affinity: {who} does not let jobs set affinity (policy.overrides); remove it")
    if r.priority_class_name and "priorityClassName" not in allowed and r.priority_class_name != tmpl.priority_class_name:
        out.append(f"spec.resources.priorityClassName: {who} does not let jobs choose a PriorityClass "
                   "(policy.overrides); remove it")
    st = rt.storage
    claims = set(st.allowed_claims or [])
    for field, uri, writable in spec_uri_fields(spec):
        claim = pvc_claim(uri)
        if claim:  # pvc:// URIs are governed by allowedClaims alone
            if claim not in claims:
                out.append(f"{field}: PersistentVolumeClaim {claim!r} is not one {who} allows (storage.allowedClaims: "
                           f"{', '.join(sorted(claims)) or 'none'})")
            continue
        prefixes = st.allowed_output_prefixes if writable else st.allowed_source_prefixes
        if prefixes is not None and not _prefixed(uri, prefixes):
            kind = "output" if writable else "source"
            out.append(f"{field}: {uri} is outside the {kind} locations {who} allows ({', '.join(prefixes) or 'none'})")
    if r.cache_claim and r.cache_claim not in claims and r.cache_claim != rt.resources.cache_claim:
        out.append(f"spec.resources.cacheClaim: PersistentVolumeClaim {r.cache_claim!r} is not one {who} allows "
                   f"(storage.allowedClaims: {', '.join(sorted(claims)) or 'none'})")
    return out


def apply_defaults(job: FineTuneJob, rt: FineTuneRuntimeSpec) -> FineTuneJob:
    """The job with the runtime's defaults filled in where the job sets nothing (the resolved spec the trainer
    reads then says what actually runs)."""
    r, res = job.spec.resources, rt.resources
    resources = {}
    if r.cpu is None and res.default_cpu is not None:
        resources["cpu"] = str(res.default_cpu)
    if r.memory is None and res.default_memory is not None:
        resources["memory"] = str(res.default_memory)
    if r.shared_memory is None and res.shared_memory is not None:
        resources["shared_memory"] = str(res.shared_memory)
    if r.cache_claim is None and res.cache_claim is not None:
        resources["cache_claim"] = res.cache_claim
    update: dict[str, Any] = {}
    if resources:
        update["resources"] = r.model_copy(update=resources)
    deadline = rt.policy.max_active_deadline_seconds
    if job.spec.active_deadline_seconds is None and deadline is not None:
        update["active_deadline_seconds"] = deadline
    # Storage patience: the runtime's value is the default and the ceiling (a job may wait less, never longer
    # than the platform allows a stuck pod to hold its GPUs).
    rt_patience, own = rt.storage.patience_seconds, job.spec.output.storage_patience_seconds
    if rt_patience is not None and (own is None or own > rt_patience):
        update["output"] = job.spec.output.model_copy(update={"storage_patience_seconds": rt_patience})
    if not update:
        return job
    return job.model_copy(update={"spec": job.spec.model_copy(update=update)})

