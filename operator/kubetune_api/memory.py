"""Will this FineTuneJob fit? A per-GPU (and per-node host) memory estimate from the model's config.json and
the spec, before any GPU is held. Pure Python (no torch): the client CLI (`kubetune estimate`), the operator
and the trainer's pre-flight check all use it.

    from kubetune_api import memory
    shape = memory.ModelShape.from_config(json.load(open("config.json")))
    est = memory.estimate(job.spec, shape)                 # Estimate: per-GPU and per-node breakdown, in bytes
    verdict = memory.check(job.spec, shape, gpu_bytes)     # None when it fits, else a Verdict with the fixes
    print(memory.format_estimate(est))

What is counted (per GPU, the largest rank; `world` = nodes x processes per node):
- weights: every parameter in its load dtype (modeling.resolve_dtype's rules: the training precision on a GPU
  for frozen bases and for DeepSpeed, fp32 for full/galore without DeepSpeed); qlora: linear weights 4-bit
  (0.5 B + quantisation constants), every other weight fp32 (peft's prepare_model_for_kbit_training casts
  them); LoRA/DoRA adapters fp32 (peft keeps adapters in fp32). ZeRO-3: 1/world of them plus the gathered
  working set (the largest tensor or layer, and the next one prefetched); offloadParams: the working set only.
- gradients: one per trainable parameter in its dtype; DDP keeps a second copy in its reduction buckets;
  DeepSpeed: 16-bit gradients (ZeRO-2/3: partitioned) plus the optimizer's fp32 gradient partition.
- optimizer: AdamW's two moments in the parameter's dtype; DeepSpeed adds fp32 master weights (12 B per
  trainable parameter / world from ZeRO-1 on; offloadOptimizer moves them to host memory); GaLore keeps the
  moments for the projected (rank x n) gradients plus the projection.
- activations: batch x sequence tokens (x2 for preference stages, which run chosen and rejected together)
  x layers x what one decoder layer saves for backward (norm inputs, q/k/v/rotary copies, attention
  output, the gated MLP's four intermediates, LoRA dropout copies), or with gradient checkpointing one
  hidden state per layer plus one layer recomputed; plus the logits (16-bit, an fp32 copy, log-softmax).
  FlashAttention/SDPA kernels: no sequence x sequence term.
- runtime: CUDA context, cuBLAS workspace, NCCL buffers, allocator slack: a fixed 1.5 GiB.

Host memory per node: loading (every process materialises the whole model, unless ZeRO-3 partitions at
load: then rank 0 reads the checkpoint once), offloaded optimizer state and parameters, ~3 GiB per process.

Not counted: generation KV caches and reward/value/reference models of RL stages (noted in the estimate),
custom architectures beyond a Llama-style decoder (Mistral, Qwen2, Gemma, Phi-3, Mixtral-style MoE map
onto it). Checked against measured memory in tests/unit/test_memory_estimate.py (CPU byte counts) and
bench/estimator_vs_gpu.py (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .finetunejob import FineTuneJobSpec

GiB = 1024 ** 3
RUNTIME_OVERHEAD = int(1.5 * GiB)
HOST_PER_PROCESS = 3 * GiB
# GPU feature discovery labels nodes with the memory of their GPUs in MiB (and the product name).
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PREFERENCE_STAGES = ("dpo", "orpo", "kto", "reward")
RL_STAGES = ("grpo", "rloo", "ppo")
# qlora: 4-bit weights + one fp32 absmax per 64 weights; double quantisation stores the absmax in 8 bits
# (plus one fp32 per 256 of them).
_NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelConfigError(ValueError):
    """config.json lacks what the estimate needs (the message names the key)."""


# ------------------------------------------------------------------------------------------------ shape
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on (from config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    dtype: str = "float32"  # the checkpoint's dtype (config torch_dtype/dtype)
    attention_bias: bool = False
    num_experts: int = 0  # MoE: experts per layer (each a gated MLP of intermediate_size)
    model_type: str = "llama"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "torch_dtype": cfg.get("torch_dtype") or cfg["text_config"].get("torch_dtype")}

        def need(*keys: str) -> int:
            for k in keys:
                if cfg.get(k) is not None:
                    return int(cfg[k])
            raise ModelConfigError(f"config.json has no {keys[0]}: not a decoder transformer this estimate knows "
                                   f"(model_type {cfg.get('model_type')!r})")

        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        inter = int(cfg.get("moe_intermediate_size") or 0) if experts else 0
        inter = inter or need("intermediate_size", "n_inner", "ffn_dim")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
        mtype = str(cfg.get("model_type") or "llama")
        return cls(
            vocab_size=need("vocab_size"), hidden_size=hidden, intermediate_size=inter,
            num_layers=need("num_hidden_layers", "n_layer", "num_layers"), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dtype if dtype in _BYTES else "float32",
            attention_bias=bool(cfg.get("attention_bias", mtype in ("qwen2", "qwen2_moe"))),
            num_experts=experts, model_type=mtype,
        )

    # shapes of one layer's linear weights: name -> (in_features, out_features, copies)
    def linears(self) -> dict[str, tuple[int, int, int]]:
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        e = max(1, self.num_experts)
        return {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1),
                "gate_proj": (h, i, e), "up_proj": (h, i, e), "down_proj": (i, h, e)}

    def layer_params(self) -> int:
        lin = sum(a * b * c for a, b, c in self.linears().values())
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        router = self.hidden_size * self.num_experts
        return lin + bias + router + 2 * self.hidden_size  # + two RMSNorm weights

    def linear_params(self) -> int:
        return self.num_layers * sum(a * b * c for a, b, c in self.linears().values())

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self, kind: str = "causal") -> int:
        if kind == "reward":
            return self.hidden_size  # one-label score head
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def parameters(self, kind: str = "causal") -> int:
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size \
            + self.head_params(kind)


# ------------------------------------------------------------------------------------------------ estimate
@dataclass
class Estimate:
    gpu: dict[str, int]  # per GPU (the busiest rank), bytes by component
    host: dict[str, int]  # per node (pod), bytes by component
    parameters: int
    trainable: int
    world: int
    weight_dtype: str
    notes: list[str] = field(default_factory=list)
    layer_activations: int = 0  # one layer's activations for one micro-batch (part of "activations")

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def _precision(spec: "FineTuneJobSpec", cuda: bool) -> str:
    p = spec.training.precision
    if not cuda or p == "fp32":
        return "float32"
    return "float16" if p == "fp16" else "bfloat16"  # auto: bf16 (every GPU kubetune targets has it)


def _weight_dtype(spec: "FineTuneJobSpec", cuda: bool) -> str:
    """modeling.resolve_dtype's rules, without torch."""
    if spec.model.dtype != "auto":
        return spec.model.dtype
    ds = spec.distributed.deepspeed if spec.distributed else None
    if not cuda or spec.training.precision == "fp32" or (spec.adapter.type in ("full", "galore") and ds is None):
        return "float32"
    return _precision(spec, cuda)


