"""Bad inputs the API server refuses only when the operator creates the children, pods Kubernetes will not
create, and edits that must take effect atomically: against the in-memory API server (the e2e suite repeats the
important ones against a real one in tests/e2e/test_bad_inputs.py)."""

from __future__ import annotations

import asyncio

import pytest

from kubetune_api import constants as C
from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import Phase, Reason
from kubetune_operator.kube import ApiError
from kubetune_operator.reconciler import applied_generation
from kubetune_operator.render import GENERATION_ANNOTATION, TEMPLATE_HASH_ANNOTATION, render_job, spec_field_of
from kubetune_operator.settings import OperatorSettings
from tests.unit.operator.builders import NS, FakeKube, ftj, model, pod
from tests.unit.operator.test_reconciler import conds, make, stored


def run(coro):
    return asyncio.run(coro)


def invalid(field: str, message: str, kind: str = "Job", name: str = "demo-trainer") -> ApiError:
    """A 422 as kube-apiserver sends it: the message and one cause naming the field of the object sent."""
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {field}: {message}',
                    [{"reason": "FieldValueInvalid", "message": message, "field": field}])


# ------------------------------------------------------------------------------------------------ field origin
@pytest.mark.parametrize("path, spec, expected", [
    ("spec.template.spec.tolerations[0].operator", {"resources": {"gpus": 0, "tolerations": [
        {"key": "a", "operator": "Exists"}]}}, "spec.resources.tolerations[0].operator"),
    ("spec.template.spec.containers[0].resources.requests[cpu]", {"resources": {"gpus": 0, "cpu": "1"}},
     "spec.resources.cpu"),
    ("spec.template.spec.containers[0].resources.limits[amd.com/gpu]",
     {"resources": {"gpus": 1}}, "spec.resources.gpus"),
    ("spec.template.spec.nodeSelector", {"resources": {"gpus": 0, "nodeSelector": {"pool": "x"}}},
     "spec.resources.nodeSelector"),
    ("spec.template.metadata.labels", {"resources": {"gpus": 0, "podLabels": {"team": "a"}}},
     "spec.resources.podLabels"),
    ("spec.template.spec.affinity.nodeAffinity", {"resources": {"gpus": 0, "affinity": {"nodeAffinity": {}}}},
     "spec.resources.affinity.nodeAffinity"),
    ("spec.template.spec.volumes[3].emptyDir.sizeLimit", {"resources": {"gpus": 0, "sharedMemory": "1Gi"}},
     "spec.resources.sharedMemory"),
    ("spec.activeDeadlineSeconds", {"activeDeadlineSeconds": 5}, "spec.activeDeadlineSeconds"),
    ("spec.backoffLimit", {"retryLimit": 2}, "spec.retryLimit"),
])
def test_api_server_paths_map_back_to_the_spec_field(path, spec, expected):
    job = model(ftj(**spec))
    assert spec_field_of(job, render_job(job), path) == expected


def test_secret_env_paths_map_to_the_runtime():
    """The runtime names the Secret and its keys: a refusal there is the runtime's, which the job names."""
    from kubetune_api.finetuneruntime import parse_runtime

    job = model(ftj(output={"uri": "s3://b/p"}))
    rendered = render_job(job, runtime=parse_runtime({"template": {"image": "t:1"},
                                                      "storage": {"credentials": {"secretName": "creds"}}}))
    env = rendered["spec"]["template"]["spec"]["containers"][0]["env"]
    i = next(i for i, e in enumerate(env) if e["name"] == "AWS_SECRET_ACCESS_KEY")
    base = f"spec.template.spec.containers[0].env[{i}].valueFrom.secretKeyRef"
    assert spec_field_of(job, rendered, base + ".name") == "spec.runtimeRef"
    assert spec_field_of(job, rendered, base + ".key") == "spec.runtimeRef"


