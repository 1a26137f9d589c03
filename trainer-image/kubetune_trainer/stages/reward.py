"""Reward-model training (reward) with TRL's RewardTrainer, on `preference` data.

    spec.training.reward: {centerRewardsCoefficient: 0.01}   # optional

The model is loaded as `AutoModelForSequenceClassification(num_labels=1)` (`model_kind = "reward"`): the base's
transformer plus a new one-output `score` head. With LoRA/QLoRA/DoRA the PEFT task type is SEQ_CLS, which
makes the new head fully trainable (and saved with the adapter) next to the low-rank updates. The loss is the
Bradley-Terry -log sigmoid(r_chosen - r_rejected) (+ centring term when configured); TRL logs `accuracy` and
`margin`, which feed the `kubetune_preference_reward_*` metrics.

The result is what `ppo` and `rloo` take as `rewardModel`. RewardTrainer scores `prompt + completion + EOS`;
`rewards.RewardModelScorer` scores the RL stages' completions the same way.

QLoRA: RewardTrainer casts every trainable parameter of a quantized model to bf16 (the QLoRA paper's recipe
for the LoRA matrices), including the score head. LoRA layers cast their input to their own dtype, but the
score head is a plain Linear fed by fp32 hidden states without autocast (always on CPU) and fails with a dtype
mismatch. The head is therefore put back in fp32, the dtype of the hidden states it reads.
"""

from __future__ import annotations

import logging

from kubetune_api.finetunejob import RewardModelParams

from . import register
from .base import Stage, StageContext

log = logging.getLogger(__name__)


def _restore_head_dtype(model) -> None:
    """Trainable non-LoRA parameters (the score-head copy PEFT trains) back to fp32: prepare_model_for_kbit_training
    keeps every non-quantized weight, final norm included, in fp32, so that is the dtype of the hidden states the
    head reads (under bf16/fp16 autocast on a GPU, autocast casts both sides anyway)."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


@register
class RewardStage(Stage):
    name = "reward"
    model_kind = "reward"

    def build_trainer(self, ctx: StageContext):
        from trl import RewardConfig, RewardTrainer

        p = ctx.spec.training.reward or RewardModelParams()
        args = RewardConfig(
            **ctx.training_args,
            max_length=ctx.spec.training.max_length,
            center_rewards_coefficient=p.center_rewards_coefficient,
        )
        trainer = RewardTrainer(
            model=ctx.model,
            args=args,
            **ctx.trainer_kwargs(),
        )
        if getattr(ctx.model, "is_loaded_in_4bit", False) or getattr(ctx.model, "is_loaded_in_8bit", False):
            _restore_head_dtype(trainer.model)
        return trainer
