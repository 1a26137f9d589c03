"""Stage registry: one readable module per stage (cpt.py, sft.py, dpo.py, ...), looked up by the spec's
`stage`. Modules are imported lazily so `kubetune --help` and the operator never pay for TRL imports."""

from __future__ import annotations

import importlib

from .base import Stage, StageContext

STAGE_MODULES = ("cpt", "sft", "dpo", "orpo", "kto", "grpo", "rloo", "ppo", "reward")
_REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    _REGISTRY[cls.name] = cls
    return cls


def get_stage(name: str) -> Stage:
    if name not in _REGISTRY:
        if name not in STAGE_MODULES:
            raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_MODULES)}")
        importlib.import_module(f"{__name__}.{name}")
    return _REGISTRY[name]()


__all__ = ["Stage", "StageContext", "register", "get_stage", "STAGE_MODULES"]
