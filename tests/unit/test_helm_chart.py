"""The Helm chart (helm/kubetune), rendered with the real helm binary for each values scenario: lint, the
objects each scenario must (and must not) produce, least-privilege RBAC, the restricted security context, the
CRD equal to crds/, monitoring gated on the Prometheus Operator API, kopf peering for several replicas, and
every value documented (values.yaml comments, README table, values.schema.json).

    .venv/bin/python -m pytest tests/unit/test_helm_chart.py -q

helm comes from ~/.cache/kubetune/bin/current (scripts/cluster/build-binaries.sh helm), $KUBETUNE_BIN_DIR or
PATH; without it these tests skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kubetune_api import constants as C

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubetune"
CRD_FILE = REPO / "crds" / f"{C.GROUP}_{C.PLURAL}.yaml"
PIPELINE_CRD_FILE = REPO / "crds" / f"{C.GROUP}_{C.PIPELINE_PLURAL}.yaml"
RULES_FILE = CHART / "files" / "prometheus-rules" / "kubetune.rules.yaml"
DASHBOARD_FILE = CHART / "files" / "dashboards" / "kubetune.json"
RELEASE, NAMESPACE = "kt", "kubetune-system"
FULLNAME = f"{RELEASE}-kubetune"


def find_helm() -> str | None:
    candidates = [os.environ.get("KUBETUNE_BIN_DIR", ""),
                  str(Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "bin" / "current")]
    for d in candidates:
        if d and os.access(os.path.join(d, "helm"), os.X_OK):
            return os.path.join(d, "helm")
    return shutil.which("helm")


HELM = find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm is not built yet: run `scripts/cluster/build-binaries.sh helm` "
                         "(or put helm on PATH / set KUBETUNE_BIN_DIR)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/kubetune-helm-cache",
                               "HELM_CONFIG_HOME": "/tmp/kubetune-helm-config",
                               "HELM_DATA_HOME": "/tmp/kubetune-helm-data"})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def _flat_set_json(values: dict) -> list[str]:
    """--set-json key=value for each top-level key (helm merges them like a values file)."""
    out: list[str] = []
    for k, v in values.items():
        out += ["--set-json", f"{k}={json.dumps(v)}"]
    return out


def render(values: dict | None = None, *extra: str) -> list[dict]:
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_flat_set_json(values or {}), *extra)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(objs: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objs: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = find(objs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}, got {len(found)}: " \
                            f"{[(o['kind'], o['metadata']['name']) for o in objs]}"
    return found[0]


def kinds(objs: list[dict]) -> set[str]:
    return {o["kind"] for o in objs}


def container(objs: list[dict]) -> dict:
    dep = one(objs, "Deployment", FULLNAME)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(objs: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(objs).get("env", [])}


def allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any((group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
               and (resource in r.get("resources", []) or "*" in r.get("resources", []))
               and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
               for r in rules)


def rbac_rules(objs: list[dict]) -> list[tuple[dict, dict]]:
    """The operator's rules (the user-facing ClusterRoles, in USER_ROLES, are checked on their own)."""
    return [(o, r) for o in objs if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] not in USER_ROLES
            for r in o.get("rules", [])]


USER_ROLES = ("kubetune-edit", "kubetune-view")


# Scenarios: name -> values. Each is linted with --strict and rendered by the tests below.
KUBETUNE_CRDS = {C.CRD_NAME, f"{C.CLUSTER_RUNTIME_PLURAL}.{C.GROUP}", f"{C.RUNTIME_PLURAL}.{C.GROUP}",
                 f"{C.PIPELINE_PLURAL}.{C.GROUP}"}
