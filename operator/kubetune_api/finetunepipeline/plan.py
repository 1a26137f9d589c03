"""How a pipeline turns into FineTuneJobs, pure and torch-free, shared by the operator and the local runner:
the child's deterministic name, the effective handover between stages, the FineTuneJob spec of stage i given
the model (and, for continue, the adapter) the previous stage handed over, what a finished stage hands over,
and the cross-stage checks (the CEL rules of spec.py in Python, plus each stage's own FineTuneJob rules).

Supported handovers (anything else is refused at admission and by `validate_pipeline`):

| previous stage trained | handover | this stage trains                   | on                                           |
|------------------------|----------|-------------------------------------|----------------------------------------------|
| lora, qlora, dora      | continue | the same adapter type, further (*)  | the previous stage's base + its adapter      |
|                        |          |                                     | (model.source + model.adapter)               |
| lora, qlora, dora      | merge    | a new adapter, or all weights       | the previous adapter merged into its base    |
|                        |          |                                     | (the previous stage writes mergedModel)      |
| full, galore           | weights  | a new adapter, or all weights       | the previous stage's full model              |
| reward (any adapter)   | -        | refused: a reward model is a classifier                                            |

(*) not into dpo, kto, or grpo/rloo/ppo with a KL penalty (beta / klCoef > 0), and without adapter.init.

Why continue is refused into dpo, kto and KL-penalised RL: with an adapter, their reference policy is the
network with the adapter disabled, which for a continued adapter is the bare base, not the previous stage's
policy. After merge the merged model is both the start and the reference.
"""

from __future__ import annotations

from typing import Optional

from ..finetunejob import FineTuneJobSpec, validate_spec
from ..finetunejob.status import Artifacts
from ..finetunejob.rules import base_reference
from .spec import ADAPTER_TYPES, FULL_TYPES, PIPELINE_NAME_MAX, FineTunePipelineSpec, Handover

PIPELINE_LABEL = "kubetune.dev/pipeline"
STAGE_NAME_LABEL = "kubetune.dev/pipeline-stage"


def child_name(pipeline: str, stage: str) -> str:
    """The stage's FineTuneJob: deterministic, so a re-run reconcile finds what an earlier one created."""
    return f"{pipeline}-{stage}"


def handover(spec: FineTunePipelineSpec, i: int) -> Optional[str]:
    """How stage i builds on stage i-1 (None for the first stage): the explicit value, else what the previous
    stage's adapter type implies."""
    if i == 0:
        return None
    explicit = spec.stages[i].handover
    if explicit:
        return str(explicit)
    prev = str(spec.stages[i - 1].job.adapter.type)
    return Handover.WEIGHTS.value if prev in FULL_TYPES else Handover.MERGE.value


