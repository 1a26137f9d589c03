"""Effective values: defaults that depend on other fields (e.g. LoRA rank, which must be absent for `full`)
and so cannot be schema defaults. The trainer and the operator both use these so that what the manifest says
and what runs cannot disagree; the field descriptions state the same defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .finetunejob import AdapterSpec, DatasetSpec, FineTuneJobSpec


def effective_lora(a: AdapterSpec) -> dict:
    rank = a.rank or 16
    return {
        "r": rank,
        "lora_alpha": a.alpha if a.alpha is not None else 2 * rank,
        "lora_dropout": a.dropout if a.dropout is not None else 0.05,
        "target_modules": a.target_modules or ["all-linear"],
        "use_rslora": bool(a.use_rslora),
        "init": a.init or "default",
    }


def effective_eval_fraction(d: DatasetSpec) -> float:
    if d.eval:
        return 0.0
    return 0.1 if d.eval_fraction is None else d.eval_fraction


def processes_per_node(spec: FineTuneJobSpec) -> int:
    d = spec.distributed
    if d and d.processes_per_node:
        return d.processes_per_node
    return max(1, spec.resources.gpus)
