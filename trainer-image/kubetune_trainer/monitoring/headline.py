"""The figure that says whether a stage is working, per stage, from the HF/TRL log dicts: perplexity for the
language-model stages, reward accuracy and margin for preference optimisation and reward models, mean reward
and KL for online RL. Pure: RunMonitor feeds it every log dict and puts the result in status.progress (fields
and the METRIC printer column), metrics.jsonl and the manifest.

Where a figure comes from (TRL 1.16 log keys):
    cpt/sft         eval_perplexity (monitoring/token_perplexity.py; never exp(eval_loss) of another stage)
    dpo/orpo        eval_rewards/accuracies, eval_rewards/margins (training batches' values until an eval ran)
    kto             eval_rewards/margins (unpaired data has no pairs, so no accuracy)
    reward          eval_accuracy, eval_margin (pairwise, chosen vs rejected score)
    grpo/rloo       reward, kl (the latest rollouts; eval_reward/eval_kl are not preferred: rarer, older)
    ppo             objective/scores, objective/kl
"""

from __future__ import annotations

import math
from typing import Any, Optional

# field -> (keys preferred, keys used until a preferred one has appeared)
_SOURCES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "lm": {"perplexity": (("eval_perplexity",), ())},
    "preference": {
        "reward_accuracy": (("eval_rewards/accuracies",), ("rewards/accuracies",)),
        "reward_margin": (("eval_rewards/margins",), ("rewards/margins",)),
    },
    "kto": {"reward_margin": (("eval_rewards/margins",), ("rewards/margins",))},
    "reward": {
        "reward_accuracy": (("eval_accuracy",), ("accuracy",)),
        "reward_margin": (("eval_margin",), ("margin",)),
    },
    "rl": {"mean_reward": (("reward",), ()), "kl": (("kl",), ())},
    "ppo": {"mean_reward": (("objective/scores",), ()), "kl": (("objective/kl",), ())},
}
STAGE_KIND = {"cpt": "lm", "sft": "lm", "dpo": "preference", "orpo": "preference", "kto": "kto",
              "reward": "reward", "grpo": "rl", "rloo": "rl", "ppo": "ppo"}
FIELDS = ("perplexity", "reward_accuracy", "reward_margin", "mean_reward", "kl")


def _finite(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


class Headline:
    """The latest headline values of one run."""

    def __init__(self, stage: str):
        self.stage = stage
        self.sources = _SOURCES.get(STAGE_KIND.get(stage, ""), {})
        self.values: dict[str, float] = {}
        self._preferred: set[str] = set()  # fields already taken from a preferred (held-out) key

    def update(self, logs: dict) -> dict[str, float]:
        """Take what this log dict has for this stage; returns the fields it changed."""
        changed = {}
        for name, (preferred, fallback) in self.sources.items():
            value = next((v for k in preferred if (v := _finite(logs.get(k))) is not None), None)
            if value is not None:
                self._preferred.add(name)
            elif name not in self._preferred:
                value = next((v for k in fallback if (v := _finite(logs.get(k))) is not None), None)
            if value is not None:
                self.values[name] = value
                changed[name] = value
        return changed

    def summary(self) -> Optional[str]:
        """What the METRIC printer column shows, e.g. "ppl 12.3", "acc 0.85 margin 2.1", "reward 0.42 kl 0.013"."""
        v = self.values
        parts = []
        if "perplexity" in v:
            parts.append(f"ppl {v['perplexity']:.4g}")
        if "reward_accuracy" in v:
            parts.append(f"acc {v['reward_accuracy']:.2f}")
        if "reward_margin" in v:
            parts.append(f"margin {v['reward_margin']:.3g}")
        if "mean_reward" in v:
            parts.append(f"reward {v['mean_reward']:.3g}")
        if "kl" in v:
            parts.append(f"kl {v['kl']:.3g}")
        return " ".join(parts) or None
