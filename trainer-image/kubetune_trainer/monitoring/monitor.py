"""RunMonitor: what a running trainer tells the world, from one object the runner owns.

    monitor = RunMonitor(job, work_dir, rank=rank)     # host/port from KUBETUNE_METRICS_HOST/_PORT
    monitor.start()                                     # GET /metrics, /progress, /healthz
    trainer = stage.build_trainer(ctx)                  # ctx.callbacks includes monitor.callback()
    monitor.guard(trainer)                              # NaN/inf loss -> errors.DivergedError at that step
    trainer.train(...)
    monitor.finish(monitor.report("succeeded", artifacts=...))

Only rank 0 serves and writes files; every rank runs the callback (early stopping must decide the same on all
ranks or they would deadlock in the next collective) and the guard (each rank sees its own loss).

Per-step cost is a handful of attribute writes in `on_step_end`: the step and last-progress gauges read those
attributes when Prometheus scrapes (`set_function`), everything else is updated on log/eval events only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from kubetune_api.constants import DEFAULT_METRICS_PORT
from kubetune_api.metrics_catalog import JOB_LABEL, TRAINER_METRICS
from kubetune_api.finetunejob import Artifacts, FineTuneJob, Forgetting, Progress
from kubetune_api.report import TrainerReport

from ..errors import DivergedError, TrainerError

log = logging.getLogger("kubetune.monitoring")

ENV_HOST = "KUBETUNE_METRICS_HOST"
ENV_PORT = "KUBETUNE_METRICS_PORT"
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
# finish() waits (at most this long) for one more scrape of /metrics when something has been scraping, so the
# last values of a run that ends between two scrapes (a NaN at step 3, say) still reach Prometheus. 0: don't.
ENV_FINAL_SCRAPE_TIMEOUT = "KUBETUNE_METRICS_FINAL_SCRAPE_TIMEOUT"
DEFAULT_FINAL_SCRAPE_TIMEOUT = 30.0

# Gauges exported from the first scrape on (so "the trainer is up but stuck" and "absent" differ); the others
# appear with their first value, so a dashboard never shows a made-up 0 for an eval loss not measured yet.
_EAGER = ("kubetune_train_step", "kubetune_train_last_progress_timestamp_seconds",
          "kubetune_train_nonfinite_loss_total", "kubetune_checkpoints_saved_total")
_ETA_WINDOW = 10  # log events the ETA's step rate is measured over (includes eval/checkpoint pauses)


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _json_value(v: Any) -> Any:
    """Strict JSON for metrics.jsonl: non-finite floats become the strings "nan"/"inf"/"-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


