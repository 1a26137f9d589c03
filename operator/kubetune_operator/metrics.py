"""The operator's Prometheus metrics, registered from `kubetune_api.metrics_catalog.OPERATOR_METRICS` (the one
table the dashboard, the alert rules and docs/metrics.md also use).

Per-job series (`kubetune_job_*`) are set from the FineTuneJob's status on every watch event, so they carry
the last-known values after the trainer pod is gone and after an operator restart (the status is the memory),
and they are removed when the FineTuneJob is deleted. Fleet series: jobs per phase, phase transitions and job
durations (observed when the operator writes a transition, so a restart does not count a job twice), and the
CPU time of the operator's own garbage collector (`__main__.tune_gc`).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kubetune_api.constants import Phase
from kubetune_api.metrics_catalog import OPERATOR_METRICS, MetricDef

log = logging.getLogger(__name__)

# Fine-tuning runs take minutes to days.
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 345600, 604800)

_PROGRESS_GAUGES = {
    "kubetune_job_train_loss": "loss",
    "kubetune_job_eval_loss": "evalLoss",
    "kubetune_job_eval_perplexity": "perplexity",
    "kubetune_job_reward_accuracy": "rewardAccuracy",
    "kubetune_job_reward_margin": "rewardMargin",
    "kubetune_job_mean_reward": "meanReward",
    "kubetune_job_policy_kl": "kl",
}


def _unsuffixed(m: MetricDef) -> str:
    # prometheus_client adds `_total` to counters itself
    return m.name[: -len("_total")] if m.type == "counter" and m.name.endswith("_total") else m.name


# Every `handler` label value of kubetune_operator_reconcile_errors_total (handlers.py's @_counted names and
# the progress loop); tests/unit/operator keeps this list and the code in step.
RECONCILE_HANDLERS = ("reconcile", "job-event", "jobset-event", "pod-event", "delete", "metrics", "progress")
# `trigger` of kubetune_operator_reconciles_total (Reconciler.reconcile) and `result` of
# kubetune_operator_progress_scrapes_total (progress.py): all exported from the start, at 0
RECONCILE_TRIGGERS = ("event", "waiting", "resync")
SCRAPE_RESULTS = ("ok", "failed")


# Exported from the operator's own phase table at scrape time (PhaseCollector) rather than as prometheus_client
# children: one child per job and phase (6 per job, each with its lock and value object) was the largest part
# of the metrics' memory per job.
PHASE_METRIC = "kubetune_job_phase"


class PhaseCollector:
    """kubetune_job_phase from OperatorMetrics._phases: 1 for each job's phase, 0 for its other phases."""

    def __init__(self, owner: "OperatorMetrics", definition: MetricDef):
        self.owner, self.definition = owner, definition

    def describe(self):
        return [GaugeMetricFamily(self.definition.name, self.definition.help, labels=list(self.definition.labels))]

    def collect(self):
        family = GaugeMetricFamily(self.definition.name, self.definition.help, labels=list(self.definition.labels))
        for (namespace, name), phase in list(self.owner._phases.items()):
            for p in Phase.ALL:
                family.add_metric([namespace, name, p], 1.0 if p == phase else 0.0)
        yield family


GC_METRIC = "kubetune_operator_gc_seconds_total"


class GcCollector:
    """kubetune_operator_gc_seconds_total from a gc callback. The callback runs inside the collector, in whatever
    thread allocated: it only adds to a list of floats (no lock, nothing that could wait on a lock the
    interrupted code holds); the scrape reads the list."""

    def __init__(self, definition: MetricDef):
        self.definition = definition
        self.seconds = [0.0, 0.0, 0.0]
        self._started: Optional[float] = None
        self._installed = False

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.thread_time()  # collections never overlap or nest (CPython's `collecting` flag)
        elif self._started is not None:
            generation = min(int(info.get("generation", 2)), 2)
            self.seconds[generation] += max(0.0, time.thread_time() - self._started)
            self._started = None

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self.on_gc)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self.on_gc)
            self._installed = False

    def describe(self):
        return [CounterMetricFamily(self.definition.name, self.definition.help,
                                    labels=list(self.definition.labels))]

    def collect(self):
        family = CounterMetricFamily(self.definition.name, self.definition.help,
                                     labels=list(self.definition.labels))
        for generation, seconds in enumerate(list(self.seconds)):
            family.add_metric([str(generation)], seconds)
        yield family


class OperatorMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        disable_created_metrics()  # `*_created` series are not in the catalog (and nobody queries them)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics: dict[str, object] = {}
        for m in OPERATOR_METRICS:
            if m.name == PHASE_METRIC:
                self.registry.register(PhaseCollector(self, m))
                continue
            if m.name == GC_METRIC:
                self.gc = GcCollector(m)
                self.registry.register(self.gc)
                continue
            kind = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}[m.type]
            kwargs = {"buckets": DURATION_BUCKETS} if m.type == "histogram" else {}
            self.metrics[m.name] = kind(_unsuffixed(m), m.help, list(m.labels), registry=self.registry, **kwargs)
        self._phases: dict[tuple[str, str], str] = {}
        self._phase_counts: dict[str, int] = {p: 0 for p in Phase.ALL}  # kept with _phases (no O(N) recount)
        self._job_series: dict[tuple[str, str], set[str]] = {}
        self._queues: dict[tuple[str, str], str] = {}  # the queue label of each job's GPU-seconds series
        self._gpu_seconds: dict[tuple[tuple[str, str], str], float] = {}  # what each counter series says
        self._server = None
        self._pipeline_series: dict[tuple[str, str], set[tuple]] = {}
        for phase in Phase.ALL:
            self.metrics["kubetune_operator_jobs"].labels(phase=phase).set(0)
        # Export 0 for every handler from the start: a counter series that appears only with the first error
        # makes rate()/increase() (dashboard, alerts) miss that first error.
        for handler in RECONCILE_HANDLERS:
            self.metrics["kubetune_operator_reconcile_errors_total"].labels(handler=handler)
        for trigger in RECONCILE_TRIGGERS:
            self.metrics["kubetune_operator_reconciles_total"].labels(trigger=trigger)
        for result in SCRAPE_RESULTS:
            self.metrics["kubetune_operator_progress_scrapes_total"].labels(result=result)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def track_gc(self) -> None:
        """Count the garbage collector's CPU time in kubetune_operator_gc_seconds_total from now on (the operator
        process calls it once; unit tests build many OperatorMetrics and leave gc alone)."""
        self.gc.install()

    def shutdown(self) -> None:
        self.gc.uninstall()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # fleet ----------------------------------------------------------------------------------------------
    def _set_phase(self, key: tuple[str, str], phase: Optional[str]) -> None:
        """Record a job's phase (None: the job is gone) and move kubetune_operator_jobs by one: every watch
        event comes here, so the fleet counts must not be recounted over all jobs (O(N) per event)."""
        old = self._phases.pop(key, None) if phase is None else self._phases.get(key)
        if phase is not None:
            self._phases[key] = phase
        if old == phase:
            return
        for p, delta in ((old, -1), (phase, 1)):
            if p is not None:
                self._phase_counts[p] = self._phase_counts.get(p, 0) + delta
                self.metrics["kubetune_operator_jobs"].labels(phase=p).set(self._phase_counts[p])

    def transition(self, from_phase: Optional[str], to_phase: str) -> None:
        self.metrics["kubetune_operator_phase_transitions_total"].labels(
            from_phase=from_phase or "", to_phase=to_phase).inc()

    def finished(self, stage: str, result: str, seconds: Optional[float]) -> None:
        if seconds is not None and seconds >= 0:
            self.metrics["kubetune_operator_job_duration_seconds"].labels(stage=stage, result=result).observe(seconds)

    def reconcile_error(self, handler: str) -> None:
        self.metrics["kubetune_operator_reconcile_errors_total"].labels(handler=handler).inc()

    def reconciled(self, trigger: str) -> None:
        self.metrics["kubetune_operator_reconciles_total"].labels(trigger=trigger).inc()

    def scraped(self, result: str) -> None:
        self.metrics["kubetune_operator_progress_scrapes_total"].labels(result=result).inc()

    # per job --------------------------------------------------------------------------------------------
    def jobs(self) -> list[tuple[str, str]]:
        """(namespace, name) of every FineTuneJob seen and not deleted."""
        return list(self._phases)

    def observe_job(self, body: dict) -> None:
        """Set the per-job series from a FineTuneJob as stored (its status)."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        status = body.get("status") or {}
        phase = status.get("phase") or Phase.PENDING
        self._set_phase(key, phase)
        labels = {"namespace": key[0], "finetunejob": key[1]}
        series = self._job_series.setdefault(key, set())  # kubetune_job_phase: PhaseCollector, from _phases
        progress = status.get("progress") or {}
        for name, field in _PROGRESS_GAUGES.items():
            if isinstance(progress.get(field), (int, float)):
                self.metrics[name].labels(**labels).set(progress[field])
                series.add(name)
        step, total = progress.get("step"), progress.get("totalSteps")
        if isinstance(step, int) and isinstance(total, int) and total > 0:
            self.metrics["kubetune_job_progress_ratio"].labels(**labels).set(step / total)
            series.add("kubetune_job_progress_ratio")
        forgetting = status.get("forgetting") or {}
        if isinstance(forgetting.get("relativeChange"), (int, float)):
            self.metrics["kubetune_job_forgetting_relative_change"].labels(**labels).set(forgetting["relativeChange"])
            series.add("kubetune_job_forgetting_relative_change")
        seconds = status.get("gpuSeconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            spec = body.get("spec") or {}
            queue = spec.get("queueName") or (meta.get("labels") or {}).get("kueue.x-k8s.io/queue-name") or ""
            counter = self.metrics["kubetune_job_gpu_seconds_total"].labels(**labels, queue=queue)
            old_queue = self._queues.get(key)
            if old_queue is not None and old_queue != queue:
                self._remove("kubetune_job_gpu_seconds_total", key[0], key[1], old_queue)
                self._gpu_seconds.pop((key, old_queue), None)
            self._queues[key] = queue
            # The counter mirrors status.gpuSeconds (cumulative, never decreasing): after an operator restart it
            # comes back at the status's value, not at 0, so increase() neither loses nor repeats GPU time.
            delta = float(seconds) - self._gpu_seconds.get((key, queue), 0.0)
            if delta > 0:
                counter.inc(delta)
                self._gpu_seconds[(key, queue)] = float(seconds)
            series.add("kubetune_job_gpu_seconds_total")
        evaluation = (body.get("spec") or {}).get("evaluation") or {}
        if evaluation.get("reference"):
            self.metrics["kubetune_job_forgetting_threshold"].labels(**labels).set(
                float(evaluation.get("forgettingThreshold", 0.10)))
            series.add("kubetune_job_forgetting_threshold")

    def forget_all_jobs(self) -> None:
        """Drop every per-job series: a paused (standby) replica must not export stale values next to the
        active one's. kopf re-lists when this replica becomes active, which brings them back."""
        for namespace, name in list(self._job_series):
            self.forget_job(namespace, name)
        for key in list(self._phases):
            self._set_phase(key, None)

    def _remove(self, metric_name: str, *label_values: str) -> None:
        try:
            self.metrics[metric_name].remove(*label_values)
        except KeyError:
            pass

    def forget_job(self, namespace: str, name: str) -> None:
        """Remove every series of a deleted FineTuneJob."""
        key = (namespace, name)
        self._set_phase(key, None)
        for metric_name in self._job_series.pop(key, set()):
            metric = self.metrics[metric_name]
            if metric_name == "kubetune_job_gpu_seconds_total":
                queue = self._queues.pop(key, "")
                self._gpu_seconds.pop((key, queue), None)
                self._remove(metric_name, namespace, name, queue)
                continue
            try:
                metric.remove(namespace, name)
            except KeyError:
                pass

    # per pipeline ---------------------------------------------------------------------------------------
    def observe_pipeline(self, namespace: str, name: str, status: dict) -> None:
        """Set a FineTunePipeline's series from the status the pipeline reconciler just derived."""
        key = (namespace, name)
        old = self._pipeline_series.get(key, set())
        now: set[tuple] = set()
        phase = status.get("phase") or Phase.PENDING
        for p in Phase.ALL:
            self.metrics["kubetune_operator_pipeline_phase"].labels(namespace, name, p).set(1 if p == phase else 0)
            now.add(("kubetune_operator_pipeline_phase", namespace, name, p))
        progress = str(status.get("progress") or "")
        if "/" in progress and progress.split("/")[0].isdigit():
            self.metrics["kubetune_operator_pipeline_current_stage"].labels(namespace, name).set(int(progress.split("/")[0]))
            now.add(("kubetune_operator_pipeline_current_stage", namespace, name))
        for i, stage in enumerate(status.get("stages") or []):
            if stage.get("jobUid") and stage.get("job"):
                labels = (namespace, name, stage["name"], stage["job"])
                self.metrics["kubetune_operator_pipeline_stage"].labels(*labels).set(i + 1)
                now.add(("kubetune_operator_pipeline_stage", *labels))
        for series in old - now:
            self._remove(*series)
        self._pipeline_series[key] = now

    def forget_pipeline(self, namespace: str, name: str) -> None:
        for series in self._pipeline_series.pop((namespace, name), set()):
            self._remove(*series)
