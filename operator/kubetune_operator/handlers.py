"""kopf handlers of the kubetune operator: thin; the work is in reconciler.py (children and status),
render.py / status.py (pure), progress.py (the periodic loop) and metrics.py.

    python -m kubetune_operator --standalone --namespace team-a     # see __main__.py
    kopf run -m kubetune_operator.handlers --standalone -n team-a     # the same handlers under kopf's own CLI

What triggers what:
Watch handlers only record what they saw and queue the FineTuneJob's key (workqueue.py: deduplicated, a fixed
number of workers, delayed retries); the reconciles run from the queue.
- every FineTuneJob watch event (kopf's initial listing included) -> the per-job Prometheus series, and a
  queued reconcile: every child checked when the job is new to this operator or its metadata/spec changed, else the Job
  and the status; an invalid spec -> Failed/InvalidSpec (final until the spec changes); a name taken by a foreign
  object, or an attempt that raised -> queued again later (`WorkQueue.later`). DELETED -> its series and state dropped.
- a labelled child Job, JobSet (multi-node jobs) or trainer pod changed -> reconcile of its FineTuneJob (status
  follows the pods), queued. Without the JobSet API in the cluster kopf logs that it cannot watch jobsets and the rest
  works; multi-node jobs then fail with reason JobSetNotInstalled (install JobSet, then restart the operator).
- deletion: nothing blocks it (no finalizer, no delete handler); the garbage collector removes the children
  through their owner references.
- the startup handler owns all settings and starts the progress loop (scrape, TTL, resync); the login handler
  gives kopf the credentials KubeApi uses (credentials.py).

Importing this module must not import torch or transformers (the operator image has neither).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any, Callable, Optional

import kopf

from kubetune_api import constants as C
from kubetune_api.constants import Label

from . import credentials
from .kube import EventRecorder, KubeApi
from .metrics import OperatorMetrics
from .outage import ENDLESS_BACKOFF, ApiHealth, ApiUnreachable, install_log_filter
from .peering import PeeringGate
from . import render_jobset as JS
from .progress import ProgressLoop, aiohttp_fetcher, job_view
from .reconciler import Reconciler, freeze, snapshot_job, snapshot_pod, thaw
from . import pipeline_handlers  # noqa: F401  (registers the FineTunePipeline handlers with kopf)
from .settings import OperatorSettings
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

FTJ = (C.GROUP, C.VERSION, C.PLURAL)
JOBSET = (JS.GROUP, JS.API_VERSION.split("/")[1], JS.PLURAL)
ANNOTATION_PREFIX = f"operator.{C.GROUP}"  # kopf's progress/diffbase annotations on FineTuneJobs
CHILD_LABELS = {Label.MANAGED_BY: Label.MANAGED_BY_VALUE, Label.JOB_NAME: kopf.PRESENT}
CHILD_SELECTOR = f"{Label.MANAGED_BY}={Label.MANAGED_BY_VALUE},{Label.JOB_NAME}"
RETRY_BACKOFF = 5.0  # seconds before a reconcile that raised something unexpected runs again
WAITING_DELAY = 5.0  # seconds before a job waiting for something it does not watch is looked at again
# Reconciles running at once per API connection: a reconcile spends part of its time between calls (rendering,
# status), so as many reconciles as connections leave connections idle; each costs ~100 KB while it runs.
RECONCILES_PER_CONNECTION = 4


# ------------------------------------------------------------------------------------------------ settings
class PipelineDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base (a deep copy of the body without status) for every watch event of every resource,
    also where only event handlers run and nothing reads it: FineTuneJobs, Jobs, pods (about 8 % of the
    operator's CPU in a burst of 1,000 jobs). Only FineTunePipelines have change handlers (create/update/resume);
    every other kind gets an empty essence. (kopf fills in `kind` on listed objects too.)"""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if body.get("kind") != C.PIPELINE_KIND:
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)


class SharedMemo(kopf.Memo):
    """The operator's memo (settings, API client, reconciler, queue, ...), one for all objects. kopf gives every
    object it watches a shallow copy of the memo passed to kopf.run() (a dict of our ~12 keys, ~300 bytes), and
    it watches three objects per FineTuneJob (the job, its Job, its pod): ~4 MB at 5,000 jobs for copies nothing
    needs, since no handler keeps per-object state in the memo (the reconciler keeps its own, keyed by job)."""

    def __copy__(self) -> "SharedMemo":
        return self


