"""cpt/sft evaluations report a token-weighted perplexity: exp(total NLL / total labelled tokens), checked
against the same sum done by hand one example at a time.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/trainer/test_token_perplexity.py -q
"""

from __future__ import annotations

import math
import random

import pytest

from kubetune_trainer import tiny

from .stage_helpers import build, rows


def _nll_sum(model, input_ids, labels) -> tuple[float, int]:
    """Sum of -log p(token) over the labelled next-token targets of ONE unpadded sequence."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids[None]).logits[0, :-1].float()
    targets = labels[1:]
    keep = targets != -100
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return float(nll), int(keep.sum())


def test_cpt_perplexity_is_total_nll_over_total_tokens(tmp_path):
    import torch

    rng = random.Random(3)
    # Two long documents, then two one-sentence ones, evaluated two per batch: a mean of per-batch means weighs
    # the short batch's few tokens as much as the long batch's many, so it disagrees with the per-token figure.
    long_docs = [" ".join(tiny.domain_sentence(rng) for _ in range(4)) for _ in range(2)]
    short_docs = [tiny.general_sentence(rng) for _ in range(2)]
    eval_rows = [{"text": t} for t in long_docs + short_docs]
    train_rows = [{"text": tiny.domain_sentence(rng)} for _ in range(8)]
    _, ctx, trainer = build("cpt", "lora", tmp_path, fmt="text", train_rows=eval_rows + train_rows, n_eval=4,
                            n_train=8, training={"batchSize": 2, "packing": False, "maxLength": 128})
    metrics = trainer.evaluate()

    tok, model = ctx.tokenizer, trainer.model
    model.eval()
    total, tokens = 0.0, 0
    for text in long_docs + short_docs:
        ids = torch.tensor(tok(text)["input_ids"] + [tok.eos_token_id])
        nll, n = _nll_sum(model, ids, ids)
        total, tokens = total + nll, tokens + n
    by_hand = math.exp(total / tokens)
    assert metrics["eval_perplexity"] == pytest.approx(by_hand, rel=1e-5)
    assert abs(math.exp(metrics["eval_loss"]) / by_hand - 1) > 1e-3  # the batch-mean figure is not it


def test_sft_perplexity_counts_only_the_answer_tokens(tmp_path):
    _, ctx, trainer = build("sft", "lora", tmp_path, fmt="chat", n_eval=5, n_train=8, training={"batchSize": 2})
    metrics = trainer.evaluate()

    model = trainer.model
    model.eval()
    total, tokens = 0.0, 0
    for batch in trainer.get_eval_dataloader():
        for r in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][r].bool()
            nll, n = _nll_sum(model, batch["input_ids"][r][real], batch["labels"][r][real])
            total, tokens = total + nll, tokens + n
    answer_tokens = sum(len(ctx.tokenizer(m["messages"][1]["content"])["input_ids"]) + 1  # + its EOS
                        for m in rows("chat")[:5])
    assert tokens == answer_tokens  # assistant-only loss: the perplexity is over the answers
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
