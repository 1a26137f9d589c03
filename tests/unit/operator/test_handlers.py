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
from kubetune_operator.__main__ import parse_args, plan, quiet_per_event_logs
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


def test_the_operator_process_never_imports_the_kubernetes_client():
    """Where the CLI's kubernetes package is installed too, the operator's entry point keeps it out (kopf would
    import its models, ~10 MB); the handlers still register and log in through credentials.py."""
    code = ("import sys; from kubetune_operator.__main__ import without_kubernetes_client; "
            "without_kubernetes_client(); import kopf, kubetune_operator.handlers; "
            "loaded = sorted(m for m, v in sys.modules.items() if m.startswith('kubernetes') and v is not None); "
            "assert not loaded, loaded[:5]; "
            "ids = [h.id for h in kopf.get_default_registry()._activities.get_all_handlers()]; "
            "assert any('login' in i for i in ids), ids; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


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


def test_only_pipelines_get_a_diff_base():
    """Only FineTunePipelines have change handlers: other kinds' watch events cost no deep copy; a pipeline's
    essence is kopf's own (spec, labels; no status)."""
    settings = kopf.OperatorSettings()
    H.configure_kopf(settings, OperatorSettings())
    storage = settings.persistence.diffbase_storage
    job = {"apiVersion": C.API_VERSION, "kind": C.KIND, "metadata": {"name": "a", "labels": {"x": "1"}},
           "spec": {"stage": "sft"}, "status": {"phase": "Running"}}
    assert storage.build(body=kopf.Body(job)) == {}
    pipeline = {**job, "kind": C.PIPELINE_KIND}
    assert storage.build(body=kopf.Body(pipeline)) == {"metadata": {"labels": {"x": "1"}}, "spec": {"stage": "sft"}}


def test_reconcile_results_become_retries():
    """What a queued run tells the queue: look again after the result's delay for a conflict or a wait, never for
    an invalid spec (final until the spec changes, which brings a watch event)."""
    class Rec:
        def __init__(self, result):
            self.result = result

        async def reconcile(self, namespace, name, **kwargs):
            assert kwargs == {"check_blocked": False}
            return self.result

    async def scenario():
        for result, delay in [(Result("conflict", message="taken", delay=30), 30),
                              (Result("waiting", message="old pods stopping"), H.WAITING_DELAY),
                              (Result("invalid", message="spec.stage: unknown"), None),
                              (Result("rejected", message="quota"), None), (Result("ok"), None)]:
            memo = kopf.Memo(reconciler=Rec(result))
            assert await H.reconcile_key(memo, "ns", "a", False) == delay, result
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


def test_kopf_per_event_success_lines_only_with_verbose():
    objects = logging.getLogger("kopf.objects")
    try:
        quiet_per_event_logs(parse_args([]))
        assert not objects.isEnabledFor(logging.INFO) and objects.isEnabledFor(logging.WARNING)
        quiet_per_event_logs(parse_args(["--verbose"]))
        assert objects.level == logging.NOTSET  # kopf's own verbose/debug levels decide
    finally:
        objects.setLevel(logging.NOTSET)


@pytest.mark.parametrize("value, frozen, threshold", [(None, True, 10000), ("3000", True, 3000), ("0", False, None)])
def test_the_operator_tunes_the_garbage_collector(value, frozen, threshold):
    """The startup objects are frozen and the youngest generation's threshold comes from KUBETUNE_GC_THRESHOLD
    (default 10000); 0 keeps Python's defaults. In a child process: freezing this one would outlive the test."""
    code = ("import gc, sys; from kubetune_operator.__main__ import parse_args, plan, tune_gc; "
            "import kubetune_operator.handlers; "
            "tune_gc(plan(parse_args(['--standalone']))['memo']['settings'].gc_threshold); "
            "print(gc.get_freeze_count(), gc.get_threshold()[0])")
    env = {"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin"}
    if value is not None:
        env["KUBETUNE_GC_THRESHOLD"] = value
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    count, gen0 = (int(x) for x in proc.stdout.split())
    if threshold is None:  # this interpreter's own default
        threshold = int(subprocess.run([sys.executable, "-c", "import gc; print(gc.get_threshold()[0])"],
                                       capture_output=True, text=True, timeout=60).stdout)
    assert gen0 == threshold
    # kopf, pydantic, the API models and the kubernetes client: tens of thousands of objects never walked again
    assert (count > 20000) if frozen else (count == 0)


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


def test_every_watched_object_shares_the_operators_memo():
    """kopf copies the memo for every object it watches (three per FineTuneJob); the operator's is shared."""
    from kopf._core.reactor.inventory import ResourceMemories

    from kubetune_operator.handlers import SharedMemo

    async def recall(memobase):
        memories = ResourceMemories()
        return [(await memories.recall(raw_body={"metadata": {"uid": f"u{i}", "name": f"n{i}", "namespace": "a"}},
                                       memobase=memobase)).memo for i in range(3)]
    shared = SharedMemo(settings=object(), queue=object())
    assert all(m is shared for m in asyncio.run(recall(shared)))
    plain = kopf.Memo(settings=object())
    copies = asyncio.run(recall(plain))
    assert all(m is not plain and m == plain for m in copies), "kopf's own behaviour: a copy per object"


def test_unusable_credentials_end_the_operator_with_one_line_not_a_retry_loop(tmp_path):
    """A kubeconfig whose user needs an exec plugin: exit 2 with the loader's message naming the user, at once
    (kopf would retry its failing startup handler every minute, with a traceback each time)."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: eks-user, user: {exec: {command: aws}}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: eks-user}}]\n")
    proc = subprocess.run([sys.executable, "-m", "kubetune_operator", "--standalone", "-n", "x"],
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin",
                               "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "kubeconfig user 'eks-user' authenticates with 'exec'" in proc.stderr
    assert "Traceback" not in proc.stderr
