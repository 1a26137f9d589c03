"""The FineTunePipeline resource's status: overall phase and conditions, `STAGE 2/4` progress, and per stage
its FineTuneJob, phase, headline metric, artifacts and gate verdict (each check with metric, value, threshold)."""

from __future__ import annotations

from typing import Optional

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from ..common import Condition, Model
from ..constants import Phase
from ..finetunejob.status import Artifacts, Forgetting, Progress


class GateCheck(Model):
    metric: str = Field(..., description="evalLoss, perplexity, forgettingRise, rewardAccuracy, rewardMargin, "
                        "meanReward or manualApproval.")
    value: Optional[float] = Field(None, description="The stage's measured value (absent: not reported).")
    threshold: Optional[float] = Field(None, description="The gate's threshold.")
    comparison: str = Field(..., description="<= or >= (manualApproval: approved).")
    passed: bool = Field(..., description="Whether this check holds.")


class GateStatus(Model):
    state: str = Field(..., json_schema_extra={"enum": ["Waiting", "Passed", "Failed", "AwaitingApproval"]},
                       description="Waiting (stage not finished), Passed, Failed or AwaitingApproval.")
    message: Optional[str] = Field(None, description="What failed: metric, value and threshold.")
    checks: Optional[list[GateCheck]] = Field(None, description="Every check of the gate.")


class StageStatus(Model):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    name: str = Field(..., description="The stage's name.")
    job: Optional[str] = Field(None, description="Its FineTuneJob (<pipeline>-<stage>).")
    job_uid: Optional[str] = Field(None, description="The FineTuneJob's uid (its run id).")
    phase: Optional[str] = Field(None, description="The FineTuneJob's phase (absent: not started).")
    model_source: Optional[str] = Field(None, description="The model this stage trained on.")
    model_adapter: Optional[str] = Field(None, description="The adapter this stage started from (handover "
                                         "continue: the previous stage's adapter).")
    metric: Optional[str] = Field(None, description="The stage's headline figure (ppl, acc, reward, ...).")
    progress: Optional[Progress] = Field(None, description="The FineTuneJob's final (or latest) progress.")
    forgetting: Optional[Forgetting] = Field(None, description="The FineTuneJob's forgetting check.")
    artifacts: Optional[Artifacts] = Field(None, description="Where the stage's results are.")
    gate: Optional[GateStatus] = Field(None, description="The verdict of the stage's gate.")
    message: Optional[str] = Field(None, description="The FineTuneJob's last message.")


class FineTunePipelineStatus(Model):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    observed_generation: Optional[int] = Field(None, description="The .metadata.generation last reconciled.")
    phase: Optional[str] = Field(None, json_schema_extra={"enum": Phase.ALL},
                                 description="Pending, Suspended, Running, Succeeded or Failed.")
    conditions: Optional[list[Condition]] = Field(
        None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Latest observations (metav1.Condition): Running, Suspended, Succeeded, Failed.",
    )
    current_stage: Optional[str] = Field(None, description="The stage running now (or the last one that ran).")
    progress: Optional[str] = Field(None, description="<stage number>/<stages>, e.g. 2/4 (kubectl get: STAGE).")
    metric: Optional[str] = Field(None, description="The current stage's headline figure.")
    stages: Optional[list[StageStatus]] = Field(None, description="Per stage, in order.")
    handled_retry: Optional[str] = Field(None, description="The retry (<stage>/<nonce>) already acted on.")
    message: Optional[str] = Field(None, description="Last notable event, human-readable.")
