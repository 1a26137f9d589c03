"""Build a `StageContext` straight from a tiny model and generated data, without the runner.

The preference/RL stage tests need exactly what a stage receives in a pod (a loaded tokenizer and model, 4-bit for
qlora; a peft_config or None; datasets in TRL's column layout; the common TrainingArguments kwargs; a model loader
and a fetcher for reward models and custom reward code), and nothing else, so that they exercise the stage
modules alone and keep running while the runner changes. Models load through `modeling.load_model` and adapters
through `adapters.peft_config` / `prepare_base`, the same helpers the runner uses; the TrainingArguments dict is
built here, mirroring `training_args.build` on CPU.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional

from kubetune_api.finetunejob import FineTuneJob, parse_job
from kubetune_trainer import adapters, modeling, tiny
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.stages import StageContext, get_stage

# Stage -> dataset format its tests feed it.
FORMATS = {"dpo": "preference", "orpo": "preference", "kto": "unpaired_preference", "reward": "preference",
           "grpo": "prompt_only", "rloo": "prompt_only", "ppo": "prompt_only"}


def data_dir() -> Path:
    """The synthetic datasets (one jsonl per format), generated once per cache root."""
    root = Path(os.environ.get("KUBETUNE_TINY_CACHE", Path.home() / ".cache/kubetune/tiny")) / "data-400-0"
    if not (root / "prompt_only.jsonl").exists():
        tiny.generate_datasets(root, n=400, seed=0)
    return root


def rows(fmt: str) -> list[dict]:
    with (data_dir() / f"{fmt}.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def dataset(items: list[dict]):
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_list(items)


def make_job(stage: str, adapter: str = "lora", *, fmt: Optional[str] = None, training: Optional[dict] = None,
             stage_block: Optional[dict] = None, adapter_extra: Optional[dict] = None,
             model_uri: str = "file:///models/tiny", spec_extra: Optional[dict] = None) -> FineTuneJob:
    """A FineTuneJob parsed through the API models (so defaults and validation are the real ones)."""
    t = {"learningRate": 5e-3, "batchSize": 4, "maxSteps": 4, "maxLength": 64, "logEverySteps": 1,
         "warmupRatio": 0.0, "lrScheduler": "constant", **(training or {})}
    if stage_block is not None:
        t[stage] = stage_block
    a = {"type": adapter, **(adapter_extra or {})}
    if adapter in ("lora", "qlora", "dora") and "rank" not in a:
        a["rank"] = 8
    spec = {"stage": stage, "model": {"source": model_uri},
            "dataset": {"format": fmt or FORMATS[stage], "train": [{"uri": "file:///data/train.jsonl"}]},
            "adapter": a, "training": t, "output": {"uri": "file:///out"}, **(spec_extra or {})}
    return parse_job({"metadata": {"name": f"t-{stage}", "namespace": "test"}, "spec": spec})


def training_args(job: FineTuneJob, out_dir: Path, *, has_eval: bool, save_steps: Optional[int] = None) -> dict:
    """What the runner hands a stage (training_args.build, on this CPU machine), except that these tests save
    only when asked and skip the step-0 baseline evaluation (they measure before/after themselves)."""
    from kubetune_trainer import training_args as common

    kwargs = common.build(job, out_dir, has_eval=has_eval)
    kwargs["save_strategy"] = "steps" if save_steps else "no"
    kwargs["save_steps"] = save_steps or job.spec.training.checkpoint_every_steps
    kwargs.pop("eval_on_start", None)
    return kwargs


def local_path(uri: str) -> Path:
    if not uri.startswith("file://"):
        raise ConfigError(f"tests resolve file:// URIs only, got {uri}")
    path = Path(uri[len("file://"):])
    if not path.exists():
        raise ConfigError(f"no such file or folder: {uri}")
    return path


def model_loader(job: FineTuneJob):
    """StageContext.load_model for tests: file:// URIs, the spec's dtype, never quantized, eval mode."""

    def load(uri: str, kind: str = "causal", *, with_tokenizer: bool = False, field: str = "spec.training"):
        try:
            path = local_path(uri)
        except ConfigError as exc:
            raise ConfigError(exc.message, field=field) from None
        modeling.check_model_folder(path, uri, field)
        tok = modeling.load_tokenizer(path, job.spec, uri=uri, field=field)
        model = modeling.load_model(path, job.spec, kind=kind, tokenizer=tok, quantize=False, uri=uri)
        model.eval()
        return (model, tok) if with_tokenizer else model

    return load


