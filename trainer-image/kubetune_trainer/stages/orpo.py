"""Odds Ratio Preference Optimization (orpo) with TRL's ORPOTrainer, on `preference` data.

    spec.training.orpo: {beta: 0.1}   # optional; weight of the odds-ratio term (the paper's lambda)

Mapping: `trl.experimental.orpo.ORPOConfig(**ctx.training_args, beta, max_length=maxLength)`. In TRL 1.16 ORPO
lives under `trl.experimental` (it left the stable API); the import path is the only difference for us.

ORPO needs no reference model: the loss is the SFT loss on `chosen` plus beta times the log odds ratio of chosen
over rejected, so it does SFT and preference alignment in one stage. It logs `rewards/margins` and
`rewards/accuracies` like DPO.
"""

from __future__ import annotations

import warnings

from kubetune_api.finetunejob import ORPOParams

from . import register
from .base import Stage, StageContext


@register
class ORPOStage(Stage):
    name = "orpo"

    def build_trainer(self, ctx: StageContext):
        with warnings.catch_warnings():
            # "experimental" is a statement about TRL's API stability, not something the user can act on.
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        p = ctx.spec.training.orpo or ORPOParams()
        args = ORPOConfig(**ctx.training_args, beta=p.beta, max_length=ctx.spec.training.max_length)
        return ORPOTrainer(
            model=ctx.model,
            args=args,
            **ctx.trainer_kwargs(),
        )