NAMESPACED = {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a", "team-b"]}
MONITORING_ON = {"monitoring": {"force": True, "serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                                "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}
SCENARIOS = {
    "defaults": {},
    "namespaced": NAMESPACED,
    "monitoring-forced": MONITORING_ON,
    "monitoring-off": {"monitoring": {"force": False}},
    "crds-off": {"crds": {"install": False}},
    "replicas-2": {"operator": {"replicas": 2}},
    "replicas-2-namespaced": {**NAMESPACED, "operator": {"replicas": 2}},
}


# ---------------------------------------------------------------------------------------------- lint
@pytest.mark.parametrize("values", SCENARIOS.values(), ids=list(SCENARIOS))
def test_lint_strict(values: dict):
    proc = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *_flat_set_json(values))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------- runtimes
def test_default_runtime_carries_the_trainer_values_and_is_a_hook():
    from kubetune_api.finetuneruntime import parse_runtime

    objs = render({"trainer": {"image": {"repository": "registry.example/trainer", "tag": "abc"},
                               "s3Endpoint": "http://s3.example:9000", "defaultCredentialsSecret": "team-s3"},
                   "runtime": {"spec": {"policy": {"allowCustomCode": True}, "resources": {"maxGpusPerNode": 4}}}})
    rt = one(objs, "ClusterFineTuneRuntime", "default")
    spec = parse_runtime(rt["spec"])  # valid against the typed model (the CRD's source)
    assert spec.template.image == "registry.example/trainer:abc"
    assert spec.storage.endpoint == "http://s3.example:9000" and spec.storage.credentials.secret_name == "team-s3"
    assert spec.policy.allow_custom_code and spec.resources.max_gpus_per_node == 4
    assert not spec.policy.allow_trust_remote_code, "the default runtime runs no remote code unless asked"
    # created after the CRDs (Helm cannot map a custom resource whose CRD is in the same release)
    assert "post-install" in rt["metadata"]["annotations"]["helm.sh/hook"]
    assert not find(render({"runtime": {"create": False}}), "ClusterFineTuneRuntime")


def test_admission_policies_and_one_binding_per_runtime_kind():
    from kubetune_api.finetuneruntime.admission import policies

    objs = render()
    rendered = {p["metadata"]["name"]: p for p in find(objs, "ValidatingAdmissionPolicy")}
    for generated in policies():
        p = rendered[generated["metadata"]["name"]]
        assert p["spec"] == generated["spec"]
        (binding,) = [b for b in find(objs, "ValidatingAdmissionPolicyBinding")
                      if b["spec"]["policyName"] == p["metadata"]["name"]]
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    assert {p["spec"]["paramKind"]["kind"] for p in rendered.values()} == {"ClusterFineTuneRuntime", "FineTuneRuntime"}
    assert not find(render({"admission": {"enabled": False}}), "ValidatingAdmissionPolicy")


def test_operator_reads_runtimes_in_both_rbac_scopes():
    for values in ({}, NAMESPACED):
        objs = render(values)
        rules = [r for o in find(objs, "ClusterRole") + find(objs, "Role") for r in o.get("rules") or []]
        cluster = [r for r in rules if "clusterfinetuneruntimes" in r["resources"]]
        assert cluster and all(set(r["verbs"]) == {"get", "list", "watch"} for r in cluster), values
        ns = [r for r in rules if "finetuneruntimes" in r["resources"]]
        assert ns and all(set(r["verbs"]) <= {"get", "list", "watch"} for r in ns), values


# ---------------------------------------------------------------------------------------------- defaults
def test_defaults_render_the_expected_objects():
    objs = render()
    assert kinds(objs) == {"ServiceAccount", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                           "Service", "Deployment", "ClusterFineTuneRuntime", "ValidatingAdmissionPolicy",
                           "ValidatingAdmissionPolicyBinding"}
    assert not find(objs, "Role") and not find(objs, "ConfigMap")
    for o in objs:
        if o["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterFineTuneRuntime",
                             "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("crd_file", [CRD_FILE, PIPELINE_CRD_FILE], ids=lambda p: p.name)
def test_crd_equals_the_generated_file(crd_file):
    CRD_FILE = crd_file
    objs = render()
    generated = yaml.safe_load(CRD_FILE.read_text())
    crd = one(objs, "CustomResourceDefinition", generated["metadata"]["name"])
    annotations = dict(crd["metadata"]["annotations"])
    assert annotations.pop("helm.sh/resource-policy") == "keep", "crds.keep defaults to true"
    assert annotations == generated["metadata"]["annotations"]
    # everything but the labels/annotations Helm adds must be the generated CRD, value for value
    rendered = {**crd, "metadata": {"name": crd["metadata"]["name"], "annotations": annotations}}
    assert rendered == generated
    # and the chart's copy (what .Files.Get reads) is the generated file byte for byte
    assert (CHART / "files" / "crds" / CRD_FILE.name).read_text() == CRD_FILE.read_text(), \
        "helm/kubetune/files/crds is stale: run `python -m kubetune_api.crdgen`"


def test_crds_keep_false_drops_the_resource_policy():
    crds = find(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} == KUBETUNE_CRDS
    for crd in crds:
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def test_crds_install_false_renders_no_crd():
    objs = render({"crds": {"install": False}})
    assert not find(objs, "CustomResourceDefinition")
    assert find(objs, "Deployment")


def test_restricted_pod_security():
    objs = render()
    pod = one(objs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert psc["runAsUser"] == 65532, "matches the operator image's USER"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert not sc.get("privileged")
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    # a read-only root needs a writable /tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_operator_container_defaults():
    objs = render()
    c = container(objs)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert c["image"] == f"{values['operator']['image']['repository']}:{app_version}"
    assert "command" not in c, "the image ENTRYPOINT (python -m kubetune_operator) is the command"
    assert c["args"] == ["--standalone"], "one replica without peering runs --standalone"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    env = env_of(objs)
    assert env["KUBETUNE_TRAINER_IMAGE"] == f"{values['trainer']['image']['repository']}:{app_version}"
    assert env["KUBETUNE_DEFAULT_CREDENTIALS_SECRET"] == values["trainer"]["defaultCredentialsSecret"]
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
    assert "KUBETUNE_S3_ENDPOINT" not in env, "empty s3Endpoint: AWS S3, no variable"
    assert json.loads(env["KUBETUNE_TRAINER_RESOURCES"]) == values["trainer"]["resources"]
    dep = one(objs, "Deployment", FULLNAME)
    assert dep["spec"]["strategy"]["type"] == "Recreate", "a standalone operator must never run twice"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME


def test_values_reach_the_deployment():
    objs = render({
        "operator": {"priorityClassName": "system-cluster-critical", "nodeSelector": {"kubernetes.io/os": "linux"},
                     "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
                     "extraArgs": ["--verbose"], "image": {"tag": "v9"}, "healthPort": 9091},
        "trainer": {"image": {"repository": "registry.example/trainer", "tag": "abc"},
                    "s3Endpoint": "https://s3.example.internal", "defaultCredentialsSecret": "team-s3"},
        "metrics": {"port": 9090},
        "watchNamespaces": ["ml"],
    })
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "infra"
    c = container(objs)
    assert c["image"].endswith(":v9")
    assert c["args"] == ["--standalone", "--verbose"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9090, "health": 9091}
    env = env_of(objs)
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example/trainer:abc"
    assert env["KUBETUNE_S3_ENDPOINT"] == "https://s3.example.internal"
    assert env["KUBETUNE_DEFAULT_CREDENTIALS_SECRET"] == "team-s3"
    assert env["KUBETUNE_METRICS_PORT"] == "9090"
    assert env["KUBETUNE_WATCH_NAMESPACES"] == "ml"
    svc = one(objs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


# ---------------------------------------------------------------------------------------------- RBAC
NEEDED = [  # (group, resource, verbs) the operator needs in every namespace it reconciles
    ("kubetune.dev", "finetunejobs", ["get", "list", "watch", "patch", "delete", "create"]),
    ("kubetune.dev", "finetunejobs/status", ["get", "patch"]),
    ("kubetune.dev", "finetunepipelines", ["get", "list", "watch", "patch"]),
    ("kubetune.dev", "finetunepipelines/status", ["get", "patch"]),
    ("batch", "jobs", ["get", "list", "watch", "create", "patch", "delete"]),
    ("jobset.x-k8s.io", "jobsets", ["get", "list", "watch", "create", "patch", "delete"]),
    ("", "pods", ["get", "list", "watch"]),
    ("", "services", ["get", "create", "patch", "delete"]),
    ("", "configmaps", ["get", "create", "patch", "delete"]),
    ("", "events", ["create", "list"]),
]
# Verbs the operator does not use (it merge-patches, never PUTs; it never lists its ConfigMaps and Services): the
# chart must not grant them.
NOT_NEEDED = [
    ("kubetune.dev", "finetunejobs", ["update"]),
    ("kubetune.dev", "finetunepipelines", ["update", "create", "delete"]),
    ("kubetune.dev", "finetunejobs/status", ["update"]),
    ("batch", "jobs", ["update"]),
    ("jobset.x-k8s.io", "jobsets", ["update"]),
    ("", "services", ["list", "watch", "update"]),
    ("", "configmaps", ["list", "watch", "update"]),
    ("", "events", ["patch", "update", "delete"]),
    ("events.k8s.io", "events", ["create", "patch"]),
]


def _assert_least_privilege(objs: list[dict]):
    for owner, rule in rbac_rules(objs):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        assert "*" not in rule.get("apiGroups", []) and "*" not in rule.get("resources", []) \
            and "*" not in rule.get("verbs", []), f"{where}: wildcard rule {rule}"
        assert "secrets" not in rule.get("resources", []), f"{where}: the operator must not access Secrets"
        assert not rule.get("nonResourceURLs"), where
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), where
    rules = [r for _, r in rbac_rules(objs)]
    # pods are read-only: the Job controller creates them; the operator reads exit codes and IPs
    for verb in ("create", "delete", "patch", "update"):
        assert not allows(rules, "", "pods", verb), f"pods {verb}"
    assert not allows(rules, "", "pods/exec", "create")
    # the operator creates FineTuneJobs only as a FineTunePipeline's stages; users create the pipelines
    assert allows(rules, "kubetune.dev", "finetunejobs", "create"), "pipeline stages are FineTuneJobs"
    assert not allows(rules, "kubetune.dev", "finetunepipelines", "create"), "users create pipelines"
    assert not allows(rules, "kubetune.dev", "finetunejobs", "update"), "merge patches only, never PUT"
    assert allows(rules, "kubetune.dev", "finetunepipelines/status", "patch")


def test_cluster_rbac():
    objs = render()
    role = one(objs, "ClusterRole", FULLNAME)
    for group, resource, verbs in NEEDED:
        for verb in verbs:
            assert allows(role["rules"], group, resource, verb), f"missing {verb} {group}/{resource}"
    for group, resource, verbs in NOT_NEEDED:
        for verb in verbs:
            assert not allows(role["rules"], group, resource, verb), f"grants unused {verb} {group}/{resource}"
    assert allows(role["rules"], "apiextensions.k8s.io", "customresourcedefinitions", "watch")
    assert not allows(role["rules"], "apiextensions.k8s.io", "customresourcedefinitions", "create")
    # cluster-wide kopf does not observe namespaces (it only does for a namespace list)
    assert not allows(role["rules"], "", "namespaces", "list")
    assert not allows(role["rules"], "kopf.dev", "clusterkopfpeerings", "get"), "no peering without peering"
    _assert_least_privilege(objs)
    binding = one(objs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert one(objs, "ServiceAccount", FULLNAME)["metadata"]["namespace"] == NAMESPACE


def test_namespaced_rbac():
    objs = render(NAMESPACED)
    assert {r["metadata"]["namespace"] for r in find(objs, "Role")} == {"team-a", "team-b"}
    for ns in ("team-a", "team-b"):
        role = one(objs, "Role", FULLNAME, ns)
        for group, resource, verbs in NEEDED:
            for verb in verbs:
                assert allows(role["rules"], group, resource, verb), f"{ns}: missing {verb} {group}/{resource}"
        rb = one(objs, "RoleBinding", FULLNAME, ns)
        assert rb["roleRef"]["kind"] == "Role" and rb["roleRef"]["name"] == FULLNAME
        assert rb["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # no ClusterRole grants anything namespaced: only read access to the two cluster-scoped kinds kopf watches
    (cr,) = [o for o in find(objs, "ClusterRole") if o["metadata"]["name"] not in USER_ROLES]
    assert cr["metadata"]["name"] == f"{FULLNAME}-discovery"
    for rule in cr["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert set(rule["resources"]) <= {"customresourcedefinitions", "namespaces", "clusterfinetuneruntimes"}, rule
    for group, resource, _ in NEEDED:
        assert not allows(cr["rules"], group, resource, "get"), f"ClusterRole grants {group}/{resource}"
    _assert_least_privilege(objs)
    assert container(objs)["args"] == ["--standalone"]
    assert env_of(objs)["KUBETUNE_WATCH_NAMESPACES"] == "team-a,team-b"
    # the trainer PodMonitor (if enabled) is limited to the same namespaces
    pm = one(render({**NAMESPACED, **MONITORING_ON}), "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_scope_auto_is_namespaced_with_a_namespace_list_and_cluster_without():
    objs = render({"watchNamespaces": ["team-a"]})  # rbac.scope defaults to auto
    assert one(objs, "Role", FULLNAME, "team-a") and not find(objs, "ClusterRole", FULLNAME)
    assert one(objs, "ClusterRole", f"{FULLNAME}-discovery")
    objs = render()
    assert one(objs, "ClusterRole", FULLNAME) and not find(objs, "Role")
    # an explicit scope still wins: cluster-wide rules with a namespace list
    objs = render({"watchNamespaces": ["team-a"], "rbac": {"scope": "cluster"}})
    assert allows(one(objs, "ClusterRole", FULLNAME)["rules"], "", "namespaces", "watch")


def test_user_roles_aggregate_into_the_builtin_roles():
    objs = render()
    edit, view = one(objs, "ClusterRole", "kubetune-edit"), one(objs, "ClusterRole", "kubetune-view")
    agg = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith(agg) and v == "true"} == \
        {agg + "edit", agg + "admin"}
    assert {k for k, v in view["metadata"]["labels"].items() if k.startswith(agg) and v == "true"} == \
        {agg + "view", agg + "edit", agg + "admin"}
    g = "kubetune.dev"
    for resource in ("finetunejobs", "finetunepipelines"):
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"):
            assert allows(edit["rules"], g, resource, verb), f"edit: {verb} {resource}"
        for verb in ("get", "list", "watch"):
            assert allows(view["rules"], g, resource, verb)
        for verb in ("create", "update", "patch", "delete"):
            assert not allows(view["rules"], g, resource, verb), f"view may {verb} {resource}"
    # status is the operator's: users read it, never write it (they could fake a Succeeded job)
    for role in (edit, view):
        assert allows(role["rules"], g, "finetunejobs/status", "get")
        for verb in ("patch", "update"):
            assert not allows(role["rules"], g, "finetunejobs/status", verb)
    # runtimes are the platform's: users may read (choose) them, not change them
    for role in (edit, view):
        assert allows(role["rules"], g, "finetuneruntimes", "list")
        for verb in ("create", "update", "patch", "delete"):
            assert not allows(role["rules"], g, "finetuneruntimes", verb)
            assert not allows(role["rules"], g, "clusterfinetuneruntimes", verb)
    assert allows(view["rules"], g, "clusterfinetuneruntimes", "get")
    for role in (edit, view):
        for rule in role["rules"]:
            assert rule["apiGroups"] == [g] and "*" not in rule["verbs"] and "*" not in rule["resources"]
    objs = render({"rbac": {"userRoles": {"create": False}}})
    assert not [o for o in find(objs, "ClusterRole") if o["metadata"]["name"] in USER_ROLES]
    objs = render({"rbac": {"userRoles": {"namePrefix": "ml-platform"}}})
    assert one(objs, "ClusterRole", "ml-platform-edit") and one(objs, "ClusterRole", "ml-platform-view")


def test_trainer_network_policy():
    assert not find(render(), "NetworkPolicy")
    proc = helm("template", RELEASE, str(CHART), "--set", "networkPolicy.enabled=true", check=False)
    assert proc.returncode != 0 and "networkPolicy.namespaces" in proc.stderr
    objs = render({**NAMESPACED, "networkPolicy": {"enabled": True}})
    assert {p["metadata"]["namespace"] for p in find(objs, "NetworkPolicy")} == {"team-a", "team-b"}
    pol = one(objs, "NetworkPolicy", f"{FULLNAME}-trainer", "team-a")["spec"]
    # it selects the pods the operator renders for trainers
    from kubetune_api.constants import Label

    assert pol["podSelector"] == {"matchLabels": {Label.MANAGED_BY: Label.MANAGED_BY_VALUE}}
    assert pol["policyTypes"] == ["Ingress"]
    metrics, peers = pol["ingress"]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    operator, prometheus = metrics["from"]
    assert operator == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
                        "podSelector": {"matchLabels": one(objs, "Deployment", FULLNAME)["spec"]["selector"]
                                        ["matchLabels"]}}
    assert prometheus == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                          "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    assert peers == {"from": [{"podSelector": {"matchLabels": {Label.MANAGED_BY: Label.MANAGED_BY_VALUE}}}]}
    # Prometheus in the trainers' own namespace, explicit namespaces, extra rules
    objs = render({"networkPolicy": {"enabled": True, "namespaces": ["ml"],
                                     "prometheus": {"namespaceSelector": None,
                                                    "podSelector": {"matchLabels": {"app": "prom",
                                                                                    "app.kubernetes.io/name": None}}},
                                     "extraIngress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}})
    pol = one(objs, "NetworkPolicy", f"{FULLNAME}-trainer", "ml")["spec"]
    assert pol["ingress"][0]["from"][1] == {"podSelector": {"matchLabels": {"app": "prom"}}}
    assert pol["ingress"][2] == {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}


def test_namespaced_scope_requires_watch_namespaces():
    proc = helm("template", RELEASE, str(CHART), "--set", "rbac.scope=namespaced", check=False)
    assert proc.returncode != 0 and "needs watchNamespaces" in proc.stderr


def test_rbac_create_false_renders_no_rbac():
    objs = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    assert not kinds(objs) & {"Role", "RoleBinding", "ClusterRoleBinding", "ServiceAccount"}
    assert {o["metadata"]["name"] for o in find(objs, "ClusterRole")} == set(USER_ROLES)  # rbac.userRoles
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# ---------------------------------------------------------------------------------------------- peering
def test_replicas_2_turns_on_peering():
    objs = render({"operator": {"replicas": 2}})
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert "args" not in container(objs), "peering on, all namespaces: no arguments at all"
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    crds = {o["metadata"]["name"] for o in find(objs, "CustomResourceDefinition")}
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= crds
    for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        crd = one(objs, "CustomResourceDefinition", name)
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]
    assert one(find(objs, "CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
               "CustomResourceDefinition")["spec"]["scope"] == "Cluster"
    peering = one(objs, "ClusterKopfPeering", "kubetune")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert "post-install" in peering["metadata"]["annotations"]["helm.sh/hook"]
    role = one(objs, "ClusterRole", FULLNAME)
    for verb in ("get", "list", "watch", "patch"):
        assert allows(role["rules"], "kopf.dev", "clusterkopfpeerings", verb)
    assert not allows(role["rules"], "kopf.dev", "clusterkopfpeerings", "delete")
    assert env_of(objs)["KUBETUNE_PEERING_NAME"] == "kubetune"
    # kopf identifies peers by POD_ID
    pod_id = [e for e in container(objs)["env"] if e["name"] == "POD_ID"]
    assert pod_id and pod_id[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    _assert_least_privilege(objs)


def test_replicas_2_namespaced_peers_per_namespace():
    objs = render({**NAMESPACED, "operator": {"replicas": 2}})
    assert {o["metadata"]["namespace"] for o in find(objs, "KopfPeering")} == {"team-a", "team-b"}
    assert not find(objs, "ClusterKopfPeering")
    for ns in ("team-a", "team-b"):
        assert allows(one(objs, "Role", FULLNAME, ns)["rules"], "kopf.dev", "kopfpeerings", "patch")
    assert "args" not in container(objs)


def test_peering_enabled_with_one_replica_and_shared_crds():
    objs = render({"peering": {"enabled": True, "installCRDs": False, "name": "kt-peers"}})
    assert "args" not in container(objs)
    assert {o["metadata"]["name"] for o in find(objs, "CustomResourceDefinition")} == KUBETUNE_CRDS
    assert one(objs, "ClusterKopfPeering")["metadata"]["name"] == "kt-peers"


def test_one_replica_has_no_peering_objects():
    objs = render()
    assert not kinds(objs) & {"ClusterKopfPeering", "KopfPeering"}
    assert {o["metadata"]["name"] for o in find(objs, "CustomResourceDefinition")} == KUBETUNE_CRDS


# ---------------------------------------------------------------------------------------------- monitoring
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_monitoring_off_by_default():
    objs = render()
    assert not kinds(objs) & MONITORING_KINDS
    assert not find(objs, "ConfigMap")


def test_monitoring_enabled_but_api_missing_renders_nothing():
    values = {"monitoring": {**MONITORING_ON["monitoring"], "force": False}}
    objs = render(values)
    assert not kinds(objs) & MONITORING_KINDS, "monitoring.coreos.com/v1 is not served: skip, do not fail"


def test_monitoring_rendered_when_api_served():
    values = {"monitoring": {**MONITORING_ON["monitoring"], "force": False}}
    objs = render(values, "--api-versions", "monitoring.coreos.com/v1")
    assert MONITORING_KINDS <= kinds(objs)


def _need(path: Path):
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO)} is not written yet (the observability engineer's file)")


def test_service_and_pod_monitors():
    objs = render(MONITORING_ON)
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), \
        "the ServiceMonitor must select the metrics Service"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert ep["honorLabels"] is True, "operator series carry the FineTuneJob's namespace label"
    pm = one(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {C.Label.MANAGED_BY: C.Label.MANAGED_BY_VALUE}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["namespaceSelector"] == {"any": True}


def test_prometheus_rule_is_the_rules_file():
    _need(RULES_FILE)
    rule = one(render(MONITORING_ON), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    assert rule["spec"]["groups"], "a PrometheusRule needs groups"


def test_dashboard_configmap():
    _need(DASHBOARD_FILE)
    objs = render(MONITORING_ON)
    cm = one(objs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubetune.json"]) == json.loads(DASHBOARD_FILE.read_text())
    custom = render({"monitoring": {"dashboard": {"enabled": True, "labelKey": "grafana.io/dashboard",
                                                  "labelValue": "kubetune", "namespace": "monitoring",
                                                  "annotations": {"grafana_folder": "ML"}}}})
    cm = one(custom, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana.io/dashboard"] == "kubetune"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}


# ---------------------------------------------------------------------------------------------- values
def test_schema_rejects_bad_values():
    for bad in (["--set", "nope=1"], ["--set", "rbac.scope=everything"], ["--set", "operator.replicas=-1"],
                ["--set-json", 'watchNamespaces=["Not_A_Namespace"]'], ["--set", "operator.image.pullPolicy=Sometimes"],
                ["--set", "trainer.s3Endpoint=s3.example.com"]):
        proc = helm("template", RELEASE, str(CHART), *bad, check=False)
        assert proc.returncode != 0, f"{bad} was accepted"


def _value_keys() -> list[tuple[str, bool, bool]]:
    """(dotted key, has its own `# --` comment, is a leaf) for every key in values.yaml, from its text."""
    out, stack, documented = [], [], False
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("# --"):
            documented = True
            continue
        if stripped.startswith("#") or not stripped:
            if not stripped:
                documented = False
            continue
        # label keys in defaults (kubernetes.io/metadata.name) contain slashes
        m = re.match(r"^(\s*)([A-Za-z0-9_./-]+):(.*)$", line)
        if not m or line.lstrip().startswith("- "):
            documented = False
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        is_leaf = bool(rest) or not (len(nxt) - len(nxt.lstrip()) > indent)
        out.append((path, documented, is_leaf))
        stack.append((indent, key))
        documented = False
    return out


def test_every_value_is_documented():
    keys = _value_keys()
    documented = {k for k, d, _ in keys if d}
    undocumented = [k for k, _, leaf in keys if leaf and not any(
        k == d or k.startswith(d + ".") for d in documented)]
    assert not undocumented, f"values without a `# --` comment (on them or a parent): {undocumented}"
    assert len(documented) >= 40


def test_parser_sees_all_values():
    """The text parser above must find exactly the keys YAML finds (or the documentation test proves nothing)."""
    def walk(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from walk(v, prefix + k + ".")
    assert {k for k, _, _ in _value_keys()} == set(walk(yaml.safe_load((CHART / "values.yaml").read_text())))


def test_readme_lists_every_documented_value():
    readme = (CHART / "README.md").read_text()
    assert "\n## Values\n" in readme
    section = readme.split("\n## Values\n", 1)[1]
    table = set(re.findall(r"^\| `?([A-Za-z0-9_.]+)`? \|", section, flags=re.M)) - {"Key"}
    documented = {k for k, d, _ in _value_keys() if d}
    assert documented - table == set(), f"README.md values table misses {sorted(documented - table)}"
    assert table - documented == set(), f"README.md lists values that no longer exist: {sorted(table - documented)}"


def test_schema_covers_every_value():
    """values.schema.json is strict (additionalProperties: false), so a value added to values.yaml without a
    schema entry would make the default values invalid; this names the missing entry instead."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: dict, node: dict, path: str):
        props = node.get("properties", {})
        for k, v in values.items():
            assert k in props, f"values.schema.json has no entry for {path}{k}"
            if isinstance(v, dict) and props[k].get("additionalProperties") is False:
                walk(v, props[k], f"{path}{k}.")
    walk(yaml.safe_load((CHART / "values.yaml").read_text()), schema, "")
    assert schema.get("additionalProperties") is False


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "kubetune"
    assert chart["appVersion"] == "0.1.0"
    import tomllib
    assert chart["appVersion"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"], \
        "the chart's appVersion is the project version (image tags default to it)"


# ---------------------------------------------------------------------------------------------- operator contract
def _operator_settings():
    try:
        from kubetune_operator import settings
    except ModuleNotFoundError:
        pytest.skip("operator/kubetune_operator/settings.py not written yet")
    return settings


@pytest.mark.parametrize("values", [
    {},
    {**NAMESPACED, "operator": {"replicas": 2}},
    {"trainer": {"s3Endpoint": "https://s3.example.internal", "s3Region": "eu-west-1",
                 "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
                 "image": {"pullPolicy": "Always"}}},
], ids=["defaults", "namespaced-replicas-2", "trainer-values"])
def test_rendered_env_is_what_the_operator_reads(values: dict):
    """Every KUBETUNE_* variable the chart sets is one the operator's settings know, and the operator accepts
    the rendered values (settings.OperatorSettings.from_env raises on a bad one)."""
    settings = _operator_settings()
    objs = render(values)
    env = env_of(objs)
    ours = {k for k in env if k.startswith(settings.ENV_PREFIX)}
    unknown = ours - set(settings.ENV_VARS.values())
    assert not unknown, f"the chart sets variables the operator does not read: {sorted(unknown)}"
    parsed = settings.OperatorSettings.from_env({k: v for k, v in env.items() if v is not None})
    assert parsed.trainer_image == env["KUBETUNE_TRAINER_IMAGE"]
    assert parsed.metrics_port == int(env["KUBETUNE_METRICS_PORT"])
    c = container(objs)
    health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert parsed.health_port == health, "the probes need kopf's liveness endpoint, which is off unless set"
    assert parsed.watch_namespaces == tuple(values.get("watchNamespaces", ()))
    assert parsed.default_credentials_secret == env["KUBETUNE_DEFAULT_CREDENTIALS_SECRET"]
    assert (parsed.peering_name is not None) == ("--standalone" not in (c.get("args") or []))
    if "trainer" in values:
        assert parsed.s3_endpoint == "https://s3.example.internal" and parsed.s3_region == "eu-west-1"
        assert parsed.trainer_resources == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}}
        assert parsed.image_pull_policy == "Always"


def test_pod_monitor_selects_the_pods_the_operator_renders():
    """The trainer PodMonitor's selector and port must match what the operator puts on trainer pods."""
    try:
        from kubetune_operator import render as operator_render
    except ModuleNotFoundError:
        pytest.skip("operator/kubetune_operator/render.py not written yet")
    from kubetune_api.finetunejob import parse_job

    body = yaml.safe_load((REPO / "examples" / "stage-sft.yaml").read_text())
    body["metadata"].update(namespace="team-a", uid="00000000-0000-0000-0000-000000000000")
    pod = operator_render.render_job(parse_job(body), body)["spec"]["template"]
    pm = one(render(MONITORING_ON), "PodMonitor")
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items()), labels
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in ports, ports


@pytest.mark.parametrize("values,expect", [
    ({}, {"standalone": True, "peering_name": None, "clusterwide": True, "namespaces": []}),
    (NAMESPACED, {"standalone": True, "peering_name": None, "clusterwide": False, "namespaces": ["team-a", "team-b"]}),
    ({"operator": {"replicas": 2}}, {"standalone": None, "peering_name": "kubetune", "clusterwide": True}),
    ({**NAMESPACED, "operator": {"replicas": 3}, "peering": {"name": "ml-peers"}},
     {"standalone": None, "peering_name": "ml-peers", "namespaces": ["team-a", "team-b"]}),
], ids=["defaults", "namespaced", "replicas-2", "replicas-3-namespaced"])
def test_operator_runs_kopf_as_the_chart_intends(values: dict, expect: dict):
    """The rendered args + env through the operator's own start-up planning (kubetune_operator.__main__.plan):
    standalone for one replica, mandatory peering under peering.name for several, the watched namespaces, and
    kopf's liveness endpoint on the port the probes use."""
    try:
        from kubetune_operator import __main__ as operator_main
    except ModuleNotFoundError:
        pytest.skip("operator/kubetune_operator/__main__.py not written yet")
    objs = render(values)
    c = container(objs)
    env = {k: v for k, v in env_of(objs).items() if v is not None}
    plan = operator_main.plan(operator_main.parse_args(c.get("args") or []), env=env)
    kwargs = plan["kwargs"]
    for key, value in expect.items():
        assert kwargs[key] == value, (key, kwargs)
    health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert kwargs["liveness_endpoint"] == f"http://0.0.0.0:{health}/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if kwargs["peering_name"]:
        assert plan["memo"]["peering"]["mandatory"], "several replicas must wait for the peering object"
        assert kwargs["priority"], "a random priority per replica (kopf pauses all replicas on a tie)"
