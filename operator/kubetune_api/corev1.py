"""The core/v1 pieces a FineTuneJob copies into its pods (affinity, tolerations, labels, names, quantities),
typed with core/v1's own rules, so the API server refuses a bad value when the FineTuneJob is applied, naming
the FineTuneJob's field, instead of the operator meeting the refusal later when it creates the Job.

Patterns follow k8s.io/apimachinery/pkg/util/validation (qualified names, label values, DNS subdomains) and
resource.Quantity; every list, map and string is bounded so that CEL cost estimation passes and the resolved
spec the operator stores in a ConfigMap stays far below 1 MiB.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

# k8s.io/apimachinery/pkg/util/validation, in RE2 syntax; "[.]" instead of "\." so the same text can sit inside a
# CEL string literal.
DNS_LABEL_RE = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_SUBDOMAIN = rf"^{DNS_LABEL_RE}([.]{DNS_LABEL_RE})*$"
QUALIFIED_NAME = rf"^({DNS_LABEL_RE}([.]{DNS_LABEL_RE})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# an extended resource (GPUs): a qualified name WITH a domain prefix, outside kubernetes.io (core/v1)
EXTENDED_RESOURCE = rf"^{DNS_LABEL_RE}([.]{DNS_LABEL_RE})+/[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"  # a key inside a Secret or ConfigMap
NO_EDGE_SPACE = r"^\S(.*\S)?$"  # core/v1: an image reference must not start or end with whitespace
# resource.Quantity, non-negative (a negative request or size limit is refused by core/v1)
QUANTITY = {
    "x-kubernetes-int-or-string": True,
    "pattern": r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
}

QUALIFIED_NAME_MAX = 317  # 253 (DNS subdomain prefix) + "/" + 63
LABEL_VALUE_MAX = 63
DNS_SUBDOMAIN_MAX = 253
ANNOTATION_VALUE_MAX = 2048
# Affinity nests lists four deep: these keep its largest form near 300 KiB (tests/unit/test_api_bounds.py).
TERMS_MAX = 3
EXPRESSIONS_MAX = 4
VALUES_LIST = 8
MATCH_LABELS_MAX = 8
TOLERATIONS_MAX = 32

LabelKey = Annotated[str, StringConstraints(max_length=QUALIFIED_NAME_MAX, pattern=QUALIFIED_NAME)]
LabelValue = Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE)]
AnnotationValue = Annotated[str, StringConstraints(max_length=ANNOTATION_VALUE_MAX)]


QUALIFIED_NAME_HELP = ("an optional DNS-subdomain prefix and /, then at most 63 characters of letters, digits, -, _ "
                       "and ., starting and ending with a letter or digit")


def map_keys_rule(what: str, target: str = "self") -> dict:
    """CEL for the keys of a string map (OpenAPI cannot constrain property names), with the bad key in the
    message: `spec.resources.nodeSelector: Invalid value: ...: node label key 'bad key!' is not a qualified name`.
    `target`: the map, relative to the object the rule sits on (`self`, or `self.matchLabels` with a guard)."""
    bad = f"size(k) > {QUALIFIED_NAME_MAX} || !k.matches('{QUALIFIED_NAME}')"
    rule = f"{target}.all(k, !({bad}))"
    if target != "self":
        rule = f"!has({target}) || {rule}"
    return {
        "rule": rule,
        "message": f"a {what} is not a qualified name ({QUALIFIED_NAME_HELP})",
        "messageExpression": f"'{what} \\'' + {target}.filter(k, {bad})[0] + '\\' is not a qualified name "
                             f"({QUALIFIED_NAME_HELP})'",
        "reason": "FieldValueForbidden",
    }


_NUMBER_RULE = {
    "rule": "!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1 && "
            "self.values[0].matches('^-?[0-9]+$'))",
    "message": "operators Gt and Lt take exactly one value, an integer",
    "fieldPath": ".values", "reason": "FieldValueForbidden",
}
_FIELD_RULE = {
    "rule": "self.key == 'metadata.name'",
    "message": "matchFields can only select metadata.name (node labels go in matchExpressions)",
    "fieldPath": ".key", "reason": "FieldValueForbidden",
}
_VALUES_RULE = {
    "rule": "self.operator in ['Exists', 'DoesNotExist'] ? !has(self.values) || size(self.values) == 0 : "
            "has(self.values) && size(self.values) > 0",
    "message": "operators In, NotIn, Gt and Lt need at least one value; Exists and DoesNotExist take no values",
    "messageExpression": "'operator ' + self.operator + (self.operator in ['Exists', 'DoesNotExist'] ? "
                         "' takes no values' : ' needs at least one value')",
    "fieldPath": ".values", "reason": "FieldValueForbidden",
}


class CoreModel(BaseModel):
    """camelCase on the wire, like core/v1; unknown fields refused (a misspelt affinity field must not vanish)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_k8s(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ------------------------------------------------------------------------------------------------ tolerations
class Toleration(CoreModel):
    """core/v1 Toleration with core/v1's rules (ValidateTolerations)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
         "message": "value must be empty when operator is Exists (Exists tolerates every value)",
         "messageExpression": "'value must be empty when operator is Exists (Exists tolerates every value), got ' "
                              "+ self.value",
         "fieldPath": ".value", "reason": "FieldValueForbidden"},
        {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
         "message": "tolerationSeconds applies only to effect NoExecute (how long a pod stays on a node tainted "
                    "NoExecute); remove it or set effect: NoExecute",
         "fieldPath": ".tolerationSeconds", "reason": "FieldValueForbidden"},
        {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
         "message": "a toleration without a key must use operator Exists (it then tolerates every taint)",
         "fieldPath": ".operator", "reason": "FieldValueForbidden"},
    ]})

    key: Optional[str] = Field(None, max_length=QUALIFIED_NAME_MAX, pattern=rf"^$|{QUALIFIED_NAME}",
                               description="Taint key (a qualified name); empty with operator Exists matches every key.")
    operator: Optional[str] = Field(None, json_schema_extra={"enum": ["Exists", "Equal"]},
                                    description="Exists or Equal (default Equal).")
    value: Optional[str] = Field(None, max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE,
                                 description="Taint value (operator Equal; empty with Exists).")
    effect: Optional[str] = Field(None, json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                                  description="Taint effect (empty matches every effect).")
    toleration_seconds: Optional[int] = Field(None, description="For NoExecute: how long the pod stays bound.")


# ------------------------------------------------------------------------------------------------ affinity
NODE_OPERATORS = ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
LABEL_OPERATORS = ["In", "NotIn", "Exists", "DoesNotExist"]


class NodeSelectorRequirement(CoreModel):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_VALUES_RULE, _NUMBER_RULE]})

    key: str = Field(..., max_length=QUALIFIED_NAME_MAX, pattern=QUALIFIED_NAME, description="Node label key.")
    operator: str = Field(..., json_schema_extra={"enum": NODE_OPERATORS}, description=", ".join(NODE_OPERATORS))
    values: Optional[list[Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX)]]] = Field(
        None, max_length=VALUES_LIST, description="Values (In/NotIn: any of; Gt/Lt: one integer).")


class NodeFieldRequirement(NodeSelectorRequirement):
    """A matchFields entry: like a label requirement, on the one node field core/v1 supports."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_VALUES_RULE, _NUMBER_RULE,
                                                                               _FIELD_RULE]})


