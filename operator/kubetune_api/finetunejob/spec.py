"""The FineTuneJob resource's spec: what to train (stage, model, data, adapter, hyper-parameters), with which
resources, and where results go; plus the whole-object model the trainer and tests parse manifests into.

Field descriptions become `kubectl explain` text, so they are written for the person reading a manifest.
Rules that involve one model sit on that model (CEL); rules that span the spec are in `rules.py`.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from .. import corev1
from ..cel import cel, validations
from ..common import (
    LIST_MAX, NAME_MAX, QUANTITY, URI_MAX, URI_PATTERN, URI_SAFETY, Model, ObjectMeta, StrEnum, Toleration,
)
from .rules import SPEC_CREATE_RULES, SPEC_MODEL_RULES, SPEC_RULES
from .status import FineTuneJobStatus


# Bounds that keep the resolved spec (stored in a ConfigMap, at most 1 MiB) small whatever the manifest says:
# tests/unit/test_api_bounds.py renders the largest spec the CRD accepts.
REWARD_PARAM_MAX = 1024
REWARD_PARAMS_MAX = 8
REWARD_PARAM_NAME_MAX = 63
REWARDS_MAX = 8
MODULE_NAME_MAX = 256  # a module name or regex (targetModules)
SOURCES_MAX = 32  # files or folders per dataset list (a folder holds any number of files)


class Stage(StrEnum):
    CPT = "cpt"
    SFT = "sft"
    DPO = "dpo"
    ORPO = "orpo"
    KTO = "kto"
    GRPO = "grpo"
    RLOO = "rloo"
    PPO = "ppo"
    REWARD = "reward"


class AdapterType(StrEnum):
    LORA = "lora"
    QLORA = "qlora"
    DORA = "dora"
    GALORE = "galore"
    FULL = "full"


class DatasetFormat(StrEnum):
    TEXT = "text"  # {"text": ...}
    CHAT = "chat"  # {"messages": [{"role", "content"}, ...]}
    PROMPT_COMPLETION = "prompt_completion"  # {"prompt", "completion"}
    PREFERENCE = "preference"  # {"prompt", "chosen", "rejected"}
    UNPAIRED_PREFERENCE = "unpaired_preference"  # {"prompt", "completion", "label": bool}
    PROMPT_ONLY = "prompt_only"  # {"prompt", ...extra columns handed to reward functions}


class ModelSpec(Model):
    source: str = Field(
        ..., max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="Where the base model lives: s3://bucket/prefix (a folder saved with save_pretrained), "
        "file:///abs/path, pvc://<claim>/<path> (mounted read-only), or hf://org/name (needs internet).",
    )
    revision: Optional[str] = Field(
        None, max_length=NAME_MAX, description="Revision (branch, tag or commit) for hf:// sources."
    )
    dtype: str = Field(
        "auto", json_schema_extra={"enum": ["auto", "float32", "bfloat16", "float16"]},
        description="Weights dtype when loading. auto: bfloat16 on GPUs that support it, float32 on CPU.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust the source."
    )
    tokenizer: Optional[str] = Field(
        None, max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="Tokenizer location when it is not stored with the model (same URI forms as source).",
    )
    adapter: Optional[str] = Field(
        None, max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="Start from this trained PEFT adapter instead of a new one: a folder saved with save_pretrained "
        "(adapter_config.json + weights, e.g. the adapter/ of an earlier run's results), same URI forms as "
        "source, trained on exactly this base model. Only with adapter.type lora, qlora or dora matching how it was "
        "trained (lora/qlora: a LoRA, dora: a DoRA); its rank, alpha and target modules are kept (set them only "
        "to the same values). Not with stages whose reference model is the base without the adapter (dpo, kto, "
        "grpo/rloo with beta > 0, ppo with klCoef > 0): merge the adapter into the base and train on the merged "
        "model instead. A restarted pod resumes from the run's own checkpoint, not from this adapter.",
    )


class DatasetSource(Model):
    uri: str = Field(
        ..., max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="A file or folder: s3://..., file://..., pvc://<claim>/<path> or hf://org/name. Files: "
        ".jsonl, .json, .parquet, .csv, .txt (txt: one example per line for text, whole file otherwise).",
    )
    split: Optional[str] = Field(None, max_length=NAME_MAX, description="Split name for hf:// sources.")


class ColumnMapping(Model):
    """Rename the dataset's columns to the names the format expects (e.g. {prompt: question})."""

    text: Optional[str] = Field(None, max_length=NAME_MAX, description="Column holding raw text (format text).")
    messages: Optional[str] = Field(None, max_length=NAME_MAX, description="Column holding chat messages.")
    prompt: Optional[str] = Field(None, max_length=NAME_MAX, description="Column holding the prompt.")
    completion: Optional[str] = Field(None, max_length=NAME_MAX, description="Column holding the completion.")
    chosen: Optional[str] = Field(None, max_length=NAME_MAX, description="Column holding the preferred answer.")
    rejected: Optional[str] = Field(None, max_length=NAME_MAX, description="Column holding the rejected answer.")
    label: Optional[str] = Field(
        None, max_length=NAME_MAX, description="Column holding the desirable (true) / undesirable label (KTO)."
    )
    answer: Optional[str] = Field(
        None, max_length=NAME_MAX, description="Column holding the reference answer that RL rewards compare to."
    )