def _lora_targets(spec: "FineTuneJobSpec", shape: ModelShape) -> dict[str, tuple[int, int, int]]:
    from .defaults import effective_lora

    targets = effective_lora(spec.adapter)["target_modules"]
    lin = shape.linears()
    if targets == ["all-linear"]:
        return lin
    return {name: dims for name, dims in lin.items() if any(t == name or name.endswith(t) for t in targets)}


def _world(spec: "FineTuneJobSpec") -> tuple[int, int]:
    from .defaults import processes_per_node

    per_node = processes_per_node(spec)
    return spec.resources.nodes * per_node, per_node


def estimate(spec: "FineTuneJobSpec", shape: ModelShape, *, cuda: bool = True, kind: Optional[str] = None) -> Estimate:
    """The breakdown for `spec` on `shape`. cuda=False: what a CPU run holds (fp32, no runtime overhead):
    the tests compare that with byte counts of real tensors."""
    from .defaults import effective_lora

    kind = kind or ("reward" if spec.stage == "reward" else "causal")
    world, per_node = _world(spec)
    ds = spec.distributed.deepspeed if spec.distributed else None
    stage = int(ds.zero_stage) if ds else 0
    adapter = spec.adapter.type
    wdt = _weight_dtype(spec, cuda)
    wb = _BYTES[wdt]
    act_b = _BYTES[_precision(spec, cuda)]
    notes: list[str] = []
    total = shape.parameters(kind)
    L = shape.num_layers

    # ---- weights
    lora = adapter in ("lora", "qlora", "dora")
    targets = _lora_targets(spec, shape) if lora else {}
    r = effective_lora(spec.adapter)["r"] if lora else 0
    adapter_params = L * sum(c * r * (a + b) + (c * b if adapter == "dora" else 0) for a, b, c in targets.values())
    if kind == "reward" and lora:
        adapter_params += shape.hidden_size  # the new score head is trained in full (modules_to_save)
    if adapter == "qlora":
        q = spec.adapter.quantization
        per = _NF4_BYTES[bool(q.double_quant) if q else True]
        weights = shape.linear_params() * per + (total - shape.linear_params()) * 4
    else:
        weights = total * wb
    if lora:
        weights += adapter_params * 4
    trainable = adapter_params if lora else total
    gathered = 0
    if stage == 3:
        largest = max(shape.layer_params(), shape.embedding_params(), shape.head_params(kind))
        gathered = int((largest + shape.layer_params()) * wb)  # current tensor/layer + the prefetched next one
        weights = gathered if ds.offload_params else weights / world + gathered

    # ---- gradients and optimizer (trainable parameters only)
    tb = 4 if lora else wb  # trainable parameters' dtype: peft adapters are fp32
    gpu: dict[str, int] = {"weights": int(weights)}
    host_extra: dict[str, int] = {}
    if ds is None:
        grads = trainable * tb * (2 if world > 1 else 1)  # DDP's reduction buckets hold a second copy
        if adapter == "galore":
            optim = _galore_states(spec, shape, tb)
        else:
            optim = 2 * trainable * tb  # AdamW: exp_avg, exp_avg_sq
    else:
        half = trainable * 2
        grads = half / world if stage >= 2 else half
        fp32_part = trainable * 4 / world if stage >= 1 else trainable * 4
        master = trainable * 12 / world if stage >= 1 else trainable * 12  # fp32 weights + 2 moments
        if ds.offload_optimizer or ds.offload_params:
            host_extra["optimizer (offloaded)"] = int((master + fp32_part) * per_node)
            optim = 0
            grads = (shape.hidden_size ** 2) * 2 * 2  # reduce buckets only; gradients stream to the host
        else:
            optim = master
            grads += fp32_part
        if ds.offload_params:
            host_extra["parameters (offloaded)"] = int(total * wb / world * per_node)
    gpu["gradients"] = int(grads)
    gpu["optimizer"] = int(optim)

    # ---- activations
    tokens = spec.training.batch_size * spec.training.max_length * (2 if spec.stage in PREFERENCE_STAGES else 1)
    per_layer = _layer_activation_bytes(spec, shape, act_b, targets if lora else {}, r)
    layer = tokens * per_layer + _dora_constant(spec, shape, targets) / L  # one layer, one micro-batch
    if spec.training.gradient_checkpointing:
        # one hidden state per layer, plus one layer's activations while it is recomputed in backward
        acts = tokens * L * shape.hidden_size * act_b + layer
    else:
        acts = L * layer
    gpu["activations"] = int(acts)
    if kind == "causal":
        # the logits the model returns (kept until the step ends), the loss's fp32 log-softmax, the final
        # norm's input (and, when lm_head trains, its output)
        full = adapter in ("full", "galore")
        gpu["logits"] = int(tokens * (shape.vocab_size * (act_b + 4) + 4 * shape.hidden_size
                                      + (2 * act_b * shape.hidden_size if full else 0)))
    if cuda:
        gpu["runtime"] = RUNTIME_OVERHEAD
    if spec.stage in ("dpo", "kto") and not lora:
        gpu["reference model"] = int(total * wb / (world if stage == 3 else 1))
    if spec.stage in RL_STAGES:
        notes.append(f"stage {spec.stage}: generation KV cache and reward/value/reference models are not counted")

    # ---- host memory per node
    host: dict[str, int] = {"processes": HOST_PER_PROCESS * per_node}
    ckpt_b = _BYTES[shape.dtype]
    if stage == 3 and adapter != "qlora":
        host["loading"] = int(total * ckpt_b)  # rank 0 reads the checkpoint once; each rank keeps its partition
    else:
        host["loading"] = int(total * (wb if adapter != "qlora" else ckpt_b) * per_node)
    host.update(host_extra)
    if lora and spec.output.merged_model:
        host["merging (rank 0)"] = int(total * ckpt_b)
    return Estimate(gpu=gpu, host=host, parameters=total, trainable=int(trainable), world=world,
                    weight_dtype="4-bit" if adapter == "qlora" else wdt, notes=notes,
                    layer_activations=int(layer))


