"""`kubetune follow` and `kubetune plot`: watch a FineTuneJob from a terminal, draw its curves to a PNG.

    kubetune follow support-bot -n ml                 # live: phase, step bar, loss, eval loss, PPL, tokens/s, ETA
    kubetune plot support-bot -n ml -o curve.png      # from the job's published metrics.jsonl
    kubetune plot ./kubetune-output/metrics.jsonl -o curve.png
    kubetune plot s3://results/fine-tunes/ml/support-bot -o curve.png

`follow` exits 0 when the job Succeeded, 1 when it Failed (or was deleted), 2 when it cannot be found or the
API cannot be reached, 130 on Ctrl-C. The kubernetes client is imported only when one of these runs.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TextIO

from kubetune_api.constants import GROUP, PLURAL, VERSION, ConditionType, Phase

BAR_WIDTH = 24


# ------------------------------------------------------------------------------------------------ rendering
def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_num(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _fmt_rate(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def render(obj: dict) -> str:
    """One status line for a FineTuneJob object (as the API returns it)."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    p = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    step, total = p.get("step"), p.get("totalSteps")
    if step is not None and total:
        done = min(1.0, step / total)
        filled = int(done * BAR_WIDTH)
        bar = f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {step}/{total} {int(done * 100):3d}%"
    else:
        bar = f"[{'.' * BAR_WIDTH}] {step if step is not None else '-'}/{total or '-'}"
    parts = [f"{meta.get('namespace', '?')}/{meta.get('name', '?')}", f"{phase:<9}", bar,
             f"loss {_fmt_num(p.get('loss'))}", f"eval {_fmt_num(p.get('evalLoss'))}",
             f"ppl {_fmt_num(p.get('perplexity'))}", f"{_fmt_rate(p.get('tokensPerSecond'))} tok/s",
             f"ETA {_fmt_duration(p.get('etaSeconds')) if phase == Phase.RUNNING else '-'}"]
    return "  ".join(parts)


def _condition(obj: dict, ctype: str) -> Optional[dict]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def summary(obj: dict) -> str:
    """What a finished job ended with: reason and message, forgetting, where the adapter is."""
    status = obj.get("status") or {}
    lines = []
    failed = _condition(obj, ConditionType.FAILED)
    if failed:
        lines.append(f"Failed: {failed.get('reason')}: {failed.get('message', '')}".rstrip(": "))
    forgetting = status.get("forgetting") or {}
    if forgetting.get("relativeChange") is not None:
        lines.append(f"forgetting: reference perplexity {_fmt_num(forgetting.get('referencePerplexityBefore'))} -> "
                     f"{_fmt_num(forgetting.get('referencePerplexityAfter'))} "
                     f"({forgetting['relativeChange'] * 100:+.1f}%, threshold "
                     f"{(forgetting.get('threshold') or 0) * 100:.0f}%)"
                     + (" EXCEEDED" if forgetting.get("exceeded") else ""))
    artifacts = status.get("artifacts") or {}
    if artifacts.get("adapterUri"):
        lines.append(f"adapter: {artifacts['adapterUri']}")
    if status.get("message") and not failed:
        lines.append(status["message"])
    return "\n".join(lines)


def follow_objects(objects: Iterable[dict], out: TextIO = sys.stdout, tty: Optional[bool] = None) -> int:
    """Print each new state of the job; return 0/1 when it reaches Succeeded/Failed (1 if it is deleted)."""
    tty = out.isatty() if tty is None else tty
    last = None
    for obj in objects:
        if obj.get("_deleted"):
            out.write(("\n" if tty and last else "") + "the FineTuneJob was deleted\n")
            return 1
        line = render(obj)
        if line != last:
            # A terminal gets one line redrawn in place (cut to its width: a wrapped line cannot be redrawn);
            # a pipe or log file gets one line per change.
            if tty:
                out.write(f"\r\x1b[2K{line[:shutil.get_terminal_size().columns - 1]}")
            else:
                out.write(f"{line}\n")
            out.flush()
            last = line
        phase = (obj.get("status") or {}).get("phase")
        if phase in Phase.TERMINAL:
            if tty:
                out.write("\n")
            text = summary(obj)
            if text:
                out.write(text + "\n")
            out.flush()
            return 0 if phase == Phase.SUCCEEDED else 1
    return 1