def validate_pipeline(spec: FineTunePipelineSpec, name: Optional[str] = None) -> list[str]:
    """Every problem as "field: problem; fix" (empty when valid): what the CRD's CEL refuses, for the local
    runner and for objects stored before a rule existed; plus each stage's FineTuneJob rules (validate_spec)."""
    errors: list[str] = []
    if name is not None and len(name) > PIPELINE_NAME_MAX:
        errors.append(f"metadata.name: at most {PIPELINE_NAME_MAX} characters (stage FineTuneJobs are named "
                      f"<pipeline>-<stage>), got {len(name)}")
    names = [s.name for s in spec.stages]
    for n in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"spec.stages: stage name {n!r} is used twice; stage names must be unique")
    if spec.retry_from is not None and spec.retry_from not in names:
        errors.append(f"spec.retryFrom: {spec.retry_from!r} is not a stage of this pipeline ({', '.join(names)})")
    for i, stage in enumerate(spec.stages):
        where = f"spec.stages[{i}]"
        if i > 0:
            prev = spec.stages[i - 1].job
            if str(prev.stage) == "reward":
                errors.append(f"spec.stages[{i - 1}].job.stage: a reward model (a classifier) cannot be trained on "
                              "by a later stage; make it the last stage")
            explicit = stage.handover
            ptype = str(prev.adapter.type)
            if explicit == Handover.MERGE and ptype not in ADAPTER_TYPES:
                errors.append(f"{where}.handover: merge needs an adapter in stages[{i - 1}], which trains {ptype} "
                              "weights; use weights (or omit handover)")
            if explicit == Handover.WEIGHTS and ptype not in FULL_TYPES:
                errors.append(f"{where}.handover: weights needs full weights in stages[{i - 1}], which trains a "
                              f"{ptype} adapter; use merge (or omit handover)")
            if explicit == Handover.CONTINUE:
                ctype = str(stage.job.adapter.type)
                if ptype not in ADAPTER_TYPES or ctype != ptype:
                    errors.append(f"{where}.handover: continue needs the same adapter type (lora, qlora or dora) in "
                                  f"stages[{i - 1}] and stages[{i}], got {ptype} then {ctype}; to change the type, "
                                  "or after full weights, use merge or weights")
                why = base_reference(stage.job)
                if why:
                    errors.append(f"{where}.handover: continue cannot go into {why}: the reference model would be "
                                  "the base without any adapter, not the previous stage's policy; use handover "
                                  "merge: the merged model becomes the reference")
                if stage.job.adapter.init is not None:
                    errors.append(f"{where}.handover: continue keeps training the previous stage's adapter, which "
                                  f"{where}.job.adapter.init cannot re-initialise: remove it")
        g = stage.gate
        st = str(stage.job.stage)
        if g is not None:
            if g.max_perplexity is not None and st not in ("cpt", "sft"):
                errors.append(f"{where}.gate.maxPerplexity: needs stage cpt or sft, got {st}")
            if g.min_reward_accuracy is not None and st not in ("dpo", "orpo", "reward"):
                errors.append(f"{where}.gate.minRewardAccuracy: needs stage dpo, orpo or reward, got {st}")
            if g.min_reward_margin is not None and st not in ("dpo", "orpo", "kto", "reward"):
                errors.append(f"{where}.gate.minRewardMargin: needs stage dpo, orpo, kto or reward, got {st}")
            if g.min_mean_reward is not None and st not in ("grpo", "rloo", "ppo"):
                errors.append(f"{where}.gate.minMeanReward: needs stage grpo, rloo or ppo, got {st}")
            if g.max_forgetting_rise is not None and not (stage.job.evaluation and stage.job.evaluation.reference):
                errors.append(f"{where}.gate.maxForgettingRise: needs {where}.job.evaluation.reference (general-"
                              "domain text for the forgetting check)")
        job = stage_job_spec(spec, i, spec.model.source)
        errors += [f"{where}.job.{e[len('spec.'):]}" if e.startswith("spec.") else f"{where}.job: {e}"
                   for e in validate_spec(job)]
    return errors


def stage_job_spec(spec: FineTunePipelineSpec, i: int, model_source: str,
                   model_adapter: Optional[str] = None) -> FineTuneJobSpec:
    """Stage i's FineTuneJob spec, training `model_source` (the pipeline's model for stage 0, the previous
    stage's hand-over otherwise), starting from `model_adapter` (handover continue: the previous stage's
    adapter, on the base it trained on). A stage whose successor takes a merged model writes one (mergedModel)."""
    stage = spec.stages[i]
    data = stage.job.model_dump(by_alias=True, exclude_none=True, mode="json")
    model = spec.model.model_dump(by_alias=True, exclude_none=True, mode="json")
    if i > 0 and (model_adapter is None or model_source != spec.model.source):
        # a merged or full model carries its own tokenizer (the trainer saves it beside the weights); revision
        # names an hf:// revision of the pipeline's model, not of a stage's output. (continue from stage 0's
        # adapter trains the pipeline's own model again: tokenizer and revision stay.)
        model = {**model, "source": model_source}
        model.pop("tokenizer", None)
        model.pop("revision", None)
    if model_adapter:
        model["adapter"] = model_adapter
    data["model"] = model
    if i + 1 < len(spec.stages) and handover(spec, i + 1) == Handover.MERGE.value:
        data.setdefault("output", {})["mergedModel"] = True
    return FineTuneJobSpec.model_validate(data)


def handed_over(spec: FineTunePipelineSpec, i: int, artifacts: Optional[Artifacts]) -> Optional[str]:
    """The URI stage i hands to stage i+1 (None when its artifacts do not name it yet): the merged model
    (merge), the whole model (weights) or the adapter (continue)."""
    if artifacts is None or i + 1 >= len(spec.stages):
        return None
    if handover(spec, i + 1) == Handover.MERGE.value:
        return artifacts.merged_model_uri
    return artifacts.adapter_uri  # continue: the adapter; full / galore: the "adapter" folder is the whole model


def next_model(spec: FineTunePipelineSpec, i: int, model_source: str, uri: str) -> tuple[str, Optional[str]]:
    """(model.source, model.adapter) of stage i+1, given the base stage i trained on and what stage i handed
    over (`handed_over`): continue keeps the base and starts from the adapter; merge and weights train the
    handed-over model with a new adapter (or all weights)."""
    if handover(spec, i + 1) == Handover.CONTINUE.value:
        return model_source, uri
    return uri, None
