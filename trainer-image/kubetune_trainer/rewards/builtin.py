"""Built-in reward functions for the RL stages (grpo, rloo), selectable by name in `spec.training.<stage>.rewards`.

Every reward follows TRL's reward-function contract, `f(completions, **columns) -> list[float]`: TRL calls it
with the batch's completions plus `prompts`, `completion_ids` and every extra dataset column (e.g. `answer`),
one value per completion. Completions are strings, or for conversational datasets a list of messages
(`[{"role": "assistant", "content": ...}]`); `completion_text` turns both into the text that is scored.

Parameters come from the manifest as strings (`params: {tolerance: "0.01"}`) and are parsed here, once, when the
trainer starts: a bad value or an unknown parameter name fails the job before any GPU time is spent.

- `exact_match` (params: column=answer): 1 if the answer span, whitespace-trimmed, equals the reference.
- `normalized_match` (column=answer): 1 if equal ignoring case, punctuation and spacing.
- `numeric_match` (column=answer, tolerance=0): 1 if the answer span's last number is within tolerance of the
  reference's number.
- `regex_match` (pattern, required; flags=""): 1 if re.search(pattern, completion) matches.
- `think_answer_format`: 1 if the completion is `<think>...</think><answer>...</answer>`.
- `length_penalty` (target=128, scale=0.01, unit=tokens|chars): -scale * max(0, length - target).

The *answer span* of a completion is the text inside its last `<answer>...</answer>` when there is one, else what
follows the last `####` (GSM8K style), else the whole completion.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Integers with thousands separators (1,234) or plain digits, optional decimals and exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


class RewardParamError(ValueError):
    """A parameter value that cannot work; the loader turns it into a ConfigError naming the reward."""


# ------------------------------------------------------------------------------------------------ text helpers
def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; a conversational completion (a list of messages, or one
    message dict) -> the content of its assistant messages, joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        msgs = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in msgs if m.get("role", "assistant") == "assistant"] or msgs
        return "".join(_content_text(m.get("content", "")) for m in assistant)
    return "" if completion is None else str(completion)


def _content_text(content: Any) -> str:
    # Multimodal message content is a list of {"type": "text", "text": ...} parts.
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def answer_span(text: str) -> str:
    """The part of a completion that holds its final answer (see the module docstring)."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    return text


