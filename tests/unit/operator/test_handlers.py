"""The kopf wiring: which handlers exist, that nothing puts a finalizer on FineTuneJobs, kopf settings, the
command line and environment, and that the operator never imports the training stack."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import kopf
import pytest

from kubetune_api import constants as C
from kubetune_operator import handlers as H
from kubetune_operator.__main__ import parse_args, plan
from kubetune_operator.reconciler import Result
from kubetune_operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[3]


def test_importing_the_operator_does_not_import_torch():
    code = ("import sys, kubetune_operator.handlers, kubetune_operator.__main__; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def _handlers():
    return kopf.get_default_registry()  # importing kubetune_operator.handlers registered them there


def test_no_handler_puts_a_finalizer_on_finetunejobs():
    registry = _handlers()
    assert registry._spawning.get_all_handlers() == [], "kopf timers/daemons always add a finalizer"
    changing = registry._changing.get_all_handlers()
    assert not [h.id for h in changing if h.requires_finalizer], "deletion must never wait for the operator"


def test_expected_handlers():
    registry = _handlers()
    ftj_changing = [h.id for h in registry._changing.get_all_handlers() if h.selector.any_name == C.PLURAL]
    assert ftj_changing == [], "FineTuneJobs are level-based: no diff-base, no kopf annotation PATCH per change"
    watching = {h.id for h in registry._watching.get_all_handlers()}
    assert {"finetunejob_event", "trainer_job_event", "trainer_jobset_event", "trainer_pod_event"} <= watching
    indexing = {h.id for h in registry._indexing.get_all_handlers()}
    assert indexing == {"finetunejobs", "trainer_jobs", "trainer_pods"}
    for h in registry._watching.get_all_handlers():
        if h.id.startswith("trainer_"):
            assert h.labels[C.Label.MANAGED_BY] == C.Label.MANAGED_BY_VALUE


def test_configure_kopf():
    settings = kopf.OperatorSettings()
    H.configure_kopf(settings, OperatorSettings())
    assert settings.persistence.progress_storage.prefix == H.ANNOTATION_PREFIX
    assert settings.persistence.diffbase_storage.prefix == H.ANNOTATION_PREFIX
    assert settings.posting.loggers is False and settings.posting.level == logging.INFO
    selectors = dict(settings.watching.label_selectors.items())
    assert sorted(selectors.values()) == [H.CHILD_SELECTOR] * 3
    assert settings.watching.server_timeout and settings.watching.client_timeout > settings.watching.server_timeout


class _Reconciler:
    """Answers reconcile() from a script: a Result, or an exception to raise."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    async def reconcile(self, namespace, name, **kwargs):
        self.calls.append((namespace, name))
        answer = self.answers.pop(0) if self.answers else Result("ok")
        if isinstance(answer, BaseException):
            raise answer
        return answer


class _Gate:
    def __init__(self, active=True):
        self.is_active = active

    async def active(self):
        return self.is_active


def _memo(reconciler, gate=None):
    from prometheus_client import CollectorRegistry
    from kubetune_operator.metrics import OperatorMetrics

    memo = kopf.Memo(reconciler=reconciler, metrics=OperatorMetrics(CollectorRegistry()))
    memo.retries = H.Retries(memo, gate or _Gate())
    return memo


def _errors(memo) -> float:
    return memo.metrics.registry.get_sample_value("kubetune_operator_reconcile_errors_total",
                                                  {"handler": "reconcile"})


def test_a_conflict_or_a_wait_comes_back_by_itself_an_invalid_spec_does_not():
    async def scenario():
        rec = _Reconciler(Result("conflict", message="taken", delay=0.05), Result("ok"))
        memo = _memo(rec)
        assert (await H.drive(memo, "ns", "a")).state == "conflict"
        assert memo.retries.pending() == [("ns", "a")]
        await asyncio.sleep(0.2)
        assert rec.calls == [("ns", "a")] * 2 and memo.retries.pending() == []

        rec = _Reconciler(Result("invalid", message="spec.stage: unknown"))
        memo = _memo(rec)
        await H.drive(memo, "ns", "b")
        await asyncio.sleep(0.1)
        assert rec.calls == [("ns", "b")] and memo.retries.pending() == [], "invalid: final until the spec changes"
    asyncio.run(scenario())


def test_a_reconcile_that_raised_is_retried_counted_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(H, "RETRY_BACKOFF", 0.05)

    async def scenario():
        rec = _Reconciler(RuntimeError("boom"), RuntimeError("boom again"), Result("ok"))
        memo = _memo(rec)
        with pytest.raises(RuntimeError):  # kopf logs and counts the handler's own failure
            await H.drive(memo, "ns", "a")
        await asyncio.sleep(0.3)
        assert len(rec.calls) == 3, rec.calls
        assert _errors(memo) == 1, "the retry's failure is counted (the handler's own by @_counted)"
        assert "retry of ns/a failed" in caplog.text
    asyncio.run(scenario())


