"""The operator's Prometheus metrics: exactly the catalog's, per-job series follow the status and go away with
the FineTuneJob, served over HTTP."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kubetune_api.constants import Phase
from kubetune_api.metrics_catalog import OPERATOR_METRICS
from kubetune_operator.metrics import OperatorMetrics
from tests.unit.operator.builders import NS, ftj


def value(m: OperatorMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def families(m: OperatorMetrics) -> dict:
    return {f.name: f for f in m.registry.collect()}


def test_registers_exactly_the_catalog():
    m = OperatorMetrics(CollectorRegistry())
    fams = families(m)
    for d in OPERATOR_METRICS:
        base = d.name[: -len("_total")] if d.type == "counter" else d.name
        assert base in fams, d.name
        assert fams[base].type == d.type
        assert fams[base].documentation == d.help
    assert len(fams) == len(OPERATOR_METRICS)


def test_per_job_series_follow_the_status_and_are_removed_on_delete():
    m = OperatorMetrics(CollectorRegistry())
    body = ftj(evaluation={"reference": [{"uri": "s3://ref/wiki.jsonl"}], "forgettingThreshold": 0.2},
               status={"phase": Phase.RUNNING, "progress": {"step": 15, "totalSteps": 60, "loss": 1.5,
                                                            "evalLoss": 1.7, "perplexity": 5.47}})
    m.observe_job(body)
    m.observe_job(ftj("other", uid="x", status={"phase": Phase.FAILED}))
    job = {"namespace": NS, "finetunejob": "demo"}
    assert value(m, "kubetune_job_phase", **job, phase="Running") == 1
    assert value(m, "kubetune_job_phase", **job, phase="Pending") == 0
    assert value(m, "kubetune_job_train_loss", **job) == 1.5
    assert value(m, "kubetune_job_eval_loss", **job) == 1.7
    assert value(m, "kubetune_job_eval_perplexity", **job) == 5.47
    assert value(m, "kubetune_job_progress_ratio", **job) == 0.25
    assert value(m, "kubetune_job_forgetting_threshold", **job) == 0.2
    assert value(m, "kubetune_operator_jobs", phase="Running") == 1
    assert value(m, "kubetune_operator_jobs", phase="Failed") == 1
    # finished: last values stay, forgetting result appears
    body["status"] = {"phase": Phase.SUCCEEDED, "progress": {"step": 60, "totalSteps": 60, "loss": 1.2},
                      "forgetting": {"relativeChange": 0.05}}
    m.observe_job(body)
    assert value(m, "kubetune_job_phase", **job, phase="Succeeded") == 1
    assert value(m, "kubetune_job_phase", **job, phase="Running") == 0
    assert value(m, "kubetune_job_train_loss", **job) == 1.2
    assert value(m, "kubetune_job_eval_perplexity", **job) == 5.47, "last-known value kept"
    assert value(m, "kubetune_job_forgetting_relative_change", **job) == 0.05
    assert value(m, "kubetune_operator_jobs", phase="Running") == 0
    m.forget_job(NS, "demo")
    for name in ("kubetune_job_train_loss", "kubetune_job_progress_ratio", "kubetune_job_forgetting_threshold",
                 "kubetune_job_forgetting_relative_change"):
        assert value(m, name, **job) is None, name
    for phase in Phase.ALL:
        assert value(m, "kubetune_job_phase", **job, phase=phase) is None
    assert value(m, "kubetune_job_phase", namespace=NS, finetunejob="other", phase="Failed") == 1
    assert value(m, "kubetune_operator_jobs", phase="Succeeded") == 0
    m.forget_job(NS, "never-seen")  # harmless


def test_jobs_per_phase_stay_equal_to_a_recount_through_transitions_deletes_and_standby():
    """kubetune_operator_jobs moves by one per event instead of recounting every job (O(N) per watch event):
    after any sequence it still equals a count over the jobs' last phases."""
    import random

    rng = random.Random(7)
    m = OperatorMetrics(CollectorRegistry())
    last: dict[str, str] = {}
    for _ in range(400):
        name = f"j{rng.randrange(12)}"
        if rng.random() < 0.2:
            m.forget_job(NS, name)
            last.pop(name, None)
        else:
            phase = rng.choice(Phase.ALL)
            m.observe_job(ftj(name, uid=name, status={"phase": phase}))
            last[name] = phase
        for phase in Phase.ALL:
            assert value(m, "kubetune_operator_jobs", phase=phase) == list(last.values()).count(phase), phase
    m.forget_all_jobs()
    assert all(value(m, "kubetune_operator_jobs", phase=p) == 0 for p in Phase.ALL)
    assert m.jobs() == []


