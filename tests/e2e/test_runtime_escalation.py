"""A namespace user who holds only `kubetune-edit` (the chart's ClusterRole, bound in one namespace) cannot get
more through a FineTuneJob than the admin-owned runtime allows: every escalation attempt below is refused at
admission (CRD schema, the chart's ValidatingAdmissionPolicies, RBAC) or fails before any pod exists with a
condition naming the field; the same user's legitimate job succeeds, rendered from the runtime.

The user is impersonated (`kubectl --as=alice --as-group=ml-team`); the operator runs as in the other e2e
tests. The policies and the user role are the chart's own templates (`helm template --show-only`).

    .venv/bin/python -m pytest tests/e2e/test_runtime_escalation.py -q
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid

import pytest
import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd, wait_for  # noqa: F401
from tests.e2e.test_helm_install import CHART, helm_bin  # noqa: F401

USER = ["--as=alice", "--as-group=ml-team"]
RUNTIME_IMAGE = "registry.internal/kubetune/trainer:1.2.3"


def runtime(kind: str, name: str, namespace: str | None = None, **spec) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


@pytest.fixture(scope="module")
def tenancy(cluster, crd, helm_bin, tmp_path_factory):
    """Namespaces `team` (alice: kubetune-edit) and `other`; runtimes; the chart's VAPs; an operator."""
    tag = uuid.uuid4().hex[:5]
    team, other = f"e2e-rt-team-{tag}", f"e2e-rt-other-{tag}"
    for ns in (team, other):
        cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("label", "namespace", team, "kubetune.dev/tier=standard")

    def chart(template: str, **values) -> list[dict]:
        args = [helm_bin, "template", "rt", str(CHART), "--show-only", template]
        for k, v in values.items():
            args += ["--set-json", f"{k}={json.dumps(v)}"]
        out = subprocess.run(args, capture_output=True, text=True, check=True, env=cluster.env).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    roles = chart("templates/user-roles.yaml")
    policies = chart("templates/admission.yaml")
    cluster.apply(roles + policies)
    cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "alice-kubetune-edit", "namespace": team},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune-edit"},
                   "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]})
    cluster.kubectl("create", "secret", "generic", "team-s3", "-n", team, "--from-literal=access=AKIA-TEAM",
                    "--from-literal=secret=team-secret-value")
    cluster.kubectl("create", "serviceaccount", "trainer", "-n", team)
    strict = dict(
        template={"image": RUNTIME_IMAGE, "serviceAccountName": "trainer", "nodeSelector": {"type": "kwok"},
                  "podLabels": {"cost-center": "ml-42"}},
        resources={"maxGpusPerNode": 2, "maxNodes": 1},
        gpu={"type": "A100-80GB", "memoryGiB": 80},
        storage={"credentials": {"secretName": "team-s3", "accessKeyIdKey": "access", "secretAccessKeyKey": "secret"},
                 "allowedSourcePrefixes": ["s3://models/", "s3://data/"], "allowedOutputPrefixes": ["s3://kubetune/"],
                 "allowedClaims": ["team-data"]},
        policy={"allowedStages": ["sft", "dpo", "grpo"], "allowedAdapters": ["lora"], "maxActiveDeadlineSeconds": 3600,
                "overrides": ["nodeSelector"]},
    )
    cluster.apply([
        runtime("FineTuneRuntime", "team-rt", team, **strict),
        runtime("FineTuneRuntime", "other-rt", other, template={"image": "anything:1"},
                policy={"allowCustomCode": True, "allowTrustRemoteCode": True}),
        runtime("ClusterFineTuneRuntime", f"h100-{tag}", None, template={"image": RUNTIME_IMAGE},
                namespaceSelector={"matchLabels": {"kubetune.dev/tier": "premium"}}),
    ])
    op = OperatorProcess(cluster, [team], tmp_path_factory.mktemp("rt") / "operator.log").start()
    # the policies reach the admission plugin asynchronously: wait until one refuses a probe
    probe = job("probe", team, stage="cpt", dataset={"format": "text", "train": [{"uri": "s3://data/t.jsonl"}]})
    wait_for(lambda: cluster.kubectl("create", "--dry-run=server", *USER, "-f", "-", input=json.dumps(probe),
                                     check=False).returncode != 0, 30, message="admission policies active")
    try:
        yield {"team": team, "other": other, "h100": f"h100-{tag}", "operator": op}
    finally:
        op.stop()
        for p in policies:
            cluster.kubectl("delete", p["kind"].lower(), p["metadata"]["name"], "--ignore-not-found", check=False)
        cluster.kubectl("delete", "clusterfinetuneruntime", f"h100-{tag}", "--ignore-not-found", check=False)
        for ns in (team, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def job(name: str, namespace: str, runtime_ref: dict | None = None, **spec) -> dict:
    base = {"runtimeRef": runtime_ref or {"kind": "FineTuneRuntime", "name": "team-rt"},
            "stage": "sft", "model": {"source": "s3://models/tiny"},
            "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
            "output": {"uri": "s3://kubetune/runs"}, "resources": {"gpus": 1}}
    for key, value in spec.items():
        node, *path = key.split(".")
        target = base
        for part in [node, *path][:-1]:
            target = target.setdefault(part, {})
        target[[node, *path][-1]] = copy.deepcopy(value)
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": base}


CUSTOM = [{"name": "my_rewards:score", "source": "s3://data/rewards.py"}]
# (attempt, spec changes, the field the refusal names). Refused at admission: the CRD (fields that moved to the
# runtime do not exist), the runtime policy VAP; the rest fails in the operator before any pod.
AT_ADMISSION = [
    ("another-image", {"resources.image": "docker.io/evil/miner:1"}, "spec.resources.image"),
    ("another-service-account", {"resources.serviceAccountName": "admin-sa"}, "spec.resources.serviceAccountName"),
    ("secret-key-via-credentials", {"output.credentials": {"secretName": "db-password", "accessKeyIdKey": "password"}},
     "spec.output.credentials"),
    ("credentials-to-own-endpoint", {"output.endpoint": "https://attacker.example"}, "spec.output.endpoint"),
    ("unlisted-pvc", {"dataset.train": [{"uri": "pvc://other-team-data/chat.jsonl"}]}, "spec.dataset.train"),
    ("node-outside-runtime", {"resources.nodeSelector": {"type": "gpu-h100"}}, "spec.resources.nodeSelector"),
    ("trust-remote-code", {"model.trustRemoteCode": True}, "spec.model.trustRemoteCode"),
    ("custom-reward-code", {"stage": "grpo", "dataset": {"format": "prompt_only", "train": [{"uri": "s3://data/p.jsonl"}]},
                            "training.grpo": {"rewards": CUSTOM}}, "spec.training"),
    ("code-execution-reward", {"stage": "grpo", "dataset": {"format": "prompt_only",
                                                            "train": [{"uri": "s3://data/p.jsonl"}]},
                               "training.grpo": {"rewards": [{"name": "code_execution"}]}}, "spec.training"),
    ("cluster-runtime-not-granted", {"runtimeRef": "H100"}, "spec.runtimeRef.name"),
    ("output-outside-prefixes", {"output.uri": "s3://other-team/steal"}, "spec.output.uri"),
    ("adapter-outside-prefixes", {"model.adapter": "s3://other-team/runs/sft/adapter"}, "spec.model.adapter"),
    ("too-many-gpus", {"resources.gpus": 8}, "spec.resources.gpus"),
    ("too-many-nodes", {"resources.nodes": 4}, "spec.resources.nodes"),
    ("forbidden-stage", {"stage": "cpt", "dataset": {"format": "text", "train": [{"uri": "s3://data/t.jsonl"}]}},
     "spec.stage"),
    ("forbidden-adapter", {"adapter": {"type": "full"}}, "spec.adapter.type"),
    ("deadline-above-max", {"activeDeadlineSeconds": 86400}, "spec.activeDeadlineSeconds"),
    ("priority-class", {"resources.priorityClassName": "system-cluster-critical"}, "spec.resources.priorityClassName"),
    ("tolerations", {"resources.tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                                                "operator": "Exists"}]}, "spec.resources.tolerations"),
    ("affinity", {"resources.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "type", "operator": "In", "values": ["gpu"]}]}]}}}},
     "spec.resources.affinity"),
    ("namespace-field-in-runtime-ref", {"runtimeRef": {"kind": "FineTuneRuntime", "name": "other-rt",
                                                        "namespace": "OTHER"}}, "spec.runtimeRef.namespace"),
]
BEFORE_ANY_POD = [
    ("runtime-from-another-namespace", {"runtimeRef": {"kind": "FineTuneRuntime", "name": "other-rt"}},
     "spec.runtimeRef", "RuntimeNotFound"),
    ("tokenizer-outside-prefixes", {"model.tokenizer": "s3://other-team/tokenizer"}, "spec.model.tokenizer",
     "RuntimePolicyViolation"),
    ("reference-outside-prefixes", {"evaluation": {"reference": [{"uri": "s3://other-team/wiki.jsonl"}]}},
     "spec.evaluation.reference[0].uri", "RuntimePolicyViolation"),
]


def _resolve(changes: dict, t: dict) -> dict:
    out = dict(changes)
    if out.get("runtimeRef") == "H100":
        out["runtimeRef"] = {"kind": "ClusterFineTuneRuntime", "name": t["h100"]}
    elif isinstance(out.get("runtimeRef"), dict) and out["runtimeRef"].get("namespace") == "OTHER":
        out["runtimeRef"] = {**out["runtimeRef"], "namespace": t["other"]}
    return out


def _as_alice(cluster, obj: dict, *verb: str) -> subprocess.CompletedProcess:
    return cluster.kubectl(*(verb or ("apply",)), *USER, "-f", "-", input=json.dumps(obj), check=False)


@pytest.mark.parametrize("attempt, changes, field", AT_ADMISSION, ids=[a[0] for a in AT_ADMISSION])
def test_escalation_refused_at_admission(cluster, tenancy, attempt, changes, field):
    obj = job(attempt, tenancy["team"], **_resolve(changes, tenancy))
    proc = _as_alice(cluster, obj)
    assert proc.returncode != 0, f"{attempt} was accepted"
    assert field in proc.stderr, proc.stderr
    assert cluster.kubectl("get", "ftj", attempt, "-n", tenancy["team"], check=False).returncode != 0


@pytest.mark.parametrize("attempt, changes, field, reason", BEFORE_ANY_POD, ids=[a[0] for a in BEFORE_ANY_POD])
def test_escalation_fails_before_any_pod(cluster, tenancy, attempt, changes, field, reason):
    team = tenancy["team"]
    proc = _as_alice(cluster, job(attempt, team, **changes))
    assert proc.returncode == 0, proc.stderr  # admission cannot see this one: the operator must

    def failed():
        obj = json.loads(cluster.kubectl("get", "ftj", attempt, "-n", team, "-o", "json").stdout)
        conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
        return conds.get("Failed") if (conds.get("Failed") or {}).get("status") == "True" else None

    cond = wait_for(failed, 30, message=f"{attempt} Failed")
    assert cond["reason"] == reason and cond["message"].startswith(field), cond
    for kind, name in (("job", f"{attempt}-trainer"), ("configmap", f"{attempt}-config")):
        assert cluster.kubectl("get", kind, name, "-n", team, check=False).returncode != 0, f"{kind} created"
    pods = cluster.kubectl("get", "pods", "-n", team, "-l", f"kubetune.dev/job-name={attempt}", "-o", "name").stdout
    assert pods.strip() == ""


def test_the_user_cannot_change_runtimes_or_the_recorded_snapshot(cluster, tenancy):
    team = tenancy["team"]
    loosened = runtime("FineTuneRuntime", "team-rt", team, template={"image": "docker.io/evil/miner:1"},
                       policy={"allowCustomCode": True})
    proc = _as_alice(cluster, loosened)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
    proc = _as_alice(cluster, runtime("FineTuneRuntime", "mine", team, template={"image": "docker.io/evil/miner:1"}),
                     "create")
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
    # alice may read the runtimes of her namespace (to choose one)
    assert cluster.kubectl("get", "finetuneruntimes", "-n", team, *USER, check=False).returncode == 0


def test_legitimate_job_succeeds_rendered_from_the_runtime(cluster, tenancy):
    team, name = tenancy["team"], "legit"
    proc = _as_alice(cluster, job(name, team, **{"resources.nodeSelector": {"extra": "ok"}}))
    # the nodeSelector key is not on the kwok nodes: drop it after proving an allowed override is accepted
    assert proc.returncode == 0, proc.stderr
    cluster.kubectl("delete", "ftj", name, "-n", team, *USER)
    cluster.wait_for(lambda: cluster.kubectl("get", "ftj", name, "-n", team, check=False).returncode != 0, 30,
                     desc="legit deleted")
    proc = _as_alice(cluster, job(name, team))
    assert proc.returncode == 0, proc.stderr
    cluster.wait_job(team, name, timeout=120, context=lambda: tenancy["operator"].logs()[-4000:])
    obj = json.loads(cluster.kubectl("get", "ftj", name, "-n", team, "-o", "json").stdout)
    assert obj["status"]["phase"] == "Succeeded"
    snap = obj["status"]["runtime"]
    assert (snap["kind"], snap["name"]) == ("FineTuneRuntime", "team-rt") and snap["generation"] >= 1
    pod = json.loads(cluster.kubectl("get", "pods", "-n", team, "-l", f"kubetune.dev/job-name={name}",
                                     "-o", "json").stdout)["items"][0]
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["image"] == RUNTIME_IMAGE and spec["serviceAccountName"] == "trainer"
    assert spec["nodeSelector"] == {"type": "kwok"} and pod["metadata"]["labels"]["cost-center"] == "ml-42"
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "access"}
    assert env["KUBETUNE_ALLOW_CUSTOM_CODE"]["value"] == "false"
    assert env["KUBETUNE_GPU_MEMORY"]["value"] == "81920Mi"
    # a running job cannot move to another runtime
    patch = json.dumps({"spec": {"runtimeRef": {"kind": "FineTuneRuntime", "name": "other-rt"}}})
    proc = cluster.kubectl("patch", "ftj", name, "-n", team, *USER, "--type=merge", "-p", patch, check=False)
    assert proc.returncode != 0 and "runtimeRef is immutable" in proc.stderr, proc.stderr
    # nor write the recorded runtime (status is the operator's)
    proc = cluster.kubectl("patch", "ftj", name, "-n", team, *USER, "--subresource=status", "--type=merge",
                           "-p", json.dumps({"status": {"runtime": {"spec": {"template": {"image": "x:1"}}}}}),
                           check=False)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), proc.stderr