def _galore_states(spec: "FineTuneJobSpec", shape: ModelShape, tb: int) -> int:
    """GaLore: AdamW moments for the projected gradients (rank x max side) and the projection (min side x rank)
    of each targeted linear layer; plain AdamW moments for every other parameter."""
    g = spec.adapter.galore
    rank = g.rank if g else 128
    frags = list(g.target_modules) if g else ["attn", "mlp"]
    names = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    per_state = 1 if g and g.optimizer == "galore_adamw_8bit" else tb
    projected = 0
    states = 0
    for name, (a, b, c) in shape.linears().items():
        if any(f in f"{names[name]}.{name}" for f in frags):
            projected += a * b * c
            states += c * (2 * rank * max(a, b) * per_state + min(a, b) * rank * tb)
    states *= shape.num_layers
    rest = shape.parameters() - projected * shape.num_layers
    return int(states + 2 * rest * tb)


def _layer_activation_bytes(spec: "FineTuneJobSpec", shape: ModelShape, b: int,
                            targets: dict[str, tuple[int, int, int]], r: int) -> float:
    """Bytes one decoder layer saves for backward, per token (HF Llama-style code, SDPA attention; b = the
    activations' bytes). A frozen weight's matmul needs no saved input, so LoRA bases save less than full
    fine-tuning; each adapted linear adds its own (dropout) input copy."""
    from .defaults import effective_lora

    h, q, kv, i = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, \
        shape.intermediate_size
    full = spec.adapter.type in ("full", "galore")
    k = 2 if shape.num_experts else 1  # MoE: ~top-2 experts' intermediates per token
    # RMSNorm (x2): the fp32 input; full fine-tuning also the normalised value and the weighted output
    norms = 2 * (4 * h + (2 * b * h if full else 0))
    # SDPA keeps rotated q, rotated k, v and its output (+ fp32 log-sum-exp per head); rotary saves no copies
    attn = (2 * q + 2 * kv) * b + shape.num_heads * 4
    mlp = (4 if full else 3) * i * k * b  # gate, act(gate), up; down_proj's input only when it trains
    lora = 0.0
    if targets:
        dropout = effective_lora(spec.adapter)["lora_dropout"]
        groups: dict[str, int] = {}
        for name, (a, out, c) in targets.items():
            copies = min(c, k)
            if dropout > 0:
                lora += a * copies * 5  # peft's fp32 dropout output (lora_A's input) + its 1-byte mask
            else:  # lora_A saves its (fp32) input: one per distinct input unless a cast makes a copy each
                key = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                       "up_proj": "mlp_in"}.get(name, name)
                groups[key] = a * copies * 4 * (1 if b == 4 else (3 if key == "attn_in" else 2))
            lora += r * 4 * copies  # lora_A's output
            if spec.adapter.type == "dora":
                lora += 2 * out * copies * b  # DoRA's extra base-output and magnitude-scaled copies
        lora += sum(groups.values())
    return norms + attn + mlp + lora


