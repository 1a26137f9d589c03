"""The FineTunePipeline resource's spec: a base model and an ordered list of stages, each a FineTuneJob spec
without `model` (the model comes from the previous stage), how it builds on the previous stage, and the gate
its own results must pass before the next stage starts.

Field descriptions become `kubectl explain` text. Rules that span stages are CEL on the spec (generated per
stage index: CEL has no index loop) and the same checks in Python in `rules.validate_pipeline`.
"""

from __future__ import annotations

from typing import Optional

from pydantic import ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel

from ..cel import cel, validations
from ..common import Model, ObjectMeta, StrEnum
from ..finetunejob import FineTuneJobSpec, ModelSpec
from ..finetunejob.rules import SPEC_CREATE_RULES, base_reference_cel
from .status import FineTunePipelineStatus

STAGES_MAX = 8
# Child FineTuneJobs are named <pipeline>-<stage>; a FineTuneJob name is at most 50 characters.
PIPELINE_NAME_MAX = 30
STAGE_NAME_MAX = 19
STAGE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

ADAPTER_TYPES = ("lora", "qlora", "dora")  # trained as a PEFT adapter: merged into its base to hand over
FULL_TYPES = ("full", "galore")  # every weight trained: the result is a whole model


class Handover(StrEnum):
    CONTINUE = "continue"
    MERGE = "merge"
    WEIGHTS = "weights"


def _stage_job_spec() -> type[Model]:
    """FineTuneJobSpec without `model`, by composition: every field the FineTuneJob gains (runtimeRef, ...)
    flows into pipeline stages without a change here. The FineTuneJob's create-time CEL rules come along;
    its immutability rules do not (a stage's job may be edited before a retry; the running child keeps its own)."""
    fields = {name: (f.annotation, f) for name, f in FineTuneJobSpec.model_fields.items()
              if name not in ("model", "suspend", "resume_from")}
    return create_model(
        "StageJobSpec", __base__=Model, __module__=__name__,
        __doc__="A FineTuneJob spec without model, suspend and resumeFrom (the pipeline decides those).",
        **fields,
    )


StageJobSpec = _stage_job_spec()
StageJobSpec.model_config["json_schema_extra"] = validations(*SPEC_CREATE_RULES)
StageJobSpec.model_rebuild(force=True)


class Gate(Model):
    """What this stage's measured results must reach before the next stage starts (after the last stage:
    before the pipeline succeeds). Every set threshold must hold; a metric the stage did not report fails
    the gate (it cannot be judged)."""

    max_eval_loss: Optional[float] = Field(None, description="Largest allowed final eval loss.")
    max_perplexity: Optional[float] = Field(
        None, gt=0, description="Largest allowed eval perplexity (stages cpt and sft).")
    max_forgetting_rise: Optional[float] = Field(
        None, ge=0, description="Largest allowed relative rise of reference perplexity (0.1 = +10 %); needs "
        "job.evaluation.reference on this stage.")
    min_reward_accuracy: Optional[float] = Field(
        None, ge=0, le=1, description="Smallest allowed reward accuracy on eval pairs (stages dpo, orpo, reward).")
    min_reward_margin: Optional[float] = Field(
        None, description="Smallest allowed mean chosen-minus-rejected reward margin (stages dpo, orpo, kto, reward).")
    min_mean_reward: Optional[float] = Field(
        None, description="Smallest allowed mean reward of the latest rollouts (stages grpo, rloo, ppo).")
    manual_approval: bool = Field(
        False, description="Also wait for a person: the gate passes only once the pipeline carries the "
        "annotation gates.kubetune.dev/<stage name>: approved (kubectl annotate ftp/NAME "
        "gates.kubetune.dev/<stage>=approved).")


class PipelineStage(Model):
    model_config = ConfigDict(json_schema_extra=validations(
        cel("!has(self.gate) || !has(self.gate.maxPerplexity) || self.job.stage in ['cpt', 'sft']",
            "gate.maxPerplexity needs stage cpt or sft (other stages report no language-model perplexity)",
            field_path=".gate.maxPerplexity"),
        cel("!has(self.gate) || !has(self.gate.minRewardAccuracy) || self.job.stage in ['dpo', 'orpo', 'reward']",
            "gate.minRewardAccuracy needs stage dpo, orpo or reward", field_path=".gate.minRewardAccuracy"),
        cel("!has(self.gate) || !has(self.gate.minRewardMargin) || self.job.stage in ['dpo', 'orpo', 'kto', 'reward']",
            "gate.minRewardMargin needs stage dpo, orpo, kto or reward", field_path=".gate.minRewardMargin"),
        cel("!has(self.gate) || !has(self.gate.minMeanReward) || self.job.stage in ['grpo', 'rloo', 'ppo']",
            "gate.minMeanReward needs stage grpo, rloo or ppo", field_path=".gate.minMeanReward"),
        cel("!has(self.gate) || !has(self.gate.maxForgettingRise) || "
            "(has(self.job.evaluation) && has(self.job.evaluation.reference))",
            "gate.maxForgettingRise needs job.evaluation.reference (the forgetting check's general-domain text)",
            field_path=".gate.maxForgettingRise"),
    ))

    name: str = Field(
        ..., max_length=STAGE_NAME_MAX, pattern=STAGE_NAME_PATTERN,
        description=f"Stage name (a DNS label of at most {STAGE_NAME_MAX} characters, unique in the pipeline); "
        "the stage's FineTuneJob is <pipeline>-<name>.",
    )
    job: StageJobSpec = Field(  # type: ignore[valid-type]
        ..., description="The stage's FineTuneJob spec without model: the first stage trains the pipeline's "
        "model, later ones what the previous stage handed over.",
    )
    handover: Optional[Handover] = Field(
        None, description="How this stage builds on the previous one. continue: this stage keeps training the "
        "previous stage's adapter on the same base (the previous stage trained lora, qlora or dora and this one "
        "the same type; not into dpo, kto, or grpo/rloo/ppo with a KL penalty, whose reference would be the base "
        "without the adapter: use merge there); merge: the previous stage's adapter (lora, qlora, dora) is "
        "merged into its base and this stage trains a new adapter on the merged model (for dpo the merged model "
        "is also the reference); weights: the previous stage trained full weights (full, galore) and this stage "
        "starts from them. Default: merge after an adapter, weights after full weights. Ignored on the first "
        "stage.",
    )
    gate: Optional[Gate] = Field(None, description="What this stage's results must reach before the pipeline "
                                 "moves on. Without a gate the next stage starts when this one succeeds.")


