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

A job with `spec.model.adapter` starts from a saved adapter instead (a pipeline's handover continue):
`fetch_start_adapter` + `check_start_adapter` (does it fit spec.adapter and this base?) + `load_start_adapter`
(PeftModel.from_pretrained(..., is_trainable=True)); the stage then gets the PeftModel and no peft_config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kubetune_api.defaults import effective_lora
from kubetune_api.finetunejob import FineTuneJobSpec

from .errors import ConfigError, TrainerError

TARGETS_FIELD = "spec.adapter.targetModules"
START_FIELD = "spec.model.adapter"
ADAPTER_CONFIG = "adapter_config.json"
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


# ------------------------------------------------------------------------------------------------ start adapter
def fetch_start_adapter(uri: str, cache_dir: Path, *, endpoint: Optional[str] = None) -> Path:
    """spec.model.adapter, fetched like the model (storage.fetch: same cache, same storage patience). A missing
    or non-adapter folder is a ConfigError naming spec.model.adapter; store outages stay retriable."""
    from . import storage

    try:
        path = Path(storage.fetch(uri, cache_dir, endpoint=endpoint))
    except TrainerError as exc:
        raise type(exc)(exc.message, field=START_FIELD) from None
    if not path.is_dir() or not (path / ADAPTER_CONFIG).is_file():
        found = sorted(p.name for p in path.iterdir())[:15] if path.is_dir() else None
        raise ConfigError(
            f"no PEFT adapter at {uri}: expected a folder saved with save_pretrained ({ADAPTER_CONFIG} + "
            f"adapter_model.safetensors), e.g. an earlier run's adapter/ (status.artifacts.adapterUri)"
            + (f"; found {found or 'an empty folder'}" if found is not None else ""), field=START_FIELD)
    return path


def _module_names(model) -> list[str]:
    import torch

    types = _adaptable_types() + (torch.nn.Embedding,)
    return [n for n, m in model.named_modules() if n and isinstance(m, types)]


def check_start_adapter(spec: FineTuneJobSpec, path: Path, model, model_kind: str = "causal",
                        uri: Optional[str] = None):
    """The saved adapter's LoraConfig, after checking it fits: a LoRA (peft_type LORA), DoRA exactly when
    spec.adapter.type is dora, the head the stage trains (causal LM or sequence classifier), target modules
    this base has, and any rank/alpha/targetModules/useRslora the spec sets equal to the saved ones (the adapter
    keeps its shape). spec.adapter.dropout, when set, replaces the saved dropout. ConfigError (exit 78) naming
    the field and the fix otherwise."""
    import json
    import re

    from peft import LoraConfig

    uri = uri or str(path)
    try:
        saved = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{uri}/{ADAPTER_CONFIG} is not readable JSON ({exc}); save the adapter with "
                          "save_pretrained", field=START_FIELD) from None
    t = str(spec.adapter.type)
    peft_type = str(saved.get("peft_type") or "")
    if peft_type.upper() != "LORA":
        raise ConfigError(f"{uri} holds a {peft_type or 'unknown'} adapter; adapter type {t} continues a LoRA-"
                          f"family adapter (peft_type LORA): point spec.model.adapter at one, or remove it to train "
                          "a new adapter", field=START_FIELD)
    dora = bool(saved.get("use_dora"))
    if dora != (t == "dora"):
        have, fix = ("a DoRA adapter (use_dora: true)", "set spec.adapter.type: dora to continue it") if dora else (
            "a plain LoRA adapter (use_dora: false)", "set spec.adapter.type: lora (or qlora) to continue it")
        raise ConfigError(f"{uri} is {have} but spec.adapter.type is {t}: {fix}, or remove spec.model.adapter to "
                          f"train a new {t} adapter", field=START_FIELD)
    want_task = "SEQ_CLS" if model_kind == "reward" else "CAUSAL_LM"
    task = saved.get("task_type")
    if task not in (None, want_task):
        raise ConfigError(f"{uri} was trained for task {task}, but stage {spec.stage} trains a "
                          f"{'sequence classifier' if model_kind == 'reward' else 'causal language model'} "
                          f"({want_task}): give an adapter of a {spec.stage}-compatible stage", field=START_FIELD)
    names = _module_names(model)
    targets = saved.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [] if isinstance(targets, str) else [m for m in (targets or []) if not _matches(m, names)]
    if missing:
        raise ConfigError(f"{uri} adapts modules {missing} that spec.model.source has none of (its linear modules "
                          f"are {linear_module_names(model)}): spec.model.source must be the base this adapter was "
                          "trained on", field=START_FIELD)
    a = spec.adapter
    saved_targets = sorted(targets) if isinstance(targets, list) else targets
    explicit = [("rank", a.rank, saved.get("r")), ("alpha", a.alpha, saved.get("lora_alpha")),
                ("useRslora", a.use_rslora, bool(saved.get("use_rslora"))),
                ("targetModules", None if a.target_modules in (None, ["all-linear"]) else sorted(a.target_modules),
                 saved_targets)]
    for name, mine, theirs in explicit:
        if mine is not None and mine != theirs:
            raise ConfigError(f"{name} {mine!r} differs from the adapter spec.model.adapter starts from ({name} "
                              f"{theirs!r}): a continued adapter keeps its shape; remove spec.adapter.{name} (or set "
                              f"it to {theirs!r})", field=f"spec.adapter.{name}")
    config = LoraConfig.from_pretrained(str(path))
    if a.dropout is not None:
        config.lora_dropout = a.dropout
    config.inference_mode = False
    return config


def load_start_adapter(model, path: Path, config, *, uri: Optional[str] = None):
    """The base (already prepared: 4-bit for qlora) with the saved adapter, trainable. Weights that do not fit
    (another base of the same architecture family, other sizes) are a ConfigError naming spec.model.adapter."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=True)
    except Exception as exc:  # noqa: BLE001 - size mismatch, missing weights file, unknown modules
        raise ConfigError(f"cannot load the adapter {uri or path} onto spec.model.source: {type(exc).__name__}: "
                          f"{str(exc)[:400]}; spec.model.source must be the base this adapter was trained on",
                          field=START_FIELD) from None


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
