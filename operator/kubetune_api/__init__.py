"""kubetune's API: one package per custom resource (`finetunejob/`; the single source of truth for crds/),
the shared model pieces (`common`, `cel`, `defaults`), the resource registry the CRD generator walks
(`resources`), shared constants, the trainer report shape and the metric catalog. Pure pydantic: imported by
the operator and the client (no torch) and by the trainer."""

from .constants import API_VERSION, GROUP, KIND, PLURAL, VERSION, ConditionType, ExitCode, Phase, Reason
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, parse_job, validate_spec

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "ConditionType", "ExitCode", "Phase", "Reason",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "parse_job", "validate_spec",
]
