"""FineTunePipeline API: the stage job is the FineTuneJob spec by composition, the CRD (printer columns, CEL,
descriptions), the stage plan (names, handover, hand-over URIs) and the gate evaluation both the operator
and the local runner use."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune_api import crdgen
from kubetune_api.finetunejob import Artifacts, FineTuneJobSpec, Forgetting, Progress, validate_spec
from kubetune_api.finetunepipeline import (Gate, StageJobSpec, approval_annotation, child_name, evaluate_gate,
                                           handed_over, handover, is_approved, next_model, parse_pipeline, stage_job_spec,
                                           validate_pipeline)
from kubetune_api.resources import FINETUNEPIPELINE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local" / "pipeline-sft-dpo-grpo.yaml"


def manifest() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def pipeline(mutate=None):
    m = manifest()
    if mutate:
        mutate(m["spec"])
    return parse_pipeline(m)


# ------------------------------------------------------------------------------------------------ API shape
def test_stage_job_is_the_finetunejob_spec_without_model():
    """Composition: every FineTuneJob field except the three the pipeline decides flows into a stage."""
    assert set(StageJobSpec.model_fields) == set(FineTuneJobSpec.model_fields) - {"model", "suspend", "resume_from"}
    for name, f in StageJobSpec.model_fields.items():
        assert f.annotation == FineTuneJobSpec.model_fields[name].annotation, name


def test_stage_job_refuses_model_and_unknown_fields():
    def add_model(s):
        s["stages"][0]["job"]["model"] = {"source": "file:///x"}
    with pytest.raises(ValidationError, match="model"):
        pipeline(add_model)


def test_crd_has_progress_columns_and_descriptions():
    crd = crdgen.build_crd(FINETUNEPIPELINE)
    version = crd["spec"]["versions"][0]
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols["Stage"] == ".status.progress" and cols["Status"] == ".status.phase"
    assert crd["spec"]["names"]["shortNames"] == ["ftp"]
    root = version["schema"]["openAPIV3Schema"]
    missing = []

    def walk(node, path):
        if isinstance(node, dict):
            if "type" in node and path.count(".") > 0 and not node.get("description") and not path.endswith("]"):
                missing.append(path)
            for k, v in (node.get("properties") or {}).items():
                walk(v, f"{path}.{k}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")
    walk(root["properties"]["spec"], "spec")
    walk(root["properties"]["status"], "status")
    assert not missing, f"fields without a description (kubectl explain): {missing[:10]}"


def test_crd_defaults_stage_job_objects_so_cel_can_read_them():
    """The handover rules read stages[i-1].job.adapter.type: the apiserver must default adapter to {}."""
    spec = crdgen.spec_schema(FINETUNEPIPELINE)
    job = spec["properties"]["stages"]["items"]["properties"]["job"]["properties"]
    assert job["adapter"]["default"] == {} and job["training"]["default"] == {}
    assert "model" not in job
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("stages[1].handover != 'merge'" in r for r in rules)
    assert spec["properties"]["stages"]["x-kubernetes-list-map-keys"] == ["name"]


# ------------------------------------------------------------------------------------------------ plan
def test_example_is_valid_and_plans_merged_handover():
    p = pipeline()
    assert validate_pipeline(p.spec, p.metadata.name) == []
    assert [handover(p.spec, i) for i in range(3)] == [None, "merge", "merge"]
    sft = stage_job_spec(p.spec, 0, p.spec.model.source)
    assert sft.model.source == p.spec.model.source and sft.output.merged_model is True
    grpo = stage_job_spec(p.spec, 2, "file:///out/dpo/merged")
    assert grpo.model.source == "file:///out/dpo/merged"
    assert grpo.output.merged_model is False  # the last stage hands over nothing
    assert child_name("tiny-stack", "dpo") == "tiny-stack-dpo"


def test_handed_over_uri_follows_the_handover():
    p = pipeline()
    arts = Artifacts(adapter_uri="s3://b/a/adapter", merged_model_uri="s3://b/a/merged")
    assert handed_over(p.spec, 0, arts) == "s3://b/a/merged"
    assert handed_over(p.spec, 2, arts) is None  # last stage

    def full_sft(s):
        s["stages"][0]["job"]["adapter"] = {"type": "full"}
    full = pipeline(full_sft)
    assert handover(full.spec, 1) == "weights"
    assert handed_over(full.spec, 0, arts) == "s3://b/a/adapter"
    assert stage_job_spec(full.spec, 0, "file:///m").output.merged_model is False


# handover continue: each unsupported combination is refused, naming the field and the fix
CONTINUE_CASES = [
    (lambda s: s["stages"][1].update(handover="continue"),
     "spec.stages[1].handover: continue cannot go into stage dpo: the reference model would be the base without "
     "any adapter, not the previous stage's policy; use handover merge: the merged model becomes the reference"),
    (lambda s: (s["stages"][2].update(handover="continue"),
                s["stages"][2]["job"]["training"]["grpo"].update(beta=0.04)),
     "spec.stages[2].handover: continue cannot go into stage grpo with training.grpo.beta 0.04"),
    (lambda s: (s["stages"][2].update(handover="continue"), s["stages"][2]["job"]["adapter"].update(type="dora")),
     "spec.stages[2].handover: continue needs the same adapter type (lora, qlora or dora) in stages[1] and "
     "stages[2], got lora then dora"),
    (lambda s: (s["stages"][2].update(handover="continue"), s["stages"][1]["job"].update(adapter={"type": "full"}),
                s["stages"][2]["job"].update(adapter={"type": "full"})),
     "spec.stages[2].handover: continue needs the same adapter type (lora, qlora or dora) in stages[1] and "
     "stages[2], got full then full"),
    (lambda s: (s["stages"][2].update(handover="continue"), s["stages"][2]["job"]["adapter"].update(init="pissa")),
     "spec.stages[2].handover: continue keeps training the previous stage's adapter, which "
     "spec.stages[2].job.adapter.init cannot re-initialise"),
]


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s["stages"][1].update(handover="weights"), "spec.stages[1].handover: weights needs full weights"),
    (lambda s: (s["stages"][0]["job"].update(adapter={"type": "full"}), s["stages"][1].update(handover="merge")),
     "spec.stages[1].handover: merge needs an adapter"),
    (lambda s: s["stages"][2].update(name="sft"), "stage name 'sft' is used twice"),
    (lambda s: s.update(retryFrom="nope"), "spec.retryFrom: 'nope' is not a stage"),
    (lambda s: s["stages"][1]["gate"].update(maxPerplexity=3.0), "spec.stages[1].gate.maxPerplexity: needs stage"),
    (lambda s: s["stages"][2]["gate"].update(minRewardAccuracy=0.5), "spec.stages[2].gate.minRewardAccuracy"),
    (lambda s: s["stages"][0]["gate"].update(minMeanReward=0.5), "spec.stages[0].gate.minMeanReward"),
    (lambda s: s["stages"][1]["gate"].update(maxForgettingRise=0.1),
     "spec.stages[1].gate.maxForgettingRise: needs spec.stages[1].job.evaluation.reference"),
    (lambda s: s["stages"][1]["job"]["dataset"].update(format="chat"), "spec.stages[1].job.dataset.format"),
    (lambda s: s["stages"][0]["job"].update(stage="reward", dataset={"format": "preference",
                                                                     "train": [{"uri": "file:///p.jsonl"}]},
                                            evaluation=None),
     "spec.stages[0].job.stage: a reward model"),
] + CONTINUE_CASES)
def test_validate_pipeline_names_field_and_fix(mutate, needle):
    p = pipeline(lambda s: mutate(s) and None)
    errors = validate_pipeline(p.spec, p.metadata.name)
    assert any(needle in e for e in errors), errors


def test_long_pipeline_name_is_refused():
    p = pipeline()
    assert any("metadata.name" in e for e in validate_pipeline(p.spec, "x" * 31))


# ------------------------------------------------------------------------------------------------ gates
def test_gate_passes_and_fails_naming_metric_value_threshold():
    gate = Gate(max_eval_loss=2.0, min_reward_accuracy=0.6)
    ok = evaluate_gate(gate, Progress(eval_loss=1.5, reward_accuracy=0.75))
    assert ok.state == "Passed" and all(c.passed for c in ok.checks)
    bad = evaluate_gate(gate, {"evalLoss": 2.5, "rewardAccuracy": 0.75})  # a FineTuneJob status dict
    assert bad.state == "Failed"
    assert "evalLoss 2.5 > 2 (gate.maxEvalLoss)" in bad.message
    assert [c.metric for c in bad.checks if not c.passed] == ["evalLoss"]


def test_gate_boundary_is_inclusive_and_forgetting_reads_relative_change():
    gate = Gate(max_forgetting_rise=0.1, min_mean_reward=0.5)
    assert evaluate_gate(gate, Progress(mean_reward=0.5), Forgetting(relative_change=0.1)).state == "Passed"
    v = evaluate_gate(gate, Progress(mean_reward=0.5), {"relativeChange": 0.25})
    assert v.state == "Failed" and "forgettingRise 0.25 > 0.1 (gate.maxForgettingRise)" in v.message


def test_unreported_metric_fails_the_gate():
    v = evaluate_gate(Gate(min_mean_reward=0.1), Progress(eval_loss=1.0))
    assert v.state == "Failed" and "meanReward not reported" in v.message


def test_manual_approval_waits_then_passes_but_never_overrides_a_failed_metric():
    gate = Gate(max_eval_loss=2.0, manual_approval=True)
    assert evaluate_gate(gate, Progress(eval_loss=1.0)).state == "AwaitingApproval"
    assert evaluate_gate(gate, Progress(eval_loss=1.0), approved=True).state == "Passed"
    assert evaluate_gate(gate, Progress(eval_loss=3.0), approved=True).state == "Failed"
    ann = {approval_annotation("sft"): "Approved"}
    assert is_approved(ann, "sft") and not is_approved(ann, "dpo") and not is_approved(None, "sft")


def test_no_gate_passes():
    assert evaluate_gate(None, None).state == "Passed"


# ------------------------------------------------------------------------------------------------ continue
def _continue_grpo(s):
    """dpo (lora) -> grpo (lora, beta 0: no reference model) continues dpo's adapter."""
    s["stages"][2]["handover"] = "continue"


