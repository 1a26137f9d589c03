"""Kahneman-Tversky Optimization (kto) with TRL's KTOTrainer.

    spec.training.kto: {beta: 0.1, desirableWeight: 1.0, undesirableWeight: 1.0}   # all optional

Data: `unpaired_preference` (prompt, completion, label) as is, or `preference` pairs, which are unpaired here:
each pair becomes a desirable (prompt, chosen, true) and an undesirable (prompt, rejected, false) row, and the
rows are shuffled with `training.seed`. The shuffle matters: TRL's own unpairing puts a whole map batch of chosen
rows before all rejected rows, and KTO reads its training data *sequentially* (its KL estimate pairs each
completion with a neighbour's prompt in a fixed-order batch), so micro-batches would be all-desirable, then
all-undesirable.

KTO's KL estimate needs at least two examples per micro-batch (`training.batchSize >= 2`); it is checked before
the model is wrapped. The reference model is chosen as for DPO (adapter disabled, or a frozen copy).
"""

from __future__ import annotations

from kubetune_api.finetunejob import KTOParams

from ..errors import ConfigError
from . import register
from .base import Stage, StageContext
from .dpo import frozen_reference


def unpair(dataset, seed: int):
    """preference rows -> shuffled unpaired rows (prompt, completion, label); other formats pass through."""
    if dataset is None or "chosen" not in dataset.column_names:
        return dataset
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(dataset).shuffle(seed=seed).flatten_indices()


@register
class KTOStage(Stage):
    name = "kto"

    def build_trainer(self, ctx: StageContext):
        from trl import KTOConfig, KTOTrainer

        t = ctx.spec.training
        if t.batch_size < 2:
            raise ConfigError("kto estimates its KL term from the other examples of a micro-batch and needs "
                              "batchSize >= 2", field="spec.training.batchSize")
        p = t.kto or KTOParams()
        args = KTOConfig(
            **ctx.training_args,
            beta=p.beta,
            desirable_weight=p.desirable_weight,
            undesirable_weight=p.undesirable_weight,
            max_length=t.max_length,
        )
        return KTOTrainer(
            model=ctx.model,
            ref_model=frozen_reference(ctx),
            args=args,
            # KTO reads unpaired rows: the shared arguments, with the datasets unpaired.
            **{**ctx.trainer_kwargs(), "train_dataset": unpair(ctx.train_dataset, t.seed),
               "eval_dataset": unpair(ctx.eval_dataset, t.seed)},
        )