class DatasetSpec(Model):
    format: DatasetFormat = Field(
        ..., description="Shape of each example: text, chat, prompt_completion, preference, unpaired_preference "
        "or prompt_only. Each stage accepts only some formats (e.g. dpo needs preference).",
    )
    train: list[DatasetSource] = Field(
        ..., min_length=1, max_length=SOURCES_MAX, description="Training data; several sources are concatenated."
    )
    eval: Optional[list[DatasetSource]] = Field(
        None, max_length=SOURCES_MAX, description="Held-out evaluation data. When absent, evalFraction of train is held out."
    )
    eval_fraction: Optional[float] = Field(
        None, ge=0.0, le=0.5,
        description="Fraction of the training data held out for evaluation when `eval` is not given. Default "
        "0.1; 0 disables evaluation.",
    )
    columns: Optional[ColumnMapping] = Field(None, description="Column renames applied before formatting.")
    max_samples: Optional[int] = Field(
        None, ge=1, description="Use at most this many training examples (after shuffling with the seed)."
    )


class RewardFunction(Model):
    """One reward for RL stages: a built-in by name, or your own `module:function` shipped with `source`."""

    model_config = ConfigDict(json_schema_extra=validations({
        **cel(f"!has(self.params) || self.params.all(k, size(k) <= {REWARD_PARAM_NAME_MAX})",
              f"reward parameter names are at most {REWARD_PARAM_NAME_MAX} characters", field_path=".params"),
        "messageExpression": f"'reward parameter names are at most {REWARD_PARAM_NAME_MAX} characters, got ' + "
                             f"self.params.filter(k, size(k) > {REWARD_PARAM_NAME_MAX})[0]",
    }))

    name: str = Field(
        ..., max_length=NAME_MAX,
        description="A built-in reward (exact_match, normalized_match, numeric_match, regex_match, "
        "think_answer_format, length_penalty, code_execution) or 'module:function' for your own, loaded from "
        "`source`. Custom functions and code_execution run in the trainer's reward sandbox, where allowed.",
    )
    weight: float = Field(1.0, description="Weight of this reward in the weighted sum.")
    params: Optional[dict[str, Annotated[str, StringConstraints(max_length=REWARD_PARAM_MAX)]]] = Field(
        None, json_schema_extra={"maxProperties": REWARD_PARAMS_MAX},
        description=f"Parameters for the reward, as strings of at most {REWARD_PARAM_MAX} characters (e.g. "
        "tolerance: '0.01', pattern: '^<think>').",
    )
    source: Optional[str] = Field(
        None, max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="A .py file or folder holding the custom reward module (only for 'module:function'). "
        "It runs only inside the trainer pod's reward sandbox (no credentials, CPU/memory/time limits).",
    )


class DPOParams(Model):
    beta: float = Field(0.1, gt=0, description="KL strength of the implicit reward (TRL DPOConfig.beta).")
    loss_type: str = Field(
        "sigmoid", json_schema_extra={"enum": ["sigmoid", "ipo", "hinge", "robust", "bco_pair", "apo_zero"]},
        description="DPO loss variant.",
    )
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Conservative DPO label smoothing.")


