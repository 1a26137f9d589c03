"""Supervised fine-tuning (sft) with TRL's SFTTrainer, for three dataset formats:

- chat (`messages`): rendered with the tokenizer's chat template; loss only on assistant turns
  (`assistant_only_loss`, which needs `{% generation %}` markers: TRL patches the templates it knows; for
  others the loss falls back to the whole conversation, with a warning);
- prompt_completion: loss only on the completion (`completion_only_loss`);
- text: plain language modelling on `text`.

`training.packing` uses TRL's best-fit-decreasing packing (padding-free, position ids reset per example, so
examples in one row do not attend to each other).
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from ..monitoring import token_perplexity
from . import register
from .base import Stage, StageContext

log = logging.getLogger(__name__)


def assistant_only_possible(tokenizer) -> bool:
    """True when TRL can mask non-assistant tokens: the template has generation markers or TRL ships a
    training variant of it."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not template:
        return False
    if has_generation_markers(template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # noqa: BLE001 - TRL raises for templates it has no training variant of
        return False


@register
class SFTStage(Stage):
    name = "sft"

    def build_trainer(self, ctx: StageContext):
        from trl import SFTConfig, SFTTrainer

        spec = ctx.spec
        fmt = spec.dataset.format
        t = spec.training
        extra: dict = {"max_length": t.max_length, "packing": t.packing, "dataset_text_field": "text"}
        if fmt == "chat":
            if not ctx.tokenizer.chat_template:
                raise ConfigError("the model's tokenizer has no chat template, so chat data cannot be rendered; "
                                  "use dataset format prompt_completion or a model with a chat template",
                                  field="spec.dataset.format")
            extra["assistant_only_loss"] = assistant_only_possible(ctx.tokenizer)
            if not extra["assistant_only_loss"]:
                log.warning("the chat template has no {%% generation %%} markers and TRL has no training variant "
                            "of it: the loss covers the whole conversation, not only assistant turns")
        elif fmt == "prompt_completion":
            extra["completion_only_loss"] = True
        else:
            extra["completion_only_loss"] = False
        trainer = SFTTrainer(
            model=ctx.model,
            args=SFTConfig(**ctx.training_args, **extra),
            **ctx.trainer_kwargs(),
        )
        token_perplexity.install(trainer)  # eval_perplexity over the answer tokens the loss covers
        return trainer
