"""The CRD bounds every list, map and string, so the resolved spec the operator stores in the ConfigMap
(render.render_config_map) can never exceed what a ConfigMap holds (1 MiB): a FineTuneJob the API server
accepts must never be refused later as a child. The bound is computed from the generated schema (largest
string, longest list, fullest map everywhere, all optional blocks present), so a new unbounded field fails here."""

from __future__ import annotations

from kubetune_api.crdgen import build_crd

CONFIG_MAP_MAX = 1024 * 1024
MAP_KEY_MAX = 317  # label/annotation keys (corev1.map_keys_rule); reward parameter names are bounded tighter
LINE = 16  # indentation, quotes, ": " and newline per YAML line: generous


def worst_case(schema: dict, path: str, parts: dict) -> int:
    """An upper bound of the YAML bytes of any value the schema accepts; parts[path] = bytes under path."""
    if "enum" in schema:
        n = max(len(str(v)) for v in schema["enum"]) + LINE
    elif schema.get("x-kubernetes-int-or-string"):
        n = 64 + LINE  # quantities: digits, a suffix
    elif schema.get("type") == "object" and "properties" in schema:
        n = sum(len(k) + LINE + worst_case(v, f"{path}.{k}", parts) for k, v in schema["properties"].items())
    elif schema.get("type") == "object" and "additionalProperties" in schema:
        items = schema.get("maxProperties")
        assert items is not None, f"{path}: a map without maxProperties"
        n = items * (MAP_KEY_MAX + LINE + worst_case(schema["additionalProperties"], f"{path}[*]", parts))
    elif schema.get("type") == "object":
        assert not schema.get("x-kubernetes-preserve-unknown-fields"), f"{path}: a free-form object is unbounded"
        n = LINE
    elif schema.get("type") == "array":
        items = schema.get("maxItems")
        assert items is not None, f"{path}: a list without maxItems"
        n = items * (LINE + worst_case(schema["items"], f"{path}[*]", parts))
    elif schema.get("type") == "string":
        assert "maxLength" in schema, f"{path}: a string without maxLength"
        n = schema["maxLength"] + LINE
    else:
        n = 32
    parts[path] = n
    return n


def test_the_largest_accepted_spec_fits_a_config_map():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    parts: dict[str, int] = {}
    size = worst_case(schema, "spec", parts)
    top = sorted(((n, p) for p, n in parts.items() if p.count(".") <= 3), reverse=True)[:12]
    assert size < CONFIG_MAP_MAX * 0.9, f"the largest spec the CRD accepts is ~{size} bytes: {top}"
