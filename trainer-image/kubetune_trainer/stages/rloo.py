"""REINFORCE Leave-One-Out (rloo) with TRL's RLOOTrainer: online RL against a reward model and/or reward functions.

    spec:
      stage: rloo
      dataset: {format: prompt_only, train: [{uri: s3://data/prompts.jsonl}]}
      training:
        rloo:
          rewardModel: s3://out/ml/my-rm/adapter  # a reward job's output: adapter/ (LoRA or full) or merged/
          numGenerations: 4            # RLOO's k: each completion's baseline is the mean of the other k-1
          maxCompletionLength: 64
          beta: 0.05                   # KL penalty to the reference policy
          rewards: [{name: length_penalty, weight: 1.0, params: {target: "48"}}]   # optional, added to the score

Mapping: `RLOOConfig(**ctx.training_args, num_generations, max_completion_length, temperature, beta,
reward_weights)` and `RLOOTrainer(reward_funcs=[reward model scorer, *reward functions])`. The reward model is
loaded with `ctx.load_model(uri, kind="reward")` (AutoModelForSequenceClassification, num_labels=1, eval mode,
never quantized) with its own tokenizer - or, for a LoRA reward job's `adapter/` output, its base (from that
job's manifest.json) with the adapter merged in - and is handed to TRL as a `rewards.RewardModelScorer` function rather
than as a bare model: the scorer appends EOS the way RewardTrainer did when it trained the model (see
rewards/model.py), which TRL's built-in reward-model path does not. Its weight is 1; it is logged as
`rewards/reward_model/mean`.

Batch geometry and reference model: as for grpo (see grpo.py).
"""

from __future__ import annotations

from . import register
from .base import Stage, StageContext
from .grpo import check_group_columns, generation_kwargs


def load_scorer(ctx: StageContext, uri: str, field: str):
    """The reward model at `uri` (a merged/full model folder or a reward job's adapter/) as a scorer."""
    from ..rewards import load_reward_model

    return load_reward_model(uri, fetch=ctx.fetch, load_model=ctx.load_model, field=field,
                             max_length=ctx.spec.training.max_length)


@register
class RLOOStage(Stage):
    name = "rloo"

    def build_trainer(self, ctx: StageContext):
        from trl import RLOOConfig, RLOOTrainer

        from .. import rewards
        from ..errors import ConfigError

        p = ctx.spec.training.rloo
        if p is None or (p.reward_model is None and not p.rewards):
            raise ConfigError("stage rloo needs rewardModel or at least one reward function",
                              field="spec.training.rloo")
        rset = rewards.build(p.rewards, fetch=ctx.fetch, field="spec.training.rloo.rewards")
        check_group_columns(ctx, rset)
        funcs, weights = list(rset.funcs), list(rset.weights)
        scorer = None
        if p.reward_model:
            scorer = load_scorer(ctx, p.reward_model, "spec.training.rloo.rewardModel")
            funcs.insert(0, scorer)
            weights.insert(0, 1.0)
        args = RLOOConfig(
            # generation_kwargs may replace the common eval batch size (it must hold whole groups).
            **{**ctx.training_args,
               **generation_kwargs(ctx.training_args, p.num_generations, has_eval=ctx.eval_dataset is not None)},
            num_generations=p.num_generations,
            max_completion_length=p.max_completion_length,
            temperature=p.temperature,
            beta=p.beta,
            reward_weights=weights,
        )
        trainer = RLOOTrainer(
            model=ctx.model,
            reward_funcs=funcs,
            args=args,
            **ctx.trainer_kwargs(),
        )
        if scorer is not None:
            # TRL places only models it was given as models; the scorer's model follows the policy's device.
            scorer.to(trainer.accelerator.device)
        return trainer
