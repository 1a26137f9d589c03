"""The FineTuneRuntime / ClusterFineTuneRuntime spec (one schema, two scopes): what a platform admin decides
for the FineTuneJobs that name the runtime (`spec.runtimeRef`): the trainer image and ServiceAccount, where
pods may run, how large a job may be, which storage it reaches with which credentials, and which features
(stages, adapters, remote code, custom reward code) it may use. Users read runtimes; only admins write them.

Field descriptions become `kubectl explain` text. The FineTuneJob side of the contract (which job fields a
runtime governs) is enforced twice: by a ValidatingAdmissionPolicy (`admission.py`) at `kubectl apply`, and by
the operator (kubetune_operator.runtimes) before any pod exists.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import ConfigDict, Field, StringConstraints

from .. import corev1
from ..cel import cel, validations
from ..common import LIST_MAX, NAME_MAX, QUANTITY, URI_MAX, Model, StrEnum, Toleration
from ..finetunejob.spec import AdapterType, Stage

PREFIX_MAX = 32  # allowed URI prefixes / claims per list (CEL cost: each job URI is compared with each prefix)
# Tag or digest required: a floating image (no tag, or :latest) would change what runs under the same runtime.
PINNED_IMAGE = r"^\S*(@sha256:[a-f0-9]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$"


class Override(StrEnum):
    """FineTuneJob fields a runtime may let users set (everything else scheduling-related is the runtime's)."""

    NODE_SELECTOR = "nodeSelector"
    TOLERATIONS = "tolerations"
    AFFINITY = "affinity"
    PRIORITY_CLASS_NAME = "priorityClassName"


OVERRIDE_FIELDS = [o.value for o in Override]


class RuntimeTemplate(Model):
    """The pod template parts the admin owns. Copied into every trainer pod of the runtime's jobs."""

    model_config = ConfigDict(json_schema_extra=validations(
        {**corev1.map_keys_rule("node label key", "self.nodeSelector"), "fieldPath": ".nodeSelector"},
        {**corev1.map_keys_rule("pod label key", "self.podLabels"), "fieldPath": ".podLabels"},
        {**corev1.map_keys_rule("pod annotation key", "self.podAnnotations"), "fieldPath": ".podAnnotations"},
    ))

    image: str = Field(
        ..., max_length=URI_MAX, pattern=PINNED_IMAGE,
        description="Trainer image, pinned by tag or digest (registry/trainer:0.2.0 or ...@sha256:<64 hex>). "
        "Users cannot choose another image: a FineTuneJob has no image field.",
    )
    image_pull_policy: Optional[str] = Field(
        None, json_schema_extra={"enum": ["Always", "IfNotPresent", "Never"]},
        description="imagePullPolicy of the trainer container. Default: the operator's setting.",
    )
    service_account_name: Optional[str] = Field(
        None, max_length=corev1.DNS_SUBDOMAIN_MAX, pattern=corev1.DNS_SUBDOMAIN,
        description="ServiceAccount of the trainer pods, in the job's namespace (its token is never mounted). "
        "Default: the namespace's `default`.",
    )
    node_selector: Optional[dict[str, corev1.LabelValue]] = Field(
        None, json_schema_extra={"maxProperties": 32},
        description="Node labels the pods must match. A job may add keys only where `policy.overrides` lists "
        "nodeSelector, and never change these.",
    )
    tolerations: Optional[list[Toleration]] = Field(
        None, max_length=corev1.TOLERATIONS_MAX, description="Tolerations of the pods (the GPU taint's is added).",
    )
    affinity: Optional[corev1.Affinity] = Field(None, description="A core/v1 Affinity for the pods.")
    priority_class_name: Optional[str] = Field(
        None, max_length=corev1.DNS_SUBDOMAIN_MAX, pattern=corev1.DNS_SUBDOMAIN,
        description="PriorityClass of the pods (a job may name another only where overrides lists it).",
    )
    runtime_class_name: Optional[str] = Field(
        None, max_length=corev1.DNS_SUBDOMAIN_MAX, pattern=corev1.DNS_SUBDOMAIN,
        description="RuntimeClass of the pods (e.g. nvidia, or a sandboxed runtime such as gvisor).",
    )
    pod_labels: Optional[dict[str, corev1.LabelValue]] = Field(
        None, json_schema_extra={"maxProperties": 32},
        description="Labels added to every pod (e.g. cost allocation); they win over the job's podLabels.",
    )
    pod_annotations: Optional[dict[str, corev1.AnnotationValue]] = Field(
        None, json_schema_extra={"maxProperties": 32},
        description="Annotations added to every pod; they win over the job's podAnnotations.",
    )


class RuntimeResources(Model):
    gpu_resource_name: str = Field(
        "nvidia.com/gpu", max_length=corev1.QUALIFIED_NAME_MAX, pattern=corev1.EXTENDED_RESOURCE,
        description="Extended resource name of the GPUs (nvidia.com/gpu, amd.com/gpu, ...).",
    )
    max_gpus_per_node: Optional[int] = Field(
        None, ge=0, le=64, description="Largest spec.resources.gpus a job may ask for. Unset: no limit.")
    max_nodes: Optional[int] = Field(
        None, ge=1, le=1024, description="Largest spec.resources.nodes a job may ask for. Unset: no limit.")
    default_cpu: Optional[Union[str, int]] = Field(
        None, json_schema_extra=QUANTITY, description="CPU request per pod when the job sets none.")
    default_memory: Optional[Union[str, int]] = Field(
        None, json_schema_extra=QUANTITY, description="Memory request and limit per pod when the job sets none.")
    shared_memory: Optional[Union[str, int]] = Field(
        None, json_schema_extra=QUANTITY, description="Size of /dev/shm when the job sets none.")
    cache_claim: Optional[str] = Field(
        None, max_length=NAME_MAX, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="PersistentVolumeClaim for the download cache when the job sets none (it must exist in the "
        "job's namespace).",
    )


class GPUSpec(Model):
    type: Optional[str] = Field(None, max_length=NAME_MAX, description="GPU model, for people (e.g. H100-80GB).")
    memory_gib: Optional[float] = Field(
        None, gt=0, le=4096, alias="memoryGiB",
        description="Memory per GPU in GiB. The trainer's pre-flight memory estimate refuses a job that cannot "
        "fit (and says which settings would), before loading weights.",
    )


class RuntimeCredentials(Model):
    """The Secret holding the S3 key pair. Users never name Secrets or keys: this is the only way credentials
    reach a trainer pod (as secretKeyRef env; the operator never reads the Secret)."""

    secret_name: str = Field(..., max_length=NAME_MAX, pattern=corev1.DNS_SUBDOMAIN,
                             description="Secret in the job's namespace (each tenant namespace holds its own).")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", max_length=NAME_MAX, pattern=corev1.CONFIG_KEY,
                                   description="Key in the Secret holding the access key id.")
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY", max_length=NAME_MAX, pattern=corev1.CONFIG_KEY,
                                       description="Key in the Secret holding the secret key.")


