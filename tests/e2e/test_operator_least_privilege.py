"""The operator, running with a token of the Helm chart's ServiceAccount (namespaced RBAC, not admin), completes
a FineTuneJob end to end: proof that the chart's RBAC suffices. (What the ServiceAccount must NOT be able to do
is asserted in test_helm_install.py.)"""

from __future__ import annotations

import json
import uuid

import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd  # noqa: F401
from tests.e2e.test_helm_install import CHART, PENDING, extra_namespaces, helm, helm_bin, values_args  # noqa: F401


def test_operator_with_chart_service_account_completes_a_job(cluster, crd, namespace, helm, extra_namespaces, tmp_path):
    watched = extra_namespaces("kt-lp")
    release = f"lp-{uuid.uuid4().hex[:5]}"
    fullname = f"{release}-kubetune"
    helm("install", release, str(CHART), "-n", namespace, "--take-ownership",
         *values_args({**PENDING, "rbac": {"scope": "namespaced"}, "watchNamespaces": [watched]}))
    op = None
    try:
        token = cluster.kubectl("create", "token", fullname, "-n", namespace, "--duration=30m").stdout.strip()
        kubeconfig = tmp_path / "sa.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "local", "cluster": {"server": cluster.env["KUBETUNE_APISERVER_URL"],
                                                       "certificate-authority": cluster.env["KUBETUNE_CA_FILE"]}}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa", "namespace": watched}}],
        }))
        op = OperatorProcess(cluster, [watched], tmp_path / "operator.log",
                             extra_env={"KUBECONFIG": str(kubeconfig), "KUBETUNE_METRICS_PORT": "18081"}).start()
        ftj = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "least-priv"},
               "spec": {"stage": "sft", "model": {"source": "s3://models/tiny"},
                        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
                        "output": {"uri": "s3://kubetune/runs"},
                        "resources": {"gpus": 1}}}
        cluster.kubectl("apply", "-n", watched, "-f", "-", input=yaml.safe_dump(ftj))
        cluster.wait_job(watched, "least-priv", timeout=120, context=lambda: op.logs()[-4000:])
        obj = json.loads(cluster.kubectl("get", "ftj", "least-priv", "-n", watched, "-o", "json").stdout)
        assert obj["status"]["phase"] == "Succeeded"
        events = json.loads(cluster.kubectl("get", "events", "-n", watched, "-o", "json").stdout)["items"]
        assert any(e["involvedObject"]["name"] == "least-priv" for e in events), "operator could not post events"
        assert "forbidden" not in op.logs().lower(), op.logs()[-4000:]
    finally:
        if op:
            op.stop()
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