def build_context(job: FineTuneJob, model_path: Path, train: list[dict], eval_rows: Optional[list[dict]],
                  out_dir: Path, *, callbacks: Optional[list] = None, save_steps: Optional[int] = None
                  ) -> StageContext:
    stage = get_stage(job.spec.stage)
    tok = modeling.load_tokenizer(Path(model_path), job.spec)
    model = modeling.load_model(Path(model_path), job.spec, kind=stage.model_kind, tokenizer=tok)
    adapters.validate(job.spec, model)
    model = adapters.prepare_base(model, job.spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        job=job, model=model, tokenizer=tok, peft_config=adapters.peft_config(job.spec, stage.model_kind),
        train_dataset=dataset(train), eval_dataset=dataset(eval_rows) if eval_rows else None,
        training_args=training_args(job, out_dir, has_eval=bool(eval_rows), save_steps=save_steps),
        callbacks=list(callbacks or []), work_dir=out_dir, load_model=model_loader(job), fetch=local_path,
    )


def build(stage: str, adapter: str, out_dir: Path, *, model_path: Optional[Path] = None, n_train: int = 32,
          n_eval: int = 0, fmt: Optional[str] = None, train_rows: Optional[list[dict]] = None,
          save_steps: Optional[int] = None, **job_kwargs):
    """(stage object, context, trainer) for a stage x adapter cell on the cached tiny model. The first n_eval
    rows are the eval split, the next n_train the training data."""
    job = make_job(stage, adapter, fmt=fmt, **job_kwargs)
    items = train_rows if train_rows is not None else rows(job.spec.dataset.format)
    ctx = build_context(job, model_path or tiny.cached_model(), items[n_eval:n_eval + n_train],
                        items[:n_eval] or None, out_dir, save_steps=save_steps)
    st = get_stage(stage)
    st.validate_dataset(ctx)
    return st, ctx, st.build_trainer(ctx)


# ------------------------------------------------------------------------------------------------ checks
def logged(trainer, key: str) -> list[float]:
    return [e[key] for e in trainer.state.log_history if key in e]


def trainable_snapshot(model) -> dict:
    """Copies of the trainable parameters, to tell afterwards whether training changed them.

    Why not compare outputs before and after: bitsandbytes 0.50 on CPU repacks 4-bit weights for its
    AVX512-BF16 inference kernel on the first eval-mode forward without grad, permanently, and gradients do not
    flow through that kernel to earlier layers, so an evaluation before training would corrupt the QLoRA run
    being tested."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(snapshot: dict, model, atol: float = 1e-7) -> bool:
    now = dict(model.named_parameters())
    return any((now[n].detach().float() - v.float()).abs().max().item() > atol for n, v in snapshot.items())


def sample_inputs(tokenizer, n: int = 3):
    rng = random.Random(1)
    texts = [f"What is {rng.randint(0, 9)} plus {rng.randint(0, 9)}? Answer: {rng.randint(0, 18)}"
             for _ in range(n)]
    return tokenizer(texts, return_tensors="pt", padding=True)


def reload_trained(trainer, ctx: StageContext, model_path: Path, out_dir: Path, kind: str = "causal"):
    """Save like the runner does (trainer.save_model) and load it back the way the model card says:
    PeftModel.from_pretrained(base, dir) for adapters (on a base loaded as the run loaded it: 4-bit for qlora),
    from_pretrained(dir) for full/galore. Returns (trained model, reloaded model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out_dir = Path(out_dir)
    trainer.save_model(str(out_dir))
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if adapters.uses_peft(ctx.spec):
        base = modeling.load_model(Path(model_path), ctx.spec, kind=kind, tokenizer=ctx.tokenizer)
        reloaded = PeftModel.from_pretrained(base, str(out_dir))
    else:
        auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        reloaded = auto.from_pretrained(str(out_dir), **({"num_labels": 1} if kind == "reward" else {}))
    # TRL trains QLoRA adapters in bf16 and saves them so; PEFT loads them back in fp32. Same values, different
    # matmul precision: give the reloaded parameters the dtypes they were trained in, to compare exactly.
    trained_dtypes = {n: p.dtype for n, p in trained.named_parameters()}
    for name, param in reloaded.named_parameters():
        if name in trained_dtypes and param.dtype != trained_dtypes[name]:
            param.data = param.data.to(trained_dtypes[name])
    return trained, reloaded


def output_of(model, inputs, kind: str = "causal"):
    import torch

    model.eval()
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return out.float()


def sample_completions(model, tokenizer, prompts: list[str], *, per_prompt: int, max_new_tokens: int,
                       seed: int = 0) -> list[str]:
    """Sampled completions (temperature 1, no top-k/top-p: the distribution the RL stages optimise)."""
    import torch

    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             num_return_sequences=per_prompt, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


__all__ = ["FORMATS", "build", "build_context", "make_job", "rows", "dataset", "training_args", "local_path",
           "model_loader", "logged", "trainable_snapshot", "changed", "sample_inputs", "sample_completions",
           "reload_trained", "output_of"]
