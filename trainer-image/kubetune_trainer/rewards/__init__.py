"""Reward functions for the RL stages: built-ins by name, your own `module:function`, weights, column checks.

    from kubetune_trainer import rewards
    rset = rewards.build(spec.training.grpo.rewards, fetch=ctx.fetch, field="spec.training.grpo.rewards")
    rewards.check_columns(rset, ctx.train_dataset.column_names)
    GRPOTrainer(..., reward_funcs=rset.funcs, args=GRPOConfig(..., reward_weights=rset.weights))

The weighted sum is left to TRL (`reward_weights`): it then logs every function's own mean
(`rewards/<name>/mean`) next to the combined `reward`, which is what you need to see which term moves.

Every function handed to TRL is wrapped so that (1) its name in TRL's logs is unique and readable
(`regex_match`, `regex_match_2`, `my_rewards.score`); (2) a custom function runs in the reward sandbox
(sandbox.py: no credentials, limits) and receives only the arguments it declares, plus its manifest `params`;
(3) failures are sorted: a custom function that raises a deterministic error (TypeError, a wrong return shape)
fails the job at once with a `ConfigError` naming `spec.training.<stage>.rewards[i]`, the function and its
traceback tail (its code is part of the config); a transient one (timeout, crash at a limit, OSError, network)
is retried RETRIES times; a built-in that raises, or a custom one still failing after its retries, drops that
call's scores (failures.py), failing the job only when it keeps failing. Custom code and `code_execution` run
only where policy.py allows. See docs/rewards.md for the built-ins and how to bring your own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..errors import ConfigError, DataError, TrainerError
from . import code_execution as _code_execution
from .builtin import (BUILTINS, RewardParamError, answer_span, build_builtin, completion_text, last_number,
                      normalize)
from .custom import TRL_ARGUMENTS, SandboxedFunction, _tail, load_function
from .failures import FailureTracker, add_listener
from .model import RewardModelScorer, load_reward_model
from .policy import require_custom_code
from .sandbox import RemoteError, Sandbox, SandboxError

__all__ = ["BUILTINS", "RewardSet", "RewardModelScorer", "load_reward_model", "build", "check_columns",
           "completion_text", "answer_span", "normalize", "last_number", "add_listener", "Sandbox"]

# Built-ins that run code from the job (the model's programs): they need the sandbox and the policy's consent.
SANDBOXED_BUILTINS = ("code_execution",)
ALL_BUILTINS = tuple(BUILTINS) + SANDBOXED_BUILTINS
# Attempts after the first for a custom reward call that failed transiently, and the pause before each.
RETRIES = 2
RETRY_PAUSE_SECONDS = (0.5, 2.0)


@dataclass
class RewardSet:
    funcs: list[Callable] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # (dataset column, spec field of the reward that reads it)
    columns: list[tuple[str, str]] = field(default_factory=list)
    # The sandbox custom rewards and code_execution run in (None when no reward needs one).
    sandbox: Optional[Sandbox] = None

    def add(self, func: Callable, weight: float, name: str, columns: Iterable[tuple[str, str]] = ()) -> None:
        self.funcs.append(func)
        self.weights.append(float(weight))
        self.names.append(name)
        self.columns.extend(columns)

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()


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


def _check_values(out: Any, n: int, name: str, field_: str) -> list:
    """A custom function's return value -> floats/None; ConfigError for the wrong shape (deterministic)."""
    if not isinstance(out, list):
        raise ConfigError(f"reward function {name} returned {type(out).__name__}; it must return a list with "
                          "one float (or None) per completion", field=field_)
    if len(out) != n:
        raise ConfigError(f"reward function {name} returned {len(out)} values for {n} completions; it must "
                          "return one per completion", field=field_)
    checked = []
    for v in out:
        if v is None:
            checked.append(None)
            continue
        try:
            if isinstance(v, (bool, list, dict)):
                raise TypeError
            checked.append(float(v))
        except (TypeError, ValueError):
            raise ConfigError(f"reward function {name} returned {v!r}; rewards must be numbers (or None)",
                              field=field_) from None
    return checked