# ------------------------------------------------------------------------------------------------ refused children
@pytest.mark.parametrize("kind, error, reason, field", [
    ("Job", invalid("spec.template.spec.tolerations[0].operator",
                    "Invalid value: \"Exists\": value must be empty when `operator` is 'Exists'"),
     Reason.INVALID_POD_TEMPLATE, "spec.resources.tolerations[0].operator"),
    ("Job", invalid("spec.template.spec.containers[0].resources.requests[cpu]",
                    'Invalid value: "-1": must be greater than or equal to 0'),
     Reason.INVALID_POD_TEMPLATE, "spec.resources.cpu"),
    ("Job", ApiError(422, "Invalid", "ValidatingAdmissionPolicy 'registry' with binding 'registry' denied request: "
                                     "images must come from registry.internal/"),
     Reason.INVALID_POD_TEMPLATE, "spec"),
    ("ConfigMap", ApiError(422, "Invalid", 'ConfigMap "demo-config" is invalid: []: Too long: may not be more '
                                           "than 1048576 bytes", [{"field": "[]", "message": "Too long"}]),
     Reason.INVALID_CONFIG, "spec"),
])
def test_a_refused_child_fails_the_job_once_with_the_field_and_creates_nothing(kind, error, reason, field):
    async def scenario():
        kube, lookup, rec = make()
        # values core/v1 refuses no longer pass the CRD: the refusal is what the fake server is told to answer
        kube.put(ftj(resources={"gpus": 0, "cpu": "1", "tolerations": [{"key": "a", "operator": "Exists"}]}))
        kube.refuse(kind, error)
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "rejected"
        failed = conds(kube)[CT.FAILED]
        assert failed["status"] == "True" and failed["reason"] == reason
        assert failed["message"].startswith(field + ":"), failed["message"]
        assert stored(kube)["status"]["phase"] == Phase.FAILED
        # a refused ConfigMap stops before the Job; a refused Job takes the ConfigMap made for it along
        assert not kube.find("ConfigMap") and not kube.find("Job"), "nothing is left behind"
        cm = "/api/v1/namespaces/ml/configmaps/demo-config"
        assert [c for c in kube.calls if c[0] in ("POST", "DELETE") and "/events" not in c[1]] == \
            ([("POST", cm), ("POST", "/apis/batch/v1/namespaces/ml/jobs/demo-trainer"), ("DELETE", cm)]
             if kind == "Job" else [("POST", cm)])
        assert [e["reason"] for e in kube.events] == [reason]
        # called again (a resync, an operator restart): no new attempt, no second event
        attempts = len([c for c in kube.calls if c[0] == "POST" and "/events" not in c[1]])
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert [e["reason"] for e in kube.events] == [reason]
        assert len([c for c in kube.calls if c[0] == "POST" and "/events" not in c[1]]) == attempts
    run(scenario())


def test_transient_api_errors_stay_retriable():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        kube.refuse("Job", ApiError(503, "ServiceUnavailable", "etcd is busy"))
        with pytest.raises(ApiError):
            await rec.reconcile(NS, "demo", ensure_all=True)
        assert CT.FAILED not in conds(kube)
    run(scenario())


# ------------------------------------------------------------------------------------------------ blocked pods
QUOTA = ('Error creating: pods "demo-trainer-0-abcde" is forbidden: exceeded quota: small, requested: '
         'requests.cpu=4, used: requests.cpu=0, limited: requests.cpu=1')
PRIORITY = 'Error creating: pods "demo-trainer-0-x" is forbidden: no PriorityClass with name urgent was found'


def failed_create(job: dict, message: str, first: str = "2026-01-01T03:00:00Z", last: str = "2026-01-01T03:00:00Z"):
    return {"involvedObject": {"uid": job["metadata"]["uid"], "kind": "Job"}, "reason": "FailedCreate",
            "type": "Warning", "message": message, "firstTimestamp": first, "lastTimestamp": last}


@pytest.mark.parametrize("message, field", [(QUOTA, "spec.resources"),
                                            (PRIORITY, "spec.resources.priorityClassName")])
