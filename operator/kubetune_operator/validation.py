"""Check a FineTuneJob before anything is created for it. Pure: returns the parsed job or a list of problems,
each starting with the field at fault in the spelling of the manifest (`spec.training.learningRate: ...`).

Three layers: the pydantic models (types, ranges, patterns; the CRD schema says the same, but a CRD applied
without validation or an older CRD must not reach the renderer), `kubetune_api.finetunejob.validate_spec` (the
cross-field rules CEL cannot express) and what only the operator cares about (names it derives children from,
PVC claim names it mounts).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional

from pydantic import ValidationError

from kubetune_api.finetunejob import FineTuneJob, parse_job, validate_spec

from . import queueing
from .render import is_multi_node, pvc_claim, spec_uri_fields

NAME_MAX = 50  # the CRD's rule: children append up to 8 characters, pod host names must stay within 63
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY_FIELDS = ("cpu", "memory", "sharedMemory")


def _loc(loc: tuple) -> str:
    """('spec', 'dataset', 'train', 0, 'uri') -> spec.dataset.train[0].uri"""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(manifest)"


def pydantic_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
        elif err.get("type") != "missing" and "input" in err:
            msg += f" (got {repr(err['input'])[:80]})"
        problems.append(f"{_loc(loc)}: {msg}")
    return problems


def normalize_body(body: dict) -> dict:
    """A copy of the manifest the models accept: the CRD types resource quantities as int-or-string, so the
    apiserver keeps `cpu: 8` as a number, which the models (strings) would refuse."""
    body = copy.deepcopy(dict(body))
    resources = (body.get("spec") or {}).get("resources")
    if isinstance(resources, dict):
        for key in _QUANTITY_FIELDS:
            if isinstance(resources.get(key), (int, float)) and not isinstance(resources.get(key), bool):
                resources[key] = str(resources[key])
    return body


def operator_problems(job: FineTuneJob) -> list[str]:
    problems = []
    name = job.metadata.name
    if len(name) > NAME_MAX:
        problems.append(f"metadata.name: at most {NAME_MAX} characters (child names add suffixes), got {len(name)}")
    if not _DNS_LABEL.match(name):
        problems.append(f"metadata.name: must be a DNS label (lowercase letters, digits, '-'; no dots), got {name!r}: "
                        "it becomes the trainer pods' host name")
    elif is_multi_node(job.spec) and not name[0].isalpha():
        problems.append(f"metadata.name: must start with a letter for multi-node jobs (the headless Service "
                        f"{name}-workers must be a DNS-1035 label), got {name!r}")
    for field, uri, _ in spec_uri_fields(job.spec):
        claim = pvc_claim(uri)
        if uri.startswith("pvc://") and (not claim or len(claim) > 253 or not _DNS_SUBDOMAIN.match(claim)):
            problems.append(f"{field}: {claim!r} (in {uri}) is not a valid PersistentVolumeClaim name "
                            "(lowercase letters, digits, '-' and '.')")
    return problems + queueing.problems(job)


def validate(body: dict) -> tuple[Optional[FineTuneJob], list[str]]:
    """(job, []) when the FineTuneJob can be rendered, else (None or job, problems)."""
    body = normalize_body(body)
    try:
        job = parse_job(body)
    except ValidationError as exc:
        return None, pydantic_problems(exc)
    problems = list(validate_spec(job.spec)) + operator_problems(job)
    return job, problems


def describe_problems(problems: list[str], limit: int = 2000) -> str:
    text = "; ".join(problems)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_valid(body: dict[str, Any]) -> FineTuneJob:
    """For callers that already validated: the parsed job (raises ValueError with the problems otherwise)."""
    job, problems = validate(body)
    if problems or job is None:
        raise ValueError(describe_problems(problems))
    return job
