"""Generate every CustomResourceDefinition in the resource registry (`resources.RESOURCES`) from its typed models.

Usage:
    python -m kubetune_api.crdgen            # write crds/<group>_<plural>.yaml (+ the chart copy) per resource
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

from .resources import FINETUNEJOB, RESOURCES, Resource

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
# The Helm chart templates its CRDs from this copy (charts cannot read files outside their folder).
CHART_CRD_DIR = REPO_ROOT / "helm" / "kubetune" / "files" / "crds"


def outputs(resource: Resource) -> tuple[Path, Path]:
    """Where a resource's CRD is written: crds/ and the chart's copy."""
    return CRD_DIR / resource.file_name, CHART_CRD_DIR / resource.file_name


# The runtimes' ValidatingAdmissionPolicies (kubetune_api.finetuneruntime.admission); the chart adds bindings.
ADMISSION_PATH = REPO_ROOT / "helm" / "kubetune" / "files" / "admission" / "policies.yaml"

CRD_PATH, CHART_CRD_PATH = outputs(FINETUNEJOB)
OUTPUTS = (CRD_PATH, CHART_CRD_PATH)  # the FineTuneJob's pair


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


def spec_schema(resource: Resource = FINETUNEJOB) -> dict:
    schema = model_schema(resource.spec_model)
    _bound_strings(schema)
    for path in resource.object_defaults:
        # "adapter", or a nested path through lists: "stages[].job.adapter"
        node = schema
        for part in path.split("."):
            node = node["properties"][part.removesuffix("[]")]
            if part.endswith("[]"):
                node = node["items"]
        node["default"] = {}
    return schema


def build_crd(resource: Resource = FINETUNEJOB) -> dict:
    spec = spec_schema(resource)
    status = model_schema(resource.status_model)
    spec["description"] = resource.spec_description
    status["description"] = resource.status_description
    root: dict[str, Any] = {"type": "object", "description": resource.description, "required": ["spec"]}
    if resource.root_validations:
        root["x-kubernetes-validations"] = resource.root_validations
    root["properties"] = {
        "apiVersion": {"type": "string", "description": f"APIVersion of this object ({resource.group}/{resource.version})."},
        "kind": {"type": "string", "description": f"Kind of this object ({resource.kind})."},
        "metadata": {"type": "object"},
        "spec": spec,
        "status": status,
    }
    version: dict[str, Any] = {"name": resource.version, "served": True, "storage": True, "subresources": {"status": {}}}
    if resource.printer_columns:
        version["additionalPrinterColumns"] = resource.printer_columns
    version["schema"] = {"openAPIV3Schema": root}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.crd_name,
            "annotations": {"kubetune.dev/generated-by": "python -m kubetune_api.crdgen (do not edit by hand)"},
        },
        "spec": {
            "group": resource.group,
            "names": {
                "kind": resource.kind, "listKind": f"{resource.kind}List", "plural": resource.plural,
                "singular": resource.singular, "shortNames": resource.short_names, "categories": resource.categories,
            },
            "scope": resource.scope,
            "versions": [version],
        },
    }


def render(resource: Resource = FINETUNEJOB) -> str:
    source = "operator/kubetune_api/" + resource.spec_model.__module__.split(".")[1] + "/"
    header = f"# Generated by `python -m kubetune_api.crdgen` from {source}. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(resource), sort_keys=False, width=120)


def render_admission() -> str:
    from .finetuneruntime.admission import policies

    header = "# Generated by `python -m kubetune_api.crdgen` from operator/kubetune_api/finetuneruntime/admission.py.\n"
    return header + "---\n".join(yaml.safe_dump(p, sort_keys=False, width=120) for p in policies())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if crds/ differs from the models")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = ap.parse_args(argv)
    texts = {path: render(r) for r in RESOURCES for path in outputs(r)}
    texts[ADMISSION_PATH] = render_admission()
    if args.stdout:
        sys.stdout.write("---\n".join(dict.fromkeys(texts.values())))
        return 0
    if args.check:
        stale = [p for p, text in texts.items() if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"{p} is out of date: run `python -m kubetune_api.crdgen`", file=sys.stderr)
        return 1 if stale else 0
    for p, text in texts.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
