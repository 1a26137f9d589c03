"""Reference perplexity: the forgetting check measures it on general text before and after training."""

from __future__ import annotations

import math

from ..errors import DataError


def reference_perplexity(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 8) -> float:
    """exp of the token-weighted mean negative log-likelihood of `texts` (each truncated to max_length tokens).

    Token-weighted, not a mean of per-batch means: the result does not depend on batch_size or on how texts of
    different lengths are grouped. Runs under no_grad in eval mode (dropout off) and restores the model's mode.
    """
    import torch

    if not texts:
        raise DataError("the reference set is empty", field="spec.evaluation.reference")
    pad_added = False
    if tokenizer.pad_token_id is None:  # batching needs a pad token; the labels mask it out anyway
        tokenizer.pad_token = tokenizer.eos_token
        pad_added = True
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length)
                input_ids = enc["input_ids"].to(device)
                mask = enc["attention_mask"].to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                # position t predicts token t+1; only real (unpadded) targets count
                targets = input_ids[:, 1:]
                target_mask = mask[:, 1:].bool() & mask[:, :-1].bool()
                # one row at a time: a float32 copy of a whole batch's logits can be GBs with a 128k vocabulary
                for row in range(input_ids.shape[0]):
                    nll = torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none")
                    total_nll += float(nll[target_mask[row]].sum())
                total_tokens += int(target_mask.sum())
    finally:
        model.train(was_training)
        if pad_added:
            tokenizer.pad_token = None
    if total_tokens == 0:
        raise DataError("the reference texts have no token to predict (each needs at least two tokens)",
                        field="spec.evaluation.reference")
    mean = total_nll / total_tokens
    return math.exp(mean) if mean < 700 else math.inf
