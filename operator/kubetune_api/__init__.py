"""kubetune's API: the FineTuneJob models (single source of truth for crds/), shared constants, the trainer
report shape and the metric catalog. Pure pydantic: imported by the operator (no torch) and the trainer."""

from .constants import API_VERSION, GROUP, KIND, PLURAL, VERSION, ConditionType, ExitCode, Phase, Reason
from .models import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, parse_job, validate_spec

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "ConditionType", "ExitCode", "Phase", "Reason",
    "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "parse_job", "validate_spec",
]
