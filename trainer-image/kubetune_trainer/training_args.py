"""The keyword arguments every stage's TrainingArguments (or TRL config) gets, from the spec.

One function so that every stage logs, evaluates, checkpoints and handles precision the same way; a stage
adds only its own settings: `DPOConfig(**ctx.training_args, beta=...)`.

Values that are set explicitly because a default would be wrong for us:
- TRL configs default to bf16=True and gradient_checkpointing=True: both always come from the spec here
  (bf16 on a CPU raises "Your setup doesn't support bf16/gpu").
- logging_nan_inf_filter=False: the default *hides* NaN/inf losses from the logs; the NaN guard and the
  metrics must see them.
- report_to=[]: no wandb/tensorboard/trackio auto-detection; metrics go through monitoring/.
- disable_tqdm: the CLI draws its own progress; tqdm bars in pod logs are noise.
- deepspeed / ddp_backend: distributed.training_args_additions (the ZeRO config from spec.distributed).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune_api.finetunejob import FineTuneJob

from . import adapters, distributed, modeling
from .errors import ConfigError

log = logging.getLogger(__name__)


def precision_flags(job: FineTuneJob) -> dict:
    """bf16/fp16/use_cpu for the spec's precision on this machine."""
    p = job.spec.training.precision
    if not modeling.has_cuda():
        if p in ("bf16", "fp16"):
            # A GPU manifest run locally (kubetune run) still works, just slower and in fp32.
            log.warning("training.precision %s needs a GPU; training in fp32 on CPU", p)
        return {"use_cpu": True, "bf16": False, "fp16": False}
    if p == "auto":
        bf16 = modeling.bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    if p == "bf16" and not modeling.bf16_supported():
        raise ConfigError("this GPU does not support bf16; use precision fp16 or auto",
                          field="spec.training.precision")
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def build(job: FineTuneJob, work_dir: Path, *, has_eval: bool) -> dict:
    """The common TrainingArguments kwargs (see StageContext.training_args)."""
    t = job.spec.training
    # transformers 5 dropped warmup_ratio: a float warmup_steps in [0, 1) is the ratio.
    warmup = t.warmup_ratio if t.warmup_ratio < 1 else 0.999
    kwargs: dict = {
        "output_dir": str(Path(work_dir) / "checkpoints"),
        "run_name": f"{job.metadata.namespace}/{job.metadata.name}",
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": warmup,
        "weight_decay": t.weight_decay,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps if t.max_steps else -1,
        "seed": t.seed,
        "data_seed": t.seed,
        "max_grad_norm": t.max_grad_norm,
        "gradient_checkpointing": t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen (PEFT) embeddings without input-grad hooks.
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None,
        "logging_strategy": "steps",
        "logging_steps": t.log_every_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,
        "include_num_input_tokens_seen": True,
        "eval_strategy": "steps" if has_eval else "no",
        "save_strategy": "steps",
        "save_steps": t.checkpoint_every_steps,
        "save_total_limit": t.keep_checkpoints,
        # Checkpoints must hold optimizer, scheduler and RNG state: a restarted pod resumes exactly.
        "save_only_model": False,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": modeling.has_cuda(),
        **precision_flags(job),
    }
    if has_eval:
        kwargs["eval_steps"] = t.eval_every_steps
        # A step-0 evaluation is the baseline every later eval loss is judged against (metrics, model card,
        # early stopping's first "best"); it costs one pass over the eval set.
        kwargs["eval_on_start"] = True
    # Multi-process backend/timeout and the DeepSpeed ZeRO config (distributed.py owns both).
    kwargs.update(distributed.training_args_additions(job.spec))
    kwargs.update(adapters.training_args_additions(job.spec))
    return kwargs