def configure_kopf(settings: kopf.OperatorSettings, cfg: OperatorSettings) -> None:
    """Everything the operator sets on kopf, in one place (called by the startup handler)."""
    # Progress and diff-base in annotations under our own prefix: status stays entirely ours.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = PipelineDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"  # unused: no handler requires one
    # Events: only the ones the operator posts on purpose (kopf.event-style), not every log line.
    settings.posting.enabled = True
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "kubetune-operator"
    # Watch only kubetune's Jobs and pods (server-side filtering: a busy cluster has many pods).
    settings.watching.label_selectors["batch", "v1", "jobs"] = CHILD_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = CHILD_SELECTOR
    settings.watching.label_selectors[JOBSET] = CHILD_SELECTOR
    # Re-establish watches regularly: a silently dead connection would otherwise freeze the status.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # An API-server outage is waited out, however long (kopf's default gives up after 9 attempts, 54 s, and its
    # watcher dies with a traceback); outage.py keeps the log to one warning each way.
    settings.networking.error_backoffs = ENDLESS_BACKOFF


def _counted(handler: str) -> Callable:
    """Count exceptions of a handler in kubetune_operator_reconcile_errors_total{handler}."""
    def decorate(fn: Callable) -> Callable:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except Exception:
                    kwargs["memo"].metrics.reconcile_error(handler)
                    raise
        else:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return fn(*args, **kwargs)
                except Exception:
                    kwargs["memo"].metrics.reconcile_error(handler)
                    raise
        return wrapper
    return decorate


