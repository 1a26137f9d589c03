"""Generate the FineTuneJob CustomResourceDefinition from the typed models.

Usage:
    python -m kubetune_api.crdgen            # write crds/kubetune.dev_finetunejobs.yaml
    python -m kubetune_api.crdgen --check    # exit 1 if the committed file differs (CI drift check)
    python -m kubetune_api.crdgen --stdout   # print it

Why a converter and not pydantic's schema as-is: Kubernetes wants a *structural* OpenAPI v3.0 schema —
no $ref, no nullable unions, `exclusiveMinimum` as a boolean, free-form objects marked with
x-kubernetes-preserve-unknown-fields — and pydantic emits JSON Schema 2020-12.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from . import constants as C
from .models import FineTuneJobSpec, FineTuneJobStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / f"{C.GROUP}_{C.PLURAL}.yaml"
# The Helm chart templates its CRD from this copy (charts cannot read files outside their folder).
CHART_CRD_PATH = REPO_ROOT / "helm" / "kubetune" / "files" / "crds" / CRD_PATH.name
OUTPUTS = (CRD_PATH, CHART_CRD_PATH)

# Fields whose model uses default_factory: the apiserver must default them to {} so that CEL rules can
# read e.g. self.adapter.type on a manifest that omits `adapter` (nested defaults then fill the rest).
_OBJECT_DEFAULTS = {"adapter", "training", "resources"}

PRINTER_COLUMNS = [
    {"name": "Stage", "type": "string", "jsonPath": ".spec.stage", "description": "Training stage"},
    {"name": "Adapter", "type": "string", "jsonPath": ".spec.adapter.type", "description": "Adapter type"},
    {"name": "Status", "type": "string", "jsonPath": ".status.phase", "description": "Phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary", "description": "step/total"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest train loss"},
    {"name": "PPL", "type": "number", "jsonPath": ".status.progress.perplexity", "description": "Eval perplexity"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpus", "priority": 1},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes", "priority": 1},
    {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds", "priority": 1,
     "description": "Seconds to completion"},
    {"name": "Job", "type": "string", "jsonPath": ".status.workload.name", "priority": 1},
]


def _resolve(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            target.update(extra)
            return _resolve(target, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: Any) -> Any:
    """Turn one resolved pydantic schema node into a structural Kubernetes schema node."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        # Union[str, int] quantities: Kubernetes expresses that with the extension alone (no type/anyOf).
        node.pop("anyOf", None)
        node.pop("type", None)
        node.pop("maxLength", None)
    # Optional[X] -> X (absence is how Kubernetes says "unset").
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            merged = dict(options[0])
            for k, v in node.items():
                if k != "anyOf" and not (k == "default" and v is None):
                    merged.setdefault(k, v)
            node = merged
    node.pop("title", None)
    if node.get("default", "missing") is None:
        node.pop("default")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    if node.get("additionalProperties") is True or node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
        node["type"] = "object"
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if "properties" in node:
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
        node.setdefault("type", "object")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key])
    if node.get("type") == "number" and "default" in node and isinstance(node["default"], int):
        node["default"] = float(node["default"])
    return node


def model_schema(model) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def _bound_strings(node: Any, limit: int = 1024) -> None:
    """CEL cost estimation treats an unbounded string as huge; give every spec string a maxLength."""
    if isinstance(node, dict):
        if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
            node["maxLength"] = limit
        for v in node.values():
            _bound_strings(v, limit)
    elif isinstance(node, list):
        for v in node:
            _bound_strings(v, limit)


def spec_schema() -> dict:
    schema = model_schema(FineTuneJobSpec)
    _bound_strings(schema)
    for name in _OBJECT_DEFAULTS:
        schema["properties"][name]["default"] = {}
    return schema


def build_crd() -> dict:
    spec = spec_schema()
    status = model_schema(FineTuneJobStatus)
    spec["description"] = "Desired state: what to train, on what, with which resources, and where results go."
    status["description"] = "Observed state, written by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": C.CRD_NAME,
            "annotations": {"kubetune.dev/generated-by": "python -m kubetune_api.crdgen (do not edit by hand)"},
        },
        "spec": {
            "group": C.GROUP,
            "names": {
                "kind": C.KIND, "listKind": f"{C.KIND}List", "plural": C.PLURAL, "singular": C.SINGULAR,
                "shortNames": C.SHORT_NAMES, "categories": C.CATEGORIES,
            },
            "scope": "Namespaced",
            "versions": [{
                "name": C.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "FineTuneJob fine-tunes an LLM declaratively: the operator runs the kubetune "
                    "trainer in GPU pods and stores the adapter in object storage.",
                    "required": ["spec"],
                    "x-kubernetes-validations": [{
                        "rule": "size(self.metadata.name) <= 50",
                        "message": "metadata.name must be at most 50 characters (child Job, Service and pod "
                        "names add suffixes and must stay within 63)",
                        "reason": "FieldValueInvalid",
                    }],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "APIVersion of this object (kubetune.dev/v1alpha1)."},
                        "kind": {"type": "string", "description": "Kind of this object (FineTuneJob)."},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    }


def render() -> str:
    header = "# Generated by `python -m kubetune_api.crdgen` from operator/kubetune_api/models.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if crds/ differs from the models")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = ap.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        stale = [p for p in OUTPUTS if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"{p} is out of date: run `python -m kubetune_api.crdgen`", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
