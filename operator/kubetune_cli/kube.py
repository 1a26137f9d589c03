"""The client's Kubernetes access: load a kubeconfig (or the in-cluster config), find the default namespace,
read a FineTuneJob. The kubernetes client is imported only when one of these is called."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kubetune_api.constants import GROUP, PLURAL, VERSION


def load_config(kubeconfig: Optional[str]) -> None:
    from kubernetes import config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
        return
    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 - no kubeconfig: maybe we run inside a pod
        config.load_incluster_config()


def default_namespace(kubeconfig: Optional[str]) -> str:
    """The kubeconfig context's namespace, the pod's own namespace in a cluster, else "default"."""
    try:
        from kubernetes import config

        _, current = config.list_kube_config_contexts(config_file=kubeconfig)
        return current.get("context", {}).get("namespace") or "default"
    except Exception:  # noqa: BLE001 - in-cluster or no contexts
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return ns_file.read_text().strip() if ns_file.exists() else "default"


def get_job(name: str, namespace: str, kubeconfig: Optional[str] = None) -> dict:
    from kubernetes import client

    load_config(kubeconfig)
    return client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