# ------------------------------------------------------------------------------------------------ lifecycle
@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches connect and authenticate as KubeApi does (credentials.py). kopf calls this again after
    a 401, which re-reads a rotated service-account token."""
    return credentials.load()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, finetunejobs: kopf.Index,
                  trainer_jobs: kopf.Index, trainer_pods: kopf.Index, **_: Any) -> None:
    cfg: OperatorSettings = memo.get("settings") or OperatorSettings.from_env()
    configure_kopf(settings, cfg)
    health = ApiHealth()
    install_log_filter(health)  # kopf has configured logging by now: its handlers are on the root logger
    api = KubeApi.from_environment(concurrency=cfg.api_concurrency)
    api.health = health
    metrics = OperatorMetrics()
    port = metrics.serve(cfg.metrics_host, cfg.metrics_port)
    metrics.track_gc()  # after serve: a startup retry after a failed serve adds no second callback
    log.info("serving metrics on http://%s:%d/metrics", cfg.metrics_host, port)
    lookup = IndexLookup(trainer_jobs, trainer_pods)
    recorder = EventRecorder(api, instance=memo.get("identity"))
    reconciler = Reconciler(api, cfg, metrics, recorder, lookup)
    peering = memo.get("peering") or {}
    gate = PeeringGate(api, standalone=peering.get("standalone", True), name=peering.get("name", "default"),
                       identity=memo.get("identity"), priority=peering.get("priority", 0),
                       namespaces=cfg.watch_namespaces, mandatory=peering.get("mandatory", False))
    fetch, close_fetch = aiohttp_fetcher(cfg.progress_timeout_seconds)
    loop = ProgressLoop(cfg, reconciler, gate, jobs=lambda: _views(finetunejobs), pods=lookup.pods, fetch=fetch)
    stopped = asyncio.Event()
    queue = WorkQueue(functools.partial(reconcile_key, memo), workers=RECONCILES_PER_CONNECTION * cfg.api_concurrency,
                      gate=gate,
                      on_error=functools.partial(reconcile_failed, memo), retry_delay=RETRY_BACKOFF)
    queue.start()
    memo.update(settings=cfg, api=api, metrics=metrics, reconciler=reconciler, loop_stopped=stopped,
                queue=queue,
                loop_task=asyncio.create_task(loop.run(stopped), name="kubetune progress loop"),
                health_task=asyncio.create_task(health.watch(api, stopped=stopped), name="kubetune API health"),
                close_fetch=close_fetch)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("loop_stopped") is not None:
        memo.loop_stopped.set()
        try:
            await asyncio.wait_for(memo.loop_task, timeout=10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            memo.loop_task.cancel()
    if memo.get("health_task") is not None:
        memo.health_task.cancel()
    if memo.get("queue") is not None:
        await memo.queue.close()
    if memo.get("close_fetch") is not None:
        await memo.close_fetch()
    if memo.get("metrics") is not None:
        memo.metrics.shutdown()
    if memo.get("api") is not None:
        await memo.api.close()


@kopf.on.probe(id="finetunejobs")
async def finetunejobs_known(memo: kopf.Memo, **_: Any) -> int:
    """Reported on the liveness endpoint: FineTuneJobs this operator tracks."""
    return sum(1 for _ in memo.metrics.jobs())


# ------------------------------------------------------------------------------------------------ indices
class IndexLookup:
    """Child Jobs and pods of a FineTuneJob, from kopf's in-memory indices (kept current by the watches). The
    indices hold frozen snapshots (reconciler.freeze: compact bytes); each lookup thaws fresh copies."""

    def __init__(self, jobs: kopf.Index, pods: kopf.Index):
        self._jobs, self._pods = jobs, pods

    @staticmethod
    def _get(index: kopf.Index, namespace: str, name: str) -> list[dict]:
        store = index.get((namespace, name))
        return [thaw(item) for item in store] if store is not None else []

    def jobs(self, namespace: str, name: str) -> list[dict]:
        return self._get(self._jobs, namespace, name)

    def pods(self, namespace: str, name: str) -> list[dict]:
        return self._get(self._pods, namespace, name)


def _views(index: kopf.Index) -> list:
    return [view for store in list(index.values()) for view in store]


@kopf.index(*FTJ)
def finetunejobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): job_view(body)}


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def trainer_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[Label.JOB_NAME]): freeze(snapshot_job(body))}


@kopf.index("v1", "pods", labels=CHILD_LABELS)
def trainer_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[Label.JOB_NAME]): freeze(snapshot_pod(body))}


# ------------------------------------------------------------------------------------------------ FineTuneJobs
# Level-based: every watch event of a FineTuneJob (kopf's initial listing included, so jobs found at startup too)
# reconciles it; the reconciler itself checks every child when the job is new to it or its spec changed. kopf's
# change-detecting handlers (on.create/update/resume) are not used for FineTuneJobs: they cost a deep copy and a
# diff of the body per event and an annotation PATCH (plus the watch event it causes) per change, about a fifth
# of the operator's CPU per new job at 1,000 jobs (docs/scale.md), for nothing the reconcile needs.
@kopf.on.event(*FTJ)
@_counted("reconcile")
async def finetunejob_event(event: kopf.RawEvent, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                            **_: Any) -> None:
    if event.get("type") == "DELETED":
        memo.metrics.forget_job(namespace, name)
        memo.reconciler.forget(namespace, name)
        memo.queue.forget(namespace, name)
        return
    memo.metrics.observe_job(body)
    # later reconciles read it instead of GETting it; our own status write's echo needs no reconcile
    if memo.reconciler.observe(event["object"]):
        memo.queue.add(namespace, name, urgent=memo.reconciler.unsettled(namespace, name))


async def reconcile_key(memo: kopf.Memo, namespace: str, name: str, check_blocked: bool) -> Optional[float]:
    """One run of the reconcile queue (workqueue.py): seconds after which to look again when the result asks for
    it (a name taken by a foreign object, the old Job's pods still stopping), else None. An invalid spec is final
    until the spec changes: the next watch event brings that."""
    result = await memo.reconciler.reconcile(namespace, name, check_blocked=check_blocked)
    if result.state in ("conflict", "waiting"):
        return result.delay or WAITING_DELAY
    return None


def reconcile_failed(memo: kopf.Memo, exc: BaseException) -> None:
    """A queued reconcile raised (the queue retries it after RETRY_BACKOFF): counted, and logged once per
    failure; an unreachable API server is outage.py's single warning, not a traceback per job."""
    memo.metrics.reconcile_error("reconcile")
    if isinstance(exc, ApiUnreachable):
        log.debug("reconcile postponed: %s", exc)
    else:
        log.error("reconcile failed; retrying in %.0f s", RETRY_BACKOFF, exc_info=exc)


# ------------------------------------------------------------------------------------------------ children
@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@_counted("job-event")
async def trainer_job_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    # the Job controller is at work: no need to look for its FailedCreate events (the progress loop does)
    memo.queue.add(namespace, labels[Label.JOB_NAME], check_blocked=False)


@kopf.on.event(*JOBSET, labels=CHILD_LABELS)
@_counted("jobset-event")
async def trainer_jobset_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    """The JobSet's status (Completed, Failed, restarts) changes after its pods': reconcile on it too."""
    memo.queue.add(namespace, labels[Label.JOB_NAME])


@kopf.on.event("v1", "pods", labels=CHILD_LABELS)
@_counted("pod-event")
async def trainer_pod_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo.queue.add(namespace, labels[Label.JOB_NAME], check_blocked=False)