# ------------------------------------------------------------------------------------------------ kubernetes
def _load_config(kubeconfig: Optional[str]):
    from kubernetes import config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
        return
    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 - no kubeconfig: maybe we run inside a pod
        config.load_incluster_config()


def _default_namespace(kubeconfig: Optional[str]) -> str:
    try:
        from kubernetes import config

        _, current = config.list_kube_config_contexts(config_file=kubeconfig)
        return current.get("context", {}).get("namespace") or "default"
    except Exception:  # noqa: BLE001 - in-cluster or no contexts
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return ns_file.read_text().strip() if ns_file.exists() else "default"


def get_job(name: str, namespace: str, kubeconfig: Optional[str] = None) -> dict:
    from kubernetes import client

    _load_config(kubeconfig)
    return client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def watch_job(name: str, namespace: str, get: Callable[[], dict], stream: Callable[..., Iterator[dict]]
              ) -> Iterator[dict]:
    """The object now, then each change; reconnects when the watch ends or its resourceVersion expires."""
    from kubernetes.client.exceptions import ApiException

    obj = get()
    yield obj
    rv = obj.get("metadata", {}).get("resourceVersion")
    while True:
        try:
            for event in stream(resource_version=rv):
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiException(status=(item or {}).get("code", 500), reason=(item or {}).get("message"))
                if kind == "DELETED":
                    yield {"_deleted": True}
                    return
                if kind in ("ADDED", "MODIFIED"):
                    rv = item.get("metadata", {}).get("resourceVersion", rv)
                    yield item
        except ApiException as exc:
            if exc.status != 410:  # 410 Gone: our resourceVersion is too old; start again from a fresh GET
                raise
            obj = get()
            rv = obj.get("metadata", {}).get("resourceVersion")
            yield obj


def follow(name: str, namespace: Optional[str] = None, kubeconfig: Optional[str] = None,
           out: TextIO = sys.stdout) -> int:
    """`kubetune follow NAME`: see the module docstring."""
    try:
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException
    except ImportError:
        print("kubetune follow needs the kubernetes client: pip install kubernetes", file=sys.stderr)
        return 2
    namespace = namespace or _default_namespace(kubeconfig)
    try:
        _load_config(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - config errors come in many types
        print(f"kubetune follow: cannot load a kubeconfig: {exc}", file=sys.stderr)
        return 2
    api = client.CustomObjectsApi()

    def get() -> dict:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def stream(resource_version=None):
        return watch.Watch().stream(api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                                    field_selector=f"metadata.name={name}", resource_version=resource_version,
                                    timeout_seconds=300)

    try:
        return follow_objects(watch_job(name, namespace, get, stream), out)
    except ApiException as exc:
        if exc.status == 404:
            print(f"kubetune follow: finetunejob {namespace}/{name} not found", file=sys.stderr)
        else:
            print(f"kubetune follow: {exc.status} {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out.write("\n")
        return 130


# ------------------------------------------------------------------------------------------------ plot
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
        namespace = namespace or _default_namespace(kubeconfig)
        obj = get_job(target, namespace, kubeconfig)
        spec, status = obj.get("spec", {}), obj.get("status") or {}
        out_uri = (status.get("artifacts") or {}).get("outputUri")
        if not out_uri:  # not published yet: the store's layout is <output.uri>/<namespace>/<name>/
            out_uri = f"{spec['output']['uri'].rstrip('/')}/{namespace}/{target}"
        endpoint = endpoint or spec.get("output", {}).get("endpoint")
        uri = out_uri
        title = f"{namespace}/{target} ({spec.get('stage')}, {spec.get('adapter', {}).get('type', 'lora')})"
    if not uri.endswith(".jsonl"):
        uri = uri.rstrip("/") + "/metrics.jsonl"
    from .. import storage

    cache = Path(cache_dir or tempfile.mkdtemp(prefix="kubetune-plot-"))
    return Path(storage.fetch(uri, cache, endpoint=endpoint)), title


def plot_command(target: str, output: str, namespace: Optional[str] = None, kubeconfig: Optional[str] = None,
                 endpoint: Optional[str] = None) -> int:
    """`kubetune plot`: see the module docstring."""
    from ..errors import TrainerError
    from .plot import plot_curves

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
