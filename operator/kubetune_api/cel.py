"""CEL rule builders: one `x-kubernetes-validations` entry (apiextensions.k8s.io/v1 ValidationRule) and the
`json_schema_extra` that attaches a list of them to a model, so rules live next to the model they constrain."""

from __future__ import annotations


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    """One x-kubernetes-validations entry (apiextensions.k8s.io/v1 ValidationRule)."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def validations(*rules: dict) -> dict:
    """`json_schema_extra` for a model: attach these rules to its schema node."""
    return {"x-kubernetes-validations": list(rules)}

