"""The registry of kubetune's custom resources: one `Resource` entry per CRD, holding what the CRD generator
needs beyond the typed models (names, printer columns, root rules). Adding a CRD is one entry here plus its
package; `python -m kubetune_api.crdgen` then writes crds/ and the chart copy for every entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from . import constants as C
from .finetunejob import FineTuneJobSpec, FineTuneJobStatus
from .finetuneruntime import FineTuneRuntimeSpec, RuntimeStatus
from .finetunepipeline import FineTunePipelineSpec, FineTunePipelineStatus
from .finetunepipeline.spec import PIPELINE_NAME_MAX


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    singular: str
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str  # the root schema's description (kubectl explain <kind>)
    spec_description: str
    status_description: str
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    scope: str = "Namespaced"
    group: str = C.GROUP
    version: str = C.VERSION
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    # Spec fields whose model uses default_factory: the apiserver must default them to {} so that CEL rules
    # can read e.g. self.adapter.type on a manifest that omits `adapter` (nested defaults then fill the rest).
    object_defaults: tuple[str, ...] = ()
    root_validations: list[dict[str, Any]] = field(default_factory=list)  # rules on the whole object

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"

    @property
    def file_name(self) -> str:
        return f"{self.group}_{self.plural}.yaml"


FINETUNEJOB = Resource(
    kind=C.KIND, plural=C.PLURAL, singular=C.SINGULAR, short_names=C.SHORT_NAMES, categories=C.CATEGORIES,
    spec_model=FineTuneJobSpec, status_model=FineTuneJobStatus,
    description="FineTuneJob fine-tunes an LLM declaratively: the operator runs the kubetune trainer in GPU pods "
    "and stores the adapter in object storage.",
    spec_description="Desired state: what to train, on what, with which resources, and where results go.",
    status_description="Observed state, written by the operator.",
    object_defaults=("runtimeRef", "adapter", "training", "resources"),
    root_validations=[{
        "rule": "size(self.metadata.name) <= 50",
        "message": "metadata.name must be at most 50 characters (child Job, Service and pod names add suffixes "
        "and must stay within 63)",
        # no fieldPath (the API server accepts none into metadata) and no messageExpression (on the root object
        # its estimated cost exceeds the budget): Forbidden, so the answer is not `Invalid value: "object"`
        "reason": "FieldValueForbidden",
    }],
    printer_columns=[
        {"name": "Stage", "type": "string", "jsonPath": ".spec.stage", "description": "Training stage"},
        {"name": "Adapter", "type": "string", "jsonPath": ".spec.adapter.type", "description": "Adapter type"},
        {"name": "Status", "type": "string", "jsonPath": ".status.phase", "description": "Phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary", "description": "step/total"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest train loss"},
        {"name": "PPL", "type": "number", "jsonPath": ".status.progress.perplexity",
         "description": "Eval perplexity (cpt/sft)"},
        {"name": "Metric", "type": "string", "jsonPath": ".status.progress.metric",
         "description": "The stage's headline figure (ppl, reward accuracy/margin, mean reward/kl)"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
        {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpus", "priority": 1},
        {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes", "priority": 1},
        {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1,
         "description": "Seconds to completion"},
        {"name": "Job", "type": "string", "jsonPath": ".status.workload.name", "priority": 1},
        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtimeRef.name", "priority": 1,
         "description": "The runtime (kind in spec.runtimeRef.kind)"},
    ],
)

_RUNTIME_COLUMNS = [
    {"name": "Image", "type": "string", "jsonPath": ".spec.template.image", "description": "Trainer image"},
    {"name": "GPU", "type": "string", "jsonPath": ".spec.gpu.type", "description": "GPU model"},
    {"name": "Max-GPUs", "type": "integer", "jsonPath": ".spec.resources.maxGpusPerNode",
     "description": "GPUs per node a job may ask for"},
    {"name": "Custom-Code", "type": "boolean", "jsonPath": ".spec.policy.allowCustomCode",
     "description": "Custom reward code allowed"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "ServiceAccount", "type": "string", "jsonPath": ".spec.template.serviceAccountName", "priority": 1},
    {"name": "Max-Nodes", "type": "integer", "jsonPath": ".spec.resources.maxNodes", "priority": 1},
]
_RUNTIME_DESCRIPTION = ("what platform admins decide for the FineTuneJobs that name it in spec.runtimeRef: trainer "
                        "image, ServiceAccount, scheduling, GPU limits, storage credentials and allowed URIs, and "
                        "which stages, adapters and code jobs may use. Users read runtimes; only admins write them.")

CLUSTER_RUNTIME = Resource(
    kind=C.CLUSTER_RUNTIME_KIND, plural=C.CLUSTER_RUNTIME_PLURAL, singular="clusterfinetuneruntime",
    short_names=["cftr"], categories=C.CATEGORIES, scope="Cluster",
    spec_model=FineTuneRuntimeSpec, status_model=RuntimeStatus,
    description="ClusterFineTuneRuntime (cluster-wide; granted to namespaces by spec.namespaceSelector) holds "
    + _RUNTIME_DESCRIPTION,
    spec_description="What jobs under this runtime run with and may do.",
    status_description="Reserved.",
    object_defaults=("resources", "storage", "policy"),
    printer_columns=_RUNTIME_COLUMNS,
)

NAMESPACED_RUNTIME = Resource(
    kind=C.RUNTIME_KIND, plural=C.RUNTIME_PLURAL, singular="finetuneruntime",
    short_names=["ftr"], categories=C.CATEGORIES,
    spec_model=FineTuneRuntimeSpec, status_model=RuntimeStatus,
    description="FineTuneRuntime (usable only by FineTuneJobs in its own namespace) holds " + _RUNTIME_DESCRIPTION,
    spec_description="What jobs under this runtime run with and may do.",
    status_description="Reserved.",
    object_defaults=("resources", "storage", "policy"),
    printer_columns=_RUNTIME_COLUMNS,
)

FINETUNEPIPELINE = Resource(
    kind=C.PIPELINE_KIND, plural=C.PIPELINE_PLURAL, singular=C.PIPELINE_SINGULAR,
    short_names=C.PIPELINE_SHORT_NAMES, categories=C.CATEGORIES,
    spec_model=FineTunePipelineSpec, status_model=FineTunePipelineStatus,
    description="FineTunePipeline chains training stages (e.g. cpt -> sft -> dpo -> grpo): the operator runs one "
    "FineTuneJob per stage, hands each stage's model to the next and starts a stage only after the previous "
    "one passed its gate.",
    spec_description="Desired state: the base model and the ordered, gated stages.",
    status_description="Observed state, written by the operator: per-stage phase, metric, artifacts and gate.",
    object_defaults=("stages[].job.adapter", "stages[].job.training", "stages[].job.resources"),
    root_validations=[{
        "rule": f"size(self.metadata.name) <= {PIPELINE_NAME_MAX}",
        "message": f"metadata.name must be at most {PIPELINE_NAME_MAX} characters (each stage's FineTuneJob is "
        "named <pipeline>-<stage> and must stay within 50)",
        "reason": "FieldValueForbidden",
    }],
    printer_columns=[
        {"name": "Stage", "type": "string", "jsonPath": ".status.progress", "description": "stage number/stages"},
        {"name": "Current", "type": "string", "jsonPath": ".status.currentStage", "description": "Current stage"},
        {"name": "Status", "type": "string", "jsonPath": ".status.phase", "description": "Phase"},
        {"name": "Metric", "type": "string", "jsonPath": ".status.metric",
         "description": "The current stage's headline figure"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    ],
)

# Every CRD kubetune installs, in generation order. Add new resources here.
RESOURCES: list[Resource] = [FINETUNEJOB, CLUSTER_RUNTIME, NAMESPACED_RUNTIME, FINETUNEPIPELINE]
