"""The reconcile loop against an in-memory API server: children created once (operator restarts included),
409s read back and adopted or refused, invalid specs, suspend, spec changes while suspended, a deleted Job,
progress and TTL."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry

from kubetune_api import constants as C
from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import Phase, Reason
from kubetune_api.report import TrainerReport
from kubetune_operator import status as S
from kubetune_operator.kube import ApiError, EventRecorder
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconciler import Reconciler, ftj_path, snapshot_job, snapshot_pod
from kubetune_operator.render import TEMPLATE_HASH_ANNOTATION
from kubetune_operator.settings import OperatorSettings
from tests.unit.operator.builders import NS, SECRET_VALUE, UID, FakeKube, FakeLookup, ftj, job_cond, pod

NOW = "2026-01-01T03:00:00Z"


def make(kube: FakeKube | None = None):
    kube = kube or FakeKube()
    lookup = FakeLookup(kube)
    metrics = OperatorMetrics(CollectorRegistry())
    rec = Reconciler(kube, OperatorSettings(), metrics, EventRecorder(kube, instance="test"), lookup,
                     now=lambda: NOW)
    return kube, lookup, rec


def stored(kube: FakeKube, name: str = "demo") -> dict:
    return kube.objects[ftj_path(NS, name)]


def conds(kube: FakeKube, name: str = "demo") -> dict:
    return {c["type"]: c for c in stored(kube, name).get("status", {}).get("conditions", [])}


def kinds(kube: FakeKube) -> list[str]:
    return sorted(o["kind"] for o in kube.objects.values()
                  if o["kind"] not in (C.KIND, C.CLUSTER_RUNTIME_KIND, C.RUNTIME_KIND, "Namespace"))


def run(coro):
    return asyncio.run(coro)


def test_create_makes_children_and_status_once():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "ok"
        assert kinds(kube) == ["ConfigMap", "Job"]
        c = conds(kube)
        assert c[CT.CREATED]["status"] == "True" and c[CT.RUNNING]["reason"] == Reason.PENDING
        st = stored(kube)["status"]
        assert st["phase"] == Phase.PENDING and st["workload"]["name"] == "demo-trainer"
        assert [e["reason"] for e in kube.events] == [Reason.JOB_CREATED]
        ev = kube.events[0]
        assert ev["involvedObject"] == {"apiVersion": C.API_VERSION, "kind": C.KIND, "name": "demo",
                                        "namespace": NS, "uid": UID, "resourceVersion": ev["involvedObject"]["resourceVersion"]}
        # again: nothing new is created, status unchanged, no new events
        before = len(kube.mutations())
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kinds(kube) == ["ConfigMap", "Job"] and len(kube.events) == 1
        assert [m for m in kube.mutations()[before:] if m[0] != "POST"] == [], "only idempotent creates (409)"
        assert rec.metrics.registry.get_sample_value(
            "kubetune_operator_phase_transitions_total", {"from_phase": "", "to_phase": "Pending"}) == 1
    run(scenario())


def test_restarted_operator_does_not_duplicate_children():
    async def scenario():
        kube, _, rec = make()
        kube.put(ftj(resources={"gpus": 8, "nodes": 2}))
        await rec.reconcile(NS, "demo", ensure_all=True)
        objects = json.dumps({k: v for k, v in kube.objects.items() if v["kind"] != C.KIND}, sort_keys=True)
        _, _, fresh = make(kube)  # a new operator process: no memory, same cluster
        result = await fresh.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "ok"
        assert kinds(kube) == ["ConfigMap", "JobSet"]
        assert json.dumps({k: v for k, v in kube.objects.items() if v["kind"] != C.KIND}, sort_keys=True) == objects
    run(scenario())


def test_child_events_follow_the_pods_to_success():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        job = kube.find("Job")[0]
        job_uid = job["metadata"]["uid"]
        lookup.pod_list = [pod(job_uid=job_uid)]
        await rec.reconcile(NS, "demo")
        assert stored(kube)["status"]["phase"] == Phase.RUNNING
        report = TrainerReport(state="succeeded", progress={"step": 60, "total_steps": 60, "loss": 0.5},
                               artifacts={"adapter_uri": "s3://b/a/"}).to_termination_message()
        lookup.pod_list = [pod(job_uid=job_uid, phase="Succeeded", message=report)]
        job["status"] = {"conditions": [job_cond("Complete", "CompletionsReached")], "completionTime": NOW}
        await rec.reconcile(NS, "demo")
        st = stored(kube)["status"]
        assert st["phase"] == Phase.SUCCEEDED and st["progress"]["summary"] == "60/60 (100%)"
        assert st["artifacts"]["adapterUri"] == "s3://b/a/"
        assert kube.events[-1]["reason"] == Reason.SUCCEEDED and kube.events[-1]["type"] == "Normal"
        # a finished job ignores later child events without even reading the FineTuneJob
        calls = len(kube.calls)
        await rec.reconcile(NS, "demo")
        assert len(kube.calls) == calls
        assert rec.metrics.registry.get_sample_value(
            "kubetune_operator_job_duration_seconds_count", {"stage": "sft", "result": "succeeded"}) == 1
    run(scenario())


def test_invalid_spec_fails_without_children():
    async def scenario():
        kube, _, rec = make()
        kube.put(ftj(stage="grpo", dataset={"format": "prompt_only", "train": [{"uri": "s3://d/p.jsonl"}]},
                     training={"grpo": {"rewards": [{"name": "my_rewards:score"}]}}))
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "invalid" and "rewards[0].source" in result.message
        failed = conds(kube)[CT.FAILED]
        assert failed["reason"] == Reason.INVALID_SPEC and "rewards[0].source" in failed["message"]
        assert stored(kube)["status"]["phase"] == Phase.FAILED
        assert kinds(kube) == []
        assert [(e["type"], e["reason"]) for e in kube.events] == [("Warning", Reason.INVALID_SPEC)]
        # later reconciles leave it alone
        assert (await rec.reconcile(NS, "demo", ensure_all=True)).state == "terminal"
        assert kinds(kube) == [] and len(kube.events) == 1
    run(scenario())


def test_child_owned_by_an_older_finetunejob_is_waited_for():
    async def scenario():
        kube, _, rec = make()
        old = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": "demo-trainer", "namespace": NS, "labels": {C.Label.JOB_NAME: "demo"},
            "ownerReferences": [{"controller": True, "uid": "older-uid"}]}, "spec": {}}
        kube.put(old)
        kube.put(ftj())
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "conflict" and result.delay > 0 and "older-uid" in result.message
        assert conds(kube)[CT.CREATED]["reason"] == Reason.CHILD_CONFLICT
        assert kube.find("Job")[0]["metadata"]["ownerReferences"][0]["uid"] == "older-uid", "not taken over"
    run(scenario())


def test_foreign_object_with_the_childs_name_is_a_conflict():
    async def scenario():
        kube, _, rec = make()
        kube.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-config", "namespace": NS},
                  "data": {"x": "y"}})
        kube.put(ftj())
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "conflict" and "not managed by kubetune" in result.message
        assert kube.find("ConfigMap")[0]["data"] == {"x": "y"}
        assert any(e["type"] == "Warning" and e["reason"] == Reason.CHILD_CONFLICT for e in kube.events)
    run(scenario())


def test_labelled_orphan_is_adopted():
    async def scenario():
        kube, _, rec = make()
        kube.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "demo-config", "namespace": NS,
            "labels": {C.Label.JOB_NAME: "demo", C.Label.MANAGED_BY: C.Label.MANAGED_BY_VALUE}}, "data": {}})
        kube.put(ftj())
        assert (await rec.reconcile(NS, "demo", ensure_all=True)).state == "ok"
        (cm,) = kube.find("ConfigMap")
        assert cm["metadata"]["ownerReferences"][0]["uid"] == UID
        assert C.CONFIG_FILE_NAME in cm["data"], "brought up to date before the Job that mounts it"
    run(scenario())


def test_suspend_and_resume_patch_the_job():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        body = stored(kube)
        body["spec"]["suspend"] = True
        body["metadata"]["generation"] = 2
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        assert job["spec"]["suspend"] is True
        assert conds(kube)[CT.SUSPENDED]["status"] == "True" and stored(kube)["status"]["phase"] == Phase.SUSPENDED
        assert conds(kube)[CT.SUSPENDED]["observedGeneration"] == 2
        body = stored(kube)
        body["spec"]["suspend"] = False
        body["metadata"]["generation"] = 3
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kube.find("Job")[0]["spec"]["suspend"] is False
        assert conds(kube)[CT.SUSPENDED]["reason"] == Reason.RESUMED
        assert kube.find("Job")[0]["metadata"]["uid"] == job["metadata"]["uid"], "same Job, not re-created"
    run(scenario())


def test_resources_changed_while_suspended_recreate_the_job():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(suspend=True))
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        old_hash = job["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
        body = stored(kube)
        body["spec"]["resources"] = {"gpus": 4, "memory": "128Gi"}
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kube.find("Job") == [], "deleted (foreground) so that it can be re-created"
        assert ("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/demo-trainer") in kube.calls
        # the Job's DELETED watch event triggers the next reconcile
        await rec.reconcile(NS, "demo")
        (new,) = kube.find("Job")
        assert new["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] != old_hash
        res = new["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == "4" and res["limits"]["memory"] == "128Gi"
        assert new["spec"]["suspend"] is True
        assert "--nproc-per-node=4" in new["spec"]["template"]["spec"]["containers"][0]["command"]
        cm = kube.find("ConfigMap")[0]["data"][C.CONFIG_FILE_NAME]
        assert "128Gi" in cm, "the ConfigMap follows the new Job"
        assert not any(e["reason"] == Reason.JOB_MISSING for e in kube.events), "our own deletion is no surprise"
        assert any("re-created" in e["message"] for e in kube.events)
        assert stored(kube)["status"]["phase"] == Phase.SUSPENDED
    run(scenario())


def test_deleted_job_is_recreated_after_its_pods_are_gone():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        job_uid = kube.find("Job")[0]["metadata"]["uid"]
        lookup.pod_list = [pod(job_uid=job_uid)]
        await rec.reconcile(NS, "demo")
        await kube.delete(f"/apis/batch/v1/namespaces/{NS}/jobs/demo-trainer")
        lookup.pod_list = [pod(job_uid=job_uid, deleting=True)]  # still stopping (checkpointing)
        result = await rec.reconcile(NS, "demo")
        assert result.state == "waiting" and kube.find("Job") == []
        assert conds(kube)[CT.CREATED]["reason"] == Reason.JOB_MISSING
        lookup.pod_list = []
        assert (await rec.reconcile(NS, "demo")).state == "ok"
        assert len(kube.find("Job")) == 1 and kube.find("Job")[0]["metadata"]["uid"] != job_uid
        assert conds(kube)[CT.CREATED]["status"] == "True"
        assert any(e["type"] == "Warning" and e["reason"] == Reason.JOB_MISSING for e in kube.events)
    run(scenario())


def test_an_ignored_pod_end_replaces_the_job_at_once_keeping_the_retry_budget():
    """A pod that exited 143 (deleted, checkpoint saved) when nothing else of the Job runs: the Job controller
    would wait out its pod-failure backoff; the reconciler replaces the Job, whose backoffLimit is what is left."""
    from kubetune_operator.render import RETRIES_USED_ANNOTATION, RUN_ID_LABEL

    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(retryLimit=3))
        await rec.reconcile(NS, "demo", ensure_all=True)
        (old,) = kube.find("Job")
        old["status"] = {"failed": 1}  # one earlier crash, counted by the Job controller
        lookup.pod_list = [pod(phase="Failed", exit_code=1, job_uid=old["metadata"]["uid"],
                               created="2026-01-01T00:01:00Z"),
                           pod(phase="Failed", exit_code=C.ExitCode.PREEMPTED, job_uid=old["metadata"]["uid"],
                               created="2026-01-01T00:02:00Z")]
        lookup.pod_list[1]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = \
            "2026-01-01T00:55:00Z"
        for p in lookup.pod_list:  # as the Job's template labels them
            p["metadata"]["labels"][RUN_ID_LABEL] = UID
        assert (await rec.reconcile(NS, "demo")).state == "ok"
        (new,) = kube.find("Job")
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        assert new["spec"]["backoffLimit"] == 2 and new["metadata"]["annotations"][RETRIES_USED_ANNOTATION] == "1"
        assert [e["reason"] for e in kube.events].count(Reason.POD_REPLACED) == 1
        st = stored(kube)["status"]
        assert st["restarts"]["retriesUsed"] == 1 and st["restartCount"] == 2
        assert (st["restarts"]["crashed"], st["restarts"]["killed"]) == (1, 1)
        # the successor runs: no second replacement, and its backoffLimit is not "aligned" back to retryLimit
        new["status"] = {"active": 1}
        lookup.pod_list.append(pod(job_uid=new["metadata"]["uid"]))
        await rec.reconcile(NS, "demo", ensure_all=True)
        (same,) = kube.find("Job")
        assert same["metadata"]["uid"] == new["metadata"]["uid"] and same["spec"]["backoffLimit"] == 2
        assert stored(kube)["status"]["restartCount"] == 2
    run(scenario())


def test_a_crash_keeps_the_job_and_its_backoff():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        (job,) = kube.find("Job")
        job["status"] = {"failed": 1}
        lookup.pod_list = [pod(phase="Failed", exit_code=1, job_uid=job["metadata"]["uid"])]
        await rec.reconcile(NS, "demo")
        assert kube.find("Job")[0]["metadata"]["uid"] == job["metadata"]["uid"]
        assert Reason.POD_REPLACED not in [e["reason"] for e in kube.events]
    run(scenario())


def test_index_lag_right_after_creation_is_not_a_missing_job():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        lookup.jobs = lambda namespace, name: []  # the watch has not delivered the Job yet
        lookup.pod_list = [pod(job_uid=kube.find("Job")[0]["metadata"]["uid"])]
        assert (await rec.reconcile(NS, "demo")).state == "ok"
        assert conds(kube)[CT.CREATED]["status"] == "True" and stored(kube)["status"]["phase"] == Phase.RUNNING
    run(scenario())


def test_resizing_a_suspended_job_across_one_node_swaps_job_and_jobset():
    async def scenario():
        kube, _, rec = make()
        kube.put(ftj(suspend=True, resources={"gpus": 1, "nodes": 2}))
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kinds(kube) == ["ConfigMap", "JobSet"]
        assert kube.find("JobSet")[0]["spec"]["suspend"] is True
        assert stored(kube)["status"]["workload"] == {"kind": "JobSet", "name": "demo", "configMap": "demo-config",
                                                      "service": "demo-workers"}
        # an operator before JobSet left its headless Service: it goes with the next new workload
        kube.put({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "demo-workers", "namespace": NS, "ownerReferences": [{"uid": UID, "controller": True}]}})
        stored(kube)["spec"]["resources"] = {"gpus": 1, "nodes": 1}
        await rec.reconcile(NS, "demo", ensure_all=True)
        await rec.reconcile(NS, "demo")
        assert kinds(kube) == ["ConfigMap", "Job"]
        stored(kube)["spec"]["resources"] = {"gpus": 1, "nodes": 3}
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kinds(kube) == ["ConfigMap", "JobSet"]
        assert kube.find("JobSet")[0]["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] == 3
    run(scenario())


def test_resuming_a_jobset_patches_only_its_suspend():
    async def scenario():
        kube, _, rec = make()
        kube.put(ftj(suspend=True, resources={"gpus": 1, "nodes": 2}))
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert stored(kube)["status"]["phase"] == Phase.SUSPENDED
        before = json.dumps(kube.find("JobSet")[0]["spec"], sort_keys=True)
        stored(kube)["spec"]["suspend"] = False
        stored(kube)["metadata"]["generation"] = 2
        await rec.reconcile(NS, "demo", ensure_all=True)
        (js,) = kube.find("JobSet")
        assert js["spec"]["suspend"] is False
        assert json.dumps({**js["spec"], "suspend": True}, sort_keys=True) == before
        patches = [c for c in kube.calls if c[0] == "PATCH" and "/jobsets/" in c[1]]
        assert len(patches) == 1
        assert stored(kube)["status"]["observedGeneration"] == 2
    run(scenario())


def test_multi_node_without_the_jobset_api_fails_with_a_condition_not_a_retry_loop():
    async def scenario():
        kube, _, rec = make()
        kube.refuse("JobSet", ApiError(404, "NotFound", "the server could not find the requested resource"))
        kube.put(ftj(resources={"gpus": 8, "nodes": 2}))
        result = await rec.reconcile(NS, "demo", ensure_all=True)
        assert result.state == "rejected"
        failed = conds(kube)[CT.FAILED]
        assert failed["status"] == "True" and failed["reason"] == Reason.JOBSET_NOT_INSTALLED
        assert failed["message"].startswith("spec.resources.nodes: 2 nodes run as a JobSet")
        assert "install JobSet" in failed["message"] and "spec.resources.nodes: 1" in failed["message"]
        assert stored(kube)["status"]["phase"] == Phase.FAILED
        assert kinds(kube) == []  # nothing created, not even the ConfigMap
        assert kube.events[-1]["type"] == "Warning" and kube.events[-1]["reason"] == Reason.JOBSET_NOT_INSTALLED
        calls = len(kube.calls)
        await rec.reconcile(NS, "demo")
        assert not [c for c in kube.calls[calls:] if c[0] == "POST"], "no retry"
    run(scenario())


def test_progress_is_written_only_while_running_and_when_it_changed():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        report = TrainerReport(progress={"step": 10, "total_steps": 60, "loss": 2.123456})
        assert not await rec.record_progress(NS, "demo", UID, report), "Pending: not yet"
        lookup.pod_list = [pod(job_uid=kube.find("Job")[0]["metadata"]["uid"])]
        await rec.reconcile(NS, "demo")
        assert await rec.record_progress(NS, "demo", UID, report)
        assert stored(kube)["status"]["progress"] == {"step": 10, "totalSteps": 60, "loss": 2.123,
                                                      "summary": "10/60 (16%)"}
        patches = len(kube.mutations())
        assert not await rec.record_progress(NS, "demo", UID, report)
        assert len(kube.mutations()) == patches
        assert not await rec.record_progress(NS, "demo", "another-uid", report)
    run(scenario())


def test_ttl_deletes_only_finished_jobs():
    async def scenario():
        kube, _, rec = make()
        kube.put(ftj(ttlSecondsAfterFinished=0))
        assert not await rec.delete_expired(NS, "demo", UID)
        stored(kube)["status"] = S.invalid_spec_status(stored(kube), "x")
        assert not await rec.delete_expired(NS, "demo", "other-uid")
        assert await rec.delete_expired(NS, "demo", UID)
        assert ftj_path(NS, "demo") not in kube.objects
    run(scenario())


def test_nothing_secret_is_written_anywhere():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj(output={"uri": "s3://b/r"}))
        await rec.reconcile(NS, "demo", ensure_all=True)
        crash = f"botocore error with AWS_SECRET_ACCESS_KEY unset"
        lookup.pod_list = [pod(job_uid=kube.find("Job")[0]["metadata"]["uid"], phase="Failed", message=crash)]
        await rec.reconcile(NS, "demo")
        assert SECRET_VALUE not in kube.dump()
    run(scenario())


def test_snapshots_copy_what_status_needs():
    body = pod()
    body["spec"] = {"containers": [{"name": "trainer", "env": [{"name": "X", "value": "big"}]}]}
    snap = snapshot_pod(body)
    assert "spec" not in snap and snap["status"] == body["status"]
    assert snap["metadata"]["ownerReferences"] == body["metadata"]["ownerReferences"]
    job = {"metadata": {"name": "j", "uid": "u", "annotations": {"a": "b"}},
           "spec": {"suspend": True, "template": {"spec": {}}}, "status": {"active": 1}}
    snap = snapshot_job(job)
    assert snap["spec"] == {"suspend": True} and snap["status"] == {"active": 1}
    job["status"]["active"] = 2
    assert snap["status"] == {"active": 1}, "a frozen copy, not a view"


def test_concurrent_triggers_are_coalesced():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        gets = sum(1 for c in kube.calls if c[0] == "GET")
        await asyncio.gather(*(rec.reconcile(NS, "demo") for _ in range(20)))
        runs = sum(1 for c in kube.calls if c[0] == "GET" and c[1] == ftj_path(NS, "demo")) - \
            sum(1 for c in kube.calls[:gets] if c[0] == "GET" and c[1] == ftj_path(NS, "demo"))
        assert 1 <= runs <= 2, f"{runs} runs for 20 triggers"
    run(scenario())


# ------------------------------------------------------------------------------------------------ scale
def gets_of_ftj(kube: FakeKube) -> int:
    return sum(1 for m, p in kube.calls if m == "GET" and p == ftj_path(NS, "demo"))


def test_watched_job_is_read_from_the_watch_not_fetched():
    """With kopf's watch feeding the FineTuneJob (observe), child events cost no GET; the status write's
    answer is held, and a watch event older than it does not roll it back."""
    async def scenario():
        kube, lookup, rec = make()
        first = kube.put(ftj())
        rec.observe(first)
        await rec.reconcile(NS, "demo", ensure_all=True)
        # a new job costs its runtime's lookup, two creates, ONE status write (which also records the runtime)
        # and its one event (JobCreated): neither the FineTuneJob nor a Job or Service is read, nothing is
        # dry-run first
        assert [p for m, p in kube.calls if m == "GET"] == ["/apis/kubetune.dev/v1alpha1/clusterfinetuneruntimes/default"]
        assert sorted(m for m, _ in kube.calls if m != "GET") == ["PATCH", "POST", "POST", "POST"]
        assert [p.rsplit("/", 1)[1] for m, p in kube.calls if m == "POST"] == ["demo-config", "demo-trainer", "events"]
        assert stored(kube)["status"]["runtime"]["name"] == "default"
        job_uid = kube.find("Job")[0]["metadata"]["uid"]
        lookup.pod_list = [pod(job_uid=job_uid)]
        rec.observe(first)  # a late watch event from before our status write: ignored
        await rec.reconcile(NS, "demo", check_blocked=False)
        assert gets_of_ftj(kube) == 0
        assert stored(kube)["status"]["phase"] == Phase.RUNNING
        events = len(kube.events)
        await rec.reconcile(NS, "demo", check_blocked=False)  # nothing changed: no write, no duplicate events
        assert len(kube.events) == events and gets_of_ftj(kube) == 0
        # a spec edit arrives through the watch: the next run sees it (suspend reaches the Job)
        edited = stored(kube)
        edited["spec"]["suspend"] = True
        edited["metadata"]["generation"] = 2
        rec.observe(kube.put(edited))
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert kube.find("Job")[0]["spec"]["suspend"] is True and gets_of_ftj(kube) == 0
        # deleted: forgotten; the next trigger asks the API server and finds nothing
        del kube.objects[ftj_path(NS, "demo")]
        rec.forget(NS, "demo")
        assert (await rec.reconcile(NS, "demo")).state == "gone" and gets_of_ftj(kube) == 1
    run(scenario())


def test_unwatched_reconcile_still_reads_the_api_server():
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        await rec.reconcile(NS, "demo")
        assert gets_of_ftj(kube) == 2
    run(scenario())


def test_spec_is_validated_and_rendered_once_per_change(monkeypatch):
    from kubetune_operator import reconciler as R

    counts = {"validate": 0, "render_job": 0}

    def counting(name, fn):
        def wrapper(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(R, "validate", counting("validate", R.validate))
    monkeypatch.setattr(R, "render_job", counting("render_job", R.render_job))

    async def scenario():
        kube, lookup, rec = make()
        rec.observe(kube.put(ftj()))
        await rec.reconcile(NS, "demo", ensure_all=True)
        job_uid = kube.find("Job")[0]["metadata"]["uid"]
        for phase in ("Pending", "Running", "Running"):
            lookup.pod_list = [pod(job_uid=job_uid, phase=phase)]
            await rec.reconcile(NS, "demo", check_blocked=False)
        assert counts["validate"] == 1 and counts["render_job"] == 1
        edited = stored(kube)
        edited["spec"]["retryLimit"] = 5
        edited["metadata"]["generation"] = 2
        rec.observe(kube.put(edited))
        await rec.reconcile(NS, "demo", ensure_all=True)
        assert counts["validate"] == 2 and counts["render_job"] == 2
        assert kube.find("Job")[0]["spec"]["backoffLimit"] == 5
    run(scenario())


def test_child_events_do_not_list_events_but_keep_pods_blocked():
    """Listing the Job's FailedCreate events on every Job/pod event costs one LIST per event while pods are
    being created; only the progress loop's runs (check_blocked, the default) list them, and child-event runs
    keep the last answer instead of flipping PodsBlocked off and on."""
    from tests.unit.operator.test_bad_inputs import QUOTA, failed_create

    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        lists = [c for c in kube.calls if c[0] == "GET" and c[1].endswith("/events")]
        (job,) = kube.find("Job")
        kube.core_events.append(failed_create(job, QUOTA))
        before = len([c for c in kube.calls if c[1].endswith("/events") and c[0] == "GET"])
        await rec.reconcile(NS, "demo", check_blocked=False)
        assert len([c for c in kube.calls if c[1].endswith("/events") and c[0] == "GET"]) == before
        assert conds(kube)[CT.RUNNING]["reason"] != Reason.PODS_BLOCKED
        await rec.reconcile(NS, "demo")  # the progress loop's run
        assert conds(kube)[CT.RUNNING]["reason"] == Reason.PODS_BLOCKED
        await rec.reconcile(NS, "demo", check_blocked=False)  # a Job event in between: still blocked
        assert conds(kube)[CT.RUNNING]["reason"] == Reason.PODS_BLOCKED
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"])]
        await rec.reconcile(NS, "demo", check_blocked=False)  # pods exist: no longer blocked, without a LIST
        assert conds(kube)[CT.RUNNING]["reason"] == Reason.RUNNING
        assert lists == [], "the run that created the Job does not look: the Job controller has not seen it yet"
    run(scenario())


def test_the_held_body_is_a_frozen_copy():
    """What the reconciler keeps per job is compact bytes (few long-lived objects per job, docs/scale.md): a later
    change to the watched dict does not reach it, and each read is a copy of its own."""
    _, _, rec = make()
    body = ftj()
    body["metadata"]["resourceVersion"] = "7"
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    rec.observe(body)
    st = rec._state(NS, "demo")
    from kubetune_operator import reconciler as R
    assert isinstance(st.frozen, bytes) and "managedFields" not in R.thaw(st.frozen)["metadata"]
    assert len(st.frozen) < len(json.dumps(R.thaw(st.frozen), separators=(",", ":"))), "compressed"
    body["spec"]["stage"] = "dpo"
    held = st.body
    assert held["spec"]["stage"] == "sft" and held["metadata"]["resourceVersion"] == "7"
    held["spec"]["stage"] = "kto"
    assert st.body["spec"]["stage"] == "sft", "each read is a copy"
    older = ftj()
    older["metadata"]["resourceVersion"] = "6"
    older["spec"]["stage"] = "orpo"
    rec.observe(older)  # a late watch event must not roll back what is held
    assert st.body["spec"]["stage"] == "sft"


def test_what_is_kept_per_job_is_bytes_digests_and_flags():
    """Every FineTuneJob the operator has seen keeps a _KeyState for as long as it exists (thousands at once,
    docs/scale.md): its status and spec keys are kept as frozen bytes and 16-byte digests, never as the dicts
    and texts a reconcile works with, and a finished job is recognised without thawing anything."""
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        job = kube.find("Job")[0]
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"])]
        await rec.reconcile(NS, "demo")
        st = rec._state(NS, "demo")
        assert not hasattr(st, "__dict__"), "slots: no per-instance dict"
        assert isinstance(st.frozen_status, bytes) and st.status == stored(kube)["status"]
        held = st.status
        held["phase"] = "Mangled"
        assert st.status["phase"] == Phase.RUNNING and not st.terminal, "each read is a copy"
        for name in ("ensured", "ensuring", "observed"):
            value = getattr(st, name)
            assert value is None or (isinstance(value, bytes) and len(value) == 16), (name, value)
        assert st.ensured is not None
        kept = {name: getattr(st, name) for name in st.__slots__ if name not in ("lock", "result")}
        assert all(isinstance(v, (bytes, str, bool, int, float, type(None))) or
                   (isinstance(v, tuple) and all(isinstance(x, (bytes, str, type(None))) for x in v))
                   for v in kept.values()), kept
        job["status"] = {"conditions": [job_cond("Complete", "CompletionsReached")], "completionTime": NOW}
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"], phase="Succeeded")]
        await rec.reconcile(NS, "demo")
        assert st.terminal and st.status["phase"] == Phase.SUCCEEDED
    run(scenario())


def test_a_job_recreated_under_a_finished_ones_name_is_reconciled():
    """forget() keeps the state of a job whose reconcile is running; the new FineTuneJob's first watch event
    must still clear the old one's terminal status, or its reconciles would all end as "terminal"."""
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        job = kube.find("Job")[0]
        job["status"] = {"conditions": [job_cond("Complete", "CompletionsReached")], "completionTime": NOW}
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"], phase="Succeeded")]
        await rec.reconcile(NS, "demo")
        st = rec._state(NS, "demo")
        assert st.terminal
        async with st.lock:  # deleted while a reconcile of it runs: forget leaves the state in place
            rec.forget(NS, "demo")
            st.status = stored(kube)["status"]  # what that running reconcile writes back
        assert rec._state(NS, "demo") is st and st.terminal
        kube.objects.clear()
        lookup.pod_list = []
        new = ftj(uid="99999999-2222-3333-4444-555555555555")
        new["metadata"]["resourceVersion"] = "1"
        kube.put(new)
        rec.observe(kube.objects[ftj_path(NS, "demo")])
        assert not st.terminal
        result = await rec.reconcile(NS, "demo")
        assert result.state == "ok" and kinds(kube) == ["ConfigMap", "Job"]
        assert stored(kube)["status"]["phase"] == Phase.PENDING
    run(scenario())


