"""RunMonitor: what a running trainer tells the world, from one object the runner owns. It keeps the run's
state from the trainer's events and hands it to the exporter (Prometheus), the progress server (/progress),
metrics.jsonl and the final TrainerReport; the stop decisions it wires in live in kubetune_trainer.control.

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

import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from kubetune_api.constants import DEFAULT_METRICS_PORT
from kubetune_api.finetunejob import Artifacts, FineTuneJob, Forgetting, Progress
from kubetune_api.metrics_catalog import JOB_LABEL
from kubetune_api.report import TrainerReport

from ..control.early_stopping import EarlyStopping
from ..control.nan_guard import diverged_error, install_nan_guard
from ..errors import TrainerError
from .eta import EtaEstimator
from .exporter import TrainerExporter
from .headline import Headline
from .jsonl import MetricsLog
from .server import ProgressServer

log = logging.getLogger("kubetune.monitoring")

ENV_HOST = "KUBETUNE_METRICS_HOST"
ENV_PORT = "KUBETUNE_METRICS_PORT"
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        self._early_stopping = EarlyStopping.from_spec(spec)
        self._forgetting_threshold = spec.evaluation.forgetting_threshold if spec.evaluation else None

        # Run state, read by /progress and the scrape-time gauges (plain attributes: the GIL keeps reads whole).
        self._step = 0
        self._total: Optional[int] = None
        self._epoch: Optional[float] = None
        self._loss: Optional[float] = None
        self._eval_loss: Optional[float] = None
        # The stage's own figure (perplexity only for cpt/sft, reward accuracy, mean reward ...): headline.py.
        self._headline = Headline(str(spec.stage))
        self._lr: Optional[float] = None
        self._tps: Optional[float] = None
        self._last_progress = time.time()
        self._eta_estimator = EtaEstimator()
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
        self._stop_message: Optional[str] = None
        # forgetting
        self._reference: dict[str, float] = {}
        self._last_checkpoint: Optional[str] = None

        self.exporter = TrainerExporter(self.const_labels, step=lambda: self._step,
                                        last_progress=lambda: self._last_progress)
        self.registry = self.exporter.registry
        self._jsonl = MetricsLog(self.metrics_path)
        self._server: Optional[ProgressServer] = None
        self._final: Optional[TrainerReport] = None
        self._callback = None

    def _child(self, name: str):
        return self.exporter.child(name)

    def _set(self, name: str, value: float) -> None:
        self.exporter.set(name, value)

    # ------------------------------------------------------------------ HTTP server
    def start(self) -> None:
        """Serve /metrics, /progress and /healthz on host:port (port 0: ephemeral; `self.port` is the bound one)."""
        if not self.reporting or self._server is not None:
            return
        self._server = ProgressServer(self.host, self.port, self.registry, progress=self._progress,
                                      on_scrape=self.exporter.note_scrape)
        self._server.start()
        self.port = self._server.port

    def _progress(self) -> dict:
        return (self._final or self.report("running")).to_k8s()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ trainer integration
    def callback(self):
        """The TrainerCallback feeding this monitor (one instance; add it to the trainer's callbacks)."""
        if self._callback is None:
            from .callback import MonitorCallback

            self._callback = MonitorCallback(self)
        return self._callback

    def guard(self, trainer) -> None:
        """Fail the run at the step whose loss is NaN/inf (control.nan_guard), recording it here first."""
        install_nan_guard(trainer, self._diverged)

    def _diverged(self, step: int, value: float) -> None:
        self._child("kubetune_train_nonfinite_loss_total").inc()
        self._set("kubetune_train_loss", value)
        last = self._loss
        self._loss = value
        self._write({"event": "nonfinite_loss", "step": step, "loss": value})
        raise diverged_error(step, value, last)

    # Called by MonitorCallback -------------------------------------------------------------
    def _on_train_begin(self, state) -> None:
        self._training = True
        self._step = state.global_step
        if state.max_steps and state.max_steps > 0 and not self._total:
            self.set_total_steps(state.max_steps)
        now = time.time()
        self._last_progress = now
        self._eta_estimator.reset(now, state.global_step)
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
                self._early_stopping.update(self._eval_loss)
            self._headline.update(entry)
        self._write({"event": "train_begin", "step": state.global_step, "total_steps": self._total})

    def _on_log(self, state, logs: dict) -> None:
        now = time.time()
        values: dict[str, Any] = {}
        for key, raw in logs.items():
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                continue
            values[key] = raw
            name = self.exporter.log_map.get(key)
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
        changed = self._headline.update(values)
        if "perplexity" in changed:  # cpt/sft only: exp(eval_loss) of a preference loss is no perplexity
            self._set("kubetune_eval_perplexity", changed["perplexity"])
            values["perplexity"] = changed["perplexity"]
        summary = "train_loss" in values  # the end-of-training summary HF logs once
        if not is_eval and not summary:
            self._log_throughput(state, values, now)
        self._eta_estimator.add(now, state.global_step)
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
        es = self._early_stopping
        if es.update(loss) and not control.should_training_stop:
            control.should_training_stop = True
            self.early_stopped = True
            self._stop_message = es.message(state.global_step)
            log.info("%s", self._stop_message)
            self._write({"event": "early_stop", "step": state.global_step, "best_eval_loss": es.best,
                         "patience": es.patience})

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

    def count_reward_error(self, reward: str, n: int = 1) -> None:
        """n failed reward-function calls (rewards/failures.py calls this through its listener; n=0 when the
        reward is set up, so the series exists at 0 from the start)."""
        self.exporter.families["kubetune_reward_errors_total"].labels(**self.const_labels, reward=reward).inc(n)

    def record_reference(self, when: str, perplexity: float) -> None:
        """Reference-set perplexity before or after training (the forgetting check)."""
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}")
        self._reference[when] = float(perplexity)
        self.exporter.families["kubetune_reference_perplexity"].labels(**self.const_labels, when=when).set(perplexity)
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

    def headline(self) -> dict[str, float]:
        """The stage's headline values so far (perplexity, reward_accuracy, reward_margin, mean_reward, kl)."""
        return dict(self._headline.values)

    def _eta(self) -> Optional[int]:
        return self._eta_estimator.eta(self._total, self._step, self._last_progress)

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
            eval_loss=_finite(self._eval_loss), learning_rate=self._lr, metric=self._headline.summary(),
            **{name: _finite(v) for name, v in self._headline.values.items()},
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
        self._jsonl.close()
        if self._server is not None:
            self.exporter.wait_for_final_scrape()
            self._server.stop()
            self._server = None

    def prepend_metrics(self, lines: list[str]) -> None:
        """A resumed run: the metrics.jsonl lines earlier pods of the run logged go first (attempts.py)."""
        if self.reporting:
            self._jsonl.prepend(lines)

    def _write(self, record: dict) -> None:
        if self.reporting:
            self._jsonl.write(record)
