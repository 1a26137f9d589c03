"""The Helm chart against the real apiserver of the local cluster (scripts/cluster/up.sh): install, the CRD it
installs equals crds/, every example is accepted by the apiserver (server-side dry-run, so the CEL rules run),
upgrade changes the Deployment, uninstall leaves nothing behind but the kept CRD, and the chart's
ServiceAccount can do what the operator needs in a watched namespace and nothing else (namespaced RBAC).

    .venv/bin/python -m pytest tests/e2e/test_helm_install.py -q

The operator pods are pinned to a node label no node has, so they stay Pending: this tests the chart, not the
operator (the local node agent would otherwise try to run the image's ENTRYPOINT, which it cannot see).
Releases and namespaces are unique per test; the FineTuneJob CRD is shared with the other e2e tests, so it is
adopted (`--take-ownership`) and always kept.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from kubetune_api import constants as C

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubetune"
CRD_FILE = REPO / "crds" / f"{C.GROUP}_{C.PLURAL}.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# runtime.name: the chart's default runtime under its own name, so that the e2e `default` (kubetune_fixtures,
# permissive for the other tests) is not replaced by the chart's stricter one
PENDING = {"operator": {"nodeSelector": {"kubetune.dev/helm-test-no-such-node": "true"}},
           "runtime": {"name": "helm-e2e"}}


@pytest.fixture(scope="module")
def helm_bin(cluster) -> str:
    path = Path(cluster.bin_dir) / "helm"
    if not os.access(path, os.X_OK):
        if os.environ.get("KUBETUNE_SKIP_BUILD") == "1":
            pytest.skip(f"helm missing in {cluster.bin_dir} and KUBETUNE_SKIP_BUILD=1")
        subprocess.run(["bash", str(REPO / "scripts" / "cluster" / "build-binaries.sh"), "helm"], check=True,
                       capture_output=True, timeout=1800)
    return str(path)


class Helm:
    def __init__(self, binary: str, cluster, tmp: Path):
        self.binary, self.cluster = binary, cluster
        self.env = {**cluster.env, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
                    "HELM_DATA_HOME": str(tmp / "data")}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.binary, *args], capture_output=True, text=True, env=self.env, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc


@pytest.fixture
def helm(helm_bin, cluster, tmp_path) -> Helm:
    return Helm(helm_bin, cluster, tmp_path)


def values_args(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]


def get_json(cluster, *args: str):
    proc = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture
def extra_namespaces(cluster):
    """Creates namespaces on demand; deletes them afterwards."""
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", name)
        made.append(name)
        return name
    yield make
    for name in made:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def _crd_spec(crd: dict) -> dict:
    spec = dict(crd["spec"])
    spec.pop("conversion", None)  # defaulted by the apiserver ({strategy: None})
    return spec


def test_install_examples_upgrade_uninstall(cluster, namespace, helm):
    release = f"kt-{uuid.uuid4().hex[:5]}"
    fullname = f"{release}-kubetune"
    try:
        helm("install", release, str(CHART), "-n", namespace, "--take-ownership", *values_args(PENDING))

        # the CRD in the apiserver is the generated one
        crd = get_json(cluster, "crd", C.CRD_NAME)
        generated = yaml.safe_load(CRD_FILE.read_text())
        assert _crd_spec(crd) == _crd_spec(generated)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{C.CRD_NAME}", "--timeout=60s")

        dep = get_json(cluster, "deployment", fullname, "-n", namespace)
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] == fullname
        # the default runtime (a post-install hook, after its CRD) and the admission policies
        rt = get_json(cluster, "clusterfinetuneruntime", "helm-e2e")
        assert rt and rt["spec"]["template"]["image"].startswith("ghcr.io/kubetune/trainer:"), rt
        assert rt["spec"]["policy"]["allowCustomCode"] is False
        for name in ("kubetune-cluster-runtime", "kubetune-namespaced-runtime"):
            assert get_json(cluster, "validatingadmissionpolicy", name), name
            assert get_json(cluster, "validatingadmissionpolicybinding", name), name
        for kind, name, ns in (("serviceaccount", fullname, namespace), ("service", f"{fullname}-metrics", namespace),
                               ("clusterrole", fullname, None), ("clusterrolebinding", fullname, None)):
            assert get_json(cluster, kind, name, *(["-n", ns] if ns else [])), f"{kind}/{name} missing"

        # every example is accepted by the apiserver: schema, defaults and CEL rules
        proc = cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-o", "name",
                               *[a for p in EXAMPLES for a in ("-f", str(p))], check=False)
        assert proc.returncode == 0, proc.stderr
        created = proc.stdout.split()
        assert len(created) == len(EXAMPLES), proc.stdout
        # and the apiserver really validates: an invalid spec is refused (dry-run as well)
        bad = yaml.safe_load((REPO / "examples" / "stage-dpo.yaml").read_text())
        bad["spec"]["dataset"]["format"] = "chat"
        proc = cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                               input=json.dumps(bad), check=False)
        assert proc.returncode != 0 and "stage dpo needs dataset.format" in proc.stderr, proc.stderr

        # upgrade: replicas and trainer image reach the Deployment; two replicas bring kopf peering
        generation = dep["metadata"]["generation"]
        helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values",
             "--set", "operator.replicas=2", "--set", "trainer.image.tag=upgraded")
        dep = get_json(cluster, "deployment", fullname, "-n", namespace)
        assert dep["metadata"]["generation"] > generation
        assert dep["spec"]["replicas"] == 2
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["KUBETUNE_TRAINER_IMAGE"].endswith(":upgraded")
        assert "--standalone" not in (c.get("args") or [])
        assert get_json(cluster, "clusterkopfpeering.kopf.dev", "kubetune"), "peering object from the hook"
        role = get_json(cluster, "clusterrole", fullname)
        assert any("clusterkopfpeerings" in r.get("resources", []) for r in role["rules"])
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
        cluster.kubectl("delete", "clusterfinetuneruntime", "helm-e2e", "--ignore-not-found", check=False)

    # nothing left but the kept CRDs (and the hook's runtime, deleted above)
    selector = f"app.kubernetes.io/instance={release}"
    for kind in ("deployment", "serviceaccount", "service", "configmap", "role", "rolebinding"):
        left = cluster.kubectl("get", kind, "-A", "-l", selector, "-o", "name").stdout.split()
        assert not left, f"orphans after uninstall: {left}"
    for kind in ("clusterrole", "clusterrolebinding", "crd"):
        left = cluster.kubectl("get", kind, "-l", selector, "-o", "name").stdout.split()
        kept = sorted(f"customresourcedefinition.apiextensions.k8s.io/{p}.{C.GROUP}"
                      for p in (C.PLURAL, C.CLUSTER_RUNTIME_PLURAL, C.RUNTIME_PLURAL, C.PIPELINE_PLURAL))
        assert sorted(left) == (kept if kind == "crd" else []), left
    assert get_json(cluster, "crd", C.CRD_NAME), "the FineTuneJob CRD is kept (crds.keep)"
    assert not get_json(cluster, "crd", "clusterkopfpeerings.kopf.dev"), "peering CRDs go with the release"
    cms = cluster.kubectl("get", "configmap", "-n", namespace, "-o", "name").stdout.split()
    assert cms == ["configmap/kube-root-ca.crt"], cms


def test_namespaced_rbac_is_least_privilege(cluster, namespace, helm, extra_namespaces):
    watched = [extra_namespaces("kt-a"), extra_namespaces("kt-b")]
    outside = extra_namespaces("kt-out")
    release = f"kt-{uuid.uuid4().hex[:5]}"
    fullname = f"{release}-kubetune"
    try:
        helm("install", release, str(CHART), "-n", namespace, "--take-ownership",
             *values_args({**PENDING, "rbac": {"scope": "namespaced"}, "watchNamespaces": watched}))
        assert not get_json(cluster, "clusterrole", fullname), "no cluster-wide role for the namespaced rules"
        token = cluster.kubectl("create", "token", fullname, "-n", namespace, "--duration=10m").stdout.strip()
        assert token

        def can(verb: str, resource: str, ns: str | None, *extra: str) -> bool:
            where = ["-n", ns] if ns else ["--all-namespaces"]
            proc = cluster.kubectl("--token", token, "auth", "can-i", verb, resource, *where, *extra, check=False)
            assert proc.stdout.strip() in ("yes", "no"), proc.stderr
            return proc.stdout.strip() == "yes"

        for ns in watched:
            assert can("create", "jobs.batch", ns)
            assert can("delete", "jobs.batch", ns)
            assert can("patch", "finetunejobs.kubetune.dev", ns, "--subresource=status")
            assert can("watch", "finetunejobs.kubetune.dev", ns)
            assert can("create", "configmaps", ns) and can("create", "services", ns)
            assert can("list", "pods", ns) and not can("delete", "pods", ns) and not can("create", "pods", ns)
            assert can("create", "events", ns)
            for verb in ("get", "list", "watch"):
                assert not can(verb, "secrets", ns), f"{verb} secrets in watched {ns}"
            # a FineTunePipeline's stages: the operator creates their FineTuneJobs (owned by the pipeline)
            assert can("create", "finetunejobs.kubetune.dev", ns)
            assert not can("update", "finetunejobs.kubetune.dev", ns)
        for ns in (outside, namespace):
            assert not can("create", "finetunejobs.kubetune.dev", ns), f"FineTuneJobs in unwatched {ns}"
            assert not can("create", "jobs.batch", ns), f"jobs in unwatched {ns}"
            assert not can("patch", "finetunejobs.kubetune.dev", ns, "--subresource=status")
            assert not can("list", "configmaps", ns)
            assert not can("get", "secrets", ns)
        assert not can("list", "finetunejobs.kubetune.dev", None), "no cluster-wide FineTuneJob access"
        assert not can("list", "secrets", None)
        assert can("watch", "customresourcedefinitions.apiextensions.k8s.io", None)  # kopf's CRD observation

        # real requests, not only the authorizer's opinion
        a = watched[0]
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "rbac-probe"},
               "spec": {"template": {"spec": {"restartPolicy": "Never",
                                              "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}
        ok = cluster.kubectl("--token", token, "create", "-n", a, "--dry-run=server", "-f", "-",
                             input=json.dumps(job), check=False)
        assert ok.returncode == 0, ok.stderr
        denied = cluster.kubectl("--token", token, "create", "-n", outside, "--dry-run=server", "-f", "-",
                                 input=json.dumps(job), check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
        cluster.kubectl("create", "secret", "generic", "s3", "-n", a, "--from-literal=AWS_ACCESS_KEY_ID=x")
        denied = cluster.kubectl("--token", token, "get", "secret", "s3", "-n", a, check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr

        ftj = yaml.safe_load((REPO / "examples" / "stage-sft.yaml").read_text())
        cluster.kubectl("create", "-n", a, "-f", "-", input=json.dumps(ftj))
        name = ftj["metadata"]["name"]
        patched = cluster.kubectl("--token", token, "patch", "ftj", name, "-n", a, "--subresource=status",
                                  "--type=merge", "-p", json.dumps({"status": {"message": "rbac probe"}}),
                                  check=False)
        assert patched.returncode == 0, patched.stderr
        assert get_json(cluster, "ftj", name, "-n", a)["status"]["message"] == "rbac probe"
        cluster.kubectl("delete", "ftj", name, "-n", a, "--wait=false")
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
    for ns in watched:
        left = cluster.kubectl("get", "role,rolebinding", "-n", ns, "-l", f"app.kubernetes.io/instance={release}",
                               "-o", "name").stdout.split()
        assert not left, f"orphans in {ns}: {left}"
    assert not get_json(cluster, "clusterrole", f"{fullname}-discovery")


def test_user_roles_aggregate_into_edit_and_view(cluster, namespace, helm, extra_namespaces):
    """A namespace user bound to the built-in `edit` (or `view`) gets FineTuneJob rights through the chart's
    aggregated ClusterRoles, the usual way: real aggregation by the controller manager, real authorizer answers."""
    team, other = extra_namespaces("kt-team"), extra_namespaces("kt-other")
    release = f"kt-{uuid.uuid4().hex[:5]}"
    editor, viewer = f"alice-{release}", f"bob-{release}"
    try:
        helm("install", release, str(CHART), "-n", namespace, "--take-ownership", *values_args(PENDING))
        cluster.kubectl("create", "rolebinding", "alice-edit", "-n", team, "--clusterrole=edit", f"--user={editor}")
        cluster.kubectl("create", "rolebinding", "bob-view", "-n", team, "--clusterrole=view", f"--user={viewer}")

        def can(user: str, verb: str, resource: str, ns: str, subresource: str = "") -> bool:
            """The authorizer's answer (a SubjectAccessReview, what `kubectl auth can-i --as` sends), asked
            directly: kubectl answers "no" for kinds whose CRD is not installed yet (FineTunePipelines,
            FineTuneRuntimes), while RBAC grants them already."""
            plural, _, group = resource.partition(".")
            review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                      "spec": {"user": user, "resourceAttributes": {"namespace": ns, "verb": verb, "group": group,
                                                                     "resource": plural,
                                                                     "subresource": subresource}}}
            out = cluster.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)).stdout
            return bool(json.loads(out)["status"].get("allowed"))

        ftj = "finetunejobs.kubetune.dev"
        # aggregation is asynchronous (the clusterrole-aggregation controller): wait for it
        deadline = time.monotonic() + 60
        while not can(editor, "create", ftj, team) and time.monotonic() < deadline:
            time.sleep(1)
        for verb in ("create", "get", "list", "watch", "patch", "update", "delete", "deletecollection"):
            assert can(editor, verb, ftj, team), f"edit cannot {verb} FineTuneJobs"
            assert can(editor, verb, "finetunepipelines.kubetune.dev", team)
        assert can(editor, "list", "finetuneruntimes.kubetune.dev", team)
        for verb in ("create", "patch", "delete"):
            assert not can(editor, verb, "finetuneruntimes.kubetune.dev", team), f"edit may {verb} runtimes"
        assert not can(editor, "patch", ftj, team, "status"), "users must not write status"
        assert can(editor, "get", ftj, team, "status")
        # kubectl's own answer agrees where the CRD exists
        asked = cluster.kubectl("auth", "can-i", "create", ftj, "-n", team, f"--as={editor}", check=False)
        assert asked.stdout.strip() == "yes", asked.stderr
        assert not can(editor, "create", ftj, other), "rights stay in the bound namespace"
        for verb in ("get", "list", "watch"):
            assert can(viewer, verb, ftj, team) and can(viewer, verb, "finetuneruntimes.kubetune.dev", team)
        for verb in ("create", "patch", "delete"):
            assert not can(viewer, verb, ftj, team), f"view may {verb} FineTuneJobs"

        # a real request as the editor: the apiserver admits the FineTuneJob
        job = yaml.safe_load((REPO / "examples" / "stage-sft.yaml").read_text())
        created = cluster.kubectl("create", "-n", team, f"--as={editor}", "--dry-run=server", "-f", "-",
                                  input=json.dumps(job), check=False)
        assert created.returncode == 0, created.stderr
        denied = cluster.kubectl("create", "-n", team, f"--as={viewer}", "--dry-run=server", "-f", "-",
                                 input=json.dumps(job), check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
    assert not get_json(cluster, "clusterrole", "kubetune-edit"), "uninstall removes the user roles"


def test_trainer_network_policy_is_accepted_by_the_apiserver(cluster, helm, extra_namespaces):
    ns = extra_namespaces("kt-np")
    rendered = helm("template", "np", str(CHART), "-n", "default", "-s", "templates/networkpolicy.yaml",
                    *values_args({"networkPolicy": {"enabled": True, "namespaces": [ns],
                                                    "extraIngress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}}))
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.stdout, check=False)
    assert applied.returncode == 0 and "created (server dry run)" in applied.stdout, applied.stderr