def test_validation_is_kept_for_recent_jobs_only_and_the_rendered_target_for_every_job(monkeypatch):
    """Parsed models sit in a bounded cache: reused across one job's burst of events, evicted for jobs seen long
    ago (which then validate again, with the same result). What aligning a live Job needs of the rendered Job is
    kept for every job, so a job that fell out of the cache is not rendered again (at thousands of jobs that
    re-rendering made the operator's CPU per job grow with N), until its spec changes."""
    import kubetune_operator.reconciler as R

    calls: list[str] = []
    renders: list[str] = []
    real_validate, real_render = R.validate, R.render_job

    def counting(body):
        calls.append(body["metadata"]["name"])
        return real_validate(body)

    def counting_render(job, *args, **kwargs):
        renders.append(job.metadata.name)
        return real_render(job, *args, **kwargs)

    monkeypatch.setattr(R, "validate", counting)
    monkeypatch.setattr(R, "render_job", counting_render)

    async def scenario():
        kube, lookup, rec = make()
        rec._models.size = 1
        for name, uid in (("a", "uid-a"), ("b", "uid-b")):
            rec.observe(kube.put(ftj(name, uid=uid)))
        await rec.reconcile(NS, "a", ensure_all=True)
        await rec.reconcile(NS, "a")
        assert calls == ["a"], "the second event of the same job reuses the validated model"
        assert renders == ["a"], "the Job rendered to create it is what the next reconcile aligns it with"
        await rec.reconcile(NS, "b", ensure_all=True)
        await rec.reconcile(NS, "a")
        assert calls == ["a", "b", "a"], "b evicted a"
        assert renders == ["a", "b"], "a left the model cache, but its target did not go with it"
        assert len(rec._models) == 1
        assert stored(kube, "a")["status"]["phase"] == stored(kube, "b")["status"]["phase"] == Phase.PENDING
        assert len(kube.find("Job")) == 2
        # a spec change renders again, and the live Job follows it
        edited = stored(kube, "a")
        edited["spec"]["retryLimit"] = 4
        edited["metadata"]["generation"] = 2
        rec.observe(kube.put(edited))
        await rec.reconcile(NS, "a")
        assert renders == ["a", "b", "a"]
        job_a = next(j for j in kube.find("Job") if j["metadata"]["name"].startswith("a"))
        assert job_a["spec"]["backoffLimit"] == 4
        assert job_a["metadata"]["annotations"][R.GENERATION_ANNOTATION] == "2"
        # the held target is a digest and a few hundred bytes, not the rendered Job
        assert all(len(st.target[1]) < 400 for st in rec._states.values())
    run(scenario())


