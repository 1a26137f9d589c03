"""`kubetune plot`: draw a run's loss / perplexity (and RL reward) curves to a PNG from its metrics.jsonl.

    kubetune plot support-bot -n ml -o curve.png      # from the job's published metrics.jsonl
    kubetune plot ./kubetune-output/metrics.jsonl -o curve.png
    kubetune plot s3://results/fine-tunes/ml/support-bot -o curve.png

Fetching reuses the trainer's storage package and drawing its plot module (neither imports torch: boto3 and
matplotlib come with the client extra).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .kube import default_namespace, get_job

_URI = re.compile(r"^(s3|file|pvc|hf)://")


def resolve_metrics(target: str, namespace: Optional[str] = None, kubeconfig: Optional[str] = None,
                    endpoint: Optional[str] = None, cache_dir: Optional[Path] = None) -> tuple[Path, str]:
    """A local metrics.jsonl for a file, a folder, an output URI or a FineTuneJob name; plus a plot title."""
    local = Path(target)
    if local.is_file():
        return local, local.name
    if local.is_dir() and (local / "metrics.jsonl").is_file():
        return local / "metrics.jsonl", str(local)
    if _URI.match(target):
        uri, title = target, target
    else:
        namespace = namespace or default_namespace(kubeconfig)
        obj = get_job(target, namespace, kubeconfig)
        spec, status = obj.get("spec", {}), obj.get("status") or {}
        out_uri = (status.get("artifacts") or {}).get("outputUri")
        if not out_uri:  # not published yet: this run's prefix is <output.uri>/<namespace>/<name>/runs/<uid>/
            out_uri = f"{spec['output']['uri'].rstrip('/')}/{namespace}/{target}/runs/{obj['metadata']['uid']}"
        # the endpoint the job's runtime named, as recorded in status.runtime when the job started
        endpoint = endpoint or (((status.get("runtime") or {}).get("spec") or {}).get("storage") or {}).get("endpoint")
        uri = out_uri
        title = f"{namespace}/{target} ({spec.get('stage')}, {spec.get('adapter', {}).get('type', 'lora')})"
    if not uri.endswith(".jsonl"):
        uri = uri.rstrip("/") + "/metrics.jsonl"
    from kubetune_trainer import storage

    cache = Path(cache_dir or tempfile.mkdtemp(prefix="kubetune-plot-"))
    return Path(storage.fetch(uri, cache, endpoint=endpoint)), title


def plot_command(target: str, output: str, namespace: Optional[str] = None, kubeconfig: Optional[str] = None,
                 endpoint: Optional[str] = None) -> int:
    """`kubetune plot`: see the module docstring."""
    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.monitoring.plot import plot_curves

    try:
        path, title = resolve_metrics(target, namespace, kubeconfig, endpoint or os.environ.get("AWS_ENDPOINT_URL"))
    except TrainerError as exc:
        print(f"kubetune plot: {exc} (metrics.jsonl is published with the artifacts when the job finishes)",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - API/config errors from the kubernetes client
        status = getattr(exc, "status", None)
        what = "not found" if status == 404 else str(exc)
        print(f"kubetune plot: {target}: {what}", file=sys.stderr)
        return 2
    png = plot_curves(path, Path(output), title=title)
    print(f"{png} (from {path})")
    return 0