def test_fleet_counters():
    m = OperatorMetrics(CollectorRegistry())
    m.transition("Running", "Failed")
    m.transition(None, "Pending")
    m.finished("sft", "failed", 5400)
    m.reconcile_error("reconcile")
    assert value(m, "kubetune_operator_phase_transitions_total", from_phase="Running", to_phase="Failed") == 1
    assert value(m, "kubetune_operator_phase_transitions_total", from_phase="", to_phase="Pending") == 1
    assert value(m, "kubetune_operator_job_duration_seconds_count", stage="sft", result="failed") == 1
    assert value(m, "kubetune_operator_job_duration_seconds_bucket", stage="sft", result="failed", le="7200.0") == 1
    assert value(m, "kubetune_operator_reconcile_errors_total", handler="reconcile") == 1


def test_serves_metrics_over_http():
    m = OperatorMetrics(CollectorRegistry())
    port = m.serve("127.0.0.1", 0)  # an ephemeral port: 18080 may be taken by an e2e operator on this machine
    try:
        m.observe_job(ftj(status={"phase": Phase.RUNNING}))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert "kubetune_job_phase" in names and "kubetune_operator_jobs" in names
        assert not [n for n in names if n.endswith("_created")], "no *_created series outside the catalog"
    finally:
        m.shutdown()


def test_every_counted_handler_is_exported_from_the_start():
    import re
    from pathlib import Path

    from prometheus_client import generate_latest

    from kubetune_operator import handlers, progress
    from kubetune_operator.metrics import RECONCILE_HANDLERS, OperatorMetrics

    names = set(re.findall(r'_counted\("([\w-]+)"\)', Path(handlers.__file__).read_text()))
    names |= set(re.findall(r'reconcile_error\("([\w-]+)"\)', Path(progress.__file__).read_text()))
    assert names and names <= set(RECONCILE_HANDLERS), names - set(RECONCILE_HANDLERS)
    text = generate_latest(OperatorMetrics().registry).decode()
    for handler in RECONCILE_HANDLERS:
        assert f'kubetune_operator_reconcile_errors_total{{handler="{handler}"}} 0.0' in text


def test_per_job_headline_series_follow_each_stages_status():
    """A dpo job exports its reward accuracy and margin, a grpo job its mean reward and KL; neither a
    perplexity (the trainer reports none for them), and both series go with the FineTuneJob."""
    m = OperatorMetrics(CollectorRegistry())
    m.observe_job(ftj("pref", uid="p", status={"phase": Phase.RUNNING, "progress": {
        "step": 5, "totalSteps": 10, "evalLoss": 0.4, "rewardAccuracy": 0.8, "rewardMargin": 1.5,
        "metric": "acc 0.80 margin 1.5"}}))
    m.observe_job(ftj("rl", uid="r", status={"phase": Phase.RUNNING, "progress": {
        "step": 5, "totalSteps": 10, "meanReward": 0.42, "kl": 0.013, "metric": "reward 0.42 kl 0.013"}}))
    pref, rl = {"namespace": NS, "finetunejob": "pref"}, {"namespace": NS, "finetunejob": "rl"}
    assert value(m, "kubetune_job_reward_accuracy", **pref) == 0.8
    assert value(m, "kubetune_job_reward_margin", **pref) == 1.5
    assert value(m, "kubetune_job_mean_reward", **rl) == 0.42
    assert value(m, "kubetune_job_policy_kl", **rl) == 0.013
    for job in (pref, rl):
        assert value(m, "kubetune_job_eval_perplexity", **job) is None
    assert value(m, "kubetune_job_mean_reward", **pref) is None
    m.forget_job(NS, "pref")
    m.forget_job(NS, "rl")
    for name in ("kubetune_job_reward_accuracy", "kubetune_job_reward_margin"):
        assert value(m, name, **pref) is None, name
    for name in ("kubetune_job_mean_reward", "kubetune_job_policy_kl"):
        assert value(m, name, **rl) is None, name


def test_garbage_collector_time_is_counted_by_generation_once_tracked():
    import gc

    m = OperatorMetrics(CollectorRegistry())
    assert value(m, "kubetune_operator_gc_seconds_total", generation="2") == 0.0, "exported from the start"

    def cycles(n: int = 20000) -> None:
        for _ in range(n):
            a: list = []
            a.append(a)  # only the collector frees these

    gc.collect()
    cycles()
    gc.collect()
    assert value(m, "kubetune_operator_gc_seconds_total", generation="2") == 0.0, "nothing counted before track_gc"
    m.track_gc()
    try:
        cycles()
        gc.collect()  # a full collection, freeing 20,000 cycles: measurable CPU time
        full = value(m, "kubetune_operator_gc_seconds_total", generation="2")
        assert full > 0.0
        assert [value(m, "kubetune_operator_gc_seconds_total", generation=g) for g in ("0", "1", "2")] \
            == m.gc.seconds
    finally:
        m.shutdown()
    assert m.gc.on_gc not in gc.callbacks, "shutdown removes the callback"
    gc.collect()
    assert value(m, "kubetune_operator_gc_seconds_total", generation="2") == full
