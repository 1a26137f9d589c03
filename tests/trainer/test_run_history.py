"""A run's story across pods (attempts.py), without training: what a checkpoint carries, what a resumed pod
puts in front of its own metrics, and the attempts' wall time. The whole path with real pods and SIGTERM is
test_checkpoint_resume.py::test_pod_entrypoint_sigterm_then_resume (and the e2e restarts test)."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_trainer.attempts import ATTEMPTS_FILE, METRICS_FILE, RunHistory, metrics_until
from kubetune_trainer.monitoring.jsonl import MetricsLog


class Monitor:
    """What RunHistory needs of a RunMonitor: the metrics file and prepend_metrics."""

    def __init__(self, path: Path):
        self.metrics_path = path
        self.log = MetricsLog(path)

    def prepend_metrics(self, lines):
        self.log.prepend(lines)


def steps(path: Path, event: str = "train") -> list[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == event]


def test_a_resumed_pod_continues_the_runs_metrics_and_attempts(tmp_path):
    # pod 1: steps 1..7, a checkpoint at 5, then killed at 7
    m1 = Monitor(tmp_path / "pod1" / "metrics.jsonl")
    h1 = RunHistory(m1, started=1000.0, pod="trainer-0-a")
    m1.log.write({"event": "eval", "step": 0, "eval_loss": 3.0})
    for s in range(1, 6):
        m1.log.write({"event": "train", "step": s, "loss": 5.0 - s / 10})
    ck = tmp_path / "pod1" / "checkpoint-5"
    ck.mkdir()
    h1.save(ck, 5)
    for s in range(6, 8):  # trained past the checkpoint: lost with the pod, trained again by pod 2
        m1.log.write({"event": "train", "step": s, "loss": 1.0})
    attempts = json.loads((ck / ATTEMPTS_FILE).read_text())["attempts"]
    assert [(a["pod"], a["fromStep"], a["toStep"]) for a in attempts] == [("trainer-0-a", 0, 5)]

    # pod 2 logged something before it resumed (its reference perplexity), then resumes from checkpoint-5
    m2 = Monitor(tmp_path / "pod2" / "metrics.jsonl")
    m2.log.write({"event": "reference", "step": 0, "when": "before", "perplexity": 9.0})
    h2 = RunHistory(m2, started=2000.0, pod="trainer-0-b")
    h2.restore(ck, 5)
    for s in range(6, 11):
        m2.log.write({"event": "train", "step": s, "loss": 0.5})
    m2.log.close()
    assert steps(m2.metrics_path) == list(range(1, 11)), "every step once, pod 1's first"
    assert steps(m2.metrics_path, "eval") == [0]
    resumed = [json.loads(x) for x in m2.metrics_path.read_text().splitlines() if '"resumed"' in x]
    assert [(r["step"], r["attempt"], r["pod"]) for r in resumed] == [(5, 2, "trainer-0-b")]

    everything = h2.attempts(10, now=2030.0)
    assert [(a["pod"], a["fromStep"], a["toStep"]) for a in everything] == [("trainer-0-a", 0, 5),
                                                                           ("trainer-0-b", 5, 10)]
    assert RunHistory.wall_seconds(everything) == everything[0]["wallSeconds"] + 30.0


def test_a_third_pod_sees_both_earlier_attempts(tmp_path):
    m = Monitor(tmp_path / "a" / "metrics.jsonl")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / ATTEMPTS_FILE).write_text(json.dumps({"attempts": [{"pod": "p1", "wallSeconds": 10, "fromStep": 0,
                                                               "toStep": 3}]}))
    (ck / METRICS_FILE).write_text("".join(json.dumps({"event": "train", "step": s}) + "\n" for s in (1, 2, 3)))
    h = RunHistory(m, started=500.0, pod="p2")
    h.restore(ck, 3)
    m.log.write({"event": "train", "step": 4})
    ck2 = tmp_path / "ck2"
    ck2.mkdir()
    h.save(ck2, 4)
    h3 = RunHistory(Monitor(tmp_path / "b" / "metrics.jsonl"), started=900.0, pod="p3")
    h3.restore(ck2, 4)
    assert [a["pod"] for a in h3.attempts(6, now=910.0)] == ["p1", "p2", "p3"]
    assert steps(h3.monitor.metrics_path) == [1, 2, 3, 4]


def test_a_checkpoint_without_history_resumes_alone(tmp_path):
    m = Monitor(tmp_path / "metrics.jsonl")
    ck = tmp_path / "ck"
    ck.mkdir()
    h = RunHistory(m, started=0.0)
    h.restore(ck, 8)
    assert [a["fromStep"] for a in h.attempts(10, now=5.0)] == [8]
    assert not m.metrics_path.exists()


def test_metrics_until_drops_later_steps_and_torn_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 6}\n{"event": "x"}\n{"step": 5, "event": "checkpoint"}\n{"st')
    assert [json.loads(x) for x in metrics_until(p, 5)] == [{"step": 1}, {"event": "x"},
                                                           {"step": 5, "event": "checkpoint"}]
