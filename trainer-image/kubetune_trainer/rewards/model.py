"""A sequence-classification reward model as a reward function, scored the way TRL's RewardTrainer trained it.

TRL's RewardTrainer appends the EOS token to every non-conversational example (`prompt + chosen + eos`) and the
classifier reads its score at the last non-pad token, i.e. at that EOS. GRPO/RLOO's built-in reward-model path
scores `prompt + completion` *without* EOS, so a reward model trained by a kubetune `reward` job would be read at
a position it never saw during training. This scorer reproduces the training-time text exactly:

- text prompts: `prompt + completion + eos` (EOS added only when missing), tokenized with the tokenizer's own
  special tokens (BOS for tokenizers that add one), as RewardTrainer tokenizes it;
- conversational prompts: the reward tokenizer's chat template over `prompt + [assistant completion]`, with no
  special tokens added on top (the template has its own), again as RewardTrainer does.

It is used by the `ppo` stage (the PPO score) and the `rloo` stage (as one of TRL's reward functions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .builtin import completion_text


class RewardModelScorer:
    """Callable reward function backed by a `AutoModelForSequenceClassification` (num_labels=1)."""

    # TRL names reward functions by __name__ in its logs (rewards/<name>/mean).
    __name__ = "reward_model"

    def __init__(self, model, tokenizer, *, max_length: Optional[int] = None, batch_size: int = 64):
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"a reward model needs num_labels=1, this one has {model.config.num_labels}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The classifier locates the last real token through pad_token_id.
        self.model.config.pad_token_id = tokenizer.pad_token_id
        self.max_length = max_length
        self.batch_size = batch_size

    def to(self, device) -> "RewardModelScorer":
        self.model.to(device)
        return self

    @property
    def device(self):
        return next(self.model.parameters()).device

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str]:
        out = []
        eos = self.tokenizer.eos_token or ""
        for prompt, completion in zip(prompts, completions):
            if isinstance(prompt, list):  # conversational
                reply = completion if isinstance(completion, list) else \
                    [{"role": "assistant", "content": completion_text(completion)}]
                out.append(self.tokenizer.apply_chat_template(list(prompt) + list(reply), tokenize=False))
            else:
                text = f"{prompt}{completion_text(completion)}"
                out.append(text if not eos or text.endswith(eos) else text + eos)
        return out

    def score_texts(self, texts: list[str], *, conversational: bool = False):
        """One float tensor of scores (on CPU), in chunks of batch_size."""
        import torch

        scores = []
        tok = self.tokenizer
        side = tok.truncation_side
        tok.truncation_side = "left"  # keep the end (the EOS the score is read at) when truncating
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True, padding_side="right",
                          add_special_tokens=not conversational, truncation=self.max_length is not None,
                          max_length=self.max_length)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                with torch.no_grad():
                    logits = self.model(**enc).logits
                scores.append(logits[:, 0].float().cpu())
        finally:
            tok.truncation_side = side
        return torch.cat(scores) if scores else torch.zeros(0)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        conversational = bool(prompts) and isinstance(prompts[0], list)
        return self.score_texts(self.texts(prompts, completions), conversational=conversational).tolist()


def load_reward_model(uri: str, *, fetch, load_model, field: str, max_length: Optional[int] = None,
                      ) -> RewardModelScorer:
    """The reward model at `uri` as a RewardModelScorer; ConfigError naming `field` when it cannot be loaded.

    `uri` is a folder saved with save_pretrained (a `reward` job's `merged/`, or its `adapter/` when it trained
    full weights), or a reward job's PEFT `adapter/` folder: a LoRA/QLoRA/DoRA reward job's default output. An
    adapter is applied to the base model its job trained on, found in the `manifest.json` that job wrote next to
    `adapter/` (`baseModel.source`), and merged (scoring then costs no more than a merged model)."""
    import json

    from ..errors import ConfigError, TrainerError

    if load_model is None:
        raise ConfigError("no model loader is configured to load the reward model", field=field)
    path = None
    if fetch is not None:
        try:
            path = Path(fetch(uri))
        except TrainerError as exc:
            raise ConfigError(f"cannot fetch the reward model {uri}: {exc.message}", field=field) from None
    if path is None or not (path / "adapter_config.json").exists() or (path / "config.json").exists():
        loaded = load_model(uri, kind="reward", with_tokenizer=True, field=field)
        model, tokenizer = loaded if isinstance(loaded, tuple) else (loaded, None)
    else:
        parent = uri.rstrip("/").rsplit("/", 1)[0]
        hint = (f"{uri} is a PEFT adapter; kubetune applies it to the base model named in the reward job's "
                f"manifest.json next to it ({parent}/manifest.json), or point rewardModel at the job's merged/ "
                "output (spec.output.mergedModel: true)")
        try:
            manifest = json.loads(Path(fetch(f"{parent}/manifest.json")).read_text())
            base_uri = manifest["baseModel"]["source"]
        except (TrainerError, OSError, ValueError, KeyError, TypeError):
            raise ConfigError(hint, field=field) from None
        from peft import PeftModel
        from transformers import AutoTokenizer

        base = load_model(base_uri, kind="reward", with_tokenizer=False, field=field)
        try:
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        except Exception as exc:  # noqa: BLE001 - a mismatched adapter/base pair in any form
            raise ConfigError(f"cannot apply the adapter {uri} to its base {base_uri}: {type(exc).__name__}: "
                              f"{str(exc)[:300]}", field=field) from None
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))  # the reward job saves its tokenizer with the adapter
    if tokenizer is None:
        raise ConfigError(f"{uri} has no tokenizer next to the reward model", field=field)
    if getattr(model.config, "num_labels", None) != 1:
        raise ConfigError(f"{uri} is not a reward model: a sequence classifier with one output (num_labels=1) is "
                          f"needed, this one has num_labels={model.config.num_labels}", field=field)
    return RewardModelScorer(model, tokenizer, max_length=max_length)