def normalize(text: str) -> str:
    """Lower case, punctuation removed (ASCII and Unicode), runs of whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if (ch in string.punctuation or unicodedata.category(ch).startswith("P")) else ch
                   for ch in text)
    return " ".join(text.split())


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # pragma: no cover - the pattern only matches parseable numbers
        return None


# ------------------------------------------------------------------------------------------------ params
def _float(params: dict, key: str, default: float, *, minimum: float | None = None) -> float:
    raw = params.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise RewardParamError(f"params.{key} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise RewardParamError(f"params.{key} must be a finite number >= {minimum}, got {raw!r}")
    return value


def _choice(params: dict, key: str, default: str, choices: tuple[str, ...]) -> str:
    value = str(params.get(key, default))
    if value not in choices:
        raise RewardParamError(f"params.{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _column(params: dict) -> str:
    value = str(params.get("column", "answer")).strip()
    if not value:
        raise RewardParamError("params.column must name a dataset column")
    return value


def _references(kwargs: dict, column: str, n: int, name: str) -> list:
    if column not in kwargs:
        # check_columns catches this before training; this is for direct calls outside a trainer.
        raise KeyError(f"{name} needs the dataset column '{column}' (got columns: {sorted(kwargs)})")
    refs = list(kwargs[column])
    if len(refs) != n:
        raise ValueError(f"{name}: {n} completions but {len(refs)} values in column '{column}'")
    return refs


# ------------------------------------------------------------------------------------------------ rewards
@dataclass
class BuiltinReward:
    """A parsed built-in: the callable TRL gets, plus the dataset columns it reads."""

    name: str
    func: Callable[..., list[float]]
    columns: tuple[str, ...] = field(default_factory=tuple)


def exact_match(params: dict) -> BuiltinReward:
    column = _column(params)

    def exact_match(completions, **kwargs) -> list[float]:
        refs = _references(kwargs, column, len(completions), "exact_match")
        return [1.0 if answer_span(completion_text(c)).strip() == str(r).strip() else 0.0
                for c, r in zip(completions, refs)]

    return BuiltinReward("exact_match", exact_match, (column,))


def normalized_match(params: dict) -> BuiltinReward:
    column = _column(params)

    def normalized_match(completions, **kwargs) -> list[float]:
        refs = _references(kwargs, column, len(completions), "normalized_match")
        return [1.0 if normalize(answer_span(completion_text(c))) == normalize(r) else 0.0
                for c, r in zip(completions, refs)]

    return BuiltinReward("normalized_match", normalized_match, (column,))


def numeric_match(params: dict) -> BuiltinReward:
    column = _column(params)
    tolerance = _float(params, "tolerance", 0.0, minimum=0.0)

    def numeric_match(completions, **kwargs) -> list[float]:
        refs = _references(kwargs, column, len(completions), "numeric_match")
        out = []
        for c, r in zip(completions, refs):
            got = last_number(answer_span(completion_text(c)))
            want = float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else last_number(str(r))
            # A reference without a number cannot be matched: 0, rather than failing a long run on one bad row.
            ok = got is not None and want is not None and abs(got - want) <= tolerance + 1e-12 * max(1.0, abs(want))
            out.append(1.0 if ok else 0.0)
        return out

    return BuiltinReward("numeric_match", numeric_match, (column,))


def regex_match(params: dict) -> BuiltinReward:
    pattern = params.get("pattern")
    if not pattern:
        raise RewardParamError("params.pattern is required (a Python regular expression)")
    flags = 0
    for letter in str(params.get("flags", "")):
        if letter not in _FLAGS:
            raise RewardParamError(f"params.flags may contain {''.join(_FLAGS)} only, got {params['flags']!r}")
        flags |= _FLAGS[letter]
    try:
        compiled = re.compile(str(pattern), flags)
    except re.error as exc:
        raise RewardParamError(f"params.pattern is not a valid regular expression ({exc})") from None

    def regex_match(completions, **kwargs) -> list[float]:
        return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]

    return BuiltinReward("regex_match", regex_match)


def think_answer_format(params: dict) -> BuiltinReward:
    def think_answer_format(completions, **kwargs) -> list[float]:
        return [1.0 if _THINK_ANSWER.match(completion_text(c)) else 0.0 for c in completions]

    return BuiltinReward("think_answer_format", think_answer_format)


def length_penalty(params: dict) -> BuiltinReward:
    target = _float(params, "target", 128.0, minimum=0.0)
    scale = _float(params, "scale", 0.01, minimum=0.0)
    unit = _choice(params, "unit", "tokens", ("tokens", "chars"))

    def length_penalty(completions, completion_ids=None, **kwargs) -> list[float]:
        if unit == "chars":
            lengths = [len(completion_text(c)) for c in completions]
        elif completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        else:
            # Called without token ids (outside TRL): whitespace-separated words approximate tokens.
            lengths = [len(completion_text(c).split()) for c in completions]
        return [-scale * max(0.0, n - target) for n in lengths]

    return BuiltinReward("length_penalty", length_penalty)


# name -> (factory, accepted parameter names)
BUILTINS: dict[str, tuple[Callable[[dict], BuiltinReward], tuple[str, ...]]] = {
    "exact_match": (exact_match, ("column",)),
    "normalized_match": (normalized_match, ("column",)),
    "numeric_match": (numeric_match, ("column", "tolerance")),
    "regex_match": (regex_match, ("pattern", "flags")),
    "think_answer_format": (think_answer_format, ()),
    "length_penalty": (length_penalty, ("target", "scale", "unit")),
}


def build_builtin(name: str, params: dict | None) -> BuiltinReward:
    """Parse a built-in's params; RewardParamError for unknown parameters or bad values."""
    factory, accepted = BUILTINS[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise RewardParamError(f"unknown params {unknown} for {name} (accepted: {allowed})")
    return factory(params)
