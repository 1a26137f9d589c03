"""CEL rule builders: one `x-kubernetes-validations` entry (apiextensions.k8s.io/v1 ValidationRule) and the
`json_schema_extra` that attaches a list of them to a model, so rules live next to the model they constrain."""

from __future__ import annotations


# The API server prints a CEL failure with reason FieldValueInvalid as `<field>: Invalid value: "object": <message>`
# -- the type of the object the rule sits on, not the value -- which reads as if the user had written "object".
# Forbidden prints `<field>: Forbidden: <message>`: rules say what is wrong (and messageExpression shows the value).
DEFAULT_REASON = "FieldValueForbidden"


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    """One x-kubernetes-validations entry (apiextensions.k8s.io/v1 ValidationRule)."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    out["reason"] = reason or DEFAULT_REASON
    return out


def validations(*rules: dict) -> dict:
    """`json_schema_extra` for a model: attach these rules to its schema node."""
    return {"x-kubernetes-validations": list(rules)}