def test_pods_kubernetes_will_not_create_show_as_pods_blocked(message, field):
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        kube.core_events.append(failed_create(job, message))
        await rec.reconcile(NS, "demo")
        running = conds(kube)[CT.RUNNING]
        assert running["status"] == "False" and running["reason"] == Reason.PODS_BLOCKED
        assert running["message"].startswith(field + ":") and message in running["message"]
        assert [e["type"] for e in kube.events if e["reason"] == Reason.PODS_BLOCKED] == ["Warning"]
        # once a pod exists, the old event no longer explains anything
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"])]
        await rec.reconcile(NS, "demo")
        assert conds(kube)[CT.RUNNING]["reason"] == Reason.RUNNING
    run(scenario())


def test_pods_a_jobsets_child_job_cannot_create_show_as_pods_blocked():
    """Multi-node: the JobSet's child Job (owned by the JobSet, labelled like ours) is the one with the events."""
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(resources={"gpus": 8, "nodes": 2}))
        await rec.reconcile(NS, "demo", ensure_all=True)
        (js,) = kube.find("JobSet")
        child = kube.put({"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": "demo-node-0", "namespace": NS, "labels": {C.Label.JOB_NAME: "demo"},
            "ownerReferences": [{"uid": js["metadata"]["uid"], "controller": True, "kind": "JobSet"}]},
            "spec": {"completions": 2}, "status": {}})
        kube.core_events.append(failed_create(child, QUOTA))
        await rec.reconcile(NS, "demo")
        running = conds(kube)[CT.RUNNING]
        assert running["status"] == "False" and running["reason"] == Reason.PODS_BLOCKED
        assert QUOTA in running["message"]
        assert kube.find("JobSet") and kube.find("Job"), "the operator never takes the JobSet's child for its own"
    run(scenario())


def test_pods_blocked_past_the_timeout_fails_the_job_and_removes_the_job():
    async def scenario():
        kube = FakeKube()
        kube, lookup, rec = make(kube)
        rec.settings = OperatorSettings(pods_blocked_timeout_seconds=600)
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        kube.core_events.append(failed_create(job, PRIORITY, first="2026-01-01T02:59:00Z"))
        await rec.reconcile(NS, "demo")
        assert conds(kube)[CT.RUNNING]["reason"] == Reason.PODS_BLOCKED, "60 s < 600 s: still waiting"
        kube.core_events[0]["firstTimestamp"] = "2026-01-01T02:00:00Z"
        await rec.reconcile(NS, "demo")
        failed = conds(kube)[CT.FAILED]
        assert failed["reason"] == Reason.PODS_BLOCKED and "priorityClassName" in failed["message"]
        assert kube.find("Job") == [], "no pods start later for a job reported Failed"
    run(scenario())