Prefix = Annotated[str, StringConstraints(max_length=URI_MAX, pattern=r"^(s3|file|pvc|hf)://.*")]
Claim = Annotated[str, StringConstraints(max_length=NAME_MAX, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


class RuntimeStorage(Model):
    endpoint: Optional[str] = Field(
        None, max_length=URI_MAX, pattern=r"^https?://.+",
        description="S3 endpoint URL (SeaweedFS, Ceph, ...). Default: the operator's configured endpoint.")
    region: Optional[str] = Field(None, max_length=NAME_MAX, description="S3 region.")
    credentials: Optional[RuntimeCredentials] = Field(
        None, description="S3 credentials Secret for every s3:// URI of the runtime's jobs. Unset: the operator's "
        "default Secret (optional reference) or the pod's workload identity.")
    allowed_source_prefixes: Optional[list[Prefix]] = Field(
        None, max_length=PREFIX_MAX,
        description="URIs a job may read (model, tokenizer, start adapter, datasets, reward sources, reward models, "
        "resumeFrom; pvc:// URIs are governed by allowedClaims instead) must start with one of these (e.g. "
        "s3://models/, hf://). Unset: any.")
    allowed_output_prefixes: Optional[list[Prefix]] = Field(
        None, max_length=PREFIX_MAX,
        description="spec.output.uri must start with one of these (e.g. s3://team-a/). Unset: any.")
    allowed_claims: Optional[list[Claim]] = Field(
        None, max_length=PREFIX_MAX,
        description="PersistentVolumeClaims a job may mount (pvc:// URIs, cacheClaim). Unset or empty: none.")
    patience_seconds: Optional[int] = Field(
        None, ge=0, le=86400,
        description="How long the trainer waits out an unreachable object store before failing the job with reason "
        "StorageUnavailable: the default of the runtime's jobs and the most a job's "
        "spec.output.storagePatienceSeconds gets (a larger value is lowered to this). Unset: 600 s, and jobs may "
        "choose.")


class RuntimePolicy(Model):
    allowed_stages: Optional[list[Stage]] = Field(
        None, max_length=16, description="Stages jobs may use. Unset: all.")
    allowed_adapters: Optional[list[AdapterType]] = Field(
        None, max_length=16, description="Adapter types jobs may use. Unset: all.")
    allow_trust_remote_code: bool = Field(
        False, description="Whether spec.model.trustRemoteCode may be true (runs Python shipped with the model).")
    allow_custom_code: bool = Field(
        False, description="Whether jobs may run reward code they bring along: 'module:function' rewards and the "
        "built-in code_execution (both run in the trainer's reward sandbox).")
    max_active_deadline_seconds: Optional[int] = Field(
        None, ge=1, description="Largest spec.activeDeadlineSeconds; also the deadline of jobs that set none.")
    overrides: Optional[list[Override]] = Field(
        None, max_length=len(OVERRIDE_FIELDS),
        description="spec.resources fields a job may set itself: nodeSelector (extra keys only), tolerations "
        "(added to the runtime's), affinity (only where the runtime sets none), priorityClassName.")


class NamespaceSelector(Model):
    match_labels: Optional[dict[str, corev1.LabelValue]] = Field(
        None, json_schema_extra={"maxProperties": corev1.MATCH_LABELS_MAX},
        description="Labels a namespace must carry (all of them) for its jobs to use this runtime.")


class FineTuneRuntimeSpec(Model):
    model_config = ConfigDict(json_schema_extra=validations(
        cel("!has(self.policy) || !has(self.policy.overrides) || !self.policy.overrides.exists(o, o == 'affinity') "
            "|| !has(self.template.affinity)",
            "policy.overrides may list affinity only when template.affinity is unset (two affinities cannot be "
            "merged safely)", field_path=".policy.overrides", reason="FieldValueForbidden"),
    ))

    template: RuntimeTemplate = Field(..., description="Image, ServiceAccount and scheduling of the trainer pods.")
    resources: RuntimeResources = Field(default_factory=RuntimeResources, description="GPU resource and limits.")
    gpu: Optional[GPUSpec] = Field(None, description="The GPUs this runtime's nodes carry.")
    storage: RuntimeStorage = Field(default_factory=RuntimeStorage, description="Object store, credentials, "
                                    "allowed URIs and claims.")
    policy: RuntimePolicy = Field(default_factory=RuntimePolicy, description="What jobs may do.")
    namespace_selector: Optional[NamespaceSelector] = Field(
        None, description="ClusterFineTuneRuntime only: namespaces whose jobs may use it (matchLabels). Unset: "
        "every namespace. Ignored on a namespaced FineTuneRuntime (usable only in its own namespace).")


class RuntimeStatus(Model):
    model_config = ConfigDict(extra="allow")
    observed_generation: Optional[int] = Field(None, description="Unused today (runtimes have no controller).")
