"""Where the operator's API server is and how the operator authenticates to it: in a pod, its service account;
elsewhere, the current context of a kubeconfig. One answer, `kopf.ConnectionInfo`, serves both of the
operator's clients: kopf's watches (handlers.login, a `@kopf.on.login` handler) and KubeApi (kube.py).

    info = load()                 # in-cluster, else $KUBECONFIG / ~/.kube/config
    info.server, info.as_http_headers(), info.as_ssl_context()

Why not the kubernetes client's config loaders: importing the `kubernetes` package costs the operator ~10 MB of
resident memory for code it does not run (docs/scale.md), and kopf's own fallback logins are narrower than
these (its in-cluster one assumes the DNS name kubernetes.default.svc; its kubeconfig one neither resolves relative
paths nor reads `tokenFile`). What a kubeconfig user entry may use here: `token`, `tokenFile`, client
certificates (paths or data). `exec` and `auth-provider` plugins run programs or refresh tokens: they are
refused with an error naming the user entry (the operator runs in-cluster in production; a kubeconfig is for
development). Tokens are read afresh at each login: KubeApi logs in again after a 401 (a rotated projected
service-account token), as kopf does.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import kopf
import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class CredentialsError(Exception):
    """No usable connection: no service account and no kubeconfig, or a kubeconfig this loader cannot use."""


def in_cluster(sa_dir: str = SERVICE_ACCOUNT_DIR, env: Optional[dict] = None) -> Optional[kopf.ConnectionInfo]:
    """The pod's service account, at the address the kubelet gives every pod (KUBERNETES_SERVICE_HOST/PORT, as
    client-go's InClusterConfig); None outside a pod."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token_path = os.path.join(sa_dir, "token")
    if not host or not port or not os.path.exists(token_path):
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    ca_path = os.path.join(sa_dir, "ca.crt")
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=ca_path if os.path.exists(ca_path) else None,
        token=_read(token_path),
        default_namespace=_read(os.path.join(sa_dir, "namespace")) or None,
        priority=20,
    )


def from_kubeconfig(kubeconfig: Optional[str] = None) -> Optional[kopf.ConnectionInfo]:
    """The current context of $KUBECONFIG (a list of files: the first value of each entry wins, as kubectl
    merges them) or ~/.kube/config; None when there is none."""
    kubeconfig = kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG", "")
    paths = [os.path.expanduser(p) for p in kubeconfig.split(os.pathsep) if p.strip()]
    if not paths:
        default = os.path.expanduser("~/.kube/config")
        paths = [default] if os.path.exists(default) else []
    if not paths:
        return None
    current: Optional[str] = None
    entries: dict[str, dict[str, tuple[dict, str]]] = {"contexts": {}, "clusters": {}, "users": {}}
    field = {"contexts": "context", "clusters": "cluster", "users": "user"}
    for path in paths:
        if not os.path.exists(path):
            continue  # kubectl skips missing files of the list
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        base = os.path.dirname(os.path.abspath(path))
        current = current or config.get("current-context")
        for kind, named in entries.items():
            for item in config.get(kind) or []:
                named.setdefault(item.get("name"), (item.get(field[kind]) or {}, base))
    if not current:
        raise CredentialsError(f"kubeconfig {os.pathsep.join(paths)}: no current-context")
    try:
        context, _ = entries["contexts"][current]
        cluster, cluster_base = entries["clusters"][context["cluster"]]
        user, user_base = entries["users"][context["user"]]
    except KeyError as exc:
        raise CredentialsError(f"kubeconfig {os.pathsep.join(paths)}: context {current!r} names an unknown "
                               f"entry {exc}") from None
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise CredentialsError(
                f"kubeconfig user {context['user']!r} authenticates with {plugin!r}, which the operator does not "
                f"run: give it a user with token, tokenFile or a client certificate, or run it in-cluster")
    # as client-go: tokenFile over token, and *-data over the file of the same thing
    token = _read(_resolve(user["tokenFile"], user_base)) if user.get("tokenFile") else user.get("token")
    return kopf.ConnectionInfo(
        server=cluster.get("server"),
        ca_path=_path_unless(cluster, "certificate-authority", cluster_base),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")) or None,
        token=token or None,
        certificate_path=_path_unless(user, "client-certificate", user_base),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=_path_unless(user, "client-key", user_base),
        private_key_data=user.get("client-key-data"),
        default_namespace=context.get("namespace"),
        priority=10,
    )


def load() -> kopf.ConnectionInfo:
    """In-cluster first (a pod may also carry a kubeconfig), then the kubeconfig."""
    info = in_cluster() or from_kubeconfig()
    if info is None:
        raise CredentialsError("no Kubernetes credentials: not in a pod with a service account, and no kubeconfig "
                               "($KUBECONFIG or ~/.kube/config)")
    return info


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _path_unless(entry: dict, field: str, base: str) -> Optional[str]:
    """The file named by `field`, unless `field`-data is given (which wins, as in client-go)."""
    return None if entry.get(f"{field}-data") else _resolve(entry.get(field), base)


def _resolve(path: Any, base: str) -> Optional[str]:
    """kubectl resolves a kubeconfig's file paths against the directory of the file that names them."""
    if not path:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base, path)
