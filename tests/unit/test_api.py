"""The API models are the single source of truth: crds/ must match them, every field must explain itself in
`kubectl explain`, and invalid specs must be refused with the field named."""

from __future__ import annotations

import re

import copy

import pytest
import yaml
from pydantic import ValidationError

from kubetune_api import crdgen
from tests import api_cases
from kubetune_api.finetunejob import FineTuneJobSpec, parse_job, validate_spec

BASE = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "stage": "sft",
        "model": {"source": "s3://models/tiny"},
        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
        "output": {"uri": "s3://results/runs"},
    },
}


def job(**spec_overrides):
    obj = copy.deepcopy(BASE)
    obj["spec"].update(spec_overrides)
    return obj


def test_committed_crd_matches_models():
    assert crdgen.main(["--check"]) == 0, "crds/ drifted from the models: run python -m kubetune_api.crdgen"


def test_crd_files_are_identical_and_parse():
    texts = [p.read_text() for p in crdgen.OUTPUTS]
    assert texts[0] == texts[1]
    crd = yaml.safe_load(texts[0])
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert crd["spec"]["names"]["categories"] == ["kubetune"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for wanted in ("Stage", "Adapter", "Status", "Progress", "Loss", "PPL", "Age"):
        assert wanted in columns


def _walk(node, path=""):
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{path}.{name}", sub
            yield from _walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")


def test_every_spec_and_status_field_is_described():
    crd = crdgen.build_crd()
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing = [p for p, sub in _walk(root) if not sub.get("description") and not p.startswith(".metadata")]
    assert not missing, f"fields without a description (kubectl explain would be empty): {missing}"


def test_schema_is_structural():
    """No $ref / anyOf-with-null / 2020-12 numeric exclusives: the apiserver would refuse the CRD."""
    text = yaml.safe_dump(crdgen.build_crd())
    assert "$ref" not in text and "'null'" not in text and "type: 'null'" not in text
    crd = crdgen.build_crd()
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, sub in _walk(root):
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in sub:
                assert isinstance(sub[key], bool), path
        if "anyOf" in sub:
            pytest.fail(f"{path} uses anyOf")


def test_spec_strings_are_bounded_for_cel_cost():
    root = crdgen.spec_schema()
    unbounded = [p for p, sub in _walk(root) if sub.get("type") == "string" and "maxLength" not in sub
                 and "enum" not in sub]
    assert not unbounded, unbounded


def test_minimal_job_gets_defaults():
    j = parse_job(job())
    assert j.spec.adapter.type == "lora"
    assert j.spec.training.learning_rate == pytest.approx(2e-4)
    assert j.spec.resources.gpus == 1
    assert (j.spec.runtime_ref.kind, j.spec.runtime_ref.name) == ("ClusterFineTuneRuntime", "default")
    assert j.spec.model.trust_remote_code is False
    assert validate_spec(j.spec) == []


def test_camel_case_round_trip():
    j = parse_job(job(training={"learningRate": 1e-3, "maxSteps": 10, "gradientAccumulationSteps": 2}))
    wire = j.spec.to_k8s()
    assert wire["training"]["learningRate"] == 1e-3 and wire["training"]["maxSteps"] == 10
    assert FineTuneJobSpec.model_validate(wire) == j.spec


@pytest.mark.parametrize("overrides, field", [
    ({"stage": "finetune"}, "stage"),
    ({"model": {"source": "ftp://x"}}, "model.source"),
    ({"training": {"learningRate": -1}}, "training.learningRate"),
    ({"adapter": {"type": "lora", "rank": 0}}, "adapter.rank"),
    ({"resources": {"gpus": -1}}, "resources.gpus"),
    ({"output": {"uri": "hf://org/model"}}, "output.uri"),
    ({"training": {"learningRate": 1e-4, "bogus": 1}}, "training.bogus"),
])
def test_schema_errors_name_the_field(overrides, field):
    with pytest.raises(ValidationError) as err:
        parse_job(job(**overrides))
    locs = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    assert any(field in loc for loc in locs), locs


@pytest.mark.parametrize("overrides, needle", [
    ({"stage": "dpo"}, "spec.dataset.format"),
    ({"stage": "grpo", "dataset": {"format": "prompt_only", "train": [{"uri": "file:///d"}]}}, "spec.training.grpo.rewards"),
    ({"stage": "ppo", "dataset": {"format": "prompt_only", "train": [{"uri": "file:///d"}]}}, "spec.training.ppo"),
    ({"stage": "rloo", "dataset": {"format": "prompt_only", "train": [{"uri": "file:///d"}]}}, "spec.training.rloo"),
    ({"adapter": {"type": "full", "rank": 8}}, "spec.adapter.rank"),
    ({"adapter": {"type": "galore", "targetModules": ["q_proj"]}}, "spec.adapter.targetModules"),
    ({"adapter": {"type": "lora", "quantization": {"quantType": "nf4"}}}, "spec.adapter.quantization"),
    ({"training": {"dpo": {"beta": 0.2}}}, "spec.training.dpo"),
])
def test_cross_field_rules_name_the_field(overrides, needle):
    errors = validate_spec(parse_job(job(**overrides)).spec)
    assert any(e.startswith(needle) for e in errors), errors


def test_custom_reward_needs_source():
    spec = job(stage="grpo", dataset={"format": "prompt_only", "train": [{"uri": "file:///d"}]},
               training={"grpo": {"rewards": [{"name": "my_rewards:score"}]}})
    errors = validate_spec(parse_job(spec).spec)
    assert any("rewards[0].source" in e for e in errors), errors


def test_cel_rules_mirror_python_rules():
    """Every stage/format pairing enforced in Python is also a CEL rule (the apiserver refuses first)."""
    rules = [r["rule"] for r in crdgen.spec_schema()["x-kubernetes-validations"]]
    from kubetune_api.finetunejob import STAGE_FORMATS
    for stage in STAGE_FORMATS:
        assert any(f"self.stage != '{stage}'" in r and "dataset.format" in r for r in rules), stage
    assert any("oldSelf" in r for r in rules), "immutability rules missing"


# ---- One rule set, two enforcers: the same malformed manifests (tests/api_cases.py) go to validate_spec()
# here and to the real apiserver in tests/e2e/test_crd_validation.py; here we also check that every CEL rule
# has a case and every case a CEL rule, so a rule added on one side only fails a test.
def _cel_rules(node, path="spec"):
    """(field the apiserver names, rule) for every spec rule that does not compare with oldSelf."""
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"]:
            yield path + rule.get("fieldPath", ""), rule
    for name, sub in node.get("properties", {}).items():
        yield from _cel_rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        # the apiserver names list items by index; cases put the offending item first
        yield from _cel_rules(node["items"], f"{path}[0]")


def _case_job(case):
    return {**BASE, "spec": {**BASE["spec"], **case.spec}}


def _covers(case, field, rule):
    # the apiserver names list items with their index (train[0]); compare paths without the indexes
    def bare(path: str) -> str:
        return re.sub(r"\[\d+\]", "", path)
    return bare(field) == bare(case.cel) and case.needle in rule["message"]


@pytest.mark.parametrize("case", api_cases.ALL, ids=[c.id for c in api_cases.ALL])
def test_validate_spec_refuses_what_cel_refuses(case):
    spec = parse_job(_case_job(case)).spec  # schema-valid: only a cross-field rule is broken
    errors = validate_spec(spec)
    if case.python is None:
        assert errors == [], f"{case.id} is now checked in Python too: set its `python` field in api_cases"
    else:
        assert any(e.startswith(case.python) for e in errors), errors
        assert len(errors) == 1, f"{case.id} should break one rule only: {errors}"


@pytest.mark.parametrize("case", api_cases.ALL, ids=[c.id for c in api_cases.ALL])
def test_every_case_has_a_cel_rule(case):
    rules = list(_cel_rules(crdgen.spec_schema()))
    assert any(_covers(case, f, r) for f, r in rules), f"no CEL rule at {case.cel} saying '{case.needle}'"


def test_every_cel_rule_has_a_case():
    # A model used in several places (core/v1 affinity terms, reward functions) carries the same rule at each:
    # one case for the rule, at any of its places, covers it.
    places: dict[tuple, list] = {}
    for field, rule in _cel_rules(crdgen.spec_schema()):
        places.setdefault((rule["rule"], rule["message"]), []).append((field, rule))
    for found in places.values():
        field, rule = found[0]
        assert any(_covers(c, f, r) for c in api_cases.ALL for f, r in found), (
            f"CEL rule at {field} ({rule['message']}) has no case in tests/api_cases.py: add one, saying whether "
            "validate_spec() repeats it")
