"""`kubetune follow NAME`: watch a FineTuneJob from a terminal until it finishes.

    kubetune follow support-bot -n ml       # live: phase, step bar, loss, eval loss, PPL, tokens/s, ETA

On a terminal the status is a rich progress bar redrawn in place; piped or logged, one plain line per change.
Exits 0 when the job Succeeded, 1 when it Failed (or was deleted), 2 when it cannot be found or the API cannot
be reached, 130 on Ctrl-C. The kubernetes client is imported only when it runs.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, Optional, TextIO

from kubetune_api.constants import GROUP, PLURAL, VERSION, ConditionType, Phase

from .kube import default_namespace, load_config


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


def _metrics(obj: dict) -> str:
    status = obj.get("status") or {}
    p = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    # cpt/sft: perplexity; other stages: their own headline (reward accuracy/margin, mean reward/KL).
    metric = p.get("metric")
    headline = metric if metric and not metric.startswith("ppl") else f"ppl {_fmt_num(p.get('perplexity'))}"
    return "  ".join([
        f"loss {_fmt_num(p.get('loss'))}", f"eval {_fmt_num(p.get('evalLoss'))}",
        headline, f"{_fmt_rate(p.get('tokensPerSecond'))} tok/s",
        f"ETA {_fmt_duration(p.get('etaSeconds')) if phase == Phase.RUNNING else '-'}"])


def render(obj: dict) -> str:
    """One plain status line for a FineTuneJob object (as the API returns it): for pipes and logs."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    p = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    step, total = p.get("step"), p.get("totalSteps")
    if step is not None and total:
        steps = f"{step}/{total} {int(min(1.0, step / total) * 100):3d}%"
    else:
        steps = f"{step if step is not None else '-'}/{total or '-'}"
    return "  ".join([f"{meta.get('namespace', '?')}/{meta.get('name', '?')}", f"{phase:<9}", steps, _metrics(obj)])


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
    if failed:
        # last: the line a person (or `tail -1`) sees; the operator's messages start with the field at fault
        lines.append(f"Failed: {failed.get('reason')}: {failed.get('message', '')}".rstrip(": "))
    return "\n".join(lines)


class _Bar:
    """The terminal view: one rich progress bar (job, phase, steps, percent, metrics) redrawn in place."""

    def __init__(self, out: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

        self.progress = Progress(
            TextColumn("{task.fields[job]}"), TextColumn("{task.fields[phase]:<9}"), BarColumn(),
            MofNCompleteColumn(), TaskProgressColumn(), TextColumn("{task.description}"),
            console=Console(file=out, force_terminal=True), auto_refresh=False)
        self.task = None

    def show(self, obj: dict) -> None:
        meta, status = obj.get("metadata", {}), obj.get("status") or {}
        p = status.get("progress") or {}
        fields = {"job": f"{meta.get('namespace', '?')}/{meta.get('name', '?')}",
                  "phase": status.get("phase") or "Pending"}
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(_metrics(obj), total=p.get("totalSteps"), **fields)
        self.progress.update(self.task, completed=p.get("step") or 0, total=p.get("totalSteps"),
                             description=_metrics(obj), **fields)
        self.progress.refresh()

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


def follow_objects(objects: Iterable[dict], out: TextIO = sys.stdout, tty: Optional[bool] = None) -> int:
    """Show each new state of the job; return 0/1 when it reaches Succeeded/Failed (1 if it is deleted)."""
    tty = out.isatty() if tty is None else tty
    bar = _Bar(out) if tty else None
    last = None
    try:
        for obj in objects:
            if obj.get("_deleted"):
                if bar is not None:
                    bar.close()
                out.write("the FineTuneJob was deleted\n")
                return 1
            line = render(obj)
            if line != last:
                if bar is not None:
                    bar.show(obj)
                else:
                    out.write(f"{line}\n")
                    out.flush()
                last = line
            phase = (obj.get("status") or {}).get("phase")
            if phase in Phase.TERMINAL:
                if bar is not None:
                    bar.close()
                    bar = None
                text = summary(obj)
                if text:
                    out.write(text + "\n")
                out.flush()
                return 0 if phase == Phase.SUCCEEDED else 1
        return 1
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------------ kubernetes
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
        print("kubetune follow needs the kubernetes client: pip install 'kubetune[client]'", file=sys.stderr)
        return 2
    namespace = namespace or default_namespace(kubeconfig)
    try:
        load_config(kubeconfig)
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
