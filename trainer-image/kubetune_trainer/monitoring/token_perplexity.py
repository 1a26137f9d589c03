"""Token-weighted evaluation perplexity for the language-model stages (cpt, sft): `eval_perplexity` in every
evaluation's metrics, = exp(total NLL over every labelled eval token / number of those tokens).

Why not exp(eval_loss): the Trainer's eval_loss is a mean of per-batch means, so a batch of short answers
weighs as much as a batch of long ones and the figure moves with the eval batch size. Perplexity is defined per
token. Each eval batch's mean loss is multiplied back by its own labelled-token count (labels shifted by one,
-100 ignored: the reduction transformers' causal-LM loss and TRL's fused head both use), summed, and the sums
are added across ranks before dividing.

Only for stages whose loss is a next-token NLL: a DPO/KTO/ORPO or reward-model loss is not one, and exp() of
it is no perplexity (runner.LM_LOSS_STAGES).
"""

from __future__ import annotations

import math


def perplexity(total_nll: float, tokens: int) -> float:
    if tokens <= 0:
        return math.nan
    mean = total_nll / tokens
    return math.exp(mean) if mean < 700 else math.inf  # exp overflows a float past ~709


def install(trainer) -> None:
    """Make `trainer.evaluate()` report `<prefix>_perplexity` (token-weighted). Wraps this trainer instance's
    compute_loss (to count) and evaluation_loop (to reset, all-reduce and add the metric before the Trainer
    logs it, so it reaches log_history, callbacks' on_log/on_evaluate and the returned metrics alike)."""
    totals = {"nll": 0.0, "tokens": 0, "on": False}
    compute_loss = trainer.compute_loss
    evaluation_loop = trainer.evaluation_loop

    def counting_compute_loss(model, inputs, *args, **kwargs):
        labels = inputs.get("labels") if totals["on"] else None  # read first: a loss may pop it
        result = compute_loss(model, inputs, *args, **kwargs)
        if labels is not None:
            loss = result[0] if isinstance(result, tuple) else result
            n = int((labels[..., 1:] != -100).sum())
            if n:
                totals["nll"] += float(loss.detach().float()) * n
                totals["tokens"] += n
        return result

    def perplexity_evaluation_loop(*args, **kwargs):
        totals.update(nll=0.0, tokens=0, on=True)
        try:
            output = evaluation_loop(*args, **kwargs)
        finally:
            totals["on"] = False
        nll, tokens = _all_ranks(totals["nll"], totals["tokens"])
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if tokens:
            output.metrics[f"{prefix}_perplexity"] = perplexity(nll, tokens)
        return output

    trainer.compute_loss = counting_compute_loss
    trainer.evaluation_loop = perplexity_evaluation_loop


def _all_ranks(nll: float, tokens: int) -> tuple[float, int]:
    """Sums over every rank: each evaluated its own shard of the eval set."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return nll, tokens
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([nll, float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]), int(t[1])
