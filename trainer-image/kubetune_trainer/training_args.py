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
- the published model is the BEST checkpoint when evaluation runs (best_model below): transformers' own
  metric_for_best_model / load_best_model_at_end pick it, and its checkpoint rotation never deletes it.
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


# What "best" means per stage: the eval metric and whether higher is better. Stages not listed (the online RL
# stages: their eval loss is not a quality measure) publish their last step.
BEST_METRIC: dict[str, tuple[str, bool]] = {
    "cpt": ("eval_loss", False), "sft": ("eval_loss", False), "dpo": ("eval_loss", False),
    "orpo": ("eval_loss", False), "kto": ("eval_loss", False), "reward": ("eval_loss", False),
}


def publish_policy(job: FineTuneJob) -> str:
    """spec.output.publish: "best" (default) or "last"."""
    return job.spec.output.publish


def best_model(job: FineTuneJob, *, has_eval: bool) -> tuple[tuple[str, bool] | None, str]:
    """(metric, greater_is_better) the published checkpoint is chosen by, or None and why the last step is
    published instead ("output.publish: last", "no evaluation data", "stage grpo has no eval metric")."""
    if publish_policy(job) == "last":
        return None, "output.publish: last"
    if not has_eval:
        return None, "no evaluation data"
    metric = BEST_METRIC.get(job.spec.stage)
    if metric is None:
        return None, f"stage {job.spec.stage} has no eval metric to choose by"
    return metric, "best"


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
    best, _why = best_model(job, has_eval=has_eval)
    if best is not None:
        # transformers tracks state.best_metric / best_global_step and protects the best checkpoint from rotation.
        # load_best_model_at_end is switched on by the runner once the Trainer exists (enable_best_model).
        kwargs.update(metric_for_best_model=best[0], greater_is_better=best[1])
    # Multi-process backend/timeout and the DeepSpeed ZeRO config (distributed.py owns both).
    kwargs.update(distributed.training_args_additions(job.spec))
    kwargs.update(adapters.training_args_additions(job.spec))
    return kwargs


def enable_best_model(trainer) -> bool:
    """Turn on `load_best_model_at_end` on a built Trainer whose args name a metric_for_best_model.

    Set here rather than in the constructor's kwargs because TrainingArguments refuses it unless checkpoints
    fall on evaluation steps (save_steps a multiple of eval_steps): without that the best evaluation might have
    no checkpoint. checkpointing.CheckpointSync saves a checkpoint at every evaluation that is a new best, which
    is the guarantee that check stands in for, so any checkpointEverySteps / evalEverySteps pair works."""
    if getattr(trainer.args, "metric_for_best_model", None) is None:
        return False
    trainer.args.load_best_model_at_end = True
    return True
