"""Everything that depends on `spec.adapter.type`, in one place.

| type   | what trains                         | here                                                          |
|--------|-------------------------------------|---------------------------------------------------------------|
| lora   | low-rank A/B on frozen base         | peft LoraConfig                                               |
| qlora  | LoRA on a 4-bit base                | LoraConfig + prepare_model_for_kbit_training (4-bit: modeling) |
| dora   | weight-decomposed LoRA              | LoraConfig(use_dora=True)                                     |
| galore | all weights, projected optimizer    | TrainingArguments optim/optim_target_modules/optim_args       |
| full   | all weights                         | nothing                                                       |

Stages receive `peft_config` (TRL trainers wrap the model themselves; plain-Trainer stages call `wrap`) and
the runner merges `training_args_additions` into the common TrainingArguments. `validate` runs before any
training so a typo in targetModules fails in seconds, listing the names that would have worked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kubetune_api.defaults import effective_lora
from kubetune_api.finetunejob import FineTuneJobSpec

from .errors import ConfigError

TARGETS_FIELD = "spec.adapter.targetModules"
PEFT_TYPES = ("lora", "qlora", "dora")
# PiSSA/OLoRA move the principal components out of the base weights into the adapter at init time, so the
# saved adapter only reproduces the model on that *modified* base; see save_adapter.
MUTATING_INITS = ("pissa", "olora")
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def uses_peft(spec: FineTuneJobSpec) -> bool:
    return spec.adapter.type in PEFT_TYPES


# ------------------------------------------------------------------------------------------------ modules
def _adaptable_types() -> tuple:
    import torch
    from transformers.pytorch_utils import Conv1D

    # bitsandbytes' Linear4bit subclasses nn.Linear, so 4-bit models are covered too.
    return (torch.nn.Linear, Conv1D)


def linear_module_names(model) -> list[str]:
    """Distinct short names (q_proj, down_proj, lm_head, ...) of the model's linear layers: what
    targetModules can name."""
    types = _adaptable_types()
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if name and isinstance(mod, types)})


def _matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def check_target_modules(spec: FineTuneJobSpec, model) -> list[str]:
    """The effective target modules; ConfigError (spec.adapter.targetModules) when one matches nothing."""
    import torch

    targets = effective_lora(spec.adapter)["target_modules"]
    if "all-linear" in targets:
        if len(targets) > 1:
            raise ConfigError("'all-linear' cannot be combined with module names; use one or the other",
                              field=TARGETS_FIELD)
        return targets
    types = _adaptable_types() + (torch.nn.Embedding,)
    names = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    unknown = [t for t in targets if not _matches(t, names)]
    if unknown:
        raise ConfigError(
            f"no module named {', '.join(repr(t) for t in unknown)} in this model; its linear modules are "
            f"{linear_module_names(model)} (or use ['all-linear'])", field=TARGETS_FIELD)
    return targets


def validate(spec: FineTuneJobSpec, model) -> None:
    """Everything about the adapter that can be checked against the loaded model, before training."""
    from . import modeling

    a = spec.adapter
    if uses_peft(spec):
        check_target_modules(spec, model)
        if a.type == "qlora" and (a.init or "default") == "pissa":
            raise ConfigError("pissa initialises from an SVD of full-precision weights and cannot run on a 4-bit "
                              "base; use adapter type lora with pissa, or init olora/gaussian/default with qlora",
                              field="spec.adapter.init")
    if a.type == "galore":
        g = a.galore
        optimizer = g.optimizer if g else "galore_adamw"
        if "8bit" in optimizer and not modeling.has_cuda():
            raise ConfigError(f"{optimizer} needs a CUDA GPU; use galore_adamw on CPU",
                              field="spec.adapter.galore.optimizer")
        if "layerwise" in optimizer and spec.training.gradient_accumulation_steps > 1:
            raise ConfigError("layer-wise GaLore updates each layer during backward and cannot accumulate "
                              "gradients; set training.gradientAccumulationSteps: 1 or use galore_adamw",
                              field="spec.adapter.galore.optimizer")
        fragments = g.target_modules if g else ["attn", "mlp"]
        linear = [n for n, m in model.named_modules() if n and isinstance(m, _adaptable_types())]
        unmatched = [f for f in fragments if not any(f in n for n in linear)]
        if unmatched:
            raise ConfigError(
                f"{unmatched} match no linear layer (GaLore target modules are name fragments); linear layers "
                f"look like {linear[:6]}", field="spec.adapter.galore.targetModules")


# ------------------------------------------------------------------------------------------------ peft
def peft_config(spec: FineTuneJobSpec, model_kind: str = "causal"):
    """LoraConfig for lora/qlora/dora (None for full/galore), from effective_lora's defaults."""
    if not uses_peft(spec):
        return None
    from peft import LoraConfig, TaskType

    e = effective_lora(spec.adapter)
    return LoraConfig(
        r=e["r"],
        lora_alpha=e["lora_alpha"],
        lora_dropout=e["lora_dropout"],
        target_modules=e["target_modules"][0] if e["target_modules"] == ["all-linear"] else list(e["target_modules"]),
        use_rslora=e["use_rslora"],
        use_dora=spec.adapter.type == "dora",
        init_lora_weights=_INIT[e["init"]],
        bias="none",
        # SEQ_CLS also makes the classification head (score) fully trainable: a reward model's head is new.
        task_type=TaskType.SEQ_CLS if model_kind == "reward" else TaskType.CAUSAL_LM,
    )


