"""Reward functions for the RL stages: built-ins by name, your own `module:function`, weights, column checks.

    from kubetune_trainer import rewards
    rset = rewards.build(spec.training.grpo.rewards, fetch=ctx.fetch, field="spec.training.grpo.rewards")
    rewards.check_columns(rset, ctx.train_dataset.column_names)
    GRPOTrainer(..., reward_funcs=rset.funcs, args=GRPOConfig(..., reward_weights=rset.weights))

The weighted sum is left to TRL (`reward_weights`): it then logs every function's own mean
(`rewards/<name>/mean`) next to the combined `reward`, which is what you need to see which term moves.

Every function handed to TRL is wrapped so that (1) its name in TRL's logs is unique and readable
(`regex_match`, `regex_match_2`, `my_rewards.score`), (2) a custom function only receives the arguments it
declares, plus its manifest `params`, and (3) a custom function that raises or returns the wrong number of
values fails the job with a `ConfigError` naming `spec.training.<stage>.rewards[i]` (its code is part of the
config; a retry would fail the same way). See docs/rewards.md for the built-ins and how to bring your own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..errors import ConfigError, DataError
from .builtin import (BUILTINS, RewardParamError, answer_span, build_builtin, completion_text, last_number,
                      normalize)
from .custom import TRL_ARGUMENTS, call_filtered, declared_arguments, load_function
from .model import RewardModelScorer, load_reward_model

__all__ = ["BUILTINS", "RewardSet", "RewardModelScorer", "load_reward_model", "build", "check_columns",
           "completion_text", "answer_span", "normalize", "last_number"]


@dataclass
class RewardSet:
    funcs: list[Callable] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # (dataset column, spec field of the reward that reads it)
    columns: list[tuple[str, str]] = field(default_factory=list)

    def add(self, func: Callable, weight: float, name: str, columns: Iterable[tuple[str, str]] = ()) -> None:
        self.funcs.append(func)
        self.weights.append(float(weight))
        self.names.append(name)
        self.columns.extend(columns)


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def _named(func: Callable, name: str) -> Callable:
    func.__name__ = name
    func.__qualname__ = name
    return func


def _custom_wrapper(func: Callable, params: dict, name: str, field_: str) -> Callable:
    var_kw, named, _ = declared_arguments(func)

    def reward(completions, **kwargs) -> list[Any]:
        kwargs = {**kwargs, **params, "completions": completions}
        try:
            out = call_filtered(func, var_kw, named, kwargs)
        except Exception as exc:  # noqa: BLE001 - user code; its failure is a config problem
            raise ConfigError(f"reward function {name} raised {type(exc).__name__}: {exc}"[:1000],
                              field=field_) from exc
        try:
            values = list(out)
        except TypeError:
            raise ConfigError(f"reward function {name} returned {type(out).__name__}; it must return a list with "
                              "one float (or None) per completion", field=field_) from None
        if len(values) != len(completions):
            raise ConfigError(f"reward function {name} returned {len(values)} values for {len(completions)} "
                              "completions; it must return one per completion", field=field_)
        checked = []
        for v in values:
            if v is None:
                checked.append(None)
                continue
            try:
                checked.append(float(v))
            except (TypeError, ValueError):
                raise ConfigError(f"reward function {name} returned {v!r}; rewards must be numbers (or None)",
                                  field=field_) from None
        return checked

    return reward


def build(specs: Optional[Iterable[Any]], *, fetch: Optional[Callable[[str], Path]] = None,
          field: str = "spec.training.grpo.rewards") -> RewardSet:
    """RewardFunction specs -> RewardSet. ConfigError naming `<field>[i]` for an unknown built-in, bad params or
    a custom function that cannot be loaded."""
    rset = RewardSet()
    for i, spec in enumerate(specs or []):
        where = f"{field}[{i}]"
        name = spec.name
        params = dict(spec.params or {})
        if not math.isfinite(spec.weight):
            raise ConfigError(f"weight must be a finite number, got {spec.weight}", field=f"{where}.weight")
        if ":" not in name:
            if name not in BUILTINS:
                raise ConfigError(f"unknown reward {name!r}; built-ins are {', '.join(BUILTINS)}, or use "
                                  "'module:function' with source for your own", field=f"{where}.name")
            if spec.source:
                raise ConfigError(f"source is only for custom 'module:function' rewards, not the built-in {name}",
                                  field=f"{where}.source")
            try:
                built = build_builtin(name, params)
            except RewardParamError as exc:
                raise ConfigError(str(exc), field=f"{where}.params") from None
            label = _unique(built.name, rset.names)
            # Each build makes a fresh closure, so renaming it cannot affect another reward.
            rset.add(_named(built.func, label), spec.weight, label, [(c, where) for c in built.columns])
        else:
            func = load_function(name, spec.source, fetch, where)
            var_kw, named, required = declared_arguments(func)
            if not var_kw and "completions" not in named:
                raise ConfigError(f"{name} must take a `completions` argument (TRL's reward-function signature is "
                                  "f(completions, **columns) -> list[float])", field=f"{where}.name")
            unknown = sorted(p for p in params if not var_kw and p not in named)
            if unknown:
                raise ConfigError(f"params {unknown} are not arguments of {name}", field=f"{where}.params")
            label = _unique(name.replace(":", "."), rset.names)
            needed = sorted(required - set(TRL_ARGUMENTS) - set(params))
            rset.add(_named(_custom_wrapper(func, params, name, where), label), spec.weight, label,
                     [(c, where) for c in needed])
    return rset


def check_columns(rset: RewardSet, columns: Iterable[str], dataset_field: str = "spec.dataset") -> None:
    """DataError when a reward reads a column the dataset lacks (e.g. `answer` for exact_match): it would fail
    at the first step otherwise, after the model loaded and the first generation ran."""
    have = set(columns)
    for column, where in rset.columns:
        if column not in have:
            raise DataError(
                f"reward {where} reads column '{column}' but the training data has only {sorted(have)}; add the "
                f"column, map it with spec.dataset.columns.answer, or set the reward's params.column",
                field=dataset_field)
