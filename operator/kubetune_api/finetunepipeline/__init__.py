"""The FineTunePipeline resource (kubetune.dev/v1alpha1): stages chained by handover and gated by their
measured results; spec, status, gate evaluation and the stage plan. Import from here.

    from kubetune_api.finetunepipeline import FineTunePipeline, parse_pipeline, evaluate_gate, validate_pipeline
"""

from .gates import approval_annotation, is_approved
from .gates import evaluate as evaluate_gate
from .plan import (PIPELINE_LABEL, STAGE_NAME_LABEL, child_name, handed_over, handover, next_model,
                   stage_job_spec, validate_pipeline)
from .spec import FineTunePipeline, FineTunePipelineSpec, Gate, Handover, PipelineStage, StageJobSpec, parse_pipeline
from .status import FineTunePipelineStatus, GateCheck, GateStatus, StageStatus

__all__ = [
    "approval_annotation", "is_approved", "evaluate_gate",
    "PIPELINE_LABEL", "STAGE_NAME_LABEL", "child_name", "handed_over", "handover", "next_model", "stage_job_spec",
    "validate_pipeline",
    "FineTunePipeline", "FineTunePipelineSpec", "Gate", "Handover", "PipelineStage", "StageJobSpec",
    "parse_pipeline",
    "FineTunePipelineStatus", "GateCheck", "GateStatus", "StageStatus",
]
