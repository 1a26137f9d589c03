"""Tiny models and synthetic datasets, built locally: nothing is downloaded.

kubetune's tests, examples and `kubetune run` default job need a real model folder to exercise the real
`from_pretrained` path, and data a tiny model can visibly learn from. Both are generated here,
deterministically from a seed:

    python -m kubetune_trainer.tiny model /tmp/tiny-llama          # Llama + byte-level BPE tokenizer
    python -m kubetune_trainer.tiny data  /tmp/tiny-data           # one .jsonl per dataset format

The model is briefly pre-trained on the general corpus (a few seconds on CPU): adapters on a random base
learn slowly and a forgetting check against a random base means nothing, so the honest starting point for
every stage is a base that already models "general" text.

Datasets (all small, all learnable by a ~150k-parameter model):
- general text (the forgetting reference): simple stories from a small grammar;
- domain text (CPT): operations log lines from another grammar;
- arithmetic Q&A as chat / prompt-completion (SFT), preference pairs whose rejected answer is clearly wrong
  (DPO/ORPO/reward), unpaired labelled completions (KTO), and prompts with reference answers (GRPO/RL).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# `{% generation %}` marks assistant tokens so TRL's assistant_only_loss can mask everything else.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|eos|>{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_NAMES = ["the cat", "the dog", "a bird", "the fox", "an old man", "the girl", "a farmer", "the king"]
_VERBS = ["saw", "found", "liked", "chased", "helped", "visited", "painted", "carried"]
_OBJECTS = ["the red ball", "a small house", "the green river", "a big tree", "the cold moon", "an apple"]
_PLACES = ["in the park", "near the hill", "by the sea", "at home", "in the forest", "under the bridge"]
_ENDINGS = ["and smiled", "and went home", "and sang a song", "and slept", "and ate bread", "and laughed"]

_COMPONENTS = ["scheduler", "kubelet", "apiserver", "controller", "etcd", "proxy"]
_ACTIONS = ["scheduled pod", "evicted pod", "restarted container", "synced volume", "pulled image", "bound claim"]
_NODES = [f"node-{i}" for i in range(8)]
_STATES = ["status ok", "status degraded", "latency high", "latency low", "retry later", "backoff reset"]

NUMBER_WORDS = {i: str(i) for i in range(0, 20)}


def general_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)} {rng.choice(_ENDINGS)} ."


def domain_sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_COMPONENTS)} {rng.choice(_ACTIONS)} web-{rng.randint(0, 9)} on "
            f"{rng.choice(_NODES)} {rng.choice(_STATES)} .")


def arithmetic_pair(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", a + b


def _wrong_answer(rng: random.Random, a_plus_b: int) -> str:
    return rng.choice(["I do not know.", "banana banana banana.", "The sky is green today.",
                       f"Maybe {a_plus_b + rng.randint(5, 9)} or something."])


def generate_datasets(dest: str | Path, n: int = 400, seed: int = 0) -> dict[str, Path]:
    """Write one jsonl per format (plus plain-text files) into dest; returns name -> path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {k: [] for k in (
        "general", "domain", "chat", "prompt_completion", "preference", "unpaired_preference", "prompt_only")}
    for _ in range(n):
        rows["general"].append({"text": " ".join(general_sentence(rng) for _ in range(3))})
        rows["domain"].append({"text": " ".join(domain_sentence(rng) for _ in range(3))})
        q, a, s = arithmetic_pair(rng)
        rows["chat"].append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        rows["prompt_completion"].append({"prompt": q, "completion": " " + a})
        rows["preference"].append({"prompt": q, "chosen": " " + a, "rejected": " " + _wrong_answer(rng, s)})
        good = rng.random() < 0.5
        rows["unpaired_preference"].append(
            {"prompt": q, "completion": " " + (a if good else _wrong_answer(rng, s)), "label": good})
        rows["prompt_only"].append({"prompt": q + " Answer:", "answer": str(s)})
    paths = {}
    for name, items in rows.items():
        p = dest / f"{name}.jsonl"
        with p.open("w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        paths[name] = p
    return paths


def _corpus(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        lines.append(general_sentence(rng))
        lines.append(domain_sentence(rng))
        q, a, _ = arithmetic_pair(rng)
        lines.append(f"{q} {a} Answer: {a.split()[-1].rstrip('.')}")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0, extra_texts: tuple[str, ...] | list[str] = ()):
    """A byte-level BPE tokenizer trained on the synthetic corpus (plus extra_texts: a domain whose words should
    be tokens, as a real model's tokenizer has most words of the text it meets), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed), 2000) + list(extra_texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE, model_max_length=512,
    )


def build_model(dest: str | Path, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                intermediate_size: int = 128, vocab_size: int = 512, pretrain_steps: int = 300,
                seed: int = 0, extra_texts: tuple[str, ...] | list[str] = ()) -> Path:
    """Save a tiny Llama (+ tokenizer) to dest with save_pretrained. Hidden and intermediate sizes are
    multiples of 64 so bitsandbytes 4-bit (QLoRA) layers work on CPU. extra_texts only shape the tokenizer's
    vocabulary: the model is pre-trained on the general corpus either way."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab_size, seed, extra_texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        _pretrain(model, tokenizer, pretrain_steps, seed)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    # Pre-training called the tokenizer with truncation: do not ship that state in tokenizer.json.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(dest)
    return dest


def _pretrain(model, tokenizer, steps: int, seed: int) -> None:
    """A few hundred AdamW steps on general text and arithmetic Q&A (not the CPT domain): the base then
    models 'general' text, so fine-tuning on the domain has something to forget."""
    import torch

    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = []
        for _ in range(8):
            q, a, _ = arithmetic_pair(rng)
            batch.append(general_sentence(rng) + " " + general_sentence(rng) if rng.random() < 0.7 else f"{q} {a}")
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_reward_model(dest: str | Path, base: str | Path, seed: int = 0) -> Path:
    """A sequence-classification head (1 label) on the tiny base: the starting point of `reward` jobs and
    the shape PPO/RLOO reward models load as."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tok.pad_token_id
    dest = Path(dest)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def cached_model(cache_dir: str | Path | None = None, **kwargs) -> Path:
    """Build once per parameter set and reuse (tests call this a lot)."""
    import hashlib
    import os

    key = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("KUBETUNE_TINY_CACHE", Path.home() / ".cache/kubetune/tiny"))
    dest = root / f"llama-{key}"
    if not (dest / "config.json").exists():
        tmp = root / f".llama-{key}.{os.getpid()}"
        build_model(tmp, **kwargs)
        tmp.rename(dest) if not dest.exists() else None
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build a tiny model or synthetic datasets (no downloads).")
    ap.add_argument("what", choices=["model", "data", "reward-model"])
    ap.add_argument("dest")
    ap.add_argument("--base", help="base model folder (reward-model)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=400, help="examples per dataset (data)")
    args = ap.parse_args(argv)
    if args.what == "model":
        print(build_model(args.dest, pretrain_steps=args.pretrain_steps))
    elif args.what == "data":
        for name, path in generate_datasets(args.dest, n=args.n).items():
            print(f"{name}: {path}")
    else:
        print(build_reward_model(args.dest, args.base or cached_model()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
