"""A run's story across its pods: every attempt (a pod that trained part of the run) and every metric it logged,
carried inside the run's checkpoints, so that a restarted run publishes one metrics.jsonl, one curve and one
wall time for the whole run, not only for its last pod.

    history = RunHistory(monitor, started=started, pod=os.environ.get("POD_NAME"))
    callbacks = [monitor.callback(), history.callback(), sync]   # before CheckpointSync: it uploads the folder
    if resumed_from_this_runs_checkpoint:
        history.restore(resume_dir, step)                         # metrics up to `step`, earlier attempts
    ...
    record.attempts = history.attempts(step=..., now=time.time())

At every checkpoint save (rank 0, before the folder is uploaded) two files go into the checkpoint folder:
`kubetune-metrics.jsonl` (this run's metrics.jsonl so far, which starts with what earlier attempts logged) and
`kubetune-attempts.json` (the earlier attempts and this one up to this save). A pod that resumes from that
checkpoint puts those metrics in front of its own (nothing logged after the checkpoint, so no step appears
twice: the steps a killed pod trained past its last checkpoint are trained, and logged, again) and continues
the list of attempts. An attempt's wall time runs from its pod's start to its last checkpoint (a pod stopped by
SIGTERM saves one as it stops; time a SIGKILLed pod spent after its last checkpoint is not counted).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("kubetune.attempts")

METRICS_FILE = "kubetune-metrics.jsonl"
ATTEMPTS_FILE = "kubetune-attempts.json"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def metrics_until(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl snapshot whose step is at most `step` (events without a step are kept;
    unparseable lines, a write cut short, are dropped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        s = record.get("step")
        if isinstance(s, (int, float)) and s > step:
            continue
        out.append(line)
    return out


class RunHistory:
    """The attempts of this run and the metrics they logged (see the module docstring)."""

    def __init__(self, monitor: Any, *, started: float, pod: Optional[str] = None, is_main: bool = True):
        self.monitor = monitor
        self.started = started
        self.pod = pod or "local"
        self.is_main = is_main
        self.earlier: list[dict] = []
        self.from_step = 0

    # ------------------------------------------------------------------ this attempt
    def current(self, step: int, now: float) -> dict:
        return {"pod": self.pod, "startedAt": _rfc3339(self.started), "fromStep": self.from_step, "toStep": int(step),
                "wallSeconds": round(max(0.0, now - self.started), 3)}

    def attempts(self, step: int, now: Optional[float] = None) -> list[dict]:
        """Every attempt of the run, this one last (up to `step`, now)."""
        return [*self.earlier, self.current(step, time.time() if now is None else now)]

    @staticmethod
    def wall_seconds(attempts: list[dict]) -> float:
        return round(sum(float(a.get("wallSeconds") or 0) for a in attempts), 3)

    # ------------------------------------------------------------------ checkpoints
    def save(self, checkpoint_dir: Path, step: int) -> None:
        """Write the run's metrics so far and the attempts into a local checkpoint folder (rank 0)."""
        if not self.is_main or not Path(checkpoint_dir).is_dir():
            return
        metrics = Path(self.monitor.metrics_path)
        if metrics.exists():
            shutil.copyfile(metrics, Path(checkpoint_dir) / METRICS_FILE)
        (Path(checkpoint_dir) / ATTEMPTS_FILE).write_text(
            json.dumps({"attempts": self.attempts(step)}, indent=1) + "\n")

    def restore(self, checkpoint_dir: Path, step: int) -> None:
        """This pod resumes the run from `checkpoint_dir` (at `step`): earlier attempts and their metrics first."""
        self.from_step = int(step)
        checkpoint_dir = Path(checkpoint_dir)
        try:
            data = json.loads((checkpoint_dir / ATTEMPTS_FILE).read_text())
            self.earlier = [a for a in data.get("attempts") or [] if isinstance(a, dict)]
        except (OSError, ValueError, AttributeError):
            self.earlier = []  # a checkpoint from a trainer without run history: this attempt stands alone
        if self.is_main and (checkpoint_dir / METRICS_FILE).is_file():
            lines = metrics_until(checkpoint_dir / METRICS_FILE, step)
            lines.append(json.dumps({"time": round(time.time(), 3), "event": "resumed", "step": int(step),
                                     "attempt": len(self.earlier) + 1, "pod": self.pod}, separators=(",", ":")))
            self.monitor.prepend_metrics(lines)
        log.info("resuming at step %d: attempt %d of this run (%.0f s in earlier attempts)", step,
                 len(self.earlier) + 1, self.wall_seconds(self.earlier))

    def callback(self):
        from transformers import TrainerCallback

        history = self

        class RunHistoryCallback(TrainerCallback):
            """Puts the run's history into each checkpoint folder before CheckpointSync uploads it."""

            def on_save(self, args, state, control, **kwargs):
                history.save(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
                return control

        return RunHistoryCallback()