def _handover_rules() -> list[dict]:
    """Per stage index: the handover must fit the previous stage's adapter type (continue: the same PEFT type,
    into a stage without a reference model, with no adapter.init), and no stage may follow a reward-model
    stage (a classifier is not a causal LM)."""
    rules = []
    for i in range(1, STAGES_MAX):
        prev, cur = f"self.stages[{i - 1}]", f"self.stages[{i}]"
        cont = f"size(self.stages) <= {i} || !has({cur}.handover) || {cur}.handover != 'continue' || "
        rules.append(cel(
            cont + f"({prev}.job.adapter.type in {list(ADAPTER_TYPES)!r} && "
            f"{cur}.job.adapter.type == {prev}.job.adapter.type)",
            f"stages[{i}].handover continue needs the same adapter type (lora, qlora or dora) in stages[{i - 1}] "
            f"and stages[{i}]; to change the type, or after full weights, use handover merge or weights",
            field_path=".stages"))
        rules.append(cel(
            cont + f"!{base_reference_cel(cur + '.job')}",
            f"stages[{i}].handover continue cannot go into dpo, kto, or grpo/rloo/ppo with a KL penalty: the "
            "reference model would be the base without any adapter, not the previous stage's policy; use handover "
            "merge: the merged model becomes the reference", field_path=".stages"))
        rules.append(cel(
            cont + f"!has({cur}.job.adapter.init)",
            f"stages[{i}].handover continue keeps training the previous stage's adapter, which adapter.init cannot "
            "re-initialise: remove it", field_path=".stages"))
        rules.append(cel(
            f"size(self.stages) <= {i} || !has({cur}.handover) || {cur}.handover != 'merge' || "
            f"{prev}.job.adapter.type in {list(ADAPTER_TYPES)!r}",
            f"stages[{i}].handover merge needs an adapter (lora, qlora, dora) in stages[{i - 1}]; it trains full "
            "weights: use handover weights (or omit it)", field_path=".stages"))
        rules.append(cel(
            f"size(self.stages) <= {i} || !has({cur}.handover) || {cur}.handover != 'weights' || "
            f"{prev}.job.adapter.type in {list(FULL_TYPES)!r}",
            f"stages[{i}].handover weights needs full weights (full, galore) in stages[{i - 1}]; it trains an "
            "adapter: use handover merge (or omit it)", field_path=".stages"))
        rules.append(cel(
            f"size(self.stages) <= {i} || {prev}.job.stage != 'reward'",
            f"stages[{i - 1}] trains a reward model (a classifier), which no later stage can train on: make it "
            "the last stage, or train it in its own FineTuneJob and reference it (rewardModel)",
            field_path=".stages"))
    return rules


class FineTunePipelineSpec(Model):
    model_config = ConfigDict(json_schema_extra=validations(
        *_handover_rules(),
        cel("!has(self.retryFrom) || self.stages.exists(s, s.name == self.retryFrom)",
            "retryFrom must name a stage of this pipeline", field_path=".retryFrom"),
    ))

    model: ModelSpec = Field(..., description="The base model the first stage trains.")
    stages: list[PipelineStage] = Field(
        ..., min_length=1, max_length=STAGES_MAX,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="The stages, in order (e.g. cpt, sft, dpo, grpo). Each runs as its own FineTuneJob, "
        "created only after the previous stage succeeded and passed its gate.",
    )
    suspend: bool = Field(
        False, description="Suspend the pipeline: the running stage's FineTuneJob is suspended (its pods stop "
        "after a checkpoint) and no new stage starts; unsuspend to continue.",
    )
    retry_from: Optional[str] = Field(
        None, max_length=STAGE_NAME_MAX,
        description="Re-run this stage and every later one (their FineTuneJobs are replaced; earlier stages "
        "keep their results). Acted on once per value: set it after fixing the stage's job or gate; change the "
        "annotation kubetune.dev/retry-nonce to retry the same stage again.",
    )


class FineTunePipeline(Model):
    """The whole object; used by the local pipeline runner and tests, not for the CRD schema root."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)
    api_version: str = "kubetune.dev/v1alpha1"
    kind: str = "FineTunePipeline"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTunePipelineSpec
    status: Optional[FineTunePipelineStatus] = None


def parse_pipeline(obj: dict) -> FineTunePipeline:
    """Parse a FineTunePipeline manifest (dict) into the typed model."""
    return FineTunePipeline.model_validate(obj)