def _custom_wrapper(fn: SandboxedFunction, params: dict, field_: str, tracker: FailureTracker) -> Callable:
    def reward(completions, **kwargs) -> list[Any]:
        log_metric = kwargs.pop("log_metric", None)
        log_extra = kwargs.pop("log_extra", None)
        kwargs.pop("environments", None)  # live objects: they cannot cross into the sandbox
        kwargs = {**kwargs, **params, "completions": completions}
        if not fn.var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in fn.named}
        wants_metric = log_metric is not None and (fn.var_kw or "log_metric" in fn.named)
        wants_extra = log_extra is not None and (fn.var_kw or "log_extra" in fn.named)
        last: Optional[SandboxError] = None
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(RETRY_PAUSE_SECONDS[min(attempt, len(RETRY_PAUSE_SECONDS)) - 1])
            try:
                out, logged = fn.sandbox.call(fn.handle, kwargs, log_metric=wants_metric, log_extra=wants_extra)
            except RemoteError as exc:
                if not exc.transient:
                    raise ConfigError(f"reward function {fn.name} (module {fn.module}, function {fn.function}) "
                                      f"raised {exc.type}: {exc.message}"[:800] + _tail(exc.traceback),
                                      field=field_) from None
                last = exc
                continue
            except SandboxError as exc:
                last = exc
                continue
            values = _check_values(out, len(completions), fn.name, field_)
            for kind, key, value in logged:
                (log_metric if kind == "metric" else log_extra)(key, value)
            tracker.succeeded()
            return values
        problem = f"{type(last).__name__}: {last}" if last is not None else "no answer"
        return tracker.failed(len(completions), f"{problem} (after {RETRIES + 1} attempts)")

    return reward


def _guarded_builtin(func: Callable, tracker: FailureTracker) -> Callable:
    def reward(completions, **kwargs) -> list[Any]:
        try:
            return func(completions, **kwargs)
        except TrainerError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad call must not end the run; failures.py decides
            return tracker.failed(len(completions), f"{type(exc).__name__}: {exc}"[:600])

    return reward


def build(specs: Optional[Iterable[Any]], *, fetch: Optional[Callable[[str], Path]] = None,
          field: str = "spec.training.grpo.rewards", sandbox: Optional[Sandbox] = None) -> RewardSet:
    """RewardFunction specs -> RewardSet. ConfigError naming `<field>[i]` for an unknown built-in, bad params, a
    custom function that cannot be loaded, or custom code where policy.py forbids it. A sandbox is started (or
    `sandbox` used) only when a custom reward or code_execution needs one."""
    rset = RewardSet()

    def box() -> Sandbox:
        if rset.sandbox is None:
            rset.sandbox = sandbox or Sandbox()
        return rset.sandbox

    try:
        for i, spec in enumerate(specs or []):
            _add(rset, i, spec, f"{field}[{i}]", fetch, box)
    except BaseException:
        if sandbox is None:
            rset.close()
        raise
    return rset


def _add(rset: RewardSet, i: int, spec: Any, where: str, fetch, box: Callable[[], Sandbox]) -> None:
    name = spec.name
    params = dict(spec.params or {})
    if not math.isfinite(spec.weight):
        raise ConfigError(f"weight must be a finite number, got {spec.weight}", field=f"{where}.weight")
    if ":" not in name:
        if name not in ALL_BUILTINS:
            raise ConfigError(f"unknown reward {name!r}; built-ins are {', '.join(ALL_BUILTINS)}, or use "
                              "'module:function' with source for your own", field=f"{where}.name")
        if spec.source:
            raise ConfigError(f"source is only for custom 'module:function' rewards, not the built-in {name}",
                              field=f"{where}.source")
        if name in SANDBOXED_BUILTINS:
            require_custom_code(f"the {name} reward", field=f"{where}.name")
        try:
            built = (_code_execution.build(params, box()) if name == "code_execution"
                     else build_builtin(name, params))
        except RewardParamError as exc:
            raise ConfigError(str(exc), field=f"{where}.params") from None
        label = _unique(built.name, rset.names)
        tracker = FailureTracker(label, where, builtin=True)
        rset.add(_named(_guarded_builtin(built.func, tracker), label), spec.weight, label,
                 [(c, where) for c in built.columns])
        return
    require_custom_code(f"the custom reward {name}", field=f"{where}.name")
    fn = load_function(name, spec.source, fetch, where, box())
    if not fn.var_kw and "completions" not in fn.named:
        raise ConfigError(f"{name} must take a `completions` argument (TRL's reward-function signature is "
                          "f(completions, **columns) -> list[float])", field=f"{where}.name")
    unknown = sorted(p for p in params if not fn.var_kw and p not in fn.named)
    if unknown:
        raise ConfigError(f"params {unknown} are not arguments of {name}", field=f"{where}.params")
    label = _unique(name.replace(":", "."), rset.names)
    needed = sorted(fn.required - set(TRL_ARGUMENTS) - set(params))
    tracker = FailureTracker(label, where, builtin=False)
    rset.add(_named(_custom_wrapper(fn, params, where, tracker), label), spec.weight, label,
             [(c, where) for c in needed])


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
