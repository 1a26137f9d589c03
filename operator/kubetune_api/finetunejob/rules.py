"""The FineTuneJob's cross-field rules, in both of the forms they are enforced: CEL (the apiserver refuses a
bad manifest at `kubectl apply`) and `validate_spec()` (the operator before rendering, the trainer before
training, and `kubetune run`, which never meets an apiserver).

One place for both: the stage/format and stage/block rules are generated from the same tables
(`STAGE_FORMATS`, `STAGE_BLOCKS`); the hand-written pairs are checked against each other by
tests/unit/test_api.py (static coverage) and tests/e2e/test_crd_validation.py (the real apiserver), which
feed both sides the same malformed manifests (tests/api_cases.py). Rules only one side can express are
marked as such below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cel import cel
from ..common import uri_problem

if TYPE_CHECKING:  # the spec module imports this one to attach the CEL rules
    from .spec import FineTuneJobSpec

# Which dataset formats each stage accepts. Used by CEL (rendered into the rule) and by validate_spec().
STAGE_FORMATS: dict[str, list[str]] = {
    "cpt": ["text"],
    "sft": ["chat", "prompt_completion", "text"],
    "dpo": ["preference"],
    "orpo": ["preference"],
    "kto": ["unpaired_preference", "preference"],
    "grpo": ["prompt_only"],
    "rloo": ["prompt_only"],
    "ppo": ["prompt_only"],
    "reward": ["preference"],
}

STAGE_BLOCKS = ["dpo", "orpo", "kto", "grpo", "rloo", "ppo", "reward"]

# Adapter types trained as a PEFT adapter: the only ones that can start from a saved adapter (model.adapter).
PEFT_ADAPTER_TYPES = ["lora", "qlora", "dora"]


def base_reference_cel(job: str) -> str:
    """CEL, true when the job at `job` (self, self.stages[i].job) trains against a reference policy: with PEFT
    that reference is the base with the adapter disabled, so it cannot start from a trained adapter (the
    reference would silently be the base, not the adapter's policy). dpo and kto always; grpo and rloo when
    their KL term is on (beta > 0); ppo when klCoef > 0. `base_reference` is the same test in Python."""
    return (f"({job}.stage in ['dpo', 'kto'] || "
            f"({job}.stage == 'grpo' && has({job}.training.grpo) && {job}.training.grpo.beta > 0.0) || "
            f"({job}.stage == 'rloo' && has({job}.training.rloo) && {job}.training.rloo.beta > 0.0) || "
            f"({job}.stage == 'ppo' && has({job}.training.ppo) && {job}.training.ppo.klCoef > 0.0))")


def base_reference(job) -> str | None:
    """Why the job (a FineTuneJobSpec or a pipeline's StageJobSpec) trains against a reference policy, in words
    ("stage dpo", "stage grpo with training.grpo.beta 0.04"), or None (see base_reference_cel)."""
    stage, t = str(job.stage), job.training
    if stage in ("dpo", "kto"):
        return f"stage {stage}"
    for name, block, attr, field in (("grpo", t.grpo, "beta", "beta"), ("rloo", t.rloo, "beta", "beta"),
                                     ("ppo", t.ppo, "kl_coef", "klCoef")):
        if stage == name and block is not None and getattr(block, attr) > 0:
            return f"stage {stage} with training.{name}.{field} {getattr(block, attr):g}"
    return None


REFERENCE_FIX = ("its reference model would be the base without the adapter, not the adapter's policy; merge the "
                 "adapter into the base (output.mergedModel of the job that trained it) and train on the merged model, "
                 "which then is the reference")

# Rules on model.adapter (FineTuneJobSpec only: a pipeline stage has no model; the pipeline's handover rules
# say the same for handover continue).
SPEC_MODEL_RULES = [
    cel(f"!has(self.model.adapter) || self.adapter.type in {PEFT_ADAPTER_TYPES!r}",
        "model.adapter (a trained PEFT adapter to start from) needs adapter.type lora, qlora or dora; full and "
        "galore train every weight: set model.source to the full model instead", field_path=".model.adapter"),
    cel(f"!has(self.model.adapter) || !{base_reference_cel('self')}",
        "model.adapter cannot start dpo, kto, or grpo/rloo/ppo with a KL penalty: " + REFERENCE_FIX,
        field_path=".model.adapter"),
    cel("!has(self.model.adapter) || !has(self.adapter.init)",
        "adapter.init is for a new adapter; the adapter starts from model.adapter: remove adapter.init",
        field_path=".adapter.init"),
]

_IMMUTABLE = ["stage", "model", "dataset", "training", "adapter", "evaluation", "output", "distributed", "resumeFrom"]
_OPTIONAL_IMMUTABLE = ["evaluation", "distributed", "resumeFrom"]

SPEC_RULES = [
    # Immutability: what was trained must be what the spec says. Only suspend and scheduling fields change.
    *[cel(f"self.{f} == oldSelf.{f}", f"spec.{f} is immutable once the job exists; create a new FineTuneJob",
          field_path=f".{f}", reason="FieldValueForbidden") for f in _IMMUTABLE if f not in _OPTIONAL_IMMUTABLE],
    *[cel(f"has(self.{f}) == has(oldSelf.{f}) && (!has(self.{f}) || self.{f} == oldSelf.{f})",
          f"spec.{f} is immutable once the job exists; create a new FineTuneJob", field_path=f".{f}",
          reason="FieldValueForbidden") for f in _OPTIONAL_IMMUTABLE],
    cel("oldSelf.suspend == true || self.resources == oldSelf.resources",
        "spec.resources can change only while the job is suspended (set spec.suspend: true first)",
        field_path=".resources", reason="FieldValueForbidden"),
]

# Rules that do not compare with oldSelf (the CRD generator puts them in a separate list entry).
SPEC_CREATE_RULES = [
    *[{**cel(f"self.stage != '{stage}' || self.dataset.format in {formats!r}",
             f"stage {stage} needs dataset.format {' or '.join(formats)}", field_path=".dataset.format"),
       "messageExpression": f"'stage {stage} needs dataset.format {' or '.join(formats)}, got ' + self.dataset.format"}
      for stage, formats in STAGE_FORMATS.items()],
    *[cel(f"!has(self.training.{b}) || self.stage == '{b}'",
          f"spec.training.{b} is only for stage {b}; remove it or set stage: {b}", field_path=f".training.{b}",
          reason="FieldValueForbidden") for b in STAGE_BLOCKS],
    cel("self.stage != 'grpo' || has(self.training.grpo)",
        "stage grpo needs spec.training.grpo.rewards (at least one reward function, e.g. {name: exact_match})",
        field_path=".training.grpo", reason="FieldValueRequired"),
    cel("self.stage != 'ppo' || has(self.training.ppo)",
        "stage ppo needs spec.training.ppo.rewardModel (a reward model URI)", field_path=".training.ppo",
        reason="FieldValueRequired"),
    cel("self.stage != 'rloo' || (has(self.training.rloo) && (has(self.training.rloo.rewardModel) || "
        "(has(self.training.rloo.rewards) && size(self.training.rloo.rewards) > 0)))",
        "stage rloo needs spec.training.rloo.rewardModel or at least one entry in spec.training.rloo.rewards",
        field_path=".training.rloo", reason="FieldValueRequired"),
    cel("self.stage != 'reward' || !has(self.evaluation) || !has(self.evaluation.reference)",
        "the forgetting check measures language-model perplexity; stage reward trains a classifier: remove "
        "evaluation.reference", field_path=".evaluation.reference", reason="FieldValueForbidden"),
    cel("!has(self.dataset.eval) || !has(self.dataset.evalFraction)",
        "set either dataset.eval or dataset.evalFraction, not both", field_path=".dataset.evalFraction"),
    cel("!has(self.distributed) || self.distributed.backend != 'nccl' || self.resources.gpus > 0",
        "backend nccl needs GPUs (resources.gpus >= 1); use gloo or auto", field_path=".distributed.backend"),
    cel("!has(self.distributed) || !has(self.distributed.deepspeed) || self.adapter.type != 'qlora' || "
        "self.distributed.deepspeed.zeroStage != 3",
        "qlora cannot be combined with DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned); use zeroStage 2",
        field_path=".distributed.deepspeed.zeroStage"),
]


# --------------------------------------------------------------------------------------------------------
# The Python side: called by the operator (PermanentError) and by the trainer before training. It repeats the
# CEL rules above that `kubetune run` must also enforce (no apiserver there) and adds what CEL cannot do (or
# should not, for cost): custom rewards need a source. CEL-only (the apiserver is the only
# gate; not repeated here): immutability, eval vs evalFraction, qlora with ZeRO-3, offloadParams below ZeRO-3,
# core/v1's rules on pod fields (a local run has no pods).
# --------------------------------------------------------------------------------------------------------
def uri_fields(spec: FineTuneJobSpec) -> list[tuple[str, str, bool]]:
    """Every URI the job reads or writes, as (field path in the manifest, uri, writable)."""
    out: list[tuple[str, str, bool]] = [("spec.model.source", spec.model.source, False)]
    if spec.model.tokenizer:
        out.append(("spec.model.tokenizer", spec.model.tokenizer, False))
    if spec.model.adapter:
        out.append(("spec.model.adapter", spec.model.adapter, False))
    out += [(f"spec.dataset.train[{i}].uri", s.uri, False) for i, s in enumerate(spec.dataset.train)]
    out += [(f"spec.dataset.eval[{i}].uri", s.uri, False) for i, s in enumerate(spec.dataset.eval or [])]
    if spec.evaluation and spec.evaluation.reference:
        out += [(f"spec.evaluation.reference[{i}].uri", s.uri, False)
                for i, s in enumerate(spec.evaluation.reference)]
    t = spec.training
    for stage, block in (("grpo", t.grpo), ("rloo", t.rloo)):
        for i, reward in enumerate((getattr(block, "rewards", None) or []) if block else []):
            if reward.source:
                out.append((f"spec.training.{stage}.rewards[{i}].source", reward.source, False))
    if t.rloo and t.rloo.reward_model:
        out.append(("spec.training.rloo.rewardModel", t.rloo.reward_model, False))
    if t.ppo:
        out.append(("spec.training.ppo.rewardModel", t.ppo.reward_model, False))
    if spec.resume_from and "://" in spec.resume_from:
        out.append(("spec.resumeFrom", spec.resume_from, False))
    out.append(("spec.output.uri", spec.output.uri, True))
    return out


def validate_spec(spec: FineTuneJobSpec) -> list[str]:
    """The cross-field problems of `spec` as "field: problem; fix" strings (empty when valid)."""
    errors: list[str] = []
    for field, uri, _ in uri_fields(spec):  # the URI_SAFETY CEL rules, for `kubetune run` and the operator
        problem = uri_problem(uri)
        if problem:
            errors.append(f"{field}: {problem} (got {uri!r})")
    stage = spec.stage
    fmt = spec.dataset.format
    if fmt not in STAGE_FORMATS[stage]:
        errors.append(f"spec.dataset.format: stage {stage} needs one of {STAGE_FORMATS[stage]}, got {fmt}")
    for block in STAGE_BLOCKS:
        if getattr(spec.training, block) is not None and block != stage:
            errors.append(f"spec.training.{block}: only for stage {block}; remove it or set stage: {block}")
    if stage == "grpo" and (spec.training.grpo is None or not spec.training.grpo.rewards):
        errors.append("spec.training.grpo.rewards: stage grpo needs at least one reward function")
    if stage == "ppo" and spec.training.ppo is None:
        errors.append("spec.training.ppo.rewardModel: stage ppo needs a reward model URI")
    if stage == "rloo":
        r = spec.training.rloo
        if r is None or (r.reward_model is None and not r.rewards):
            errors.append("spec.training.rloo: stage rloo needs rewardModel or rewards")
    a = spec.adapter
    lora_fields = {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "targetModules": a.target_modules,
                   "useRslora": a.use_rslora, "init": a.init}
    if a.type in ("full", "galore"):
        bad = [k for k, v in lora_fields.items() if v is not None]
        if bad:
            errors.append(f"spec.adapter.{bad[0]}: not allowed with adapter type {a.type} (remove {', '.join(bad)})")
    if a.quantization is not None and a.type != "qlora":
        errors.append("spec.adapter.quantization: only for adapter type qlora")
    if a.galore is not None and a.type != "galore":
        errors.append("spec.adapter.galore: only for adapter type galore")
    if spec.model.adapter:
        if a.type not in PEFT_ADAPTER_TYPES:
            errors.append(f"spec.model.adapter: a trained PEFT adapter to start from needs adapter.type lora, qlora "
                          f"or dora, got {a.type} (which trains every weight): set model.source to the full model "
                          "instead")
        else:
            why = base_reference(spec)
            if why:
                errors.append(f"spec.model.adapter: cannot start {why} from a trained adapter: {REFERENCE_FIX}")
            if a.init is not None:
                errors.append("spec.adapter.init: for a new adapter only; this job starts from spec.model.adapter: "
                              "remove adapter.init")
    if stage == "reward" and spec.evaluation and spec.evaluation.reference:
        errors.append("spec.evaluation.reference: the forgetting check measures language-model perplexity, but "
                      "stage reward trains a sequence classifier; remove evaluation.reference")
    rewards = (spec.training.grpo.rewards if spec.training.grpo else []) + (
        spec.training.rloo.rewards or [] if spec.training.rloo else [])
    for i, r in enumerate(rewards):
        custom = ":" in r.name
        if custom and not r.source:
            errors.append(f"rewards[{i}].source: custom reward '{r.name}' needs source (a .py file or folder URI)")
    if spec.distributed and spec.distributed.backend == "nccl" and spec.resources.gpus == 0:
        errors.append("spec.distributed.backend: backend nccl needs GPUs (resources.gpus >= 1); use gloo or auto")
    return errors
