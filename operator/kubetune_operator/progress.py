"""Training progress in the FineTuneJob's status while it runs, and the periodic work of the operator.

Design: the operator scrapes `GET http://<pod IP>:<metrics port>/progress` of each Running job's rank-0 pod
(pod index 0, see render.py) every `progress_interval_seconds`, and takes the final values from the
trainer's termination message when the pod ends (status.py). Why this way:

- No credentials in the trainer: it needs no Kubernetes API access (`automountServiceAccountToken: false`),
  so a compromised training script or a custom reward function cannot touch the cluster. The operator, which
  already has the access, does the writing.
- Thousands of jobs: one loop for all of them, with a global cap on scrapes in flight and a short timeout, so
  slow or unreachable pods cannot pile up tasks or delay the others; the status is patched only when a
  value changed. Scrapes per second are capped too (`progress_max_scrapes_per_second`): past that many
  Running jobs per interval, each job is scraped less often, oldest-scraped first, so the operator's work per
  second (and the status writes it causes) stays bounded instead of growing with the number of jobs.
- Unreachable pods (network policies, a pod that is just starting, a node that went away) cost nothing
  but a warning event at most once per job per `progress_warning_interval_seconds`; the last values stay.
- Values survive the pod: the termination message is kept by the kubelet in the pod status after exit, and the
  status keeps the last scraped values, so `kubectl get ftj` shows the final loss after the pod is gone (and
  after an operator restart).
- Prometheus has the same numbers (it scrapes the trainer's /metrics), but the operator cannot assume a
  Prometheus, and status must work without one.

This is one loop started by the startup handler, not kopf timers: a kopf timer or daemon puts a finalizer on
every FineTuneJob, which would block `kubectl delete` (and namespace deletion) whenever the operator is not
running. The loop follows kopf peering (peering.py), so a standby replica stays quiet. The same loop deletes
FineTuneJobs whose ttlSecondsAfterFinished has passed, reconciles Pending jobs without a running pod (pods the
Job controller cannot create show only in events) and reconciles every unfinished job not reconciled for
`resync_interval_seconds` (a safety net for missed watch events and failed writes: each job at least that often,
spread over time instead of every job in one tick).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional

from kubetune_api.constants import Phase
from kubetune_api.report import TrainerReport

from . import status as S
from .peering import PeeringGate
from .reconciler import Reconciler
from .settings import OperatorSettings

log = logging.getLogger(__name__)

PROGRESS_UNAVAILABLE = "ProgressUnavailable"  # event reason (an event, not a condition: status is unaffected)


@dataclass(frozen=True)
class JobView:
    """What the loop needs of one FineTuneJob (from the kopf index of FineTuneJobs)."""
    namespace: str
    name: str
    uid: str
    phase: Optional[str]
    completion_time: Optional[str]
    ttl_seconds: Optional[int]
    terminal: bool


def job_view(body: Any) -> JobView:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    return JobView(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
                   phase=status.get("phase"), completion_time=status.get("completionTime"),
                   ttl_seconds=spec.get("ttlSecondsAfterFinished"), terminal=S.is_terminal(status))


def rank0_pod(pods: Iterable[dict]) -> Optional[dict]:
    """The running pod with completion index 0 (the newest one, after restarts)."""
    candidates = [p for p in pods if S.pod_is_running(p) and S.completion_index(p) in (0, None)
                  and (p.get("status") or {}).get("podIP")]
    return sorted(candidates, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")[-1] \
        if candidates else None


def ttl_due(view: JobView, now: float) -> bool:
    if not view.terminal or view.ttl_seconds is None or not view.completion_time:
        return False
    finished = S.parse_time(view.completion_time)
    return finished is not None and finished.timestamp() + view.ttl_seconds <= now


class WarningThrottle:
    """At most one warning per key per interval."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[Any, float] = {}

    def allow(self, key: Any) -> bool:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        return True

    def forget(self, key: Any) -> None:
        self._last.pop(key, None)


Fetch = Callable[[str], Awaitable[Any]]  # url -> parsed JSON (raises on any failure)


