"""Group Relative Policy Optimization (grpo) with TRL's GRPOTrainer: RL with verifiable rewards.

    spec:
      stage: grpo
      dataset: {format: prompt_only, train: [{uri: s3://data/math.jsonl}]}   # prompt + answer (+ any columns)
      training:
        batchSize: 8                     # completions per device per step (TRL's unit), not prompts
        grpo:
          numGenerations: 4              # completions per prompt; the advantage is relative within this group
          maxCompletionLength: 64
          temperature: 1.0
          beta: 0.0                      # KL to the reference; 0 skips the reference model entirely
          rewards:
            - {name: numeric_match, weight: 1.0, params: {tolerance: "0.01"}}
            - {name: think_answer_format, weight: 0.2}

Mapping: `GRPOConfig(**ctx.training_args, num_generations, max_completion_length, temperature, beta,
reward_weights)` and `GRPOTrainer(reward_funcs=...)` with the functions from `rewards.build` (built-ins or your
`module:function`). Every extra dataset column (e.g. `answer`) reaches the reward functions as a keyword
argument; a reward that reads a column the data lacks fails before training (DataError).

Batch geometry (TRL's constraints, shared with rloo): one generation round produces `generation_batch_size`
completions, which must hold whole groups (a multiple of numGenerations) and be a multiple of the global batch
(batchSize x processes). TRL's default is batchSize x processes x gradientAccumulationSteps; when that is not a
multiple of numGenerations it is raised here to the least common multiple with numGenerations (so, for
example, batchSize 2 with numGenerations 4 still works: each generation round then feeds two optimizer
micro-steps) instead of failing with TRL's ValueError. The eval batch is rounded up to whole groups likewise.

With LoRA the reference model (beta > 0) is the adapter-disabled base; for full fine-tuning TRL reloads the
base. TRL logs `reward`, `reward_std`, `kl` and each function's `rewards/<name>/mean`.
"""

from __future__ import annotations

import logging
import math

from .. import distributed
from . import register
from .base import Stage, StageContext

log = logging.getLogger(__name__)


def generation_kwargs(training_args: dict, num_generations: int, *, has_eval: bool) -> dict:
    """generation_batch_size / per_device_eval_batch_size that satisfy TRL's group constraints (see docstring)."""
    world = max(1, distributed.world_size())
    per_step = int(training_args.get("per_device_train_batch_size", 8)) * world
    default = per_step * int(training_args.get("gradient_accumulation_steps", 1))
    out: dict = {}
    if default % num_generations:
        gen = math.lcm(default, num_generations)
        log.info("generation batch raised from %d to %d completions so that it holds whole groups of %d",
                 default, gen, num_generations)
        out["generation_batch_size"] = gen
    if has_eval:
        eval_bs = int(training_args.get("per_device_eval_batch_size", per_step // world))
        # (per-device eval batch x world) must hold whole groups: round the per-device batch up to a multiple of
        # num_generations / gcd(num_generations, world).
        per_device = num_generations // math.gcd(num_generations, world)
        out["per_device_eval_batch_size"] = per_device * max(1, math.ceil(eval_bs / per_device))
    return out


def check_group_columns(ctx: StageContext, rset) -> None:
    """DataError before training when a reward reads a column the train or eval data lacks."""
    from .. import rewards

    rewards.check_columns(rset, ctx.train_dataset.column_names)
    if ctx.eval_dataset is not None:
        rewards.check_columns(rset, ctx.eval_dataset.column_names, dataset_field="spec.dataset.eval")


@register
class GRPOStage(Stage):
    name = "grpo"

    def build_trainer(self, ctx: StageContext):
        from trl import GRPOConfig, GRPOTrainer

        from .. import rewards
        from ..errors import ConfigError

        p = ctx.spec.training.grpo
        if p is None or not p.rewards:
            raise ConfigError("stage grpo needs at least one reward function", field="spec.training.grpo.rewards")
        rset = rewards.build(p.rewards, fetch=ctx.fetch, field="spec.training.grpo.rewards")
        check_group_columns(ctx, rset)
        args = GRPOConfig(
            # generation_kwargs may replace the common eval batch size (it must hold whole groups).
            **{**ctx.training_args,
               **generation_kwargs(ctx.training_args, p.num_generations, has_eval=ctx.eval_dataset is not None)},
            num_generations=p.num_generations,
            max_completion_length=p.max_completion_length,
            temperature=p.temperature,
            beta=p.beta,
            reward_weights=rset.weights,
        )
        return GRPOTrainer(
            model=ctx.model,
            reward_funcs=rset.funcs,
            args=args,
            **ctx.trainer_kwargs(),
        )
