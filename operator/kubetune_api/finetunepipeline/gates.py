"""Gate evaluation: does a finished stage's measured result pass its gate? Pure and torch-free, so the
operator (from the child FineTuneJob's status) and the local pipeline runner (from the TrainerReport) judge a
stage with the same code: both hand over the same `Progress` and `Forgetting` shapes.

    from kubetune_api.finetunepipeline.gates import evaluate
    verdict = evaluate(stage.gate, progress, forgetting, approved=False)
    verdict.state      # Passed | Failed | AwaitingApproval
    verdict.message    # "gate failed: evalLoss 2.31 > 2.0 (maxEvalLoss)"
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from pydantic.alias_generators import to_camel

from ..finetunejob.status import Forgetting, Progress
from .spec import Gate
from .status import GateCheck, GateStatus

PASSED, FAILED, WAITING, AWAITING_APPROVAL = "Passed", "Failed", "Waiting", "AwaitingApproval"
APPROVAL_ANNOTATION_PREFIX = "gates.kubetune.dev/"
APPROVED = "approved"

# gate field -> (metric name in GateCheck, where the value comes from, comparison)
CHECKS: list[tuple[str, str, str]] = [
    ("max_eval_loss", "evalLoss", "<="),
    ("max_perplexity", "perplexity", "<="),
    ("max_forgetting_rise", "forgettingRise", "<="),
    ("min_reward_accuracy", "rewardAccuracy", ">="),
    ("min_reward_margin", "rewardMargin", ">="),
    ("min_mean_reward", "meanReward", ">="),
]


def approval_annotation(stage_name: str) -> str:
    """The annotation a person sets on the pipeline to approve a stage with gate.manualApproval."""
    return f"{APPROVAL_ANNOTATION_PREFIX}{stage_name}"


def is_approved(annotations: Optional[Mapping[str, str]], stage_name: str) -> bool:
    return ((annotations or {}).get(approval_annotation(stage_name)) or "").strip().lower() == APPROVED


def measured(progress: Union[Progress, Mapping[str, Any], None],
             forgetting: Union[Forgetting, Mapping[str, Any], None]) -> dict[str, Optional[float]]:
    """The values a gate can judge, by metric name, from a stage's progress and forgetting result (typed, or
    the camelCase dicts of a FineTuneJob's status)."""
    p = progress if isinstance(progress, Progress) else Progress.model_validate(dict(progress or {}))
    f = forgetting if isinstance(forgetting, Forgetting) else Forgetting.model_validate(dict(forgetting or {}))
    return {
        "evalLoss": p.eval_loss, "perplexity": p.perplexity, "forgettingRise": f.relative_change,
        "rewardAccuracy": p.reward_accuracy, "rewardMargin": p.reward_margin, "meanReward": p.mean_reward,
    }


def _fmt(v: Optional[float]) -> str:
    return "not reported" if v is None else f"{v:.4g}"


def evaluate(gate: Optional[Gate], progress: Union[Progress, Mapping[str, Any], None],
             forgetting: Union[Forgetting, Mapping[str, Any], None] = None, *, approved: bool = False) -> GateStatus:
    """Judge a *succeeded* stage's results against its gate. Every threshold must hold; a metric the stage did
    not report fails its check (it cannot be judged, and passing it silently would defeat the gate). Metric
    checks come first: a stage that misses a threshold fails even if a person approved it; one that meets them
    waits for the approval annotation when manualApproval is set."""
    if gate is None:
        return GateStatus(state=PASSED, message="no gate", checks=[])
    values = measured(progress, forgetting)
    checks: list[GateCheck] = []
    for field, metric, cmp in CHECKS:
        threshold = getattr(gate, field)
        if threshold is None:
            continue
        value = values[metric]
        ok = value is not None and (value <= threshold if cmp == "<=" else value >= threshold)
        checks.append(GateCheck(metric=metric, value=value, threshold=threshold, comparison=cmp, passed=ok))
    failed = [c for c in checks if not c.passed]
    if failed:
        parts = []
        for c in failed:
            field = next(f for f, m, _ in CHECKS if m == c.metric)
            if c.value is None:
                parts.append(f"{c.metric} {_fmt(c.value)} (gate.{to_camel(field)} {c.threshold:.4g} cannot be judged)")
            else:
                bad = ">" if c.comparison == "<=" else "<"
                parts.append(f"{c.metric} {_fmt(c.value)} {bad} {c.threshold:.4g} (gate.{to_camel(field)})")
        return GateStatus(state=FAILED, message="gate failed: " + "; ".join(parts), checks=checks)
    if gate.manual_approval:
        checks.append(GateCheck(metric="manualApproval", comparison="approved", passed=approved))
        if not approved:
            return GateStatus(state=AWAITING_APPROVAL, checks=checks,
                              message="metrics pass; waiting for a person to approve")
    summary = ", ".join(f"{c.metric} {_fmt(c.value)} {c.comparison} {c.threshold:.4g}" for c in checks
                        if c.threshold is not None)
    return GateStatus(state=PASSED, message=f"gate passed: {summary}" if summary else "gate passed", checks=checks)


def approval_hint(pipeline_name: str, stage_name: str, namespace: Optional[str] = None) -> str:
    ns = f" -n {namespace}" if namespace else ""
    return f"kubectl annotate ftp/{pipeline_name}{ns} {approval_annotation(stage_name)}={APPROVED}"
