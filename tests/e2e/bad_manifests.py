"""A corpus of malformed FineTuneJobs, each with the field its error must name. Every one must end either
refused by the API server at admission (schema, CEL) or Failed by the operator (InvalidSpec,
InvalidPodTemplate, ConfigTooLarge) -- never a retry loop, a silent hang or a pod. Which of the two depends on
how much of the rule the CRD can state; the sweep (test_bad_inputs.py) accepts either but insists on the field.

Each entry: (name, {dotted path under spec: value, ...}, field the message must name). A value of DELETE
removes the key. Paths index lists with [i].
"""

from __future__ import annotations

import copy
import re
from typing import Any

DELETE = object()

BASE = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "x"},
    "spec": {
        "stage": "sft",
        "model": {"source": "s3://models/tiny"},
        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
        "output": {"uri": "s3://kubetune/runs"},
        # GPU nodes are KWOK fakes: a pod that slipped through would never run the real trainer
        "resources": {"gpus": 1},
        "retryLimit": 0,
    },
}
PROMPTS = {"format": "prompt_only", "train": [{"uri": "s3://d/p.jsonl"}]}

CASES: list[tuple[str, dict[str, Any], str]] = [
    # ---- types, ranges, enums (schema)
    ("unknown-stage", {"stage": "finetune"}, "spec.stage"),
    ("unknown-format", {"dataset.format": "chatml"}, "spec.dataset.format"),
    ("dpo-with-chat", {"stage": "dpo"}, "spec.dataset.format"),
    ("bad-model-scheme", {"model.source": "ftp://models/x"}, "spec.model.source"),
    ("missing-model", {"model": DELETE}, "spec.model"),
    ("missing-dataset", {"dataset": DELETE}, "spec.dataset"),
    ("missing-output", {"output": DELETE}, "spec.output"),
    ("empty-train", {"dataset.train": []}, "spec.dataset.train"),
    ("empty-train-uri", {"dataset.train": [{"uri": ""}]}, "spec.dataset.train[0].uri"),
    ("eval-fraction-high", {"dataset.evalFraction": 1.5}, "spec.dataset.evalFraction"),
    ("eval-and-fraction", {"dataset.eval": [{"uri": "s3://d/e.jsonl"}], "dataset.evalFraction": 0.1},
     "spec.dataset.evalFraction"),
    ("max-samples-zero", {"dataset.maxSamples": 0}, "spec.dataset.maxSamples"),
    ("lr-zero", {"training.learningRate": 0}, "spec.training.learningRate"),
    ("lr-huge", {"training.learningRate": 5}, "spec.training.learningRate"),
    ("lr-string", {"training.learningRate": "fast"}, "spec.training.learningRate"),
    ("batch-zero", {"training.batchSize": 0}, "spec.training.batchSize"),
    ("max-length-tiny", {"training.maxLength": 4}, "spec.training.maxLength"),
    ("epochs-zero", {"training.epochs": 0}, "spec.training.epochs"),
    ("warmup-two", {"training.warmupRatio": 2}, "spec.training.warmupRatio"),
    ("keep-zero", {"training.keepCheckpoints": 0}, "spec.training.keepCheckpoints"),
    ("scheduler-unknown", {"training.lrScheduler": "zigzag"}, "spec.training.lrScheduler"),
    ("precision-unknown", {"training.precision": "fp8x"}, "spec.training.precision"),
    ("dpo-block-on-sft", {"training.dpo": {"beta": 0.2}}, "spec.training.dpo"),
    ("grpo-no-rewards", {"stage": "grpo", "dataset": PROMPTS}, "spec.training.grpo"),
    ("grpo-empty-rewards", {"stage": "grpo", "dataset": PROMPTS, "training.grpo": {"rewards": []}},
     "spec.training.grpo.rewards"),
    ("ppo-no-reward-model", {"stage": "ppo", "dataset": PROMPTS}, "spec.training.ppo"),
    ("rank-zero", {"adapter": {"type": "lora", "rank": 0}}, "spec.adapter.rank"),
    ("rank-huge", {"adapter": {"type": "lora", "rank": 100000}}, "spec.adapter.rank"),
    ("dropout-one", {"adapter": {"type": "lora", "dropout": 1}}, "spec.adapter.dropout"),
    ("full-with-rank", {"adapter": {"type": "full", "rank": 8}}, "spec.adapter"),
    ("lora-with-4bit", {"adapter": {"type": "lora", "quantization": {"quantType": "nf4"}}},
     "spec.adapter.quantization"),
    ("adapter-unknown", {"adapter": {"type": "prefix"}}, "spec.adapter.type"),
    ("on-forgetting-unknown", {"evaluation": {"onForgetting": "panic"}}, "spec.evaluation.onForgetting"),
    ("reward-with-reference", {"stage": "reward", "dataset.format": "preference",
                               "evaluation": {"reference": [{"uri": "s3://d/g.jsonl"}]}}, "spec.evaluation.reference"),
    ("zero-stage-four", {"distributed": {"deepspeed": {"zeroStage": 4}}}, "spec.distributed.deepspeed.zeroStage"),
    ("offload-params-zero2", {"distributed": {"deepspeed": {"zeroStage": 2, "offloadParams": True}}},
     "spec.distributed.deepspeed.offloadParams"),
    ("qlora-zero3", {"adapter": {"type": "qlora"}, "distributed": {"deepspeed": {"zeroStage": 3}}},
     "spec.distributed.deepspeed.zeroStage"),
    ("backend-mpi", {"distributed": {"backend": "mpi"}}, "spec.distributed.backend"),
    ("output-ftp", {"output.uri": "ftp://x/y"}, "spec.output.uri"),
    ("endpoint-not-http", {"output.endpoint": "minio:9000"}, "spec.output.endpoint"),
    ("gpus-negative", {"resources.gpus": -1}, "spec.resources.gpus"),
    ("gpus-too-many", {"resources.gpus": 100}, "spec.resources.gpus"),
    ("nodes-zero", {"resources.nodes": 0}, "spec.resources.nodes"),
    ("retry-negative", {"retryLimit": -1}, "spec.retryLimit"),
    ("unknown-field", {"training.learningrate": 0.1}, "learningrate"),
    ("toleration-operator-enum", {"resources.tolerations": [{"key": "a", "operator": "Maybe"}]},
     "spec.resources.tolerations[0].operator"),
    ("toleration-effect-enum", {"resources.tolerations": [{"key": "a", "operator": "Exists", "effect": "Never"}]},
     "spec.resources.tolerations[0].effect"),
    # ---- rules the operator checks (InvalidSpec)
    ("custom-reward-no-source", {"stage": "grpo", "dataset": PROMPTS,
                                 "training.grpo": {"rewards": [{"name": "my_rewards:score"}]}}, "rewards[0].source"),
    ("pvc-claim-invalid", {"output.uri": "pvc://Bad_Claim/x"}, "spec.output.uri"),
    # ---- what core/v1 refuses in the pod template (issue 11, class 1)
    ("runtime-kind-unknown", {"runtimeRef": {"kind": "TrainingRuntime", "name": "x"}}, "spec.runtimeRef.kind"),
    ("runtime-name-invalid", {"runtimeRef": {"name": "Bad_Name"}}, "spec.runtimeRef.name"),
    ("toleration-exists-value", {"resources.tolerations": [{"key": "a", "operator": "Exists", "value": "v"}]},
     "spec.resources.tolerations[0]"),
    ("toleration-seconds-noschedule", {"resources.tolerations": [
        {"key": "a", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]},
     "spec.resources.tolerations[0]"),
    ("cpu-negative", {"resources.cpu": "-2"}, "spec.resources.cpu"),
    ("shm-negative", {"resources.sharedMemory": "-1Gi"}, "spec.resources.sharedMemory"),
    ("memory-not-quantity", {"resources.memory": "lots"}, "spec.resources.memory"),
    ("node-selector-key", {"resources.nodeSelector": {"bad key!": "x"}}, "spec.resources.nodeSelector"),
    ("node-selector-value", {"resources.nodeSelector": {"pool": "a b"}}, "spec.resources.nodeSelector"),
    ("pod-label-value", {"resources.podLabels": {"team": "no spaces allowed"}}, "spec.resources.podLabels"),
    ("pod-label-key", {"resources.podLabels": {"-bad": "x"}}, "spec.resources.podLabels"),
    ("pod-annotation-key", {"resources.podAnnotations": {"bad key": "x"}}, "spec.resources.podAnnotations"),
    ("affinity-wrong-shape", {"resources.affinity": {"nodeAffinity": "fast nodes please"}},
     "spec.resources.affinity"),
    ("affinity-bad-operator", {"resources.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "Is", "values": ["a"]}]}]}}}},
     "spec.resources.affinity"),
    ("affinity-gt-not-number", {"resources.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "mem", "operator": "Gt", "values": ["lots"]}]}]}}}},
     "spec.resources.affinity"),
    ("affinity-match-fields-label", {"resources.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "pool", "operator": "In", "values": ["a"]}]}]}}}}, "spec.resources.affinity"),
    ("priority-class-invalid", {"resources.priorityClassName": "Urgent!"}, "spec.resources.priorityClassName"),
    # ---- fields that moved to the runtime (issue 9): unknown to the CRD, refused by kubectl's strict validation
    ("image-is-the-runtimes", {"resources.image": "trainer:1"}, "spec.resources.image"),
    ("service-account-is-the-runtimes", {"resources.serviceAccountName": "sa"}, "spec.resources.serviceAccountName"),
    ("credentials-are-the-runtimes", {"output.credentials": {"secretName": "s"}}, "spec.output.credentials"),
    # ---- accepted values that make no sense (issue 11, class 3)
    ("alpha-zero", {"adapter": {"type": "lora", "alpha": 0}}, "spec.adapter.alpha"),
    ("alpha-negative", {"adapter": {"type": "lora", "alpha": -16}}, "spec.adapter.alpha"),
    ("target-modules-empty", {"adapter": {"type": "lora", "targetModules": []}}, "spec.adapter.targetModules"),
    ("seed-too-big", {"training.seed": 2 ** 32}, "spec.training.seed"),
    # ---- sizes: the rendered ConfigMap must stay under 1 MiB
    ("reward-params-huge", {"stage": "grpo", "dataset": PROMPTS, "training.grpo": {
        "rewards": [{"name": "regex_match", "params": {"pattern": "a" * (1100 * 1024)}}]}},
     "spec"),
]

_INDEX = re.compile(r"^(\w+)\[(\d+)\]$")


def build(name: str, changes: dict[str, Any]) -> dict:
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = name
    for path, value in changes.items():
        node = obj["spec"]
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        last = parts[-1]
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return obj
