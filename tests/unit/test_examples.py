"""The manifests in examples/ are what users copy first, so they must be valid and cover the whole API.

Every example parses with the typed models, passes validate_spec(), and validates against the generated CRD's
structural schema (types, enums, patterns, bounds, unknown fields); the CEL rules are checked by the apiserver in
tests/e2e/test_helm_install.py (server-side dry-run). Together the examples cover every stage and every adapter.

    .venv/bin/python -m pytest tests/unit/test_examples.py -q
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubetune_api import constants as C
from kubetune_api.finetunejob import AdapterType, Stage, parse_job, validate_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CRD = REPO / "crds" / f"{C.GROUP}_{C.PLURAL}.yaml"
VALUES = REPO / "helm" / "kubetune" / "values.yaml"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one FineTuneJob per file, found {len(docs)} documents"
    return docs[0]


def _ids(paths):
    return [p.name for p in paths]


def test_examples_exist():
    assert len(EXAMPLES) >= 15, f"expected one example per stage and adapter, found {_ids(EXAMPLES)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_parses_and_validates(path: Path):
    obj = _load(path)
    assert obj["apiVersion"] == C.API_VERSION and obj["kind"] == C.KIND
    meta = obj["metadata"]
    # no namespace: `kubectl apply -n team-a -f examples/x.yaml` must put it where the user says
    assert "namespace" not in meta, f"{path.name}: leave metadata.namespace out"
    assert DNS1123.match(meta["name"]) and len(meta["name"]) <= 50, meta["name"]
    job = parse_job(obj)
    errors = validate_spec(job.spec)
    assert errors == [], f"{path.name}: {errors}"


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_is_realistic(path: Path):
    """s3:// model and data and output, GPUs: what a real cluster run looks like (credentials: the runtime's)."""
    spec = parse_job(_load(path)).spec
    assert spec.model.source.startswith("s3://"), path.name
    uris = [s.uri for s in spec.dataset.train + (spec.dataset.eval or [])]
    assert uris and all(u.startswith("s3://") for u in uris), uris
    assert spec.output.uri.startswith("s3://")
    assert spec.resources.gpus >= 1, f"{path.name}: examples are for GPU clusters"


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_header_commands_name_this_file_and_job(path: Path):
    """The copy-paste commands in each file's comment header refer to that file and that job."""
    text = path.read_text()
    name = _load(path)["metadata"]["name"]
    for ref in re.findall(r"examples/([\w.-]+\.yaml)", text):
        assert (REPO / "examples" / ref).exists(), f"{path.name} mentions missing examples/{ref}"
    assert f"examples/{path.name}" in text, f"{path.name}: header should show `kubectl apply -f examples/{path.name}`"
    for ref in re.findall(r"ftj(?:/| )([a-z0-9-]+)(?= |$| -)", text, flags=re.M):
        if ref not in ("-w", "-o"):
            assert ref == name, f"{path.name}: header mentions ftj {ref}, the job is {name}"


def test_file_names_match_their_stage_or_adapter():
    for path in EXAMPLES:
        spec = parse_job(_load(path)).spec
        kind, _, what = path.stem.partition("-")
        if kind == "stage":
            assert spec.stage == what, f"{path.name} has stage {spec.stage}"
        elif kind == "adapter":
            assert spec.adapter.type == what, f"{path.name} has adapter {spec.adapter.type}"


def test_examples_cover_every_stage_and_adapter():
    specs = [parse_job(_load(p)).spec for p in EXAMPLES]
    assert {s.stage for s in specs} == {s.value for s in Stage}
    assert {s.adapter.type for s in specs} == {a.value for a in AdapterType}
    # one dedicated file per stage and per adapter, so a user finds them by name
    names = {p.stem for p in EXAMPLES}
    assert {f"stage-{s.value}" for s in Stage} <= names
    assert {f"adapter-{a.value}" for a in AdapterType} <= names


def test_multinode_deepspeed_example():
    specs = {p.name: parse_job(_load(p)).spec for p in EXAMPLES}
    multi = [n for n, s in specs.items()
             if s.resources.nodes > 1 and s.distributed and s.distributed.deepspeed is not None]
    assert multi, "need a multi-node DeepSpeed example"
    s = specs[multi[0]]
    assert s.resources.gpus >= 1 and s.distributed.backend in ("nccl", "auto")


def test_grpo_example_uses_builtin_and_custom_rewards():
    spec = parse_job(_load(REPO / "examples" / "stage-grpo.yaml")).spec
    names = [r.name for r in spec.training.grpo.rewards]
    assert any(":" not in n for n in names) and any(":" in n for n in names), names


