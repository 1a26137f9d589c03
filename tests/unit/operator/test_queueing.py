"""Kueue admission and GPU-second accounting without a cluster: what the child Job gets (labels, suspend), that the
operator never writes a queued Job's suspend (spec.suspend goes to the Workload's spec.active), the Queued /
Admitted / Preempted status read from the Workload, and the GPU-second ledger across attempts and restarts.
The real Kueue controller is exercised by tests/e2e/test_kueue_queueing.py."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import Phase, Reason
from kubetune_api.finetunejob import parse_job
from kubetune_operator import queueing as Q
from kubetune_operator import status as S
from kubetune_operator.kube import EventRecorder
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconciler import Reconciler, ftj_path
from kubetune_operator.render import render_job
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validation import validate
from tests.unit.operator.builders import NS, FakeKube, FakeLookup, ftj, job_obj, merge, pod

NOW = "2026-01-01T03:00:00Z"


def model(body: dict):
    job, problems = validate(body)
    assert not problems, problems
    return job


def queued(**spec) -> dict:
    return ftj(queueName="team", **spec)


def workload(job: dict, *, admitted: bool = False, evicted: str | None = None, active: bool = True,
             pending: str | None = None, annotations: dict | None = None) -> dict:
    conds = []
    if admitted:
        conds += [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": ""},
                  {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""}]
    elif pending:
        conds.append({"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": pending})
    if evicted:
        conds.append({"type": "Evicted", "status": "True", "reason": evicted,
                      "message": "Preempted to accommodate a workload (UID: x) due to prioritization in the "
                                 "ClusterQueue"})
    meta = {"name": f"job-{job['metadata']['name']}-1a2b3", "namespace": NS,
            "labels": {Q.JOB_UID_LABEL: job["metadata"]["uid"]}}
    if annotations:
        meta["annotations"] = annotations
    status: dict = {"conditions": conds}
    if admitted:
        status["admission"] = {"clusterQueue": "kubetune"}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": meta,
            "spec": {"queueName": "team", "active": active}, "status": status}


# ------------------------------------------------------------------------------------------------ render
def test_queued_job_is_created_suspended_with_kueues_labels():
    job = render_job(model(queued(workloadPriorityClassName="high")))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][Q.QUEUE_LABEL] == "team"
    assert job["metadata"]["labels"][Q.PRIORITY_LABEL] == "high"
    # the FineTuneJob's own label works as well; the field wins over it
    body = ftj()
    body["metadata"]["labels"] = {Q.QUEUE_LABEL: "from-label"}
    assert render_job(model(body))["metadata"]["labels"][Q.QUEUE_LABEL] == "from-label"
    body["spec"]["queueName"] = "from-field"
    assert render_job(model(body))["metadata"]["labels"][Q.QUEUE_LABEL] == "from-field"


def test_without_a_queue_suspend_follows_the_spec_and_no_kueue_label():
    for suspend in (False, True):
        job = render_job(model(ftj(suspend=suspend)))
        assert job["spec"]["suspend"] is suspend
        assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])


def test_priority_class_without_a_queue_is_refused_naming_the_field():
    _, problems = validate(ftj(workloadPriorityClassName="high"))
    assert problems and problems[0].startswith("spec.workloadPriorityClassName:") and "queueName" in problems[0]


def test_suspend_patch_never_touches_a_queued_child():
    for suspend in (False, True):
        for live in (False, True):
            assert Q.suspend_patch(model(queued(suspend=suspend)), live) is None
    assert Q.suspend_patch(model(ftj(suspend=True)), False) is True
    assert Q.suspend_patch(model(ftj(suspend=False)), True) is False
    assert Q.suspend_patch(model(ftj(suspend=False)), False) is None


def test_spec_suspend_reaches_kueue_as_workload_active():
    job = job_obj()
    wl = workload(job, admitted=True)
    off = Q.workload_active_patch(model(queued(suspend=True)), wl)
    assert off == {"metadata": {"annotations": {Q.DEACTIVATED_ANNOTATION: "true"}}, "spec": {"active": False}}
    ours = workload(job, active=False, annotations={Q.DEACTIVATED_ANNOTATION: "true"})
    assert Q.workload_active_patch(model(queued(suspend=False)), ours)["spec"] == {"active": True}
    # a Workload Kueue itself deactivated (no annotation) stays as Kueue left it
    assert Q.workload_active_patch(model(queued(suspend=False)), workload(job, active=False)) is None
    assert Q.workload_active_patch(model(queued(suspend=False)), wl) is None


# ------------------------------------------------------------------------------------------------ status
def test_queue_states_from_the_workload():
    job = job_obj()
    w = Q.queue_state("team", workload(job, pending="couldn't assign flavors: insufficient quota for "
                                                    "nvidia.com/gpu"), child_suspended=True)
    assert (w.state, w.reason) == ("waiting", Reason.WAITING_FOR_ADMISSION)
    assert "LocalQueue team" in w.message and "insufficient quota" in w.message
    a = Q.queue_state("team", workload(job, admitted=True), child_suspended=False)
    assert (a.state, a.reason) == ("admitted", Reason.ADMITTED) and "ClusterQueue kubetune" in a.message
    p = Q.queue_state("team", workload(job, evicted="Preempted"), child_suspended=True)
    assert (p.state, p.reason) == ("evicted", Reason.PREEMPTED)
    assert "Preempted to accommodate" in p.message and "resumes from the latest checkpoint" in p.message
    # deactivated for spec.suspend, then active again: waiting, not "evicted"
    r = Q.queue_state("team", workload(job, evicted="Deactivated"), child_suspended=True)
    assert r.state == "waiting"
    m = Q.queue_state("team", None, child_suspended=True, kueue_missing=True)
    assert m.reason == Reason.KUEUE_NOT_INSTALLED and m.message.startswith("spec.queueName:")


def test_status_queued_admitted_preempted():
    body = queued()
    job = job_obj(suspend=True)
    waiting = Q.queue_state("team", workload(job), child_suspended=True)
    st = S.derive_status(body, job, [], now=NOW, queue=waiting)
    c = {x["type"]: x for x in st["conditions"]}
    assert st["phase"] == Phase.QUEUED
    assert c[CT.ADMITTED]["status"] == "False" and c[CT.ADMITTED]["reason"] == Reason.WAITING_FOR_ADMISSION
    assert CT.SUSPENDED not in c, "Kueue holding a job is not the user's suspend"
    body["status"] = st
    running = job_obj(suspend=False)
    admitted = Q.queue_state("team", workload(running, admitted=True), child_suspended=False)
    st = S.derive_status(body, running, [pod()], now=NOW, queue=admitted)
    c = {x["type"]: x for x in st["conditions"]}
    assert st["phase"] == Phase.RUNNING and c[CT.ADMITTED]["status"] == "True"
    changes = S.condition_changes(body["status"]["conditions"], st["conditions"])
    assert ("Normal", c[CT.ADMITTED]) in changes
    body["status"] = st
    pre = Q.queue_state("team", workload(job, evicted="Preempted"), child_suspended=True)
    st2 = S.derive_status(body, job, [], now=NOW, queue=pre)
    c2 = {x["type"]: x for x in st2["conditions"]}
    assert st2["phase"] == Phase.QUEUED and c2[CT.ADMITTED]["reason"] == Reason.PREEMPTED
    assert ("Warning", c2[CT.ADMITTED]) in S.condition_changes(st["conditions"], st2["conditions"])


# ------------------------------------------------------------------------------------------------ cost
def test_gpu_seconds_sum_every_attempt_and_survive_restarts():
    first = pod(phase="Failed", exit_code=143, started="2026-01-01T00:10:00Z")   # ends 00:50: 40 min
    second = pod(started="2026-01-01T01:00:00Z")                                 # running since 01:00
    stored: dict = {}

    def account(pods, now):  # as the reconciler does: the result is merge-patched onto the stored status
        nonlocal stored
        usage, secs = S.gpu_usage(stored or None, pods, gpus_per_pod=8, now=now)
        stored = merge(stored, usage)
        return secs
    assert account([first, second], "2026-01-01T01:30:30Z") == 8 * 40 * 60 + 8 * 30 * 60  # running: whole minutes
    # the first pod is gone (garbage-collected), the status is the memory: counted once, not again or never
    assert account([second], "2026-01-01T01:31:00Z") == 8 * 40 * 60 + 8 * 31 * 60
    assert stored["closedSeconds"] == 8 * 40 * 60
    # the running pod vanished (deleted on preemption) before its end was seen: closed when noticed, once
    assert account([], "2026-01-01T01:32:00Z") == 8 * 40 * 60 + 8 * 32 * 60
    assert account([], "2026-01-01T01:40:00Z") == 8 * 40 * 60 + 8 * 32 * 60
    assert stored["openPods"] == [] and len(stored["closedPods"]) == 2
    # pods that never started (pending) cost nothing
    assert S.gpu_usage(None, [pod(phase="Pending")], gpus_per_pod=8, now=NOW)[1] == 0


# ------------------------------------------------------------------------------------------------ reconciler
def make(kube: FakeKube):
    lookup = FakeLookup(kube)
    rec = Reconciler(kube, OperatorSettings(), OperatorMetrics(CollectorRegistry()),
                     EventRecorder(kube, instance="test"), lookup, now=lambda: NOW)
    return lookup, rec


def test_reconciler_leaves_suspend_to_kueue_and_deactivates_the_workload_for_spec_suspend():
    async def scenario():
        kube = FakeKube()
        lookup, rec = make(kube)
        kube.put(queued())
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        assert job["spec"]["suspend"] is True and job["metadata"]["labels"][Q.QUEUE_LABEL] == "team"
        assert kube.objects[ftj_path(NS, "demo")]["status"]["phase"] == Phase.QUEUED
        # Kueue admits: creates the Workload and unsuspends the Job; the operator must not suspend it back
        kube.put(workload(job, admitted=True))
        kube.objects[next(p for p, o in kube.objects.items() if o["kind"] == "Job")]["spec"]["suspend"] = False
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"])]
        await rec.reconcile(NS, "demo")
        assert kube.find("Job")[0]["spec"]["suspend"] is False
        status = kube.objects[ftj_path(NS, "demo")]["status"]
        assert status["phase"] == Phase.RUNNING
        assert {c["type"]: c for c in status["conditions"]}[CT.ADMITTED]["status"] == "True"
        job_patches = [c for c in kube.mutations() if c[0] == "PATCH" and "/jobs/" in c[1]]
        assert job_patches == [], job_patches
        # the user suspends: the Workload is deactivated (Kueue then evicts and suspends the Job itself)
        kube.objects[ftj_path(NS, "demo")]["spec"]["suspend"] = True
        kube.objects[ftj_path(NS, "demo")]["metadata"]["generation"] = 2
        await rec.reconcile(NS, "demo", ensure_all=True)
        (wl,) = kube.find("Workload")
        assert wl["spec"]["active"] is False and wl["metadata"]["annotations"][Q.DEACTIVATED_ANNOTATION] == "true"
        assert kube.find("Job")[0]["spec"]["suspend"] is False, "the operator left the Job's suspend to Kueue"
        # unsuspend: reactivated, annotation gone
        kube.objects[ftj_path(NS, "demo")]["spec"]["suspend"] = False
        kube.objects[ftj_path(NS, "demo")]["metadata"]["generation"] = 3
        await rec.reconcile(NS, "demo", ensure_all=True)
        (wl,) = kube.find("Workload")
        assert wl["spec"]["active"] is True and Q.DEACTIVATED_ANNOTATION not in (wl["metadata"].get("annotations") or {})
    asyncio.run(scenario())


def test_queued_job_suspended_at_creation_gets_no_job_until_unsuspended():
    async def scenario():
        kube = FakeKube()
        _, rec = make(kube)
        kube.put(queued(suspend=True))
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kube.find("Job") == [] and kube.find("ConfigMap")
        assert kube.objects[ftj_path(NS, "demo")]["status"]["phase"] == Phase.SUSPENDED
        kube.objects[ftj_path(NS, "demo")]["spec"]["suspend"] = False
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        assert job["spec"]["suspend"] is True, "created for Kueue to admit"
    asyncio.run(scenario())


def test_queue_without_kueue_installed_says_so_on_the_job():
    async def scenario():
        kube = FakeKube()
        kube.kueue_served = False
        _, rec = make(kube)
        kube.put(queued())
        await rec.reconcile(NS, "demo", ensure_all=True)
        status = kube.objects[ftj_path(NS, "demo")]["status"]
        admitted = {c["type"]: c for c in status["conditions"]}[CT.ADMITTED]
        assert admitted["reason"] == Reason.KUEUE_NOT_INSTALLED and "install Kueue" in admitted["message"]
    asyncio.run(scenario())


def test_gpu_seconds_counter_mirrors_status_across_operator_restarts():
    def value(m, **labels):
        return m.registry.get_sample_value("kubetune_job_gpu_seconds_total", labels)
    body = queued()
    body["status"] = {"phase": "Running", "gpuSeconds": 480}
    m = OperatorMetrics(CollectorRegistry())
    m.observe_job(body)
    labels = {"namespace": NS, "finetunejob": "demo", "queue": "team"}
    assert value(m, **labels) == 480
    body["status"]["gpuSeconds"] = 960
    m.observe_job(body)
    m.observe_job(body)
    assert value(m, **labels) == 960
    restarted = OperatorMetrics(CollectorRegistry())
    restarted.observe_job(body)
    assert value(restarted, **labels) == 960, "comes back at the status value, not 0 (increase() sees no reset)"
    restarted.forget_job(NS, "demo")
    assert value(restarted, **labels) is None
    parse_job(body)  # the status shape parses with the typed model


def test_admitted_but_not_yet_unsuspended_is_admitted_not_queued():
    job = job_obj(suspend=True)
    state = Q.queue_state("team", workload(job, admitted=True), child_suspended=True)
    st = S.derive_status(queued(), job, [], now=NOW, queue=state)
    c = {x["type"]: x for x in st["conditions"]}
    assert c[CT.ADMITTED]["status"] == "True" and st["phase"] == Phase.PENDING