def _dora_constant(spec: "FineTuneJobSpec", shape: ModelShape, targets: dict[str, tuple[int, int, int]]) -> int:
    """DoRA recomputes each adapted weight (W + BA) and its norm every forward: weight-sized, fp32."""
    if spec.adapter.type != "dora":
        return 0
    return shape.num_layers * sum(a * out * c * 4 for a, out, c in targets.values())


# ------------------------------------------------------------------------------------------------ verdict
@dataclass
class Verdict:
    """A job that does not fit: the numbers and what would make it fit, cheapest first."""

    needed: int
    available: int
    source: str
    estimate: Estimate
    fixes: list[str]

    def message(self) -> str:
        fixes = ("use " + ", or ".join(self.fixes)) if self.fixes else \
            "no change of batch, sharding, nodes or adapter fits: use GPUs with more memory"
        return (f"needs ~{gib(self.needed)} GiB per GPU, have {gib(self.available)} ({self.source}): "
                f"{fixes}. Breakdown: {breakdown(self.estimate.gpu)}")


def gib(n: float) -> str:
    v = n / GiB
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def breakdown(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)


def _with(spec: "FineTuneJobSpec", **changes: Any) -> "FineTuneJobSpec":
    """A copy of the spec with dotted-path changes ("training.batch_size": 1)."""
    data = spec.model_dump(by_alias=False)
    for path, value in changes.items():
        node = data
        parts = path.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return type(spec).model_validate(data)