class ORPOParams(Model):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (TRL ORPOConfig.beta).")


class KTOParams(Model):
    beta: float = Field(0.1, gt=0, description="KL strength (TRL KTOConfig.beta).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable examples.")


class GRPOParams(Model):
    num_generations: int = Field(4, ge=2, le=64, description="Completions sampled per prompt (group size).")
    max_completion_length: int = Field(64, ge=1, le=32768, description="Tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    beta: float = Field(0.0, ge=0, description="KL penalty against the reference model (0 disables it).")
    rewards: list[RewardFunction] = Field(
        ..., min_length=1, max_length=REWARDS_MAX, description="Reward functions; the reward is their weighted sum."
    )


class RLOOParams(Model):
    num_generations: int = Field(4, ge=2, le=64, description="Completions sampled per prompt (RLOO's k).")
    max_completion_length: int = Field(64, ge=1, le=32768, description="Tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    beta: float = Field(0.05, ge=0, description="KL penalty against the reference model.")
    reward_model: Optional[str] = Field(
        None, max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="A sequence-classification reward model (e.g. the output of a `reward` stage job).",
    )
    rewards: Optional[list[RewardFunction]] = Field(
        None, max_length=REWARDS_MAX, description="Reward functions, alone or added to the reward model's score."
    )


class PPOParams(Model):
    reward_model: str = Field(
        ..., max_length=URI_MAX, pattern=URI_PATTERN, json_schema_extra=URI_SAFETY,
        description="A sequence-classification reward model (e.g. the output of a `reward` stage job).",
    )
    max_completion_length: int = Field(32, ge=1, le=32768, description="Tokens generated per rollout.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    ppo_epochs: int = Field(2, ge=1, le=16, description="Optimisation passes over each rollout batch.")
    clip_range: float = Field(0.2, gt=0, le=1, description="PPO ratio clipping.")
    value_clip_range: float = Field(0.2, gt=0, le=1, description="Value-function clipping.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty against the reference policy.")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")


class RewardModelParams(Model):
    center_rewards_coefficient: Optional[float] = Field(
        None, ge=0, description="Push rewards towards zero mean (TRL RewardConfig.center_rewards_coefficient)."
    )


class TrainingSpec(Model):
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training data (ignored when maxSteps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: str = Field(
        "cosine",
        json_schema_extra={"enum": ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"]},
        description="Learning-rate schedule after warmup.",
    )
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=8, le=1048576, description="Maximum tokens per example (or per packed row).")
    packing: bool = Field(False, description="Pack several examples into each row (cpt, sft) for throughput.")
    seed: int = Field(42, ge=0, le=2 ** 32 - 1,
                      description="Seed for data order, initialisation and sampling (0 to 2^32-1, numpy's range).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    precision: str = Field(
        "auto", json_schema_extra={"enum": ["auto", "bf16", "fp16", "fp32"]},
        description="Mixed precision. auto: bf16 where the GPU supports it, fp32 on CPU.",
    )
    checkpoint_every_steps: int = Field(
        100, ge=1, description="Save a full checkpoint (weights, optimizer, scheduler, RNG) to the output "
        "every N steps; a restarted pod resumes from the latest one. Also saved on SIGTERM.",
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Complete checkpoints kept in the object store.")
    eval_every_steps: int = Field(50, ge=1, description="Evaluate (eval loss, perplexity) every N steps.")
    log_every_steps: int = Field(5, ge=1, description="Publish train metrics every N steps.")
    dpo: Optional[DPOParams] = Field(None, description="DPO settings (stage dpo only).")
    orpo: Optional[ORPOParams] = Field(None, description="ORPO settings (stage orpo only).")
    kto: Optional[KTOParams] = Field(None, description="KTO settings (stage kto only).")
    grpo: Optional[GRPOParams] = Field(None, description="GRPO settings (stage grpo only; rewards required).")
    rloo: Optional[RLOOParams] = Field(None, description="RLOO settings (stage rloo only).")
    ppo: Optional[PPOParams] = Field(None, description="PPO settings (stage ppo only; rewardModel required).")
    reward: Optional[RewardModelParams] = Field(None, description="Reward-model training settings (stage reward only).")


class QuantizationSpec(Model):
    quant_type: str = Field("nf4", json_schema_extra={"enum": ["nf4", "fp4"]}, description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: str = Field(
        "auto", json_schema_extra={"enum": ["auto", "float32", "bfloat16", "float16"]},
        description="Dtype for matmuls on the de-quantized weights. auto: bfloat16 on GPU, float32 on CPU.",
    )


class GaLoreSpec(Model):
    rank: int = Field(128, ge=1, le=8192, description="Rank of the gradient projection.")
    update_proj_gap: int = Field(200, ge=1, description="Steps between recomputing the projection (SVD).")
    scale: float = Field(0.25, gt=0, description="Scale applied to the projected update.")
    target_modules: list[Annotated[str, StringConstraints(max_length=MODULE_NAME_MAX)]] = Field(
        default_factory=lambda: ["attn", "mlp"], max_length=LIST_MAX,
        description="Name fragments of the linear layers whose gradients are projected.",
    )
    optimizer: str = Field(
        "galore_adamw", json_schema_extra={"enum": ["galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise"]},
        description="GaLore optimizer variant (galore_adamw_8bit needs CUDA).",
    )


class AdapterSpec(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.type != 'full' || (!has(self.rank) && !has(self.alpha) && !has(self.dropout) && "
                "!has(self.targetModules) && !has(self.useRslora) && !has(self.init))",
                "full fine-tuning trains every weight: remove rank, alpha, dropout, targetModules, useRslora "
                "and init, or choose type lora/qlora/dora", reason="FieldValueForbidden"),
            cel("self.type != 'galore' || (!has(self.rank) && !has(self.alpha) && !has(self.dropout) && "
                "!has(self.targetModules) && !has(self.useRslora) && !has(self.init))",
                "galore trains full weights with a projected optimizer: put its settings under adapter.galore "
                "(rank, updateProjGap, scale, targetModules), not rank/alpha/dropout/targetModules",
                reason="FieldValueForbidden"),
            cel("self.type == 'qlora' || !has(self.quantization)",
                "adapter.quantization (4-bit base) is only for type qlora", field_path=".quantization",
                reason="FieldValueForbidden"),
            cel("self.type == 'galore' || !has(self.galore)",
                "adapter.galore is only for type galore", field_path=".galore", reason="FieldValueForbidden"),
        )
    )

    type: AdapterType = Field(
        AdapterType.LORA, description="lora, qlora (4-bit base + LoRA), dora (weight-decomposed LoRA), galore "
        "(full weights, low-rank projected optimizer) or full.",
    )
    rank: Optional[int] = Field(None, ge=1, le=4096, description="LoRA rank r (lora/qlora/dora). Default 16.")
    alpha: Optional[float] = Field(
        None, gt=0, description="LoRA alpha (scaling = alpha/r), greater than 0 (0 makes an adapter that changes "
        "nothing). Default 2*rank.")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="LoRA dropout. Default 0.05.")
    target_modules: Optional[list[Annotated[str, StringConstraints(max_length=MODULE_NAME_MAX)]]] = Field(
        None, min_length=1, max_length=LIST_MAX,
        description="Module names to adapt (e.g. q_proj, v_proj), or ['all-linear']; omit it for the default, "
        "all-linear (an empty list is refused rather than silently meaning all). "
        "Names that match no module fail the job before training.",
    )
    use_rslora: Optional[bool] = Field(None, description="Rank-stabilised LoRA scaling (alpha/sqrt(r)).")
    init: Optional[str] = Field(
        None, json_schema_extra={"enum": ["default", "gaussian", "pissa", "olora"]},
        description="Adapter initialisation; pissa/olora start from the weights' principal components.",
    )
    quantization: Optional[QuantizationSpec] = Field(None, description="4-bit options (type qlora only).")
    galore: Optional[GaLoreSpec] = Field(None, description="GaLore options (type galore only).")


class EarlyStoppingSpec(Model):
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest eval-loss decrease that counts as improvement.")


class EvaluationSpec(Model):
    reference: Optional[list[DatasetSource]] = Field(
        None, max_length=SOURCES_MAX,
        description="General-domain text (format text) for the forgetting check: perplexity is measured on it "
        "before and after training.",
    )
    reference_max_samples: int = Field(256, ge=1, le=100000, description="Reference examples evaluated.")
    forgetting_threshold: float = Field(
        0.10, ge=0, le=100,
        description="Largest allowed relative rise of reference perplexity (0.10 = +10 %).",
    )
    on_forgetting: str = Field(
        "warn", json_schema_extra={"enum": ["warn", "fail"]},
        description="warn: set condition ForgettingThresholdExceeded and succeed; fail: fail the job "
        "(artifacts are still written, marked in manifest.json).",
    )
    early_stopping: Optional[EarlyStoppingSpec] = Field(
        None, description="Stop when eval loss stops improving (guards against overfitting)."
    )


class ResourcesSpec(Model):
    """How large the trainer pods are and, where the job's runtime allows it, where they run. The image,
    ServiceAccount, GPU resource name and credentials are the runtime's (spec.runtimeRef), not the job's.
    Every field here is copied into the pod template, so each carries core/v1's rule for it
    (kubetune_api.corev1): the API server refuses a bad value at `kubectl apply`."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            {**corev1.map_keys_rule("node label key", "self.nodeSelector"), "fieldPath": ".nodeSelector"},
            {**corev1.map_keys_rule("pod label key", "self.podLabels"), "fieldPath": ".podLabels"},
            {**corev1.map_keys_rule("pod annotation key", "self.podAnnotations"), "fieldPath": ".podAnnotations"},
        )
    )

    gpus: int = Field(1, ge=0, le=64, description="GPUs per node (requests = limits of the runtime's GPU resource; at "
                      "most the runtime's resources.maxGpusPerNode).")
    cpu: Optional[Union[str, int]] = Field(None, json_schema_extra=QUANTITY,
                                           description="CPU request per node pod, e.g. '8' (non-negative).")
    memory: Optional[Union[str, int]] = Field(
        None, json_schema_extra=QUANTITY, description="Memory request and limit per node pod, e.g. 64Gi."
    )
    shared_memory: Optional[Union[str, int]] = Field(
        None, json_schema_extra=QUANTITY,
        description="Size of /dev/shm (a memory-backed emptyDir); data loaders and NCCL need more than the 64Mi default.",
    )
    cache_claim: Optional[str] = Field(
        None, max_length=NAME_MAX, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="A PersistentVolumeClaim (ReadWriteMany for several nodes) for downloaded models and data. "
        "Without it each pod downloads into its own emptyDir, and a retried pod (a new pod) downloads it all "
        "again; with it, files whose ETag and size match are reused.",
    )
    nodes: int = Field(1, ge=1, le=1024, description="Nodes (pods); >1 runs torchrun across the pods of a JobSet (needs JobSet "
                       "installed), restarted as a whole when one fails.")
    node_selector: Optional[dict[str, corev1.LabelValue]] = Field(
        None, json_schema_extra={"maxProperties": 32}, description="Node labels the pods must match."
    )
    tolerations: Optional[list[Toleration]] = Field(
        None, max_length=corev1.TOLERATIONS_MAX,
        description="Extra tolerations (only where the runtime's policy.overrides lists tolerations), added to the "
        "runtime's. A toleration for the GPU resource taint is added automatically.",
    )
    affinity: Optional[corev1.Affinity] = Field(
        None, description="A core/v1 Affinity for the pods; only where the runtime's policy.overrides lists affinity.",
    )
    priority_class_name: Optional[str] = Field(None, max_length=corev1.DNS_SUBDOMAIN_MAX,
                                               pattern=corev1.DNS_SUBDOMAIN,
                                               description="PriorityClass of the pods; only where the runtime's "
                                               "policy.overrides lists priorityClassName (else the runtime's).")
    pod_labels: Optional[dict[str, corev1.LabelValue]] = Field(
        None, json_schema_extra={"maxProperties": 32}, description="Extra labels on the pods."
    )
    pod_annotations: Optional[dict[str, corev1.AnnotationValue]] = Field(
        None, json_schema_extra={"maxProperties": 32}, description="Extra annotations on the pods."
    )


class DeepSpeedSpec(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!has(self.offloadParams) || !self.offloadParams || self.zeroStage == 3",
                "offloadParams needs zeroStage 3 (only ZeRO-3 partitions parameters)", field_path=".offloadParams"),
        )
    )

    zero_stage: int = Field(2, json_schema_extra={"enum": [1, 2, 3]}, description="ZeRO stage: 1, 2 or 3.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")


class DistributedSpec(Model):
    backend: str = Field(
        "auto", json_schema_extra={"enum": ["auto", "nccl", "gloo"]},
        description="torch.distributed backend. auto: nccl with GPUs, gloo without.",
    )
    processes_per_node: Optional[int] = Field(
        None, ge=1, le=64, description="torchrun --nproc-per-node. Default: GPUs per node (1 without GPUs)."
    )
    deepspeed: Optional[DeepSpeedSpec] = Field(None, description="Train with DeepSpeed ZeRO.")


class OutputSpec(Model):
    uri: str = Field(
        ..., max_length=URI_MAX, pattern=r"^(s3|file|pvc)://.+", json_schema_extra=URI_SAFETY,
        description="Where results go: s3://bucket/prefix, file:///abs/path or pvc://<claim>/<path>. Each run "
        "writes <uri>/<namespace>/<name>/runs/<run-id>/ (adapter, checkpoints, manifest.json, metrics; the run id "
        "is the FineTuneJob's uid) and then <uri>/<namespace>/<name>/runs.json, the index naming the latest "
        "finished run. A re-created job of the same name gets a new run beside the old one.",
    )
    merged_model: bool = Field(
        False, description="Also write the base model with the adapter merged in (merged into a full-precision base)."
    )
    publish: str = Field(
        "best", json_schema_extra={"enum": ["best", "last"]},
        description="Which weights become the result when evaluation runs. best: the checkpoint with the best eval "
        "loss (kept even beyond keepCheckpoints; manifest.json names its step and why); last: the final step.",
    )
    keep_runs: Optional[int] = Field(
        None, ge=1, le=1000,
        description="Delete older runs of this job (results and checkpoints) beyond the newest N when a run "
        "finishes. Unset: no run is ever deleted.",
    )
    storage_patience_seconds: Optional[int] = Field(
        None, ge=0, le=86400,
        description="How long the trainer waits out an unreachable object store (connection refused or reset, "
        "timeouts, HTTP 5xx, throttling) before giving up, in seconds of outage. Meanwhile training goes on: "
        "checkpoint uploads wait in the background (a newer checkpoint replaces one still waiting) and every other "
        "storage call retries with backoff. When the outage outlasts it, the trainer exits 75 and the job fails "
        "at once with reason StorageUnavailable, naming the endpoint and the call, without using retryLimit. "
        "Denied access, missing buckets or objects fail at once whatever this says. Default: the runtime's "
        "storage.patienceSeconds, else 600; the runtime's value is also the maximum.",
    )


RUNTIME_KINDS = ["ClusterFineTuneRuntime", "FineTuneRuntime"]
DEFAULT_RUNTIME = {"kind": "ClusterFineTuneRuntime", "name": "default"}


class RuntimeRef(Model):
    """The admin-owned runtime a job runs under (Kubeflow Trainer's runtimeRef, in kubetune's terms)."""

    kind: str = Field(
        "ClusterFineTuneRuntime", json_schema_extra={"enum": RUNTIME_KINDS},
        description="ClusterFineTuneRuntime (cluster-wide, granted to namespaces by its namespaceSelector) or "
        "FineTuneRuntime (in the job's own namespace; there is no namespace field).",
    )
    name: str = Field("default", max_length=NAME_MAX, pattern=corev1.DNS_SUBDOMAIN, description="The runtime's name.")


class FineTuneJobSpec(Model):
    model_config = ConfigDict(json_schema_extra=validations(*SPEC_CREATE_RULES, *SPEC_MODEL_RULES, *SPEC_RULES))

    runtime_ref: RuntimeRef = Field(
        default_factory=lambda: RuntimeRef(**DEFAULT_RUNTIME),
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": "runtimeRef is immutable: create a new FineTuneJob to use another "
             "runtime", "reason": "FieldValueForbidden"}]},
        description="The runtime (image, ServiceAccount, scheduling, storage credentials, limits and policy set by "
        "the platform admins) this job runs under. Default: the ClusterFineTuneRuntime `default` the chart "
        "installs. Immutable.",
    )
    stage: Stage = Field(
        ..., description="Training stage: cpt (continued pre-training), sft, dpo, orpo, kto, grpo (RL with "
        "verifiable rewards), rloo, ppo (RLHF with a reward model) or reward (reward-model training).",
    )
    model: ModelSpec = Field(..., description="The base model.")
    dataset: DatasetSpec = Field(..., description="Training (and evaluation) data.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="What is trained: an adapter or all weights.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyper-parameters and the stage's own settings.")
    evaluation: Optional[EvaluationSpec] = Field(
        None, description="Forgetting check and early stopping. Eval loss/perplexity are always measured."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods: GPUs, nodes, scheduling.")
    distributed: Optional[DistributedSpec] = Field(None, description="torchrun / DeepSpeed settings.")
    output: OutputSpec = Field(..., description="Where the adapter, checkpoints and reports are written.")
    resume_from: Optional[str] = Field(
        None, max_length=URI_MAX, pattern=r"^((s3|file|pvc)://.+|[A-Za-z0-9][A-Za-z0-9._-]{0,127})$",
        json_schema_extra=URI_SAFETY,
        description="Continue another run's training (weights, optimizer, step) instead of starting at step 0: "
        "a run id of this job (see runs.json), a run's URI (.../runs/<id>/: its latest checkpoint) or a "
        "checkpoint URI (.../runs/<id>/checkpoints/checkpoint-N). Refused unless stage, adapter settings and base "
        "model bytes match. Without it a new FineTuneJob always starts fresh.",
    )
    suspend: bool = Field(
        False, description="Suspend the job: its pods are deleted (a checkpoint is saved on SIGTERM) and it "
        "resumes from the latest checkpoint when unsuspended. With a queue (queueName), Kueue decides when the "
        "trainer runs: suspend deactivates the job's Kueue Workload, and the operator never resumes a trainer Job "
        "that Kueue holds.",
    )
    queue_name: Optional[str] = Field(
        None, max_length=63, pattern=rf"^{corev1.DNS_LABEL_RE}$",
        description="Kueue LocalQueue (in this namespace) that admits the job: the trainer Job is created "
        "suspended with the label kueue.x-k8s.io/queue-name and starts when Kueue admits it. The FineTuneJob "
        "label kueue.x-k8s.io/queue-name does the same; this field wins when both are set.",
    )
    workload_priority_class_name: Optional[str] = Field(
        None, max_length=63, pattern=rf"^{corev1.DNS_LABEL_RE}$",
        description="Kueue WorkloadPriorityClass of the job (label kueue.x-k8s.io/priority-class on the trainer "
        "Job; needs queueName). Kueue preempts lower-priority jobs for higher ones; a preempted trainer "
        "checkpoints on SIGTERM and resumes from that step when admitted again.",
    )
    retry_limit: int = Field(
        3, ge=0, le=100, description="Pod restarts tolerated for retriable failures (the Job's backoffLimit). "
        "Invalid config/data and NaN loss fail at once.",
    )
    active_deadline_seconds: Optional[int] = Field(
        None, ge=1, description="Fail the job when it runs longer than this."
    )
    ttl_seconds_after_finished: Optional[int] = Field(
        None, ge=0, description="Delete the FineTuneJob this long after it finishes (its artifacts stay)."
    )


class FineTuneJob(Model):
    """The whole object; used by the trainer (`kubetune run`) and tests, not for the CRD schema root."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)
    api_version: str = "kubetune.dev/v1alpha1"
    kind: str = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None


def parse_job(obj: dict) -> FineTuneJob:
    """Parse a FineTuneJob manifest (dict) into the typed model."""
    return FineTuneJob.model_validate(obj)