class ProgressLoop:
    def __init__(self, settings: OperatorSettings, reconciler: Reconciler, gate: PeeringGate,
                 jobs: Callable[[], list[JobView]], pods: Callable[[str, str], list[dict]], fetch: Fetch,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.reconciler = reconciler
        self.gate = gate
        self.jobs = jobs
        self.pods = pods
        self.fetch = fetch
        self.clock = clock
        self.semaphore = asyncio.Semaphore(settings.progress_max_concurrency)
        self.warnings = WarningThrottle(settings.progress_warning_interval_seconds)
        self._ticks = 0
        self._scraped: dict[tuple[str, str], int] = {}  # tick of each job's last scrape, while over the budget
        self._ttl_denied: set[tuple[str, str]] = set()
        self._paused = False

    async def run(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            try:
                if await self.gate.active():
                    await self.tick()
                    self._paused = False
                elif not self._paused:
                    self._paused = True
                    self.reconciler.metrics.forget_all_jobs()
            except Exception:  # noqa: BLE001 - the loop must outlive any single failure
                log.exception("progress loop iteration failed")
                self.reconciler.metrics.reconcile_error("progress")
            try:
                await asyncio.wait_for(stopped.wait(), timeout=self.settings.progress_interval_seconds)
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> None:
        views = self.jobs()
        now = self.clock()
        running = [v for v in views if v.phase == Phase.RUNNING]
        await asyncio.gather(*(self.scrape_one(v) for v in self.due_scrapes(running)))
        for v in views:
            if ttl_due(v, now) and (v.namespace, v.name) not in self._ttl_denied:
                await self._expire(v)
        # A Pending job whose pods Kubernetes refuses to create changes nothing the operator watches (the refusal
        # is only an event on the Job): look again every tick so PodsBlocked shows within one, with one LIST of
        # FailedCreate events per namespace for all of them; only those the events name (or reported blocked) are
        # reconciled (refusal_may_change). Jobs whose pods exist and wait for a node are left to the pods' watch
        # events (lacks_pods).
        waiting = {(v.namespace, v.name) for v in views if not v.terminal and v.phase in (None, Phase.PENDING)
                   and self.reconciler.lacks_pods(v.namespace, v.name)}
        if waiting:
            await self.reconciler.share_failed_creates({ns for ns, _ in waiting})
            waiting = {key for key in waiting if self.reconciler.refusal_may_change(*key)}
        stale = self.settings.resync_interval_seconds
        try:
            for v in views:
                if v.terminal:
                    continue
                trigger = "waiting" if (v.namespace, v.name) in waiting else \
                    "resync" if self.reconciler.idle_seconds(v.namespace, v.name) >= stale else None
                if trigger is None:
                    continue
                try:
                    await self.reconciler.reconcile(v.namespace, v.name, trigger=trigger)
                except Exception as exc:  # noqa: BLE001
                    log.warning("%s reconcile of %s/%s failed: %s", trigger, v.namespace, v.name, exc)
        finally:
            self.reconciler.unshare_failed_creates()

    def due_scrapes(self, running: list[JobView]) -> list[JobView]:
        """The Running jobs to scrape this tick: all of them while they fit the budget (progress_max_scrapes_per_second
        x progress_interval_seconds), else that many, scraped longest ago first (never scraped: first of all). At
        N=3,000 jobs the loop scraped every one every 15 s, and each job's share of the operator's CPU grew with
        how long it ran (docs/scale.md); a user sees progress every N/rate seconds instead at that scale."""
        budget = max(1, math.ceil(self.settings.progress_max_scrapes_per_second
                                  * self.settings.progress_interval_seconds))
        if len(running) <= budget:
            self._scraped.clear()  # nothing to remember while everyone fits
            return running
        self._ticks += 1
        keys = {(v.namespace, v.name) for v in running}
        for key in [k for k in self._scraped if k not in keys]:
            del self._scraped[key]
        due = sorted(running, key=lambda v: self._scraped.get((v.namespace, v.name), 0))[:budget]
        for v in due:
            self._scraped[(v.namespace, v.name)] = self._ticks
        return due

    async def _expire(self, v: JobView) -> None:
        try:
            await self.reconciler.delete_expired(v.namespace, v.name, v.uid)
        except Exception as exc:  # noqa: BLE001
            status = getattr(exc, "status", None)
            if status == 403:
                # RBAC without `delete` on finetunejobs: say so once, do not retry every interval
                self._ttl_denied.add((v.namespace, v.name))
            log.warning("could not delete expired %s/%s: %s", v.namespace, v.name, exc)

    async def scrape_one(self, v: JobView) -> Optional[TrainerReport]:
        pod = rank0_pod(self.pods(v.namespace, v.name))
        if pod is None:
            return None  # not running yet (or between restarts): nothing to ask
        url = f"http://{pod['status']['podIP']}:{self.settings.trainer_metrics_port}/progress"
        async with self.semaphore:
            try:
                data = await self.fetch(url)
                report = TrainerReport.model_validate(data)
            except Exception as exc:  # noqa: BLE001 - timeouts, refused connections, bad JSON: all the same
                self.reconciler.metrics.scraped("failed")
                if self._running_for(pod) >= self.startup_grace:
                    await self._unreachable(v, url, exc)
                return None
        self.reconciler.metrics.scraped("ok")
        self.warnings.forget((v.namespace, v.name, "progress"))
        try:
            await self.reconciler.record_progress(v.namespace, v.name, v.uid, report)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not record progress of %s/%s: %s", v.namespace, v.name, exc)
        return report

    @property
    def startup_grace(self) -> float:
        """A trainer serves /progress only once it has started up (imports, downloads): no warning before."""
        return max(120.0, 4 * self.settings.progress_interval_seconds)

    def _running_for(self, pod: dict) -> float:
        started = S.parse_time(((S.trainer_status(pod).get("state") or {}).get("running") or {}).get("startedAt")
                               or (pod.get("status") or {}).get("startTime"))
        return self.clock() - started.timestamp() if started else float("inf")

    async def _unreachable(self, v: JobView, url: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        log.debug("progress of %s/%s from %s failed: %s", v.namespace, v.name, url, reason)
        if not self.warnings.allow((v.namespace, v.name, "progress")):
            return
        body = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": v.name, "namespace": v.namespace, "uid": v.uid}}
        await self.reconciler.recorder.event(
            body, "Warning", PROGRESS_UNAVAILABLE,
            f"cannot read training progress from {url} ({reason[:200]}); status keeps the last values. "
            "Check NetworkPolicies for the trainer's metrics port.")


def aiohttp_fetcher(timeout: float):
    """A Fetch over one aiohttp session (aiohttp comes with kopf); returns (fetch, close)."""
    import aiohttp

    session: Optional[aiohttp.ClientSession] = None

    async def fetch(url: str) -> Any:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        async with session.get(url) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def close() -> None:
        if session is not None:
            await session.close()

    return fetch, close