def fixes(spec: "FineTuneJobSpec", shape: ModelShape, available: int, limit: int = 3) -> list[str]:
    """Single changes that make the job fit, cheapest first (cost: slower steps < changed sharding < more
    hardware < a different method)."""
    t = spec.training
    ds = spec.distributed.deepspeed if spec.distributed else None
    nodes = spec.resources.nodes
    world, _ = _world(spec)
    candidates: list[tuple[str, dict]] = []
    if not t.gradient_checkpointing:
        candidates.append(("set training.gradientCheckpointing: true", {"training.gradient_checkpointing": True}))
    if t.batch_size > 1:
        candidates.append((f"batchSize 1 with gradientAccumulationSteps {t.batch_size * t.gradient_accumulation_steps}",
                           {"training.batch_size": 1,
                            "training.gradient_accumulation_steps": min(1024, t.batch_size * t.gradient_accumulation_steps)}))
    if world > 1 or nodes > 1:
        if not ds or ds.zero_stage < 3:
            candidates.append(("distributed.deepspeed.zeroStage: 3",
                               {"distributed.deepspeed": {"zero_stage": 3}}))
        if not ds or not ds.offload_optimizer:
            candidates.append(("zeroStage 3 with offloadOptimizer", {"distributed.deepspeed": {
                "zero_stage": 3, "offload_optimizer": True}}))
        candidates.append(("zeroStage 3 with offloadOptimizer and offloadParams", {"distributed.deepspeed": {
            "zero_stage": 3, "offload_optimizer": True, "offload_params": True}}))
    sharded = {"zero_stage": 3, **({"offload_optimizer": ds.offload_optimizer} if ds else {})}
    for n in (2, 4, 8, 16, 32, 64):
        if n > nodes:
            candidates.append((f"{n} nodes with zeroStage 3", {"resources.nodes": n, "distributed.deepspeed": sharded}))
    if spec.adapter.type in ("full", "galore"):
        candidates.append(("adapter.type: lora", {"adapter": {"type": "lora"}}))
    if spec.adapter.type != "qlora":
        candidates.append(("adapter.type: qlora", {"adapter": {"type": "qlora"}}))
    out: list[str] = []
    seen_nodes = False
    combined: dict = {}
    combined_text: list[str] = []
    for text, change in candidates:
        if "resources.nodes" in change and seen_nodes:
            continue
        try:
            alt = _with(spec, **change)
        except ValueError:
            continue
        if estimate(alt, shape).gpu_total <= available:
            out.append(text)
            seen_nodes = seen_nodes or "resources.nodes" in change
        if len(out) >= limit:
            break
    if not out:
        # no single change is enough: the shortest prefix of the cheap changes (not more hardware) together
        for text, change in candidates:
            if "resources.nodes" in change or "adapter" in change:
                continue
            combined.update(change)
            combined_text.append(text)
            try:
                if estimate(_with(spec, **combined), shape).gpu_total <= available:
                    return [" + ".join(combined_text)]
            except ValueError:
                continue
    return out


