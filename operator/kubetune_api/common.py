"""Shared API building blocks: the pydantic `Model` base every resource uses, `StrEnum`, the size bounds CEL
cost estimation needs, and the small Kubernetes-shaped types more than one resource embeds (Secret refs,
tolerations, resource quantities, metav1-style Condition and ObjectMeta)."""

from __future__ import annotations

import enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from . import corev1

# CEL cost estimation needs bounded strings and lists: every string and list carries a max.
NAME_MAX = 253
URI_MAX = 2048
LIST_MAX = 64
URI_PATTERN = r"^(s3|file|pvc|hf)://.+"
# Path safety: a URI may not climb out of its claim, bucket or folder, nor hide an empty segment. The apiserver's
# `pattern` (Go RE2) has no look-ahead, so these are CEL rules on every URI field, each with a message that says
# what is wrong; `uri_problem` is the same check in Python (validate_spec, the trainer's storage).
URI_SAFETY_RULES = [
    {"rule": "!self.matches('/[.][.](/|$)')", "message": "a URI may not contain a '..' path segment",
     "reason": "FieldValueInvalid"},
    {"rule": "!self.matches('^[a-z0-9]+://.*//')", "message": "a URI may not contain an empty path segment ('//')",
     "reason": "FieldValueInvalid"},
    {"rule": "!self.matches('^(s3|pvc|hf):///')",
     "message": "s3://, pvc:// and hf:// URIs start with a bucket, claim or name, not '/'", "reason": "FieldValueInvalid"},
]
URI_SAFETY = {"x-kubernetes-validations": URI_SAFETY_RULES}


def uri_problem(uri: str) -> str | None:
    """What makes `uri` unsafe as a path (the URI_SAFETY_RULES, in Python), or None."""
    import re

    if re.search(r"/\.\.(/|$)", uri):
        return "a URI may not contain a '..' path segment"
    if re.match(r"^[a-z0-9]+://.*//", uri):
        return "a URI may not contain an empty path segment ('//')"
    if re.match(r"^(s3|pvc|hf):///", uri):
        return "s3://, pvc:// and hf:// URIs start with a bucket, claim or name, not '/'"
    return None


class Model(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields refused (the CRD prunes them anyway)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True,
        validate_default=True,
    )

    def to_k8s(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StrEnum(str, enum.Enum):
    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


class SecretKeyRef(Model):
    name: str = Field(..., max_length=NAME_MAX, pattern=corev1.DNS_SUBDOMAIN,
                      description="Name of a Secret in the FineTuneJob's namespace.")
    key: str = Field(..., max_length=NAME_MAX, pattern=corev1.CONFIG_KEY, description="Key inside the Secret.")


class StorageCredentials(Model):
    """S3 credentials, only ever as a Secret reference: the operator wires them into the pod with
    secretKeyRef and never reads them."""

    secret_name: str = Field(
        ..., max_length=NAME_MAX, pattern=corev1.DNS_SUBDOMAIN,
        description="Secret in the job's namespace holding the S3 access key pair (never copied into status, "
        "events or logs).",
    )
    access_key_id_key: str = Field(
        "AWS_ACCESS_KEY_ID", max_length=NAME_MAX, pattern=corev1.CONFIG_KEY, description="Key in the Secret holding the access key id."
    )
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", max_length=NAME_MAX, pattern=corev1.CONFIG_KEY, description="Key in the Secret holding the secret key."
    )



# core/v1 types with core/v1's own rules (corev1.py); re-exported here, where the resources look for them.
Toleration = corev1.Toleration
QUANTITY = corev1.QUANTITY


class Condition(Model):
    """Shaped like metav1.Condition."""

    type: str = Field(..., max_length=316, description="Condition type, e.g. Succeeded.")
    status: str = Field(..., json_schema_extra={"enum": ["True", "False", "Unknown"]}, description="True, False or Unknown.")
    reason: str = Field(..., max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable detail.")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"})
    observed_generation: Optional[int] = Field(None, ge=0, description="The .metadata.generation this condition was set for.")



class ObjectMeta(Model):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)
    name: str = Field("local", max_length=NAME_MAX)
    namespace: str = Field("default", max_length=NAME_MAX)
    uid: Optional[str] = None
    generation: Optional[int] = None
    labels: Optional[dict[str, str]] = None
    annotations: Optional[dict[str, str]] = None


