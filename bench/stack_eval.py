"""Held-out metrics of the training-stack demonstration (bench/training_stack.py), each a plain function of a
model folder (or loaded model) and held-out rows, so the same function measures a stage's input and its output:

- perplexity(model, tok, texts): exp of the token-weighted mean NLL (the trainer's own reference_perplexity, the
  function behind the forgetting check) - the cpt metric on domain text, the forgetting check on general text;
- completion_loss(model, tok, rows): mean NLL per completion token (the completion followed by EOS) given the
  prompt - what the sft stage's completion-only loss and its eval loss measure;
- reward_accuracy(policy, reference, tok, pairs, beta): DPO's implicit reward r = beta * (log pi(y|x) - log
  pi_ref(y|x)) on held-out pairs; the share where r(chosen) > r(rejected), a tie counting one half. Before the
  dpo stage policy = reference, every pair ties and the accuracy is 0.5 (chance) by construction; TRL's logged
  accuracy counts ties as 0 instead;
- preference_accuracy(model, tok, pairs): the share where the model's mean per-token log-prob of chosen beats
  rejected's: the model's own preference, defined for any model (no reference);
- mean_reward(model, tok, rows, rewards): completions sampled at a fixed seed and temperature for each held-out
  prompt, scored by the same kubetune built-in reward functions, with the same weights, as the grpo job.
"""

from __future__ import annotations

import statistics
from pathlib import Path


def load(path: str | Path):
    """(model, tokenizer) from a full model folder (a stage's merged/ output or the base), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tok


def perplexity(model, tok, texts: list[str], max_length: int = 128) -> float:
    from kubetune_trainer.monitoring import reference_perplexity

    return reference_perplexity(model, tok, texts, max_length)


def _sequence_logprobs(model, tok, prompts: list[str], completions: list[str], *, add_eos: bool = True,
                       batch_size: int = 32):
    """Per row: (sum of log p(completion tokens | prompt), number of completion tokens). Prompt and completion
    are tokenized separately and concatenated, as TRL does for prompt/completion data; rows are right-padded
    into batches (causal attention: padding after a row cannot change its logits)."""
    import torch

    rows = []
    for prompt, completion in zip(prompts, completions):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if add_eos else [])
        rows.append((p, c))
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (p, c) in enumerate(batch):
                ids[j, :len(p) + len(c)] = torch.tensor(p + c)
                mask[j, :len(p) + len(c)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            token_logp = logp.gather(2, ids[:, 1:, None])[:, :, 0]
            for j, (p, c) in enumerate(batch):
                out.append((float(token_logp[j, len(p) - 1:len(p) - 1 + len(c)].sum()), len(c)))
    return out


def completion_loss(model, tok, rows: list[dict]) -> float:
    """Token-weighted mean NLL of completion + EOS given the prompt over prompt_completion rows."""
    lp = _sequence_logprobs(model, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    return -sum(s for s, _ in lp) / sum(n for _, n in lp)


def reward_accuracy(policy, reference, tok, pairs: list[dict], beta: float = 0.1) -> dict:
    """DPO's implicit-reward accuracy and mean margin on preference rows (prompt, chosen, rejected)."""
    prompts = [r["prompt"] for r in pairs]
    rewards = {}
    for side in ("chosen", "rejected"):
        completions = [r[side] for r in pairs]
        pol = _sequence_logprobs(policy, tok, prompts, completions)
        ref = pol if reference is policy else _sequence_logprobs(reference, tok, prompts, completions)
        rewards[side] = [beta * (a - b) for (a, _), (b, _) in zip(pol, ref)]
    margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"])]
    acc = statistics.mean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    return {"accuracy": acc, "margin": statistics.mean(margins)}


def preference_accuracy(model, tok, pairs: list[dict]) -> float:
    prompts = [r["prompt"] for r in pairs]
    ch = _sequence_logprobs(model, tok, prompts, [r["chosen"] for r in pairs])
    rj = _sequence_logprobs(model, tok, prompts, [r["rejected"] for r in pairs])
    return statistics.mean(1.0 if a / n > b / m else 0.0 for (a, n), (b, m) in zip(ch, rj))


def mean_reward(model, tok, rows: list[dict], rewards: list[dict], *, samples: int = 8, temperature: float = 0.7,
                max_new_tokens: int = 8, seed: int = 0) -> dict:
    """Sampled completions for prompt_only rows (with `answer`), scored like the grpo job scores them.

    rewards: the job's `grpo.rewards` entries ({name, weight, params}; built-ins only). Returns the weighted mean
    reward, each reward's mean, and the greedy accuracy of the first reward (one answer per prompt)."""
    import torch

    from kubetune_trainer.rewards import builtin

    fns = [(r.get("weight", 1.0), builtin.build_builtin(r["name"], r.get("params") or {})) for r in rewards]
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    n_in = enc["input_ids"].shape[1]
    with torch.no_grad():
        torch.manual_seed(seed)
        sampled = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=tok.pad_token_id)
        greedy = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(sampled[:, n_in:], skip_special_tokens=True)
    refs = [a for a in answers for _ in range(samples)]
    scores = [fn.func(texts, answer=refs) for _, fn in fns]  # by position: two rewards may share a name
    total = [sum(w * s[i] for (w, _), s in zip(fns, scores)) for i in range(len(texts))]
    first = fns[0][1]
    greedy_texts = tok.batch_decode(greedy[:, n_in:], skip_special_tokens=True)
    return {"mean_reward": statistics.mean(total),
            **{f"{fn.name}_mean": statistics.mean(s) for (_, fn), s in zip(fns, scores)},
            "greedy_accuracy": statistics.mean(first.func(greedy_texts, answer=answers)),
            "examples": texts[:3]}