def test_a_changed_recorded_runtime_renders_again_and_the_live_job_follows():
    """The kept target is keyed by the runtime too: a recorded runtime that changes (status.runtime written
    anew) brings its defaults to the live Job's mutable fields, here the deadline a runtime's policy sets."""
    import kubetune_operator.reconciler as R

    async def scenario():
        kube, lookup, rec = make()
        rec.observe(kube.put(ftj()))
        await rec.reconcile(NS, "demo", ensure_all=True)
        job = kube.find("Job")[0]
        assert "activeDeadlineSeconds" not in job["spec"]
        edited = stored(kube)
        snap = edited["status"]["runtime"]
        snap["spec"].setdefault("policy", {})["maxActiveDeadlineSeconds"] = 3600
        rec.observe(kube.put(edited))
        await rec.reconcile(NS, "demo")
        assert kube.find("Job")[0]["spec"]["activeDeadlineSeconds"] == 3600
        assert R.thaw(rec._states[(NS, "demo")].target[1])["mutable"]["activeDeadlineSeconds"] == 3600
    run(scenario())


def test_bounded_cache_evicts_the_least_recently_used():
    from kubetune_operator.reconciler import BoundedCache

    cache = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    cache.pop("a")
    cache.pop("missing")
    assert len(cache) == 1


