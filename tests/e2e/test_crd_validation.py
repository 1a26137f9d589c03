"""Malformed FineTuneJobs are refused by the real kube-apiserver (schema + CEL), with a message that names the
field and what is allowed; the training spec is immutable while suspend (and, when suspended, resources) are not."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests import api_cases
from tests.e2e.kubetune_fixtures import crd  # noqa: F401

VALID = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid"},
    "spec": {
        "stage": "sft",
        "model": {"source": "s3://models/tiny"},
        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
        "output": {"uri": "s3://results/runs"},
    },
}


def manifest(name: str, **spec) -> dict:
    obj = copy.deepcopy(VALID)
    obj["metadata"]["name"] = name
    obj["spec"].update(spec)
    return obj


def apply(cluster, namespace, obj):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj), check=False)


BAD = [
    ("unknown-stage", {"stage": "finetune"}, ["spec.stage", "Unsupported value", "sft"]),
    ("dpo-chat", {"stage": "dpo"}, ["spec.dataset.format", "stage dpo needs dataset.format preference, got chat"]),
    ("grpo-no-rewards", {"stage": "grpo", "dataset": {"format": "prompt_only", "train": [{"uri": "s3://d/p.jsonl"}]}},
     ["spec.training.grpo", "at least one reward"]),
    ("grpo-empty-rewards", {"stage": "grpo", "dataset": {"format": "prompt_only", "train": [{"uri": "s3://d/p.jsonl"}]},
                            "training": {"grpo": {"rewards": []}}},
     ["spec.training.grpo.rewards", "at least 1"]),
    ("full-with-rank", {"adapter": {"type": "full", "rank": 8}}, ["spec.adapter", "remove rank"]),
    ("lora-with-4bit", {"adapter": {"type": "lora", "quantization": {"quantType": "nf4"}}},
     ["spec.adapter.quantization", "only for type qlora"]),
    ("bad-model-uri", {"model": {"source": "ftp://models/x"}}, ["spec.model.source", "should match"]),
    ("negative-gpus", {"resources": {"gpus": -1}}, ["spec.resources.gpus", "greater than or equal to 0"]),
    ("zero-lr", {"training": {"learningRate": 0}}, ["spec.training.learningRate", "greater than 0"]),
    ("dpo-block-on-sft", {"training": {"dpo": {"beta": 0.2}}}, ["spec.training.dpo", "only for stage dpo"]),
    ("offload-params-zero2", {"distributed": {"deepspeed": {"zeroStage": 2, "offloadParams": True}}},
     ["spec.distributed.deepspeed.offloadParams", "zeroStage 3"]),
    ("ppo-without-reward-model", {"stage": "ppo", "dataset": {"format": "prompt_only", "train": [{"uri": "s3://d/p"}]}},
     ["spec.training.ppo", "rewardModel"]),
    ("missing-output", {"output": None}, ["spec.output", "Required value"]),
]


@pytest.mark.parametrize("name, spec, needles", BAD, ids=[b[0] for b in BAD])
def test_malformed_manifest_is_rejected_with_the_field_named(cluster, namespace, crd, name, spec, needles):
    obj = manifest(name, **spec)
    obj["spec"] = {k: v for k, v in obj["spec"].items() if v is not None}
    result = apply(cluster, namespace, obj)
    assert result.returncode != 0, f"{name} was accepted"
    for needle in needles:
        assert needle in result.stderr, result.stderr
    # nothing half-created
    got = cluster.kubectl("get", "ftj", name, "-n", namespace, check=False)
    assert got.returncode != 0


def test_name_longer_than_50_is_rejected(cluster, namespace, crd):
    result = apply(cluster, namespace, manifest("x" * 51))
    assert result.returncode != 0 and "at most 50 characters" in result.stderr


def test_valid_manifest_gets_schema_defaults(cluster, namespace, crd):
    assert apply(cluster, namespace, manifest("defaults")).returncode == 0
    obj = json.loads(cluster.kubectl("get", "ftj", "defaults", "-n", namespace, "-o", "json").stdout)
    assert obj["spec"]["adapter"]["type"] == "lora"
    assert obj["spec"]["runtimeRef"] == {"kind": "ClusterFineTuneRuntime", "name": "default"}
    assert obj["spec"]["model"]["trustRemoteCode"] is False
    assert obj["spec"]["training"]["learningRate"] == pytest.approx(2e-4)


def test_training_spec_is_immutable_but_suspend_is_not(cluster, namespace, crd):
    assert apply(cluster, namespace, manifest("immutable")).returncode == 0

    def patch(body):
        return cluster.kubectl("patch", "ftj", "immutable", "-n", namespace, "--type", "merge",
                               "-p", json.dumps({"spec": body}), check=False)

    r = patch({"training": {"learningRate": 0.1}})
    assert r.returncode != 0 and "spec.training is immutable" in r.stderr
    r = patch({"model": {"source": "s3://models/other"}})
    assert r.returncode != 0 and "spec.model is immutable" in r.stderr
    r = patch({"evaluation": {"forgettingThreshold": 0.5}})
    assert r.returncode != 0 and "spec.evaluation is immutable" in r.stderr
    r = patch({"resources": {"gpus": 4}})
    assert r.returncode != 0 and "only while the job is suspended" in r.stderr
    assert patch({"suspend": True}).returncode == 0
    assert patch({"resources": {"gpus": 4}}).returncode == 0  # allowed while suspended (Kueue resizes)
    assert patch({"suspend": False}).returncode == 0


def test_kubectl_explain_reads_well(cluster, crd):
    out = cluster.kubectl("explain", "ftj.spec.adapter.rank").stdout
    assert "LoRA rank" in out
    out = cluster.kubectl("explain", "ftj.spec.evaluation.forgettingThreshold").stdout
    assert "perplexity" in out


def test_short_name_and_category(cluster, namespace, crd):
    assert cluster.kubectl("get", "ftj", "-n", namespace).returncode == 0
    assert cluster.kubectl("get", "kubetune", "-n", namespace).returncode == 0


@pytest.mark.parametrize("case", api_cases.ALL, ids=[c.id for c in api_cases.ALL])
def test_apiserver_refuses_what_validate_spec_refuses(cluster, namespace, crd, case):
    """The CEL half of tests/api_cases.py (tests/unit/test_api.py feeds the same manifests to validate_spec)."""
    obj = manifest(case.id, **case.spec)
    result = apply(cluster, namespace, obj)
    assert result.returncode != 0, f"{case.id} was accepted"
    assert case.cel in result.stderr and case.needle in result.stderr, result.stderr