def prepare_base(model, spec: FineTuneJobSpec):
    """qlora: peft's prepare_model_for_kbit_training (fp32 norms/head, input grads for checkpointing)."""
    if spec.adapter.type != "qlora":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def wrap(model, config):
    """get_peft_model, for stages that use a plain transformers.Trainer (TRL trainers wrap it themselves)."""
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)


def training_args_additions(spec: FineTuneJobSpec) -> dict:
    """TrainingArguments entries the adapter type adds (GaLore's optimizer and its settings)."""
    if spec.adapter.type != "galore":
        return {}
    from kubetune_api.finetunejob import GaLoreSpec

    g = spec.adapter.galore or GaLoreSpec()
    return {
        "optim": g.optimizer,
        "optim_target_modules": list(g.target_modules),
        "optim_args": f"rank={g.rank},update_proj_gap={g.update_proj_gap},scale={g.scale}",
    }


def parameter_count(param) -> int:
    """Parameters a tensor holds, not its storage elements. ZeRO-3 leaves each rank an empty partition of
    a parameter whose full size is `ds_numel`; bitsandbytes packs two 4-bit weights per byte
    (Params4bit.numel() is half the weight count, less with a wider quant_storage), so a QLoRA model counted
    by numel() looks half its size and its trainable share twice too large."""
    if hasattr(param, "ds_numel"):
        return int(param.ds_numel)
    if type(param).__name__ == "Params4bit":
        state = getattr(param, "quant_state", None)
        shape = getattr(state, "shape", None)
        if shape is not None:
            n = 1
            for d in shape:
                n *= int(d)
            return n
        return param.numel() * 2 * param.element_size()  # peft's rule, when the original shape is unknown
    return param.numel()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted as the parameters they are and ZeRO-3
    partitioned parameters (empty on each rank) by their full size `ds_numel`."""
    trainable = total = 0
    for p in model.parameters():
        n = parameter_count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ------------------------------------------------------------------------------------------------ saving
def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a trainer dependency
        return False
    return isinstance(model, PeftModel)


def needs_weight_conversion(spec: FineTuneJobSpec) -> bool:
    return uses_peft(spec) and (spec.adapter.init or "default") in MUTATING_INITS


def save_initial_adapter(model, directory: Path) -> Optional[Path]:
    """PiSSA/OLoRA: keep the adapter as initialised (before any step), so save_adapter can express the trained
    one as a plain LoRA on the *original* base. Deterministic inits (full SVD / QR) make this reproducible on
    a resumed run too."""
    if not is_peft_model(model):
        return None
    directory = Path(directory)
    cfg = model.peft_config["default"]
    init = cfg.init_lora_weights
    # Saved with init_lora_weights=True so that loading it never re-runs the SVD on an already-modified base.
    cfg.init_lora_weights = True
    try:
        model.save_pretrained(str(directory))
    finally:
        cfg.init_lora_weights = init
    return directory


def save_adapter(model, directory: Path, *, initial: Optional[Path] = None) -> Path:
    """The trained adapter in PEFT format, loadable with PeftModel.from_pretrained(original_base, directory).
    With `initial` (PiSSA/OLoRA) it is converted to a standard LoRA (rank doubles) relative to the unmodified
    base, so users need not know how it was initialised."""
    directory = Path(directory)
    if initial is not None:
        model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(initial))
    else:
        model.save_pretrained(str(directory))
    return directory


def merge(adapter_dir: Path, base_path: Path, spec: FineTuneJobSpec, model_kind: str = "causal"):
    """The base with the adapter merged in. The base is reloaded from its source in its checkpoint dtype
    (bf16 for most published models: never upcast to fp32, never 4-bit: merging into a quantized base
    re-quantizes the sum and shifts the logits). This holds the whole model on rank 0's host once."""
    from peft import PeftModel

    from . import distributed, modeling

    # Rank 0 alone merges: never under a live ZeRO-3 config's zero.Init (the other ranks would not join).
    with distributed.zero3_init_disabled():
        base = modeling.load_model(base_path, spec, kind=model_kind, quantize=False, dtype="auto")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged
