#!/usr/bin/env python3
"""Turns a controller release's manifests (JobSet, Kueue; rendered by build-binaries.sh from the module's own
config/default) into what the local cluster applies when the controller runs as a local process.

Kept: Namespace, ServiceAccount, RBAC, CRDs and the Mutating/ValidatingWebhookConfigurations. Dropped: the
Deployment (the binary runs on this host), Services, Secrets, ConfigMaps and APIServices (Kueue's visibility
API is switched off; an APIService without a backend would break discovery for every client).
Every webhook's `clientConfig.service` (webhooks and CRD conversion) becomes `url: https://127.0.0.1:PORT<path>`
with the local webhook CA as caBundle: the apiserver cannot reach Service IPs here (no kube-proxy).
For Kueue, webhooks of integrations that are not enabled (pods, deployments, Ray, Kubeflow...) are not
registered: Kueue answers them with a no-op, so leaving them out changes nothing but removes a cluster-wide
failure point (every Pod create would fail while Kueue restarts).

Usage (up.sh):
    python addons.py MANIFESTS --port 6446 --ca-file pki/webhook-ca.crt [--keep-groups batch,kueue.x-k8s.io] > out.json
"""
import argparse
import base64
import json
import sys

import yaml

KEEP_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
              "CustomResourceDefinition", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


def local_client_config(cfg: dict, port: int, ca_bundle: str) -> dict:
    path = (cfg.get("service") or {}).get("path", "")
    return {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}


def render(docs: list[dict], port: int, ca_bundle: str, keep_groups: set[str] | None) -> list[dict]:
    out = []
    for d in docs:
        if not d or d.get("kind") not in KEEP_KINDS:
            continue
        if d["kind"] == "CustomResourceDefinition":
            conv = (d["spec"].get("conversion") or {}).get("webhook")
            if conv:
                conv["clientConfig"] = local_client_config(conv.get("clientConfig") or {}, port, ca_bundle)
        elif d["kind"].endswith("WebhookConfiguration"):
            hooks = []
            for w in d.get("webhooks") or []:
                groups = {g for r in w.get("rules") or [] for g in r.get("apiGroups") or []}
                if keep_groups is not None and not groups & keep_groups:
                    continue
                w["clientConfig"] = local_client_config(w["clientConfig"], port, ca_bundle)
                hooks.append(w)
            d["webhooks"] = hooks
        out.append(d)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifests")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca-file", required=True)
    ap.add_argument("--keep-groups", help="comma list: register only webhooks whose rules name these API groups")
    args = ap.parse_args(argv)
    with open(args.ca_file, "rb") as f:
        ca = base64.b64encode(f.read()).decode()
    with open(args.manifests) as f:
        docs = list(yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))  # libyaml: 5x faster
    keep = set(args.keep_groups.split(",")) if args.keep_groups else None
    json.dump({"apiVersion": "v1", "kind": "List", "items": render(docs, args.port, ca, keep)}, sys.stdout)


if __name__ == "__main__":
    main()