class NodeSelectorTerm(CoreModel):
    match_expressions: Optional[list[NodeSelectorRequirement]] = Field(
        None, max_length=EXPRESSIONS_MAX, description="Requirements on node labels, ANDed.")
    match_fields: Optional[list[NodeFieldRequirement]] = Field(
        None, max_length=EXPRESSIONS_MAX, description="Requirements on node fields (metadata.name), ANDed.")


class NodeSelector(CoreModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(..., min_length=1, max_length=TERMS_MAX,
                                                        description="Terms, ORed.")


class PreferredSchedulingTerm(CoreModel):
    weight: int = Field(..., ge=1, le=100, description="Added to a node's score when the term matches (1-100).")
    preference: NodeSelectorTerm = Field(..., description="The node selector term.")


class NodeAffinity(CoreModel):
    required_during_scheduling_ignored_during_execution: Optional[NodeSelector] = Field(
        None, description="Nodes the pods must run on.")
    preferred_during_scheduling_ignored_during_execution: Optional[list[PreferredSchedulingTerm]] = Field(
        None, max_length=TERMS_MAX, description="Nodes the scheduler prefers, by weight.")


class LabelSelectorRequirement(CoreModel):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_VALUES_RULE]})

    key: str = Field(..., max_length=QUALIFIED_NAME_MAX, pattern=QUALIFIED_NAME, description="Label key.")
    operator: str = Field(..., json_schema_extra={"enum": LABEL_OPERATORS}, description=", ".join(LABEL_OPERATORS))
    values: Optional[list[LabelValue]] = Field(None, max_length=VALUES_LIST,
                                               description="Label values (In/NotIn; none for Exists/DoesNotExist).")