def test_retries_keep_the_earliest_and_stop_on_delete_and_on_standby():
    async def scenario():
        rec = _Reconciler()
        memo = _memo(rec)
        memo.retries.later("ns", "a", 0.05)
        memo.retries.later("ns", "a", 10)  # later than the pending one: ignored
        memo.retries.later("ns", "b", 0.05)
        memo.retries.cancel("ns", "b")  # the job was deleted
        await asyncio.sleep(0.2)
        assert rec.calls == [("ns", "a")]

        standby = _memo(rec, gate=_Gate(active=False))
        standby.retries.later("ns", "c", 0.01)
        await asyncio.sleep(0.1)
        assert rec.calls == [("ns", "a")], "a standby replica leaves the jobs to the active one"
        memo.retries.later("ns", "d", 10)
        memo.retries.close()
        assert memo.retries.pending() == []
    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ CLI / env
def test_cli_standalone_with_namespaces():
    p = plan(parse_args(["--standalone", "--namespace", "a", "--namespace=b"]), env={})
    kw = p["kwargs"]
    assert kw["standalone"] is True and kw["peering_name"] is None
    assert kw["namespaces"] == ["a", "b"] and kw["clusterwide"] is False
    assert kw["liveness_endpoint"] is None
    assert p["memo"]["settings"].watch_namespaces == ("a", "b")
    assert p["memo"]["peering"]["standalone"] is True


def test_env_as_the_helm_chart_sets_it():
    env = {"KUBETUNE_PEERING_NAME": "kubetune", "KUBETUNE_WATCH_NAMESPACES": "", "KUBETUNE_HEALTH_PORT": "8081",
           "KUBETUNE_METRICS_PORT": "8080", "KUBETUNE_TRAINER_IMAGE": "ghcr.io/kubetune/trainer:1.2.3",
           "KUBETUNE_TRAINER_RESOURCES": '{"requests":{"cpu":"4","memory":"32Gi"},"limits":{"memory":"32Gi"}}',
           "KUBETUNE_DEFAULT_CREDENTIALS_SECRET": "kubetune-s3-credentials", "POD_ID": "kubetune-abc"}
    p = plan(parse_args([]), env=env)
    kw = p["kwargs"]
    assert kw["standalone"] is None and kw["peering_name"] == "kubetune"
    assert kw["clusterwide"] is True and kw["namespaces"] == []
    assert kw["liveness_endpoint"] == "http://0.0.0.0:8081/healthz"
    assert isinstance(kw["priority"], int) and kw["priority"] > 0, "random: replicas must not tie"
    s = p["memo"]["settings"]
    assert s.trainer_image == "ghcr.io/kubetune/trainer:1.2.3"
    assert s.trainer_resources["limits"] == {"memory": "32Gi"}
    assert p["memo"]["peering"] == {"standalone": False, "name": "kubetune", "priority": kw["priority"],
                                    "mandatory": True}
    assert plan(parse_args(["--priority", "7"]), env=env)["kwargs"]["priority"] == 7


def test_liveness_flag_and_defaults():
    p = plan(parse_args(["--standalone", "--liveness", "http://0.0.0.0:9999/healthz"]), env={})
    assert p["kwargs"]["liveness_endpoint"] == "http://0.0.0.0:9999/healthz"
    s = p["memo"]["settings"]
    assert s.metrics_port == 8080 and s.progress_interval_seconds == 15 and s.progress_timeout_seconds == 2
    assert s.progress_max_concurrency == 32 and s.trainer_termination_grace_seconds == 300
    assert s.trainer_metrics_port == C.DEFAULT_METRICS_PORT and s.trainer_image == "ghcr.io/kubetune/trainer:0.1.0"


def test_e2e_fixture_environment():
    env = {"KUBETUNE_S3_ENDPOINT": "http://127.0.0.1:9000", "KUBETUNE_METRICS_PORT": "18080",
           "KUBETUNE_METRICS_HOST": "127.0.0.1", "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "2",
           "KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS": "30"}
    s = OperatorSettings.from_env(env)
    assert (s.s3_endpoint, s.metrics_port, s.metrics_host, s.progress_interval_seconds,
            s.trainer_termination_grace_seconds) == ("http://127.0.0.1:9000", 18080, "127.0.0.1", 2.0, 30)


@pytest.mark.parametrize("env,var", [({"KUBETUNE_METRICS_PORT": "http"}, "KUBETUNE_METRICS_PORT"),
                                     ({"KUBETUNE_TRAINER_RESOURCES": "{cpu"}, "KUBETUNE_TRAINER_RESOURCES"),
                                     ({"KUBETUNE_TRAINER_RESOURCES": '{"request": {}}'}, "KUBETUNE_TRAINER_RESOURCES"),
                                     ({"KUBETUNE_TRAINER_IMAGE_PULL_POLICY": "Sometimes"},
                                      "KUBETUNE_TRAINER_IMAGE_PULL_POLICY")])
def test_bad_settings_name_the_variable(env, var):
    with pytest.raises(ValueError, match=var):
        OperatorSettings.from_env(env)


def test_cli_rejects_contradictions():
    with pytest.raises(SystemExit):
        parse_args(["--standalone", "--peering", "x"])
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "x"])
