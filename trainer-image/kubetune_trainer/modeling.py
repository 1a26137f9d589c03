"""Tokenizer and model loading: `from_pretrained` on a local folder that storage.fetch produced.

What the spec decides here: the weights dtype, 4-bit quantization (qlora), whether shipped Python code may
run (`trustRemoteCode`, off unless the spec says so), and the head (causal LM, or a one-label sequence
classifier for reward models). A model that cannot be loaded is a `ConfigError` naming `spec.model.source`:
retrying the pod would fail the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from kubetune_api.finetunejob import FineTuneJobSpec

from .errors import ConfigError, InsufficientMemoryError

log = logging.getLogger(__name__)

SOURCE_FIELD = "spec.model.source"
# Adapter types whose base weights stay frozen: a bf16 base is fine for them. full/galore update every
# weight, and AdamW steps on bf16 weights round away (update << weight), so those keep fp32 master weights
# and get bf16 speed from mixed precision (autocast) instead.
FROZEN_BASE_ADAPTERS = ("lora", "qlora", "dora")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: FineTuneJobSpec):
    """The torch dtype weights are loaded in. `auto`: the training precision on a GPU (bf16 where supported,
    fp16 when the spec asks for it), fp32 on CPU. full/galore without DeepSpeed load fp32 (see
    FROZEN_BASE_ADAPTERS); with DeepSpeed they load in the training precision: DeepSpeed keeps the fp32
    master weights inside its optimizer and casts the model to bf16/fp16 anyway, so an fp32 load would only
    double the host memory every rank needs while loading (280 GB instead of 140 for a 70B model)."""
    import torch

    if spec.model.dtype != "auto":
        return getattr(torch, _DTYPES[spec.model.dtype])
    uses_deepspeed = getattr(spec.distributed, "deepspeed", None) is not None if spec.distributed else False
    if not has_cuda() or spec.training.precision == "fp32" or (
            spec.adapter.type not in FROZEN_BASE_ADAPTERS and not uses_deepspeed):
        return torch.float32
    if spec.training.precision == "fp16" or not bf16_supported():
        return torch.float16
    return torch.bfloat16


def compute_dtype(spec: FineTuneJobSpec):
    """Matmul dtype of the de-quantized 4-bit weights (qlora)."""
    import torch

    q = spec.adapter.quantization
    choice = q.compute_dtype if q else "auto"
    if choice != "auto":
        return getattr(torch, _DTYPES[choice])
    if not has_cuda():
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float16


def quantization_config(spec: FineTuneJobSpec):
    """BitsAndBytesConfig for qlora (4-bit nf4/fp4, optional double quantization); None otherwise.
    bitsandbytes >= 0.49 has CPU kernels, so this also runs (slowly) without a GPU."""
    if spec.adapter.type != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    q = spec.adapter.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type if q else "nf4",
        bnb_4bit_use_double_quant=q.double_quant if q else True,
        bnb_4bit_compute_dtype=compute_dtype(spec),
    )


def fetch_model(uri: str, cache_dir: Path, *, endpoint: Optional[str] = None, revision: Optional[str] = None,
                field: str = SOURCE_FIELD) -> Path:
    """storage.fetch, with a missing model re-labelled as the spec field it came from (storage's message
    already names the URI and what exists nearby). Store outages stay retriable TrainerErrors."""
    from . import storage

    try:
        path = storage.fetch(uri, cache_dir, endpoint=endpoint, revision=revision)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=field) from None
    check_model_folder(path, uri, field)
    return path


def check_model_folder(path: Path, uri: str, field: str = SOURCE_FIELD) -> None:
    if not Path(path).is_dir():
        raise ConfigError(f"no model at {uri}: expected a folder saved with save_pretrained "
                          "(config.json + weights)", field=field)
    if not (Path(path) / "config.json").exists():
        found = sorted(p.name for p in Path(path).iterdir())[:15]
        raise ConfigError(f"no model at {uri}: the folder has no config.json (found: {found or 'nothing'}); "
                          "save the model with save_pretrained", field=field)


def _load_error(exc: Exception, uri: str, spec: FineTuneJobSpec) -> ConfigError:
    text = str(exc)
    if "trust_remote_code" in text and not spec.model.trust_remote_code:
        return ConfigError(f"{uri} ships its own model code; set spec.model.trustRemoteCode: true only if you "
                           "trust it", field="spec.model.trustRemoteCode")
    return ConfigError(f"cannot load the model from {uri}: {type(exc).__name__}: {text[:400]}", field=SOURCE_FIELD)


def load_tokenizer(path: Path, spec: FineTuneJobSpec, *, uri: Optional[str] = None, field: str = SOURCE_FIELD):
    """AutoTokenizer from the model folder (or spec.model.tokenizer's).

    Batching needs a pad token. A tokenizer without one gets an existing token, never a new one (a new token
    would resize the embedding matrix, which an adapter cannot carry): its unk token when it has one distinct
    from EOS, else EOS itself. Padding with EOS is safe here because every collator kubetune uses masks the
    padding it adds by position, not by token id, so the real EOS at the end of a document or assistant turn
    keeps its label and the model learns to stop (tests/trainer/test_eos.py)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=spec.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here means the folder is not a usable tokenizer
        err = _load_error(exc, uri or str(path), spec)
        raise ConfigError(err.message.replace("the model", "the tokenizer"), field=field) from None
    if tok.pad_token is None:
        if tok.eos_token is None and tok.unk_token is None:
            raise ConfigError("the tokenizer has no pad, eos or unk token to pad batches with", field=field)
        distinct_unk = tok.unk_token is not None and tok.unk_token != tok.eos_token
        tok.pad_token = tok.unk_token if distinct_unk or tok.eos_token is None else tok.eos_token
        log.info("tokenizer has no pad token; padding with %r (padding is masked by position, so EOS labels stay)",
                 tok.pad_token)
    return tok


def load_model(path: Path, spec: FineTuneJobSpec, *, kind: str = "causal", tokenizer: Any = None,
               quantize: bool = True, dtype: Any = None, uri: Optional[str] = None):
    """from_pretrained with the spec's dtype, 4-bit for qlora (when `quantize`), and the stage's head.

    kind: "causal" (AutoModelForCausalLM) or "reward" (AutoModelForSequenceClassification, num_labels=1).
    dtype: override (the merge helper loads the full-precision base in the checkpoint's own dtype: "auto").
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype is not None else resolve_dtype(spec),
        "trust_remote_code": spec.model.trust_remote_code,
    }
    qconf = quantization_config(spec) if quantize else None
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        if has_cuda():
            from . import distributed

            # 4-bit weights are quantized while loading, on the device they will live on: the Trainer cannot
            # move a quantized model afterwards.
            kwargs["device_map"] = {"": distributed.local_rank()}
    if kind == "reward":
        kwargs["num_labels"] = 1
        auto = AutoModelForSequenceClassification
    elif kind == "causal":
        auto = AutoModelForCausalLM
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - config/weights mismatch, unknown architecture, missing files
        raise _load_error(exc, uri or str(path), spec) from None
    if qconf is not None and not has_cuda():
        _disable_cpu_4bit_repacking(model)
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        # Sequence classifiers find the last real token through pad_token_id; causal LMs use it for padding.
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _disable_cpu_4bit_repacking(model) -> None:
    """bitsandbytes 0.50 on CPU repacks 4-bit weights for a faster inference kernel on the first no-grad
    forward in eval mode (e.g. the reference-perplexity pass or any evaluation). After that the input
    gradients through those layers are wrong (measured: cosine -0.04 with the true gradient), so a QLoRA run
    would silently train on garbage. Turning the repacking off keeps CPU QLoRA correct; GPUs never repack."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - qlora already required it to load
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def model_loader(spec: FineTuneJobSpec, cache_dir: Path, endpoint: Optional[str] = None) -> Callable[..., Any]:
    """StageContext.load_model: another model by URI (a reward model for RLOO/PPO, a value-model init), in
    the spec's dtype, never quantized, in eval mode. `load(uri, kind)` returns the model;
    `load(uri, kind, with_tokenizer=True)` returns (model, tokenizer)."""

    def load(uri: str, kind: str = "causal", *, with_tokenizer: bool = False, field: str = "spec.training"):
        path = fetch_model(uri, cache_dir, endpoint=endpoint, field=field)
        tok = load_tokenizer(path, spec, uri=uri, field=field)
        model = load_model(path, spec, kind=kind, tokenizer=tok, quantize=False, uri=uri)
        model.eval()
        return (model, tok) if with_tokenizer else model

    return load


ENV_GPU_MEMORY = "KUBETUNE_GPU_MEMORY"  # a declared per-GPU memory (quantity), when lower than the device's


def check_memory(spec: FineTuneJobSpec, path: Path) -> None:
    """Refuse a job whose memory estimate (kubetune_api.memory, from the fetched config.json) exceeds this
    GPU, before any weights load: InsufficientMemoryError (exit 78) with the numbers and the cheapest fixes.
    The operator cannot do this (config.json sits behind the job's own storage credentials); this is the
    first moment anyone can. No-op without a GPU and for architectures the estimate does not know."""
    if spec.resources.gpus == 0 or not has_cuda():
        return
    from kubetune_api import memory

    from . import distributed

    try:
        shape = memory.ModelShape.from_config(json.loads((Path(path) / "config.json").read_text()))
    except (memory.ModelConfigError, ValueError, OSError) as exc:
        log.info("no memory estimate for this model: %s", exc)
        return
    import torch

    device = torch.cuda.get_device_properties(distributed.local_rank())
    available, source = device.total_memory, f"{device.name}"
    declared = os.environ.get(ENV_GPU_MEMORY)
    declared_bytes, declared_source = memory.declared_gpu_memory(
        spec, memory.parse_quantity(declared) if declared else None)
    if declared_bytes and declared_bytes < available:
        available, source = declared_bytes, declared_source
    verdict = memory.check(spec, shape, available, source)
    est = verdict.estimate if verdict else memory.estimate(spec, shape)
    log.info("memory estimate: %s GiB per GPU of %s GiB (%s): %s", memory.gib(est.gpu_total), memory.gib(available),
             source, memory.breakdown(est.gpu))
    if verdict is not None:
        raise InsufficientMemoryError(verdict.message(), field="spec.resources")