def _runtimes() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted((REPO / "examples" / "runtimes").glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        out[(obj["kind"], obj["metadata"]["name"])] = obj
    return out


def test_example_runtimes_parse_and_the_default_one_matches_the_chart():
    from kubetune_api.finetuneruntime import parse_runtime

    runtimes = _runtimes()
    assert ("ClusterFineTuneRuntime", "default") in runtimes
    for (kind, name), obj in runtimes.items():
        parse_runtime(obj["spec"])
        assert kind in ("ClusterFineTuneRuntime", "FineTuneRuntime")
    if VALUES.exists():
        chart = yaml.safe_load(VALUES.read_text())
        # the chart's default runtime uses the Secret docs/install.md tells admins to create
        assert chart["trainer"]["defaultCredentialsSecret"] == \
            runtimes[("ClusterFineTuneRuntime", "default")]["spec"]["storage"]["credentials"]["secretName"]


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_is_allowed_by_its_runtime(path: Path):
    """Each example names a runtime from examples/runtimes (or the default) and asks nothing it forbids."""
    from kubetune_api.finetuneruntime import parse_runtime
    from kubetune_operator.runtimes import violations

    job = parse_job(_load(path))
    ref = job.spec.runtime_ref
    obj = _runtimes()[(ref.kind, ref.name)]
    assert violations(job, parse_runtime(obj["spec"]), ref.name) == [], path.name


# ---------------------------------------------------------------------------------------------------------
# A small validator for the structural-schema subset the generated CRD uses. Not a general JSON-Schema
# implementation: it knows exactly the keywords crdgen emits and fails on any other, so a generator change
# that adds one makes this test ask for support instead of silently ignoring it.
# ---------------------------------------------------------------------------------------------------------
_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_KNOWN = {"type", "description", "properties", "required", "items", "additionalProperties", "enum", "pattern",
          "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems",
          "maxItems", "maxProperties", "default", "format", "x-kubernetes-validations",
          "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
          "x-kubernetes-list-map-keys"}


def schema_errors(value, schema: dict, path: str = "") -> list[str]:
    unknown = set(schema) - _KNOWN
    assert not unknown, f"validator does not know schema keywords {unknown} at {path}"
    errs: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            return [f"{path}: want int or string"]
        if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: {value!r} does not match {schema['pattern']}")
        return errs
    t = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if t in checks and not isinstance(value, checks[t]):
        return [f"{path}: want {t}, got {type(value).__name__}"]
    if t == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: want integer, got {value!r}"]
    if t == "number" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return [f"{path}: want number, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", 1 << 30) or len(value) < schema.get("minLength", 0):
            errs.append(f"{path}: length out of bounds")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and (value < lo or (schema.get("exclusiveMinimum") and value == lo)):
            errs.append(f"{path}: {value} below minimum {lo}")
        if hi is not None and (value > hi or (schema.get("exclusiveMaximum") and value == hi)):
            errs.append(f"{path}: {value} above maximum {hi}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 1 << 30) or len(value) < schema.get("minItems", 0):
            errs.append(f"{path}: {len(value)} items out of bounds")
        for i, item in enumerate(value):
            errs += schema_errors(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        if len(value) > schema.get("maxProperties", 1 << 30):
            errs.append(f"{path}: too many properties")
        for req in schema.get("required", []):
            if req not in value:
                errs.append(f"{path}.{req}: required")
        props = schema.get("properties")
        for k, v in value.items():
            if props is not None and k in props:
                errs += schema_errors(v, props[k], f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += schema_errors(v, schema["additionalProperties"], f"{path}.{k}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errs.append(f"{path}.{k}: unknown field (the apiserver would prune or reject it)")
    return errs


def _crd_spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


@pytest.mark.parametrize("path", EXAMPLES, ids=_ids(EXAMPLES))
def test_example_matches_crd_schema(path: Path):
    errs = schema_errors(_load(path)["spec"], _crd_spec_schema(), "spec")
    assert errs == [], f"{path.name}: {errs}"


def test_schema_validator_catches_mistakes():
    """The validator above must be able to fail: typos, wrong types, bad enums and patterns."""
    schema = _crd_spec_schema()
    good = _load(REPO / "examples" / "stage-sft.yaml")["spec"]
    assert schema_errors(good, schema) == []
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["adapter"]["rnak"] = 8                      # typo: unknown field
    bad["training"]["batchSize"] = "8"              # string for integer
    bad["stage"] = "rlhf"                           # not in the enum
    bad["model"]["source"] = "gs://bucket/model"    # not an allowed URI scheme
    bad["resources"]["memory"] = "80 GB"            # not a quantity
    del bad["output"]                               # required
    errs = "\n".join(schema_errors(bad, schema, "spec"))
    for needle in ("adapter.rnak", "batchSize", "stage", "model.source", "resources.memory", "output: required"):
        assert needle in errs or needle.replace(": required", "") in errs, (needle, errs)