class LabelSelector(CoreModel):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {**map_keys_rule("label key", "self.matchLabels"), "fieldPath": ".matchLabels"},
    ]})

    match_labels: Optional[dict[str, LabelValue]] = Field(
        None, json_schema_extra={"maxProperties": MATCH_LABELS_MAX}, description="Labels that must all match.")
    match_expressions: Optional[list[LabelSelectorRequirement]] = Field(
        None, max_length=EXPRESSIONS_MAX, description="Label requirements, ANDed.")


class PodAffinityTerm(CoreModel):
    label_selector: Optional[LabelSelector] = Field(None, description="The pods this term is about.")
    namespace_selector: Optional[LabelSelector] = Field(None, description="Namespaces to look for those pods in.")
    namespaces: Optional[list[Annotated[str, StringConstraints(max_length=63, pattern=rf"^{DNS_LABEL_RE}$")]]] = \
        Field(None, max_length=MATCH_LABELS_MAX, description="Namespace names to look for those pods in.")
    topology_key: str = Field(..., min_length=1, max_length=QUALIFIED_NAME_MAX, pattern=QUALIFIED_NAME,
                              description="Node label that defines co-location, e.g. kubernetes.io/hostname.")
    match_label_keys: Optional[list[LabelKey]] = Field(
        None, max_length=EXPRESSIONS_MAX, description="Pod label keys whose values must equal this pod's.")
    mismatch_label_keys: Optional[list[LabelKey]] = Field(
        None, max_length=EXPRESSIONS_MAX, description="Pod label keys whose values must differ from this pod's.")


class WeightedPodAffinityTerm(CoreModel):
    weight: int = Field(..., ge=1, le=100, description="Added to a node's score when the term matches (1-100).")
    pod_affinity_term: PodAffinityTerm = Field(..., description="The pod affinity term.")


class PodAffinity(CoreModel):
    required_during_scheduling_ignored_during_execution: Optional[list[PodAffinityTerm]] = Field(
        None, max_length=TERMS_MAX, description="Terms the placement must satisfy.")
    preferred_during_scheduling_ignored_during_execution: Optional[list[WeightedPodAffinityTerm]] = Field(
        None, max_length=TERMS_MAX, description="Terms the scheduler prefers, by weight.")


class Affinity(CoreModel):
    """core/v1 Affinity (node affinity, pod affinity and anti-affinity), copied to the trainer pods."""

    node_affinity: Optional[NodeAffinity] = Field(None, description="Which nodes the pods may run on.")
    pod_affinity: Optional[PodAffinity] = Field(None, description="Run near pods that match (same topology).")
    pod_anti_affinity: Optional[PodAffinity] = Field(None, description="Run away from pods that match.")