def test_continue_trains_the_previous_adapter_on_the_base_the_previous_stage_trained():
    p = pipeline(_continue_grpo)
    assert validate_pipeline(p.spec, p.metadata.name) == []
    assert [handover(p.spec, i) for i in range(3)] == [None, "merge", "continue"]
    dpo_base = "file:///out/sft/merged"
    dpo = stage_job_spec(p.spec, 1, dpo_base)
    assert dpo.output.merged_model is False  # grpo continues the adapter: no merged model needed
    arts = Artifacts(adapter_uri="file:///out/dpo/adapter", merged_model_uri=None)
    uri = handed_over(p.spec, 1, arts)
    assert uri == "file:///out/dpo/adapter"
    assert next_model(p.spec, 1, dpo_base, uri) == (dpo_base, "file:///out/dpo/adapter")
    assert next_model(p.spec, 0, p.spec.model.source, "file:///out/sft/merged") == ("file:///out/sft/merged", None)
    grpo = stage_job_spec(p.spec, 2, *next_model(p.spec, 1, dpo_base, uri))
    assert grpo.model.source == dpo_base and grpo.model.adapter == "file:///out/dpo/adapter"
    assert validate_spec(grpo) == []  # the child FineTuneJob passes its own rules


def test_continue_from_the_first_stage_keeps_the_pipelines_tokenizer_and_revision():
    def cpt_sft(s):
        s["model"].update(tokenizer="file:///tok", revision="main")
        s["stages"][1] = {**s["stages"][0], "name": "sft2", "handover": "continue"}
        del s["stages"][2]
    p = pipeline(cpt_sft)
    assert validate_pipeline(p.spec, p.metadata.name) == []
    assert stage_job_spec(p.spec, 0, p.spec.model.source).output.merged_model is False
    second = stage_job_spec(p.spec, 1, *next_model(p.spec, 0, p.spec.model.source, "file:///o/sft/adapter"))
    assert (second.model.source, second.model.adapter) == (p.spec.model.source, "file:///o/sft/adapter")
    assert (second.model.tokenizer, second.model.revision) == ("file:///tok", "main")
    # a merged model carries its own tokenizer: dropped there, as before
    merged = stage_job_spec(p.spec, 1, "file:///o/sft/merged")
    assert merged.model.tokenizer is None and merged.model.adapter is None




def test_continue_cel_rules_per_stage_index():
    """One rule per index for each continue check (CEL has no index loop), with the fix in the message; the
    real apiserver runs them in tests/e2e (test_pipeline_end_to_end's admission test)."""
    spec = crdgen.spec_schema(FINETUNEPIPELINE)
    rules = spec["x-kubernetes-validations"]
    for i in range(1, 8):
        mine = [r for r in rules if f"self.stages[{i}].handover != 'continue'" in r["rule"]]
        assert len(mine) == 3, (i, mine)
        same, ref, init = mine
        assert f"self.stages[{i}].job.adapter.type == self.stages[{i - 1}].job.adapter.type" in same["rule"]
        assert f"self.stages[{i}].job.stage in ['dpo', 'kto']" in ref["rule"]
        assert f"self.stages[{i}].job.training.grpo.beta > 0.0" in ref["rule"]
        assert "use handover merge: the merged model becomes the reference" in ref["message"]
        assert f"!has(self.stages[{i}].job.adapter.init)" in init["rule"]
    enum = spec["properties"]["stages"]["items"]["properties"]["handover"]["enum"]
    assert set(enum) == {"continue", "merge", "weights"}