# ------------------------------------------------------------------------------------------------ edits
def test_resources_and_unsuspend_in_one_update_start_the_new_template():
    """What Kueue does on admission: one update sets the admitted resources and suspend: false."""
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(suspend=True))
        await rec.reconcile(NS, "demo", ensure_all=True)
        (old,) = kube.find("Job")
        body = stored(kube)
        body["spec"]["suspend"] = False
        body["spec"]["resources"] = {"gpus": 2, "memory": "64Gi"}
        body["metadata"]["generation"] = 2
        await rec.reconcile(NS, "demo", ensure_all=True)
        patches = [c for c in kube.calls if c[0] == "PATCH" and c[1].endswith("/jobs/demo-trainer")]
        assert patches == [], "the old Job must not be resumed with the old template"
        assert kube.find("Job") == []
        assert stored(kube)["status"]["observedGeneration"] == 1, "not applied yet"
        await rec.reconcile(NS, "demo")  # the DELETED event
        (new,) = kube.find("Job")
        assert new["metadata"]["uid"] != old["metadata"]["uid"] and new["spec"]["suspend"] is False
        limits = new["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "2" and limits["memory"] == "64Gi"
        assert stored(kube)["status"]["observedGeneration"] == 2
    run(scenario())


@pytest.mark.parametrize("field, value, job_field", [("activeDeadlineSeconds", 60, "activeDeadlineSeconds"),
                                                     ("retryLimit", 7, "backoffLimit")])
def test_mutable_fields_reach_the_running_job_in_place(field, value, job_field):
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(activeDeadlineSeconds=3600))
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"])]
        body = stored(kube)
        body["spec"][field] = value
        body["metadata"]["generation"] = 2
        await rec.reconcile(NS, "demo", ensure_all=True)
        (live,) = kube.find("Job")
        assert live["metadata"]["uid"] == job["metadata"]["uid"], "patched, not re-created"
        assert live["spec"][job_field] == value
        assert live["metadata"]["annotations"][GENERATION_ANNOTATION] == "2"
        assert live["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] == \
            job["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
        assert stored(kube)["status"]["observedGeneration"] == 2
    run(scenario())


def test_observed_generation_stays_while_a_running_job_cannot_take_the_change():
    job = {"metadata": {"annotations": {GENERATION_ANNOTATION: "3"}}, "spec": {}, "status": {}}
    body = {"metadata": {"generation": 5}, "status": {"observedGeneration": 3}}
    assert applied_generation(job, body) == 3
    deleting = {"metadata": {"deletionTimestamp": "x", "annotations": {GENERATION_ANNOTATION: "3"}}}
    assert applied_generation(deleting, body) == 3
    assert applied_generation({"metadata": {}}, body) == 5, "a Job from an older operator: no annotation"


def test_trust_remote_code_is_a_condition_and_one_warning_event():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(model={"source": "hf://org/custom-arch", "trustRemoteCode": True}))
        await rec.reconcile(NS, "demo", ensure_all=True)
        await rec.reconcile(NS, "demo")
        c = conds(kube)[CT.TRUSTS_REMOTE_CODE]
        assert c["status"] == "True" and c["reason"] == Reason.TRUST_REMOTE_CODE and "hf://org/custom-arch" in c["message"]
        warnings = [e for e in kube.events if e["reason"] == Reason.TRUST_REMOTE_CODE]
        assert [e["type"] for e in warnings] == ["Warning"]
        assert stored(kube)["status"]["phase"] == Phase.PENDING, "informational: the phase is unaffected"
    run(scenario())


def test_no_remote_code_condition_by_default():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert CT.TRUSTS_REMOTE_CODE not in conds(kube)
    run(scenario())


def test_a_deepspeed_job_always_runs_under_the_launcher():
    """DeepSpeed joins a process group even with one process; without torchrun there is none ("Default
    process group has not been initialized", exit 1, retried)."""
    job = model(ftj(resources={"gpus": 1}, distributed={"deepspeed": {"zeroStage": 2}}))
    command = render_job(job)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "kubetune_trainer.launch"] and "--nproc-per-node=1" in command
    plain = render_job(model(ftj(resources={"gpus": 1})))["spec"]["template"]["spec"]["containers"][0]["command"]
    assert plain[:3] == ["python", "-m", "kubetune_trainer"]


def test_a_forbidden_child_is_shown_and_retried_not_failed():
    """403: a ResourceQuota on object counts (count/jobs.batch) or missing RBAC; fixed outside the spec."""
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        kube.refuse("Job", ApiError(403, "Forbidden", 'jobs.batch "demo-trainer" is forbidden: exceeded quota: '
                                                      "jobs, requested: count/jobs.batch=1, used: 1, limited: 1"))
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "conflict" and result.delay > 0
        created = conds(kube)[CT.CREATED]
        assert created["status"] == "False" and created["reason"] == Reason.CHILD_FORBIDDEN
        assert "exceeded quota" in created["message"] and CT.FAILED not in conds(kube)
        del kube.refusals["Job"]
        assert (await rec.reconcile(NS, "demo", ensure_all=True)).state == "ok"
        assert conds(kube)[CT.CREATED]["status"] == "True"
    run(scenario())


def test_follow_ends_with_the_failure_naming_the_field():
    """`kubetune follow`'s last line is the failure, and the operator's messages start with the field."""
    from kubetune_cli.follow import summary

    obj = {"status": {"phase": "Failed", "artifacts": {"adapterUri": "s3://b/a"},
                      "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidPodTemplate",
                                      "message": "spec.resources.image: images must come from registry.internal/"}]}}
    assert summary(obj).splitlines()[-1] == \
        "Failed: InvalidPodTemplate: spec.resources.image: images must come from registry.internal/"
