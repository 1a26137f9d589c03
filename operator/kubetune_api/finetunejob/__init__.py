"""The FineTuneJob resource (kubetune.dev/v1alpha1): spec, status and cross-field rules; import from here.

    from kubetune_api.finetunejob import FineTuneJob, parse_job, validate_spec
"""

from .rules import STAGE_BLOCKS, STAGE_FORMATS, uri_fields, validate_spec
from .spec import (
    AdapterSpec, AdapterType, ColumnMapping, DatasetFormat, DatasetSource, DatasetSpec, DeepSpeedSpec,
    DistributedSpec, DPOParams, EarlyStoppingSpec, EvaluationSpec, FineTuneJob, FineTuneJobSpec, GaLoreSpec,
    GRPOParams, KTOParams, ModelSpec, ORPOParams, OutputSpec, PPOParams, QuantizationSpec, ResourcesSpec,
    RewardFunction, RewardModelParams, RLOOParams, RuntimeRef, Stage, TrainingSpec, parse_job,
)
from .status import Artifacts, FineTuneJobStatus, Forgetting, Progress, RuntimeSnapshot, Workload

__all__ = [
    "STAGE_BLOCKS", "STAGE_FORMATS", "uri_fields", "validate_spec",
    "AdapterSpec", "AdapterType", "ColumnMapping", "DatasetFormat", "DatasetSource", "DatasetSpec", "DeepSpeedSpec",
    "DistributedSpec", "DPOParams", "EarlyStoppingSpec", "EvaluationSpec", "FineTuneJob", "FineTuneJobSpec",
    "GaLoreSpec", "GRPOParams", "KTOParams", "ModelSpec", "ORPOParams", "OutputSpec", "PPOParams",
    "QuantizationSpec", "ResourcesSpec", "RewardFunction", "RewardModelParams", "RLOOParams", "Stage",
    "TrainingSpec", "parse_job", "RuntimeRef", "RuntimeSnapshot",
    "Artifacts", "FineTuneJobStatus", "Forgetting", "Progress", "Workload",
]
