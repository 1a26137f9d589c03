"""Malformed FineTuneJob specs shared by both enforcers of the cross-field rules, so they cannot drift apart:
tests/unit/test_api.py feeds them to `validate_spec()` and checks a CEL rule covers each field; the real
kube-apiserver gets the same manifests in tests/e2e/test_crd_validation.py.

Each case breaks exactly one rule of an otherwise valid sft/chat spec (the overrides replace whole top-level
spec fields). `python` is the field validate_spec() names; `cel` is the field the apiserver names (the
fieldPath of the rule, or the object the rule sits on) and `needle` a phrase of its message.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_api.finetunejob import STAGE_FORMATS

_PROMPTS = {"format": "prompt_only", "train": [{"uri": "s3://data/prompts.jsonl"}]}
_PAIRS = {"format": "preference", "train": [{"uri": "s3://data/pairs.jsonl"}]}

# A valid settings block for every stage that has one (used to put it on the wrong stage).
STAGE_BLOCK_EXAMPLES = {
    "dpo": {"beta": 0.2}, "orpo": {"beta": 0.2}, "kto": {"beta": 0.2},
    "grpo": {"rewards": [{"name": "exact_match"}]}, "rloo": {"rewardModel": "s3://models/rm"},
    "ppo": {"rewardModel": "s3://models/rm"}, "reward": {"centerRewardsCoefficient": 0.01},
}


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict
    cel: str
    needle: str
    python: str | None = None  # None: CEL-only rule (validate_spec() does not repeat it; see rules.py)


BOTH = [
    *[Case(f"{stage}-wrong-format",
           {"stage": stage, "dataset": {"format": "preference" if stage == "sft" else "chat",
                                        "train": [{"uri": "s3://data/x.jsonl"}]},
            **({"training": {stage: STAGE_BLOCK_EXAMPLES[stage]}} if stage in STAGE_BLOCK_EXAMPLES else {})},
           "spec.dataset.format", f"stage {stage} needs dataset.format", python="spec.dataset.format")
      for stage in STAGE_FORMATS],
    *[Case(f"{b}-block-on-sft", {"training": {b: block}}, f"spec.training.{b}", f"only for stage {b}",
           python=f"spec.training.{b}") for b, block in STAGE_BLOCK_EXAMPLES.items()],
    Case("grpo-without-rewards", {"stage": "grpo", "dataset": _PROMPTS}, "spec.training.grpo",
         "at least one reward function", python="spec.training.grpo.rewards"),
    Case("ppo-without-reward-model", {"stage": "ppo", "dataset": _PROMPTS}, "spec.training.ppo",
         "rewardModel", python="spec.training.ppo"),
    Case("rloo-without-block", {"stage": "rloo", "dataset": _PROMPTS}, "spec.training.rloo",
         "rewardModel or at least one entry", python="spec.training.rloo"),
    Case("rloo-empty-block", {"stage": "rloo", "dataset": _PROMPTS, "training": {"rloo": {"rewards": []}}},
         "spec.training.rloo", "rewardModel or at least one entry", python="spec.training.rloo"),
    Case("full-with-rank", {"adapter": {"type": "full", "rank": 8}}, "spec.adapter", "remove rank",
         python="spec.adapter.rank"),
    Case("galore-with-target-modules", {"adapter": {"type": "galore", "targetModules": ["q_proj"]}},
         "spec.adapter", "put its settings under adapter.galore", python="spec.adapter.targetModules"),
    Case("lora-with-quantization", {"adapter": {"type": "lora", "quantization": {"quantType": "nf4"}}},
         "spec.adapter.quantization", "only for type qlora", python="spec.adapter.quantization"),
    Case("lora-with-galore-block", {"adapter": {"type": "lora", "galore": {"rank": 64}}},
         "spec.adapter.galore", "only for type galore", python="spec.adapter.galore"),
    Case("reward-with-forgetting-check",
         {"stage": "reward", "dataset": _PAIRS, "evaluation": {"reference": [{"uri": "s3://data/ref.txt"}]}},
         "spec.evaluation.reference", "stage reward trains a classifier", python="spec.evaluation.reference"),
]

# model.adapter (continue training a saved PEFT adapter): only for PEFT types, never into a stage whose reference
# model is the base with the adapter disabled, never with adapter.init.
_ADAPTER = {"source": "s3://models/tiny", "adapter": "s3://results/runs/ns/sft/runs/r1/adapter"}
BOTH += [
    Case("model-adapter-with-full", {"model": _ADAPTER, "adapter": {"type": "full"}}, "spec.model.adapter",
         "needs adapter.type lora, qlora or dora", python="spec.model.adapter"),
    *[Case(f"model-adapter-into-{cid}", {"model": _ADAPTER, **spec}, "spec.model.adapter",
           "its reference model would be the base without the adapter", python="spec.model.adapter")
      for cid, spec in (
          ("dpo", {"stage": "dpo", "dataset": _PAIRS}),
          ("kto", {"stage": "kto", "dataset": _PAIRS}),
          ("grpo-with-kl", {"stage": "grpo", "dataset": _PROMPTS,
                            "training": {"grpo": {"beta": 0.04, "rewards": [{"name": "exact_match"}]}}}),
          ("rloo-default-kl", {"stage": "rloo", "dataset": _PROMPTS, "training": {"rloo": {"rewardModel": "s3://m/rm"}}}),
          ("ppo-default-kl", {"stage": "ppo", "dataset": _PROMPTS, "training": {"ppo": {"rewardModel": "s3://m/rm"}}}),
      )],
    Case("model-adapter-with-init", {"model": _ADAPTER, "adapter": {"type": "lora", "init": "pissa"}},
         "spec.adapter.init", "remove adapter.init", python="spec.adapter.init"),
]

BOTH += [
    Case("nccl-without-gpus", {"resources": {"gpus": 0}, "distributed": {"backend": "nccl"}},
         "spec.distributed.backend", "backend nccl needs GPUs", python="spec.distributed.backend"),
]

# Path safety (common.URI_SAFETY_RULES on every URI field, uri_problem in validate_spec): one case per rule and
# field, so nothing may climb out of its claim, bucket or folder anywhere a URI is accepted.
_URI_FIELDS = {  # apiserver field -> spec override holding the URI X
    "spec.model.source": lambda x: {"model": {"source": x}},
    "spec.model.tokenizer": lambda x: {"model": {"source": "s3://m/x", "tokenizer": x}},
    "spec.model.adapter": lambda x: {"model": {"source": "s3://m/x", "adapter": x}},
    "spec.dataset.train[0].uri": lambda x: {"dataset": {"format": "chat", "train": [{"uri": x}]}},
    "spec.dataset.eval[0].uri": lambda x: {"dataset": {"format": "chat", "train": [{"uri": "s3://d/t.jsonl"}],
                                                       "eval": [{"uri": x}]}},
    "spec.evaluation.reference[0].uri": lambda x: {"evaluation": {"reference": [{"uri": x}]}},
    "spec.training.grpo.rewards[0].source": lambda x: {
        "stage": "grpo", "dataset": _PROMPTS, "training": {"grpo": {"rewards": [{"name": "m:f", "source": x}]}}},
    "spec.training.rloo.rewardModel": lambda x: {"stage": "rloo", "dataset": _PROMPTS,
                                                 "training": {"rloo": {"rewardModel": x}}},
    "spec.training.rloo.rewards[0].source": lambda x: {"stage": "rloo", "dataset": _PROMPTS, "training": {"rloo": {
        "rewardModel": "s3://m/rm", "rewards": [{"name": "m:f", "source": x}]}}},
    "spec.training.ppo.rewardModel": lambda x: {"stage": "ppo", "dataset": _PROMPTS,
                                                "training": {"ppo": {"rewardModel": x}}},
    "spec.output.uri": lambda x: {"output": {"uri": x}},
    "spec.resumeFrom": lambda x: {"resumeFrom": x},
}
_HOSTILE = [("dotdot", "pvc://claim/../x", "'..' path segment"), ("empty-segment", "s3://b//x", "empty path segment"),
            ("no-claim", "pvc:///etc/x", "not '/'")]
URI_SAFETY = [Case(f"{field.removeprefix('spec.').replace('[0]', '')}-{kind}", make(uri), field, needle,
                   python=field)
              for field, make in _URI_FIELDS.items() for kind, uri, needle in _HOSTILE]
BOTH += URI_SAFETY

CEL_ONLY = [
    Case("eval-and-eval-fraction",
         {"dataset": {"format": "chat", "train": [{"uri": "s3://d/t.jsonl"}], "eval": [{"uri": "s3://d/e.jsonl"}],
                      "evalFraction": 0.2}},
         "spec.dataset.evalFraction", "not both"),
    Case("qlora-with-zero3", {"adapter": {"type": "qlora"}, "distributed": {"deepspeed": {"zeroStage": 3}}},
         "spec.distributed.deepspeed.zeroStage", "use zeroStage 2"),
    Case("offload-params-below-zero3", {"distributed": {"deepspeed": {"zeroStage": 2, "offloadParams": True}}},
         "spec.distributed.deepspeed.offloadParams", "needs zeroStage 3"),
    # core/v1's rules on what the pods get (kubetune_api.corev1): refused at apply instead of when the operator
    # creates the Job. validate_spec() does not repeat them: a local run has no pods.
    Case("toleration-exists-with-value", {"resources": {"tolerations": [{"key": "a", "operator": "Exists",
                                                                         "value": "v"}]}},
         "spec.resources.tolerations[0].value", "value must be empty when operator is Exists"),
    Case("toleration-seconds-without-noexecute",
         {"resources": {"tolerations": [{"key": "a", "operator": "Exists", "effect": "NoSchedule",
                                         "tolerationSeconds": 30}]}},
         "spec.resources.tolerations[0].tolerationSeconds", "applies only to effect NoExecute"),
    Case("toleration-without-key-equal", {"resources": {"tolerations": [{"operator": "Equal", "value": "v"}]}},
         "spec.resources.tolerations[0].operator", "without a key must use operator Exists"),
    Case("node-selector-bad-key", {"resources": {"nodeSelector": {"bad key!": "x"}}},
         "spec.resources.nodeSelector", "is not a qualified name"),
    Case("pod-label-bad-key", {"resources": {"podLabels": {"-team": "a"}}},
         "spec.resources.podLabels", "is not a qualified name"),
    Case("pod-annotation-bad-key", {"resources": {"podAnnotations": {"my annotation": "a"}}},
         "spec.resources.podAnnotations", "is not a qualified name"),
    Case("node-affinity-in-without-values", {"resources": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
             {"matchExpressions": [{"key": "pool", "operator": "In"}]}]}}}}},
         "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
         ".matchExpressions[0].values", "at least one value"),
    Case("node-affinity-gt-not-a-number",
         {"resources": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
             "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu-mem", "operator": "Gt", "values": ["lots"]}]}]}}}}},
         "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
         ".matchExpressions[0].values", "exactly one value, an integer"),
    Case("node-affinity-match-fields-label",
         {"resources": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
             "nodeSelectorTerms": [{"matchFields": [{"key": "pool", "operator": "In", "values": ["a"]}]}]}}}}},
         "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
         ".matchFields[0].key", "can only select metadata.name"),
    Case("pod-affinity-bad-match-labels-key",
         {"resources": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
             {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"bad key!": "x"}}}]}}}},
         "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector"
         ".matchLabels", "is not a qualified name"),
    Case("reward-param-name-too-long",
         {"stage": "grpo", "dataset": _PROMPTS,
          "training": {"grpo": {"rewards": [{"name": "regex_match", "params": {"p" * 64: "x"}}]}}},
         "spec.training.grpo.rewards[0].params", "at most 63 characters"),
]

ALL = BOTH + CEL_ONLY
