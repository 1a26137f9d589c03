"""scripts/cluster/addons.py turns a controller release's manifests into what the local cluster applies: webhooks
and CRD conversion reach 127.0.0.1, the Deployment/Services/APIServices are dropped, and Kueue's no-op webhooks
for integrations that are off are not registered.

    .venv/bin/python -m pytest tests/unit/test_cluster_addons.py -q
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

ADDONS = Path(__file__).resolve().parents[2] / "scripts" / "cluster" / "addons.py"
spec = importlib.util.spec_from_file_location("kubetune_cluster_addons", ADDONS)
addons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(addons)


def _hook(name, group, resource, path):
    return {"name": name, "clientConfig": {"service": {"name": "kueue-webhook-service", "namespace": "kueue-system",
                                                       "path": path}},
            "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "resources": [resource],
                       "operations": ["CREATE"]}]}


MANIFESTS = [
    {"kind": "Namespace", "metadata": {"name": "kueue-system"}},
    {"kind": "Deployment", "metadata": {"name": "kueue-controller-manager"}},
    {"kind": "Service", "metadata": {"name": "kueue-webhook-service"}},
    {"kind": "APIService", "metadata": {"name": "v1beta2.visibility.kueue.x-k8s.io"}},
    {"kind": "Secret", "metadata": {"name": "kueue-webhook-server-cert"}},
    {"kind": "CustomResourceDefinition", "metadata": {"name": "workloads.kueue.x-k8s.io"},
     "spec": {"conversion": {"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {
         "service": {"name": "kueue-webhook-service", "namespace": "kueue-system", "path": "/convert"}}}}}},
    {"kind": "CustomResourceDefinition", "metadata": {"name": "resourceflavors.kueue.x-k8s.io"}, "spec": {}},
    {"kind": "MutatingWebhookConfiguration", "metadata": {"name": "kueue-mutating-webhook-configuration"},
     "webhooks": [_hook("mjob.kb.io", "batch", "jobs", "/mutate-batch-v1-job"),
                  _hook("mpod.kb.io", "", "pods", "/mutate--v1-pod"),
                  _hook("mrayjob.kb.io", "ray.io", "rayjobs", "/mutate-ray-io-v1-rayjob")]},
    None,
]


def test_keeps_what_a_local_controller_needs_and_points_webhooks_at_loopback():
    out = addons.render(copy.deepcopy(MANIFESTS), 6446, "Q0E=", {"batch", "kueue.x-k8s.io"})
    kinds = [d["kind"] for d in out]
    assert kinds == ["Namespace", "CustomResourceDefinition", "CustomResourceDefinition",
                     "MutatingWebhookConfiguration"]
    conv = out[1]["spec"]["conversion"]["webhook"]
    assert conv["clientConfig"] == {"url": "https://127.0.0.1:6446/convert", "caBundle": "Q0E="}
    assert conv["conversionReviewVersions"] == ["v1"]
    assert "conversion" not in out[2]["spec"]
    hooks = out[3]["webhooks"]
    assert [w["name"] for w in hooks] == ["mjob.kb.io"]    # pods/Ray: integrations off, Kueue answers no-op
    assert hooks[0]["clientConfig"] == {"url": "https://127.0.0.1:6446/mutate-batch-v1-job", "caBundle": "Q0E="}


def test_without_a_group_filter_every_webhook_is_registered():
    out = addons.render([d for d in copy.deepcopy(MANIFESTS) if d and d["kind"] == "MutatingWebhookConfiguration"],
                        9443, "Q0E=", None)
    assert [w["name"] for w in out[0]["webhooks"]] == ["mjob.kb.io", "mpod.kb.io", "mrayjob.kb.io"]
    assert all(w["clientConfig"]["url"].startswith("https://127.0.0.1:9443/") for w in out[0]["webhooks"])
