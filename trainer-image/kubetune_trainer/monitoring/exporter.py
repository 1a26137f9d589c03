"""The Prometheus side of a run: one registry holding the catalog's trainer metrics (kubetune_api.metrics_catalog)
with the job's constant labels, plus scrape bookkeeping so the run's last values can wait for one more scrape.

Gauges in EAGER are exported from the first scrape on (so "the trainer is up but stuck" and "absent" differ);
the others appear with their first value, so a dashboard never shows a made-up 0 for an eval loss not measured
yet.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from kubetune_api.metrics_catalog import TRAINER_METRICS

# finish() waits (at most this long) for one more scrape of /metrics when something has been scraping, so the
# last values of a run that ends between two scrapes (a NaN at step 3, say) still reach Prometheus. 0: don't.
ENV_FINAL_SCRAPE_TIMEOUT = "KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT"
DEFAULT_FINAL_SCRAPE_TIMEOUT = 30.0

EAGER = ("kubetune_train_step", "kubetune_train_last_progress_timestamp_seconds",
         "kubetune_train_nonfinite_loss_total", "kubetune_checkpoints_saved_total")


class TrainerExporter:
    def __init__(self, const_labels: dict[str, str], *, step: Callable[[], float],
                 last_progress: Callable[[], float]):
        """`step` and `last_progress` are read when Prometheus scrapes (the per-step hot path writes nothing)."""
        self.const_labels = const_labels
        # No `<counter>_created` series: they are not in the catalog and nothing here queries them.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.families: dict[str, Any] = {}
        self._children: dict[str, Any] = {}
        for m in TRAINER_METRICS:
            cls = Counter if m.type == "counter" else Gauge
            self.families[m.name] = cls(m.name, m.help, m.labels, registry=self.registry)
        self.child("kubetune_train_step").set_function(step)
        self.child("kubetune_train_last_progress_timestamp_seconds").set_function(last_progress)
        for name in EAGER:
            self.child(name)
        # log key -> gauge name, resolved once (on_log runs every logging step)
        self.log_map = {key: m.name for m in TRAINER_METRICS for key in m.log_keys}
        self._scrapes = 0
        self._scrape_times: deque[float] = deque(maxlen=4)
        self._scraped = threading.Condition()

    def child(self, name: str):
        """The series of metric `name` with the job's labels."""
        child = self._children.get(name)
        if child is None:
            child = self.families[name].labels(**self.const_labels)
            self._children[name] = child
        return child

    def set(self, name: str, value: float) -> None:
        self.child(name).set(value)

    def note_scrape(self) -> None:
        with self._scraped:
            self._scrapes += 1
            self._scrape_times.append(time.monotonic())
            self._scraped.notify_all()

    def wait_for_final_scrape(self) -> None:
        """Block until the next scrape (at most ~1.5 scrape intervals, capped by the env) if anyone scrapes."""
        cap = float(os.environ.get(ENV_FINAL_SCRAPE_TIMEOUT, DEFAULT_FINAL_SCRAPE_TIMEOUT))
        with self._scraped:
            if cap <= 0 or not self._scrape_times or time.monotonic() - self._scrape_times[-1] > 600:
                return  # nobody is scraping: don't hold up the exit
            times = list(self._scrape_times)
            interval = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 15.0
            seen = self._scrapes
            self._scraped.wait_for(lambda: self._scrapes > seen, timeout=min(cap, 1.5 * interval + 1.0))
