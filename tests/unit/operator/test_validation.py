"""What the operator refuses before creating anything: every problem names the field at fault."""

from __future__ import annotations

import pytest

from kubetune_operator.validation import describe_problems, normalize_body, validate
from tests.unit.operator.builders import ftj


def problems(body) -> list[str]:
    return validate(body)[1]


def test_valid_job_parses():
    job, errs = validate(ftj())
    assert errs == [] and job is not None and job.metadata.name == "demo"


@pytest.mark.parametrize("spec,field", [
    ({"training": {"learningRate": 5}}, "spec.training.learningRate"),
    ({"dataset": {"format": "chat", "train": [{"uri": "chat.jsonl"}]}}, "spec.dataset.train[0].uri"),
    ({"adapter": {"type": "lora", "rnak": 8}}, "spec.adapter.rnak"),
    ({"stage": "dpo"}, "spec.dataset.format"),
    ({"adapter": {"type": "full", "rank": 8}}, "spec.adapter.rank"),
    ({"stage": "grpo", "dataset": {"format": "prompt_only", "train": [{"uri": "s3://d/p.jsonl"}]},
      "training": {"grpo": {"rewards": [{"name": "my_rewards:score"}]}}}, "rewards[0].source"),
    ({"output": {"uri": "pvc://Bad_Claim/x"}}, "spec.output.uri"),
])
def test_problems_name_the_field(spec, field):
    errs = problems(ftj(**spec))
    assert errs, spec
    assert field in describe_problems(errs)
    assert any(e.startswith(field) for e in errs), errs


def test_unknown_field_message_says_so():
    (err,) = problems(ftj(training={"learningRat": 0.1}))
    assert err.startswith("spec.training.learningRat:") and "unknown field" in err


def test_names_the_operator_derives_children_from():
    body = ftj()
    body["metadata"]["name"] = "my.job"
    assert any(e.startswith("metadata.name:") and "DNS label" in e for e in problems(body))
    body = ftj(resources={"gpus": 1, "nodes": 2})
    body["metadata"]["name"] = "7b-run"
    assert any(e.startswith("metadata.name:") and "start with a letter" in e for e in problems(body))
    body["spec"]["resources"]["nodes"] = 1
    assert problems(body) == [], "a single-node job needs no Service, so a leading digit is fine"
    body["metadata"]["name"] = "x" * 51
    assert any("at most 50" in e for e in problems(body))


def test_integer_quantities_are_accepted():
    """The CRD types cpu/memory as int-or-string, so `cpu: 8` arrives as a number."""
    body = ftj(resources={"gpus": 1, "cpu": 8, "memory": "64Gi"})
    job, errs = validate(body)
    assert errs == [] and job.spec.resources.cpu == "8"
    assert body["spec"]["resources"]["cpu"] == 8, "the caller's body is not modified"
    assert normalize_body({"spec": {"resources": {"cpu": True}}})["spec"]["resources"]["cpu"] is True


def test_describe_problems_is_bounded():
    assert len(describe_problems(["spec.x: " + "y" * 5000])) == 2000