def check(spec: "FineTuneJobSpec", shape: ModelShape, available: Optional[int], source: str = "declared"
          ) -> Optional[Verdict]:
    """None when the estimate fits in `available` bytes per GPU (or nothing is declared, or no GPUs); else a
    Verdict naming the numbers and the cheapest fixes."""
    if not available or spec.resources.gpus == 0:
        return None
    est = estimate(spec, shape)
    if est.gpu_total <= available:
        return None
    return Verdict(needed=est.gpu_total, available=available, source=source, estimate=est,
                   fixes=fixes(spec, shape, available))


# ------------------------------------------------------------------------------------------------ declared
def parse_quantity(q: Any) -> int:
    """Kubernetes quantity ("80Gi", "81559Mi", "85e9", 1024) to bytes."""
    s = str(q).strip()
    m = re.fullmatch(r"([0-9.eE+-]+)\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?", s)
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    mult = {None: 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "k": 1e3, "K": 1e3,
            "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}[m.group(2)]
    return int(float(m.group(1)) * mult)


def declared_gpu_memory(spec: "FineTuneJobSpec", default: Optional[int] = None,
                        runtime_gib: Optional[float] = None) -> tuple[Optional[int], str]:
    """(bytes of memory per GPU, where the number came from) for this job, or (None, why not).

    THE hook for whatever declares GPU memory: first the job's runtime (`gpu.memoryGiB`, the admin's word for
    its GPU class), then the job's nodeSelector (GPU feature discovery's `nvidia.com/gpu.memory` label, in MiB,
    or a product name like NVIDIA-H100-80GB-HBM3), then `default` (an operator setting or a CLI flag)."""
    if runtime_gib:
        return int(runtime_gib * 2 ** 30), "runtime gpu.memoryGiB"
    sel = spec.resources.node_selector or {}
    if GPU_MEMORY_LABEL in sel:
        try:
            return int(sel[GPU_MEMORY_LABEL]) * 2 ** 20, f"nodeSelector {GPU_MEMORY_LABEL}"
        except ValueError:
            pass
    m = re.search(r"(\d+)GB", sel.get(GPU_PRODUCT_LABEL, ""))
    if m:
        # marketing GB: an "80GB" H100 reports 81559 MiB
        return int(m.group(1)) * 1019 * 2 ** 20, f"nodeSelector {GPU_PRODUCT_LABEL}"
    if default:
        return default, "configured GPU memory"
    return None, "no GPU memory declared"


def format_estimate(est: Estimate, available: Optional[int] = None, source: str = "") -> str:
    lines = [f"parameters {est.parameters / 1e9:.2f} B ({est.weight_dtype} weights), trainable "
             f"{est.trainable / 1e6:,.1f} M, {est.world} process(es)", "per GPU:"]
    lines += [f"  {k:24s} {v / GiB:8.2f} GiB" for k, v in est.gpu.items()]
    lines.append(f"  {'total':24s} {est.gpu_total / GiB:8.2f} GiB")
    if available:
        lines.append(f"  {'available':24s} {available / GiB:8.2f} GiB ({source})")
    lines.append("host memory per node (pod):")
    lines += [f"  {k:24s} {v / GiB:8.2f} GiB" for k, v in est.host.items()]
    lines.append(f"  {'total':24s} {est.host_total / GiB:8.2f} GiB")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