def test_every_child_is_checked_when_a_job_is_new_to_the_operator_or_its_spec_changed():
    """No kopf create/update/resume handlers: the reconciler notices itself when a job needs its ConfigMap and
    Service checked (first seen, e.g. after an operator restart, or metadata/spec changed); other events only
    look at the Job and the status."""
    async def scenario():
        kube, lookup, rec = make()
        kube.put(ftj())
        await rec.reconcile(NS, "demo")
        (cm,) = kube.find("ConfigMap")
        path = f"/api/v1/namespaces/{NS}/configmaps/{cm['metadata']['name']}"
        del kube.objects[path]
        await rec.reconcile(NS, "demo")  # a pod event: same spec, children already checked
        assert not kube.find("ConfigMap")

        _, _, restarted = make(kube)  # a new operator process: nothing ensured yet
        restarted.lookup = lookup
        await restarted.reconcile(NS, "demo")
        assert len(kube.find("ConfigMap")) == 1

        del kube.objects[path]
        body = stored(kube)
        body["metadata"]["labels"] = {"team": "a"}  # a metadata change: the children carry labels
        kube.put(body)
        await restarted.reconcile(NS, "demo")
        assert len(kube.find("ConfigMap")) == 1
    run(scenario())


def test_the_echo_of_our_own_status_write_needs_no_reconcile():
    async def scenario():
        kube, lookup, rec = make()
        body = kube.put(ftj())
        body["metadata"]["resourceVersion"] = "1"
        assert rec.observe(json.loads(json.dumps(body))), "first sight"
        assert not rec.observe(json.loads(json.dumps(body))), "the same version again"
        await rec.reconcile(NS, "demo")  # writes the status: the answer is held
        echo = json.loads(json.dumps(stored(kube)))
        assert not rec.observe(echo), "the watch event of that write"
        echo["metadata"]["resourceVersion"] = str(int(echo["metadata"]["resourceVersion"]) + 1)
        echo["metadata"]["labels"] = {"team": "b"}  # someone else changed it
        assert rec.observe(echo)
    run(scenario())


def test_a_job_is_unsettled_until_its_children_match_its_newest_spec():
    async def scenario():
        kube, lookup, rec = make()
        body = kube.put(ftj())
        body["metadata"]["resourceVersion"] = "1"
        assert rec.unsettled(NS, "demo"), "never seen"
        rec.observe(json.loads(json.dumps(body)))
        assert rec.unsettled(NS, "demo")
        await rec.reconcile(NS, "demo")
        assert not rec.unsettled(NS, "demo")
        changed = json.loads(json.dumps(stored(kube)))
        changed["metadata"]["resourceVersion"] = "99"
        changed["spec"]["training"] = {**changed["spec"].get("training", {}), "maxSteps": 7}
        rec.observe(changed)
        assert rec.unsettled(NS, "demo"), "a spec change"
    run(scenario())
