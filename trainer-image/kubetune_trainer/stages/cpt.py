"""Continued pre-training (cpt): next-token loss on raw domain text (dataset format text).

Uses a plain `transformers.Trainer` with its own packing instead of TRL's SFTTrainer(packing=True): CPT needs
none of SFTTrainer's chat/completion masking, and on the team's measurements (shared notes, trainer-stack.md)
SFTTrainer packing ran ~2x slower per step than a plain Trainer fed pre-packed fixed-length blocks (its
padding-free packing rebuilds position ids / block masks every batch). Packing here is the classic
`run_clm` recipe: tokenize every document, end it with EOS, concatenate, cut into maxLength blocks.
Documents may share a block (attention crosses the EOS boundary), which is the standard pre-training
trade-off: no padding, every token trains.

Without `training.packing` each document is its own row, truncated to maxLength and padded per batch.

Every document ends with EOS and that EOS is a training target, so the model learns where documents end.
transformers' DataCollatorForLanguageModeling would mask every position holding the pad id, and for a tokenizer
whose pad token is its EOS (modeling.load_tokenizer's fallback) that silently drops every EOS label; TRL's
collator used here masks only the padding it adds (labels padded with -100).
"""

from __future__ import annotations

from .. import adapters
from ..errors import DataError
from ..monitoring import token_perplexity
from . import register
from .base import Stage, StageContext


def tokenize_texts(dataset, tokenizer, max_length: int, packing: bool):
    """text rows -> input_ids/attention_mask rows (packed into max_length blocks, or one per document)."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        if eos is not None:
            ids = [x if x and x[-1] == eos else x + [eos] for x in ids]
        return {"input_ids": ids}

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    if not packing:
        def truncate(batch):
            ids = [x[:max_length] for x in batch["input_ids"]]
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

        return tokenized.map(truncate, batched=True)

    def pack(batch):
        flat = [t for x in batch["input_ids"] for t in x]
        # Keep a short tail only when it is all there is: otherwise dropping < max_length tokens per map batch
        # keeps every block the same length (no padding at all).
        n = (len(flat) // max_length) * max_length or len(flat)
        blocks = [flat[i:i + max_length] for i in range(0, n, max_length)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]}

    return tokenized.map(pack, batched=True, batch_size=1000)


def collator(tokenizer):
    """Labels = input_ids (the model shifts them); only the padding the collator adds becomes -100, never a
    real token that happens to share the pad id (EOS, when the tokenizer pads with it)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)


@register
class CPTStage(Stage):
    name = "cpt"

    def build_trainer(self, ctx: StageContext):
        from transformers import Trainer, TrainingArguments

        t = ctx.spec.training
        train = tokenize_texts(ctx.train_dataset, ctx.tokenizer, t.max_length, t.packing)
        if len(train) == 0:
            raise DataError("the training text tokenizes to nothing", field="spec.dataset.train")
        evald = tokenize_texts(ctx.eval_dataset, ctx.tokenizer, t.max_length, t.packing) \
            if ctx.eval_dataset is not None and len(ctx.eval_dataset) else None
        trainer = Trainer(
            model=adapters.wrap(ctx.model, ctx.peft_config),
            args=TrainingArguments(**ctx.training_args),
            train_dataset=train,
            eval_dataset=evald,
            data_collator=collator(ctx.tokenizer),
            processing_class=ctx.tokenizer,
            callbacks=list(ctx.callbacks),
        )
        token_perplexity.install(trainer)
        return trainer
