"""Direct Preference Optimization (dpo) with TRL's DPOTrainer, on `preference` data (prompt, chosen, rejected).

    spec.training.dpo: {beta: 0.1, lossType: sigmoid, labelSmoothing: 0.0}   # all optional

Mapping: `DPOConfig(**ctx.training_args, beta, loss_type=[lossType], label_smoothing, max_length=maxLength)`.

The reference model (what the implicit reward is measured against) is:
- LoRA / QLoRA / DoRA: the same network with the adapter disabled (TRL does this when it wraps the model from
  `peft_config`): no second copy of the weights in memory, and exactly the starting policy;
- full / GaLore: a frozen copy of the starting weights, made here before any step. TRL would otherwise reload
  the base from `config._name_or_path`, which is a cache path on the pod (and a second read of a large model);
  the copy is the same weights with no I/O. Under DeepSpeed ZeRO-3 the parameters are partitioned and cannot be
  deep-copied, so TRL's own reload (which it prepares for ZeRO-3) is used instead.

TRL logs `rewards/margins` and `rewards/accuracies` (chosen vs rejected implicit reward), which feed the
`kubetune_preference_reward_*` metrics.
"""

from __future__ import annotations

import copy
import logging

from kubetune_api.finetunejob import DPOParams

from . import register
from .base import Stage, StageContext

log = logging.getLogger(__name__)


def zero3_enabled() -> bool:
    """True when transformers will partition parameters with DeepSpeed ZeRO-3 (deep copies are impossible)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return bool(is_deepspeed_zero3_enabled())


def frozen_reference(ctx: StageContext):
    """The reference policy for preference/RL stages that need one: None for PEFT (the trainer disables the
    adapter instead) or under ZeRO-3 (TRL reloads it itself); else a frozen eval-mode copy of the base."""
    if ctx.peft_config is not None or zero3_enabled():
        return None
    ref = copy.deepcopy(ctx.model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@register
class DPOStage(Stage):
    name = "dpo"

    def build_trainer(self, ctx: StageContext):
        from trl import DPOConfig, DPOTrainer

        p = ctx.spec.training.dpo or DPOParams()
        args = DPOConfig(
            **ctx.training_args,
            beta=p.beta,
            loss_type=[p.loss_type],
            label_smoothing=p.label_smoothing,
            # prompt + completion tokens; longer pairs are truncated (keep_start), as the other stages do.
            max_length=ctx.spec.training.max_length,
        )
        return DPOTrainer(
            model=ctx.model,
            ref_model=frozen_reference(ctx),
            args=args,
            **ctx.trainer_kwargs(),
        )