class RunMonitor:
    def __init__(self, job: FineTuneJob, out_dir: Path, *, host: str | None = None, port: int | None = None,
                 rank: int = 0):
        self.job = job
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.reporting = rank == 0
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.early_stopped = False
        self.host = host or os.environ.get(ENV_HOST) or "127.0.0.1"
        self.port = int(port if port is not None else os.environ.get(ENV_PORT) or DEFAULT_METRICS_PORT)
        spec = job.spec
        self.const_labels = {"namespace": job.metadata.namespace, JOB_LABEL: job.metadata.name,
                             "stage": str(spec.stage), "adapter": str(spec.adapter.type)}
        es = spec.evaluation.early_stopping if spec.evaluation else None
        self._patience = es.patience if es else None
        self._min_delta = es.min_delta if es else 0.0
        self._forgetting_threshold = spec.evaluation.forgetting_threshold if spec.evaluation else None

        # Run state, read by /progress and the scrape-time gauges (plain attributes: the GIL keeps reads whole).
        self._step = 0
        self._total: Optional[int] = None
        self._epoch: Optional[float] = None
        self._loss: Optional[float] = None
        self._eval_loss: Optional[float] = None
        self._perplexity_value: Optional[float] = None
        self._lr: Optional[float] = None
        self._tps: Optional[float] = None
        self._last_progress = time.time()
        self._rate_points: deque[tuple[float, int]] = deque(maxlen=_ETA_WINDOW)
        self._training = False
        # tokens/s bookkeeping (see on_step_end)
        self._t_prev: Optional[float] = None
        self._tok_prev = 0
        self._paused = True
        self._win_time = 0.0
        self._win_tokens = 0
        self._tok_logged = 0
        self._num_tokens_logged: Optional[float] = None
        self._t_logged: Optional[float] = None
        # early stopping
        self._best_eval: Optional[float] = None
        self._bad_evals = 0
        self._stop_message: Optional[str] = None
        # forgetting
        self._reference: dict[str, float] = {}
        self._last_checkpoint: Optional[str] = None

        # No `<counter>_created` series: they are not in the catalog and nothing here queries them.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self._families: dict[str, Any] = {}
        self._children: dict[str, Any] = {}
        for m in TRAINER_METRICS:
            cls = Counter if m.type == "counter" else Gauge
            self._families[m.name] = cls(m.name, m.help, m.labels, registry=self.registry)
        self._child("kubetune_train_step").set_function(lambda: self._step)
        self._child("kubetune_train_last_progress_timestamp_seconds").set_function(lambda: self._last_progress)
        for name in _EAGER:
            self._child(name)
        # log key -> gauge child, resolved once (on_log runs every logging step)
        self._log_map = {key: m.name for m in TRAINER_METRICS for key in m.log_keys}

        self._jsonl = None
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._final: Optional[TrainerReport] = None
        self._scrapes = 0
        self._scrape_times: deque[float] = deque(maxlen=4)
        self._scraped = threading.Condition()
        self._callback = None

    # ------------------------------------------------------------------ metrics plumbing
    def _child(self, name: str):
        child = self._children.get(name)
        if child is None:
            child = self._families[name].labels(**self.const_labels)
            self._children[name] = child
        return child

    def _set(self, name: str, value: float) -> None:
        self._child(name).set(value)

    # ------------------------------------------------------------------ HTTP server
    def start(self) -> None:
        """Serve /metrics, /progress and /healthz on host:port (port 0: ephemeral; `self.port` is the bound one)."""
        if not self.reporting or self._server is not None:
            return
        handler = _make_handler(self)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_MetricsServer", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self._server = server_cls((self.host, self.port), handler)
        except OSError as exc:
            # Metrics must not cost the run: serve on an ephemeral port (loudly) rather than fail training.
            log.warning("metrics: cannot bind %s:%s (%s); serving on an ephemeral port instead", self.host,
                        self.port, exc)
            self._server = server_cls((self.host, 0), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubetune-metrics", daemon=True)
        self._thread.start()
        log.info("metrics: serving http://%s:%d/metrics and /progress", self.host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _note_scrape(self) -> None:
        with self._scraped:
            self._scrapes += 1
            self._scrape_times.append(time.monotonic())
            self._scraped.notify_all()

    def _wait_for_final_scrape(self) -> None:
        cap = float(os.environ.get(ENV_FINAL_SCRAPE_TIMEOUT, DEFAULT_FINAL_SCRAPE_TIMEOUT))
        with self._scraped:
            if cap <= 0 or not self._scrape_times or time.monotonic() - self._scrape_times[-1] > 600:
                return  # nobody is scraping: don't hold up the exit
            times = list(self._scrape_times)
            interval = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 15.0
            seen = self._scrapes
            self._scraped.wait_for(lambda: self._scrapes > seen, timeout=min(cap, 1.5 * interval + 1.0))

    # ------------------------------------------------------------------ trainer integration
    def callback(self):
        """The TrainerCallback feeding this monitor (one instance; add it to the trainer's callbacks)."""
        if self._callback is None:
            from .callback import MonitorCallback

            self._callback = MonitorCallback(self)
        return self._callback

    def guard(self, trainer) -> None:
        """Check the loss of every step as it is computed; NaN/inf raises errors.DivergedError at that step.

        Wraps this trainer instance's `training_step`. Micro-batch losses are summed on the device (NaN and inf
        propagate through a sum) and read back once per optimizer step, when gradients sync: one host sync per
        step, the same HF's default NaN filter costs, and before the optimizer applies the bad gradients.
        """
        import torch

        original = trainer.training_step
        if getattr(original, "_kubetune_guarded", False):
            return
        accumulation = max(1, int(getattr(getattr(trainer, "args", None), "gradient_accumulation_steps", 1) or 1))
        accelerator = getattr(trainer, "accelerator", None)
        pending: list = [None]

        def training_step(*args, **kwargs):
            loss = original(*args, **kwargs)
            if not isinstance(loss, torch.Tensor):
                return loss
            if accumulation == 1:
                # Every call is a whole optimizer step: read the loss right away, without accelerate's
                # sync_gradients property (several microseconds per call, measured in bench/).
                value = loss.item() if loss.numel() == 1 else float(loss.detach().sum())
                if not math.isfinite(value):
                    self._diverged(trainer.state.global_step + 1, value)
                return loss
            part = loss.detach() if loss.requires_grad else loss
            if part.numel() != 1:
                part = part.sum()
            pending[0] = part if pending[0] is None else pending[0] + part
            if accelerator is None or accelerator.sync_gradients:  # the last micro-batch of the step
                total = pending[0].item()
                pending[0] = None
                if not math.isfinite(total):
                    self._diverged(trainer.state.global_step + 1, total)
            return loss

        training_step._kubetune_guarded = True  # type: ignore[attr-defined]
        trainer.training_step = training_step

    def _diverged(self, step: int, value: float) -> None:
        self._child("kubetune_train_nonfinite_loss_total").inc()
        self._set("kubetune_train_loss", value)
        last = f"; last logged loss {self._loss:.4g}" if self._loss is not None else ""
        self._loss = value
        self._write({"event": "nonfinite_loss", "step": step, "loss": value})
        kind = "NaN" if math.isnan(value) else "infinite"
        err = DivergedError(
            f"training loss became {kind} at step {step}{last}. Lower spec.training.learningRate, keep "
            f"spec.training.maxGradNorm > 0, or use precision bf16 instead of fp16; resuming the same config "
            f"would diverge again")
        err.step = step  # type: ignore[attr-defined]
        raise err

    # Called by MonitorCallback -------------------------------------------------------------
    def _on_train_begin(self, state) -> None:
        self._training = True
        self._step = state.global_step
        if state.max_steps and state.max_steps > 0 and not self._total:
            self.set_total_steps(state.max_steps)
        now = time.time()
        self._last_progress = now
        self._rate_points.clear()
        self._rate_points.append((now, state.global_step))
        self._tok_prev = self._tok_logged = getattr(state, "num_input_tokens_seen", 0) or 0
        self._t_prev = time.perf_counter()
        self._t_logged = now
        self._paused = True  # the first step includes compilation/warm-up: keep it out of tokens/s
        self._win_time, self._win_tokens = 0.0, 0
        # A resumed run: rebuild early-stopping counters and the latest values from the restored log history.
        for entry in getattr(state, "log_history", None) or []:
            if "loss" in entry:
                self._loss = _finite(entry["loss"])
            if "eval_loss" in entry and _finite(entry["eval_loss"]) is not None:
                self._eval_loss = float(entry["eval_loss"])
                self._perplexity_value = _perplexity(self._eval_loss)
                self._early_stopping_update(self._eval_loss)
        self._write({"event": "train_begin", "step": state.global_step, "total_steps": self._total})

    def _on_log(self, state, logs: dict) -> None:
        now = time.time()
        values: dict[str, Any] = {}
        for key, raw in logs.items():
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                continue
            values[key] = raw
            name = self._log_map.get(key)
            if name is not None:
                self._set(name, float(raw))
        if "loss" in values:
            self._loss = float(values["loss"])
        if "learning_rate" in values:
            self._lr = float(values["learning_rate"])
        if state.epoch is not None:
            self._epoch = float(state.epoch)
        is_eval = any(k.startswith("eval_") for k in values)
        if "eval_loss" in values:
            self._eval_loss = float(values["eval_loss"])
            self._perplexity_value = _perplexity(self._eval_loss)
            self._set("kubetune_eval_perplexity", self._perplexity_value)
            values["perplexity"] = self._perplexity_value
        summary = "train_loss" in values  # the end-of-training summary HF logs once
        if not is_eval and not summary:
            self._log_throughput(state, values, now)
        self._rate_points.append((now, state.global_step))
        eta = self._eta()
        if eta is not None:
            self._set("kubetune_train_eta_seconds", eta)
        event = "eval" if is_eval else ("summary" if summary else "train")
        self._write({"event": event, "step": state.global_step, "epoch": self._epoch, **values})

    def _log_throughput(self, state, values: dict, now: float) -> None:
        seen = getattr(state, "num_input_tokens_seen", 0) or 0
        if seen > self._tok_logged:
            self._child("kubetune_train_tokens_total").inc(seen - self._tok_logged)
            self._tok_logged = seen
            if self._win_time > 0 and self._win_tokens > 0:
                self._tps = self._win_tokens / self._win_time
        elif "num_tokens" in values:
            # TRL trainers count tokens themselves when include_num_input_tokens_seen is off: wall-clock rate.
            n = values["num_tokens"]
            if self._num_tokens_logged is not None and n > self._num_tokens_logged and self._t_logged:
                self._child("kubetune_train_tokens_total").inc(n - self._num_tokens_logged)
                self._tps = (n - self._num_tokens_logged) / max(now - self._t_logged, 1e-9)
            self._num_tokens_logged = n
        self._win_time, self._win_tokens = 0.0, 0
        self._t_logged = now
        if self._tps is not None:
            self._set("kubetune_train_tokens_per_second", self._tps)
            values["tokens_per_second"] = self._tps

    def _on_evaluate(self, state, control, metrics: dict | None) -> None:
        self._paused = True
        loss = _finite((metrics or {}).get("eval_loss"))
        if loss is None or not self._training:
            return  # the runner's final evaluation after training does not count towards early stopping
        if self._early_stopping_update(loss) and not control.should_training_stop:
            control.should_training_stop = True
            self.early_stopped = True
            self._stop_message = (
                f"stopped early at step {state.global_step}: eval loss did not improve by more than "
                f"{self._min_delta:g} for {self._patience} evaluations (best {self._best_eval:.4f})")
            log.info("%s", self._stop_message)
            self._write({"event": "early_stop", "step": state.global_step, "best_eval_loss": self._best_eval,
                         "patience": self._patience})

    def _early_stopping_update(self, loss: float) -> bool:
        """Count evaluations without improvement; True once patience is used up."""
        if self._patience is None:
            return False
        if self._best_eval is None or loss < self._best_eval - self._min_delta:
            self._best_eval, self._bad_evals = loss, 0
        else:
            self._bad_evals += 1
        return self._bad_evals >= self._patience

    def _on_train_end(self, state) -> None:
        self._training = False
        self._step = state.global_step
        if self.early_stopped:
            # The plan is over: the steps reached are the steps planned. This also keeps the final evaluation,
            # forgetting check and uploads that follow from looking like a stalled run (KubetuneTrainingStalled
            # ignores runs with step >= total).
            self.set_total_steps(state.global_step)

    # ------------------------------------------------------------------ the runner's calls
    def set_total_steps(self, n: int) -> None:
        self._total = int(n)
        self._set("kubetune_train_total_steps", self._total)

    def record_reference(self, when: str, perplexity: float) -> None:
        """Reference-set perplexity before or after training (the forgetting check)."""
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}")
        self._reference[when] = float(perplexity)
        self._families["kubetune_reference_perplexity"].labels(**self.const_labels, when=when).set(perplexity)
        change = self._relative_change()
        if change is not None:
            self._set("kubetune_forgetting_relative_change", change)
        self._write({"event": "reference", "step": self._step, "when": when, "perplexity": float(perplexity),
                     **({"relative_change": change} if change is not None else {})})

    def _relative_change(self) -> Optional[float]:
        before, after = self._reference.get("before"), self._reference.get("after")
        if before is None or after is None or not before > 0:
            return None
        return after / before - 1.0

    def record_checkpoint(self, uri: str) -> None:
        """A complete checkpoint was published (its COMPLETE marker written)."""
        now = time.time()
        self._last_checkpoint = uri
        self._child("kubetune_checkpoints_saved_total").inc()
        self._set("kubetune_checkpoint_last_timestamp_seconds", now)
        self._write({"event": "checkpoint", "step": self._step, "uri": uri})

    def _eta(self) -> Optional[int]:
        if not self._total or not self._rate_points:
            return None
        t0, s0 = self._rate_points[0]
        t1, s1 = self._rate_points[-1]
        if self._step > s1:  # steps since the last log event count too
            t1, s1 = self._last_progress, self._step
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0, int(round((self._total - s1) * (t1 - t0) / (s1 - s0))))

    def report(self, state: str = "running", error: TrainerError | None = None, artifacts=None,
               forgetting=None) -> TrainerReport:
        """The run as the operator sees it: served on /progress while running, the termination message at the end."""
        total = self._total
        step = self._step
        if total:
            summary = f"{step}/{total} ({int(100 * min(step, total) / total)}%)"
        else:
            summary = str(step)
        progress = Progress(
            step=step, total_steps=total, summary=summary, epoch=self._epoch, loss=_finite(self._loss),
            eval_loss=_finite(self._eval_loss), perplexity=_finite(self._perplexity_value), learning_rate=self._lr,
            tokens_per_second=_finite(self._tps), eta_seconds=self._eta() if state == "running" else None,
            last_progress_time=_rfc3339(self._last_progress),
        )
        if forgetting is None and "before" in self._reference:
            change = self._relative_change()
            threshold = self._forgetting_threshold
            forgetting = Forgetting(
                reference_perplexity_before=self._reference["before"],
                reference_perplexity_after=self._reference.get("after"), relative_change=change,
                threshold=threshold,
                exceeded=(change > threshold) if change is not None and threshold is not None else None)
        elif isinstance(forgetting, dict):
            forgetting = Forgetting.model_validate(forgetting)
        if isinstance(artifacts, dict):
            artifacts = Artifacts.model_validate(artifacts)
        if self._last_checkpoint and artifacts is None:
            artifacts = Artifacts(latest_checkpoint=self._last_checkpoint)
        fields: dict[str, Any] = {}
        if error is not None:
            fields = {"reason": error.reason, "message": error.message, "field": error.field,
                      "exit_code": error.exit_code}
        elif state == "succeeded":
            fields = {"exit_code": 0, "message": self._stop_message}
        return TrainerReport(state=state, progress=progress, forgetting=forgetting, artifacts=artifacts, **fields)

    def finish(self, report: TrainerReport) -> None:
        """Write the termination message (env KUBETUNE_TERMINATION_LOG), then stop serving."""
        if not self.reporting or self._final is not None:
            return  # other ranks report nothing; a second finish() must not append another "finish" event
        self._final = report
        path = os.environ.get(ENV_TERMINATION_LOG)
        if path:
            try:
                Path(path).write_text(report.to_termination_message())
            except OSError as exc:
                log.warning("cannot write the termination message to %s: %s", path, exc)
        self._write({"event": "finish", "step": self._step, "state": report.state,
                     **({"reason": report.reason} if report.reason else {})})
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._server is not None:
            self._wait_for_final_scrape()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------ metrics.jsonl
    def _write(self, record: dict) -> None:
        if not self.reporting:
            return
        if self._jsonl is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.metrics_path, "a", buffering=1)  # line-buffered: readable while running
        record = {"time": round(time.time(), 3), **{k: _json_value(v) for k, v in record.items() if v is not None}}
        self._jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")


def _make_handler(monitor: RunMonitor):
    class Handler(BaseHTTPRequestHandler):
        server_version = "kubetune-trainer"

        def do_GET(self):  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(monitor.registry)
                monitor._note_scrape()
            elif path == "/progress":
                report = monitor._final or monitor.report("running")
                body, content_type = json.dumps(report.to_k8s()).encode(), "application/json"
            elif path == "/healthz":
                body, content_type = b"ok\n", "text/plain; charset=utf-8"
            else:
                self.send_error(404, "try /metrics, /progress or /healthz")
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 - scrapes every few seconds would flood the pod log
            pass

    return Handler
