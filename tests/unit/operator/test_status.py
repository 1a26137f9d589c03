"""FineTuneJob status from the child Job and its pods: conditions, phase, reasons, the trainer's final report."""

from __future__ import annotations

import json

import pytest

from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import ExitCode, Phase, Reason
from kubetune_api.report import TrainerReport
from kubetune_operator import status as S
from tests.unit.operator.builders import ftj, job_cond, job_obj, pod

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"


def cond(status: dict, ctype: str) -> dict:
    c = S.get_condition(status.get("conditions"), ctype)
    assert c is not None, f"no {ctype} condition in {status.get('conditions')}"
    return c


def again(body: dict, new_status: dict) -> dict:
    return {**body, "status": new_status}


# ------------------------------------------------------------------------------------------------ conditions
def test_set_condition_keeps_transition_time_while_status_is_unchanged():
    conds = S.set_condition([], CT.RUNNING, False, Reason.PENDING, "waiting", 1, T0)
    conds = S.set_condition(conds, CT.RUNNING, False, Reason.PENDING, "still waiting", 2, T1)
    (c,) = conds
    assert c["lastTransitionTime"] == T0 and c["message"] == "still waiting" and c["observedGeneration"] == 2
    conds = S.set_condition(conds, CT.RUNNING, True, Reason.RUNNING, "up", 2, T2)
    assert conds[0]["lastTransitionTime"] == T2 and conds[0]["status"] == "True"


def test_set_condition_replaces_by_type_and_keeps_order():
    conds = S.set_condition([], CT.CREATED, True, Reason.JOB_CREATED, "", 1, T0)
    conds = S.set_condition(conds, CT.RUNNING, False, Reason.PENDING, "", 1, T0)
    conds = S.set_condition(conds, CT.CREATED, True, Reason.JOB_CREATED, "again", 1, T1)
    assert [c["type"] for c in conds] == [CT.CREATED, CT.RUNNING]
    assert set(conds[0]) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


@pytest.mark.parametrize("trues,phase", [
    ([CT.FAILED, CT.SUCCEEDED, CT.RUNNING], Phase.FAILED),
    ([CT.SUCCEEDED, CT.SUSPENDED], Phase.SUCCEEDED),
    ([CT.SUSPENDED, CT.RUNNING], Phase.SUSPENDED),
    ([CT.RUNNING, CT.CREATED], Phase.RUNNING),
    ([CT.CREATED], Phase.PENDING),
    ([], Phase.PENDING),
])
def test_phase_priority(trues, phase):
    conds = []
    for t in trues:
        conds = S.set_condition(conds, t, True, "R", "", 1, T0)
    conds = S.set_condition(conds, "Other", False, "R", "", 1, T0)
    assert S.derive_phase(conds) == phase


def test_reasons_are_camel_case():
    pattern = __import__("re").compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    for name, value in vars(Reason).items():
        if not name.startswith("_"):
            assert pattern.match(value), value


# ------------------------------------------------------------------------------------------------ numbers
def test_progress_summary_and_rounding():
    assert S.progress_summary(12, 60) == "12/60 (20%)"
    assert S.progress_summary(60, 60) == "60/60 (100%)"
    assert S.progress_summary(3, None) == "3"
    assert S.round_sig(1.23456789) == 1.235
    assert S.round_sig(0.000123456) == 0.0001235
    assert S.round_sig(12345.678) == 12350.0
    assert S.round_sig(7) == 7 and S.round_sig(float("nan")) is None
    p = S.progress_dict({"step": 5, "totalSteps": 50, "loss": 2.3456789, "learningRate": 0.000123456})
    assert p == {"step": 5, "totalSteps": 50, "loss": 2.346, "learningRate": 0.0001235, "summary": "5/50 (10%)"}


# ------------------------------------------------------------------------------------------------ Job situations
def test_pods_pending_names_the_reason():
    unsched = pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    st = S.derive_status(ftj(), job_obj(active=1), [unsched], now=T0)
    assert st["phase"] == Phase.PENDING
    assert cond(st, CT.CREATED)["status"] == "True" and cond(st, CT.CREATED)["reason"] == Reason.JOB_CREATED
    running = cond(st, CT.RUNNING)
    assert running["status"] == "False" and running["reason"] == Reason.PENDING
    assert "Insufficient nvidia.com/gpu" in running["message"]
    assert st["workload"] == {"kind": "Job", "name": "demo-trainer", "configMap": "demo-config"}
    assert st["observedGeneration"] == 1 and "startTime" not in st

    missing_secret = pod(phase="Pending", waiting={"reason": "CreateContainerConfigError",
                                                   "message": 'secret "s3-creds" not found'})
    st = S.derive_status(ftj(), job_obj(active=1), [missing_secret], now=T0)
    assert 'secret "s3-creds" not found' in cond(st, CT.RUNNING)["message"]


def test_running():
    st = S.derive_status(ftj(), job_obj(active=1, ready=1), [pod(started="2026-01-01T00:10:00Z")], now=T1)
    assert st["phase"] == Phase.RUNNING
    assert cond(st, CT.RUNNING)["reason"] == Reason.RUNNING and cond(st, CT.RUNNING)["status"] == "True"
    assert st["startTime"] == "2026-01-01T00:10:00Z"


def test_multi_node_is_running_only_when_every_node_runs():
    body = ftj(resources={"gpus": 8, "nodes": 2})
    one = S.derive_status(body, job_obj(nodes=2), [pod(index=0), pod(index=1, phase="Pending")], now=T0)
    assert one["phase"] == Phase.PENDING and "1/2" in cond(one, CT.RUNNING)["message"]
    both = S.derive_status(body, job_obj(nodes=2), [pod(index=0), pod(index=1)], now=T0)
    assert both["phase"] == Phase.RUNNING
    assert both["workload"]["service"] == "demo-workers"


def test_pod_that_finished_before_the_job_completes_keeps_it_running():
    st = S.derive_status(ftj(), job_obj(), [pod(phase="Running")], now=T0)
    st2 = S.derive_status(again(ftj(), st), job_obj(), [pod(phase="Succeeded")], now=T1)
    assert st2["phase"] == Phase.RUNNING
    assert cond(st2, CT.RUNNING)["lastTransitionTime"] == T0


def test_suspended_and_resumed():
    running = S.derive_status(ftj(), job_obj(), [pod()], now=T0)
    suspended = S.derive_status(again(ftj(suspend=True, generation=2), running), job_obj(suspend=True), [], now=T1)
    assert suspended["phase"] == Phase.SUSPENDED
    assert cond(suspended, CT.SUSPENDED)["reason"] == Reason.SUSPENDED
    assert cond(suspended, CT.SUSPENDED)["observedGeneration"] == 2
    assert cond(suspended, CT.RUNNING)["status"] == "False"
    resumed = S.derive_status(again(ftj(generation=3), suspended), job_obj(), [pod()], now=T2)
    assert resumed["phase"] == Phase.RUNNING
    assert cond(resumed, CT.SUSPENDED) == {"type": CT.SUSPENDED, "status": "False", "reason": Reason.RESUMED,
                                           "message": cond(resumed, CT.SUSPENDED)["message"],
                                           "lastTransitionTime": T2, "observedGeneration": 3}
    assert resumed["startTime"] == running["startTime"], "startTime is when the trainer first ran"


def _succeeded_report() -> str:
    return TrainerReport(
        state="succeeded", exit_code=0,
        progress={"step": 60, "total_steps": 60, "loss": 1.234567, "eval_loss": 1.5, "perplexity": 4.48168907},
        forgetting={"reference_perplexity_before": 10.0, "reference_perplexity_after": 12.5,
                    "relative_change": 0.25, "threshold": 0.1, "exceeded": True},
        artifacts={"output_uri": "s3://b/runs/ml/demo/", "adapter_uri": "s3://b/runs/ml/demo/adapter/",
                   "manifest_uri": "s3://b/runs/ml/demo/manifest.json"},
    ).to_termination_message()


def test_succeeded_takes_the_final_report_from_the_termination_message():
    old = S.derive_status(ftj(), job_obj(), [pod()], now=T0)
    old["progress"] = {"step": 40, "totalSteps": 60, "summary": "40/60 (66%)", "loss": 2.0}
    done = pod(phase="Succeeded", message=_succeeded_report())
    job = job_obj(conditions=[job_cond("SuccessCriteriaMet", "CompletionsReached"),
                              job_cond("Complete", "CompletionsReached")], completionTime=T2, succeeded=1)
    st = S.derive_status(again(ftj(), old), job, [done], now=T2)
    assert st["phase"] == Phase.SUCCEEDED
    assert cond(st, CT.SUCCEEDED)["reason"] == Reason.SUCCEEDED
    assert cond(st, CT.RUNNING)["status"] == "False"
    assert st["completionTime"] == T2 and st["startTime"]
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 60
    assert st["progress"]["summary"] == "60/60 (100%)"
    assert st["progress"]["loss"] == 1.235 and st["progress"]["perplexity"] == 4.482
    assert st["artifacts"]["adapterUri"] == "s3://b/runs/ml/demo/adapter/"
    assert "adapter at s3://b/runs/ml/demo/adapter/" in cond(st, CT.SUCCEEDED)["message"]
    assert st["forgetting"]["relativeChange"] == 0.25
    forgot = cond(st, CT.FORGETTING_EXCEEDED)
    assert forgot["status"] == "True" and forgot["reason"] == Reason.FORGETTING
    assert "+25.0%" in forgot["message"]


def test_forgetting_within_threshold():
    msg = TrainerReport(state="succeeded", forgetting={"relative_change": 0.02, "threshold": 0.1,
                                                       "exceeded": False}).to_termination_message()
    st = S.derive_status(ftj(), job_obj(conditions=[job_cond("Complete", "CompletionsReached")]),
                         [pod(phase="Succeeded", message=msg)], now=T0)
    assert cond(st, CT.FORGETTING_EXCEEDED)["status"] == "False"
    assert cond(st, CT.FORGETTING_EXCEEDED)["reason"] == Reason.WITHIN_THRESHOLD


def test_permanent_trainer_error_carries_the_trainers_message():
    report = json.dumps({"state": "failed", "reason": "InvalidDataset", "exitCode": 65,
                         "message": "spec.dataset.train[0]: file chat.jsonl has no column 'messages' (found: text)",
                         "progress": {"step": 0, "totalSteps": 60}})
    failed_pod = pod(phase="Failed", exit_code=ExitCode.DATA_ERROR, message=report)
    for job_conds in ([job_cond("FailureTarget", "PodFailurePolicy", "Container trainer ... exit code 65")],
                      [job_cond("FailureTarget", "PodFailurePolicy"), job_cond("Failed", "PodFailurePolicy")]):
        st = S.derive_status(ftj(), job_obj(conditions=job_conds, failed=1), [failed_pod], now=T1)
        assert st["phase"] == Phase.FAILED
        failed = cond(st, CT.FAILED)
        assert failed["reason"] == Reason.TRAINER_ERROR
        assert "no column 'messages'" in failed["message"] and failed["message"].startswith("InvalidDataset:")
        assert st["completionTime"] == T1
        assert st["progress"]["summary"] == "0/60 (0%)"
        assert st["message"] == failed["message"]


def test_storage_unavailable_has_its_own_reason_naming_endpoint_and_call():
    """Exit 75 (the trainer waited out its storage patience budget): reason StorageUnavailable, not the generic
    TrainerError of a bad spec, with the trainer's message (endpoint, last call); the retry count stays 0."""
    msg = ("object storage at http://seaweedfs:8333 unreachable for 20 s, the patience budget "
           "(spec.output.storagePatienceSeconds: 20); last call: uploading s3://kubetune/ns/j/runs/u/adapter/x: "
           "EndpointConnectionError: Could not connect")
    report = json.dumps({"state": "failed", "reason": "StorageUnavailable", "exitCode": 75, "message": msg})
    failed_pod = pod(phase="Failed", exit_code=ExitCode.STORAGE_UNAVAILABLE, message=report)
    st = S.derive_status(ftj(), job_obj(conditions=[job_cond("Failed", "PodFailurePolicy")], failed=1),
                         [failed_pod], now=T1)
    failed = cond(st, CT.FAILED)
    assert st["phase"] == Phase.FAILED and failed["reason"] == Reason.STORAGE_UNAVAILABLE == "StorageUnavailable"
    assert failed["message"].startswith("StorageUnavailable: object storage at http://seaweedfs:8333")
    assert "uploading s3://kubetune/ns/j/runs/u/adapter/x" in failed["message"]
    assert ExitCode.STORAGE_UNAVAILABLE in ExitCode.PERMANENT  # the podFailurePolicy's FailJob rule holds it
    assert list(ExitCode.PERMANENT) == sorted(ExitCode.PERMANENT)  # the Job API wants onExitCodes ordered


def test_backoff_limit_with_a_plain_text_crash():
    crash = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: an illegal memory access\n"
    assert TrainerReport.parse(crash) is None
    pods = [pod(phase="Failed", exit_code=1, message=crash, created="2026-01-01T00:01:00Z"),
            pod(phase="Failed", exit_code=1, message=crash, created="2026-01-01T00:02:00Z")]
    st = S.derive_status(ftj(retryLimit=1), job_obj(conditions=[job_cond("Failed", "BackoffLimitExceeded")],
                                                    failed=2), pods, now=T1)
    failed = cond(st, CT.FAILED)
    assert failed["reason"] == Reason.BACKOFF_LIMIT
    assert "retryLimit 1" in failed["message"]
    assert "exit code 1: RuntimeError: CUDA error: an illegal memory access" in failed["message"]
    assert st["restartCount"] == 1


def test_deadline_exceeded():
    st = S.derive_status(ftj(activeDeadlineSeconds=60),
                         job_obj(conditions=[job_cond("Failed", "DeadlineExceeded")]), [], now=T1)
    assert cond(st, CT.FAILED)["reason"] == Reason.DEADLINE and "60" in cond(st, CT.FAILED)["message"]


def test_restarting_between_attempts():
    pods = [pod(phase="Failed", exit_code=1, message="OOM", created="2026-01-01T00:01:00Z"),
            pod(phase="Pending", created="2026-01-01T00:02:00Z")]
    st = S.derive_status(ftj(), job_obj(failed=1, active=1), pods, now=T1)
    assert st["phase"] == Phase.PENDING
    assert cond(st, CT.RUNNING)["reason"] == Reason.RESTARTING
    assert "retryLimit 3" in cond(st, CT.RUNNING)["message"]
    assert st["restartCount"] == 1
    later = S.derive_status(again(ftj(), st), job_obj(), [pods[1] | {"status": pod()["status"]}], now=T2)
    assert later["phase"] == Phase.RUNNING and later["restartCount"] == 1, "restartCount never goes down"


def test_pods_of_another_job_are_ignored():
    stranger = pod(job_uid="older-job", phase="Failed", exit_code=ExitCode.CONFIG_ERROR)
    st = S.derive_status(ftj(), job_obj(), [stranger, pod()], now=T0)
    assert st["phase"] == Phase.RUNNING and "restartCount" not in st


def test_job_missing_after_it_was_created():
    created = S.derive_status(ftj(), job_obj(), [pod()], now=T0)
    st = S.derive_status(again(ftj(), created), None, [], now=T1)
    assert cond(st, CT.CREATED)["status"] == "False" and cond(st, CT.CREATED)["reason"] == Reason.JOB_MISSING
    assert cond(st, CT.RUNNING)["reason"] == Reason.JOB_MISSING
    assert st["phase"] == Phase.PENDING
    # never created: nothing to call missing
    assert S.derive_status(ftj(), None, [], now=T0)["conditions"] == []


def test_finished_jobs_stay_finished():
    job = job_obj(conditions=[job_cond("Complete", "CompletionsReached")])
    done = S.derive_status(ftj(), job, [pod(phase="Succeeded", message=_succeeded_report())], now=T1)
    # the Job and pods may be garbage-collected later, and the spec may change (generation 2)
    later = S.derive_status(again(ftj(generation=2), done), None, [], now=T2)
    assert later["phase"] == Phase.SUCCEEDED
    assert [(c["type"], c["status"], c["lastTransitionTime"]) for c in later["conditions"]] == \
        [(c["type"], c["status"], c["lastTransitionTime"]) for c in done["conditions"]]
    assert all(c["observedGeneration"] == 2 for c in later["conditions"])
    assert later["progress"] == done["progress"]


@pytest.mark.parametrize("situation", ["pending", "running", "suspended", "succeeded", "failed"])
def test_derive_is_idempotent(situation):
    job, pods = {
        "pending": (job_obj(), [pod(phase="Pending")]),
        "running": (job_obj(), [pod()]),
        "suspended": (job_obj(suspend=True), []),
        "succeeded": (job_obj(conditions=[job_cond("Complete", "CompletionsReached")]),
                      [pod(phase="Succeeded", message=_succeeded_report())]),
        "failed": (job_obj(conditions=[job_cond("Failed", "BackoffLimitExceeded")]), [pod(phase="Failed")]),
    }[situation]
    first = S.derive_status(ftj(), job, pods, now=T0)
    second = S.derive_status(again(ftj(), first), job, pods, now=T1)
    if situation == "running":
        # the one time-dependent field: a running pod keeps costing (1 GPU from 00:10 until T1 = 01:00)
        assert (first["gpuSeconds"], second["gpuSeconds"]) == (0, 50 * 60)
        first["gpuSeconds"] = second["gpuSeconds"]
    assert second == first
    assert S.owned_changes(first, second) == {}


def test_invalid_spec_status():
    st = S.invalid_spec_status(ftj(), "rewards[0].source: custom reward needs source", now=T0)
    assert st["phase"] == Phase.FAILED
    assert cond(st, CT.FAILED)["reason"] == Reason.INVALID_SPEC
    assert "rewards[0].source" in cond(st, CT.FAILED)["message"]
    assert S.is_terminal(st)


# ------------------------------------------------------------------------------------------------ events
def test_condition_changes_tell_each_transition_once():
    pending = S.derive_status(ftj(), job_obj(), [pod(phase="Pending")], now=T0)
    changes = S.condition_changes([], pending["conditions"])
    # a new job's pods were just asked for: JobCreated says so, "0/1 running" is no news of its own
    assert [(t, c["reason"]) for t, c in changes] == [("Normal", Reason.JOB_CREATED)]
    assert S.condition_changes(pending["conditions"], pending["conditions"]) == []
    running = S.derive_status(again(ftj(), pending), job_obj(), [pod(phase="Running")], now=T1)
    assert [(t, c["reason"]) for t, c in S.condition_changes(pending["conditions"], running["conditions"])] == \
        [("Normal", Reason.RUNNING)]
    # waiting again after running (a replaced pod) is news
    again_pending = S.derive_status(again(ftj(), running), job_obj(), [pod(phase="Pending")], now=T1)
    assert [(t, c["reason"]) for t, c in S.condition_changes(running["conditions"], again_pending["conditions"])] \
        == [("Normal", Reason.PENDING)]
    failed = S.derive_status(again(ftj(), pending), job_obj(conditions=[job_cond("Failed", "BackoffLimitExceeded")]),
                             [pod(phase="Failed")], now=T1)
    changes = S.condition_changes(pending["conditions"], failed["conditions"])
    assert [(t, c["type"], c["reason"]) for t, c in changes] == [("Warning", CT.FAILED, Reason.BACKOFF_LIMIT)], \
        "Running turning False for the same reason is not a second event"


def test_crash_summary_of_a_trainer_report_names_the_field():
    msg = TrainerReport(state="failed", reason="InvalidConfig", message="model not found",
                        field="spec.model.source").to_termination_message()
    text = S.crash_summary(pod(phase="Failed", exit_code=ExitCode.CONFIG_ERROR, message=msg))
    assert text == "InvalidConfig: model not found (field spec.model.source)"


def test_progress_dict_carries_the_stages_headline():
    from kubetune_api.finetunejob import Progress
    from kubetune_operator.status import progress_dict

    data = progress_dict(Progress(step=3, total_steps=10, reward_accuracy=0.812345, reward_margin=1.23456,
                                  metric="acc 0.81 margin 1.23"))
    assert data["rewardAccuracy"] == 0.8123 and data["rewardMargin"] == 1.235
    assert data["metric"] == "acc 0.81 margin 1.23" and "perplexity" not in data


# ------------------------------------------------------------------------------------------------ restarts
def _disruption() -> list[dict]:
    return [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]


def test_every_ended_pod_is_counted_once_by_cause_and_stays_counted_after_it_is_gone():
    body = ftj(retryLimit=3)
    deleted = pod(phase="Running", deleting=True)                      # kubectl delete pod: still stopping
    st = S.derive_status(body, job_obj(active=1), [deleted], now=T0)
    assert st["restarts"]["killed"] == 1 and st["restartCount"] == 1
    # the same pod again, now exited 143 after its SIGTERM checkpoint: not counted twice
    stopped = {**deleted, "status": pod(phase="Failed", exit_code=ExitCode.PREEMPTED)["status"]}
    st = S.derive_status(again(body, st), job_obj(), [stopped], now=T1)
    assert st["restarts"]["killed"] == 1 and st["restartCount"] == 1
    # it vanished (deleted pods do not stay); a preempted one and a crash follow
    preempted = pod(phase="Failed", exit_code=ExitCode.PREEMPTED, conditions=_disruption())
    crashed = pod(phase="Failed", exit_code=1, message="RuntimeError: boom")
    st = S.derive_status(again(body, st), job_obj(failed=1), [preempted, crashed, pod()], now=T2)
    r = st["restarts"]
    assert (r["killed"], r["preempted"], r["crashed"], r["storage"]) == (1, 1, 1, 0)
    assert st["restartCount"] == 3 and r["retriesUsed"] == 1
    assert set(r["pods"]) == {preempted["metadata"]["uid"], crashed["metadata"]["uid"]}, "gone pods are forgotten"
    # an operator restart re-reads the same pods from the status: nothing is counted again
    st2 = S.derive_status(again(body, st), job_obj(failed=1), [preempted, crashed, pod()], now=T2)
    assert st2["restarts"] == r and st2["restartCount"] == 3
    assert "1 preempted, 1 killed, 1 crashed" in st2["message"]


def test_a_cause_seen_later_replaces_a_guess_but_never_the_other_way():
    body = ftj()
    p = pod(phase="Running", deleting=True)
    st = S.derive_status(body, job_obj(), [p], now=T0)
    assert st["restarts"]["killed"] == 1
    evicted = {**p, "status": {**pod(phase="Failed", exit_code=143)["status"], "conditions": _disruption()}}
    st = S.derive_status(again(body, st), job_obj(), [evicted], now=T1)
    assert (st["restarts"]["killed"], st["restarts"]["preempted"], st["restartCount"]) == (0, 1, 1)


def test_storage_exit_and_suspension_have_their_own_causes():
    storage = pod(phase="Failed", exit_code=S.STORAGE_EXIT_CODE)
    report = TrainerReport(state="failed", reason="StorageUnavailable", message="s3 down", exit_code=1)
    storage2 = pod(phase="Failed", exit_code=1, message=report.to_termination_message())
    suspended = pod(phase="Running", deleting=True)
    r = S.count_restarts(None, [storage, storage2, suspended], job_obj(suspend=True))
    assert (r["storage"], r["preempted"], r["crashed"], r["killed"]) == (2, 1, 0, 0)


def test_the_pod_that_ended_the_run_is_not_a_restart():
    crash = pod(phase="Failed", exit_code=ExitCode.CONFIG_ERROR, message="bad")
    earlier = pod(phase="Failed", exit_code=143, created="2026-01-01T00:00:30Z")
    st = S.derive_status(ftj(), job_obj(conditions=[job_cond("Failed", "PodFailurePolicy")], failed=1),
                         [earlier, crash], now=T1)
    assert st["restartCount"] == 1 and st["restarts"]["killed"] == 1 and st["restarts"]["crashed"] == 0


def test_pods_of_replaced_jobs_of_the_same_run_count_but_not_an_older_finetunejobs():
    from kubetune_operator.render import RUN_ID_LABEL

    body = ftj()
    ours = pod(phase="Failed", exit_code=143, job_uid="replaced-job")
    ours["metadata"]["labels"][RUN_ID_LABEL] = body["metadata"]["uid"]
    older = pod(phase="Failed", exit_code=1, job_uid="older-ftj-job")
    older["metadata"]["labels"][RUN_ID_LABEL] = "another-uid"
    st = S.derive_status(body, job_obj(), [ours, older, pod()], now=T0)
    assert st["restartCount"] == 1 and st["restarts"]["killed"] == 1


def test_retries_used_adds_the_failures_of_replaced_jobs():
    from kubetune_operator.render import RETRIES_USED_ANNOTATION

    job = job_obj(failed=1)
    job["metadata"]["annotations"] = {RETRIES_USED_ANNOTATION: "2"}
    assert S.count_restarts(None, [], job)["retriesUsed"] == 3
    assert S.count_restarts({"retriesUsed": 4}, [], job)["retriesUsed"] == 4, "never goes down"


def test_waits_for_backoff_only_for_an_ignored_end_of_a_settled_job():
    sigterm = pod(phase="Failed", exit_code=ExitCode.PREEMPTED)
    assert "was killed (exit code 143" in S.waits_for_backoff(job_obj(), [sigterm], T1)
    evicted = pod(phase="Failed", exit_code=1, conditions=_disruption())
    assert "was preempted" in S.waits_for_backoff(job_obj(), [evicted], T1)
    crash = pod(phase="Failed", exit_code=1)
    assert S.waits_for_backoff(job_obj(failed=1), [crash], T1) is None, "a crash keeps the Job controller's backoff"
    assert S.waits_for_backoff(job_obj(active=1), [sigterm], T1) is None, "the Job controller has not settled"
    assert S.waits_for_backoff(job_obj(terminating=1), [sigterm], T1) is None
    assert S.waits_for_backoff(job_obj(uncountedTerminatedPods={"failed": ["x"]}), [sigterm], T1) is None
    assert S.waits_for_backoff(job_obj(), [sigterm, pod(phase="Pending")], T1) is None, "a replacement exists"
    assert S.waits_for_backoff(job_obj(suspend=True), [sigterm], T1) is None
    assert S.waits_for_backoff(job_obj(conditions=[job_cond("Failed", "BackoffLimitExceeded")]), [sigterm], T1) is None


def test_waits_for_backoff_when_the_deleted_pod_is_already_gone():
    """A deleted pod disappears once the Job controller has let go of it: a Job that has run but has no pods
    (crashed pods stay) lost them to deletion."""
    job = job_obj(startTime="2026-01-01T00:00:02Z")
    job["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    assert S.waits_for_backoff(job, [], "2026-01-01T00:00:30Z") == "its pod was deleted"
    assert S.waits_for_backoff(job, [pod(job_uid="another-job", phase="Failed", exit_code=1)],
                               "2026-01-01T00:00:30Z") == "its pod was deleted"
    assert S.waits_for_backoff(job, [], "2026-01-01T00:00:03Z") is None, "a new Job gets its pods in a moment"
    fresh = job_obj()
    fresh["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    assert S.waits_for_backoff(fresh, [], "2026-01-01T00:00:30Z") is None, "the Job controller never synced it"


# ------------------------------------------------------------------------------------------------ JobSet (multi-node)
JS_UID = "jobset-uid"


def jobset_obj(*, suspend: bool = False, conditions: list | None = None, restarts: int = 0) -> dict:
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "demo", "namespace": "team-a", "uid": JS_UID},
            "spec": {"suspend": suspend},
            "status": {"restarts": restarts, **({"conditions": conditions} if conditions else {})}}


def gang_pod(index: int, attempt: int, **kw) -> dict:
    """A pod of the JobSet's child Job: owned by that Job (not the JobSet), labelled with the JobSet's uid."""
    p = pod(index=index, job_uid=f"child-job-{attempt}", **kw)
    p["metadata"]["labels"].update({"jobset.sigs.k8s.io/jobset-uid": JS_UID,
                                    "jobset.sigs.k8s.io/restart-attempt": str(attempt)})
    return p


def test_jobset_gang_running_after_a_restart_then_succeeded_with_rank0s_report():
    body = ftj(resources={"gpus": 8, "nodes": 2})
    pods = [gang_pod(0, 1), gang_pod(1, 1), pod(index=0, job_uid="someone-else")]
    st = S.derive_status(body, jobset_obj(restarts=1), pods, now=T1)
    assert st["phase"] == Phase.RUNNING and st["restartCount"] == 1
    assert cond(st, CT.RUNNING)["message"] == "2/2 trainer pod(s) running after 1 restart(s)"
    assert st["workload"] == {"kind": "JobSet", "name": "demo", "configMap": "demo-config", "service": "demo-workers"}
    assert cond(st, CT.CREATED)["message"] == "JobSet demo created"
    report = TrainerReport(state="succeeded", progress={"step": 20, "total_steps": 20},
                           artifacts={"adapter_uri": "s3://b/adapter/"}).to_termination_message()
    done = [gang_pod(0, 1, phase="Succeeded", message=report), gang_pod(1, 1, phase="Succeeded")]
    st = S.derive_status(again(body, st), jobset_obj(restarts=1, conditions=[job_cond("Completed", "AllJobsCompleted")]),
                         done, now=T2)
    assert st["phase"] == Phase.SUCCEEDED and st["artifacts"]["adapterUri"] == "s3://b/adapter/"
    assert st["progress"]["step"] == 20 and st["restartCount"] == 1


def test_jobset_failed_by_its_failure_policy_is_a_trainer_error_with_the_pods_reason():
    body = ftj(resources={"gpus": 8, "nodes": 2})
    report = TrainerReport(state="failed", reason="DataError", message="dataset is empty",
                           field="spec.dataset.train", exit_code=ExitCode.DATA_ERROR).to_termination_message()
    pods = [gang_pod(0, 0, phase="Failed", exit_code=ExitCode.DATA_ERROR, message=report), gang_pod(1, 0, phase="Failed")]
    js = jobset_obj(conditions=[job_cond("Failed", "FailJobSetFailurePolicyAction", "rule PermanentError")])
    st = S.derive_status(body, js, pods, now=T1)
    failed = cond(st, CT.FAILED)
    assert st["phase"] == Phase.FAILED and failed["reason"] == Reason.TRAINER_ERROR
    assert "dataset is empty" in failed["message"]


def test_jobset_out_of_restarts_reads_as_retry_limit_exhausted():
    body = ftj(resources={"gpus": 8, "nodes": 2}, retryLimit=2)
    pods = [gang_pod(0, 2, phase="Failed", exit_code=1), gang_pod(1, 2, phase="Failed", exit_code=1)]
    js = jobset_obj(restarts=2, conditions=[job_cond("Failed", "ReachedMaxRestarts", "jobset failed")])
    st = S.derive_status(body, js, pods, now=T1)
    failed = cond(st, CT.FAILED)
    assert failed["reason"] == Reason.BACKOFF_LIMIT and failed["message"].startswith("retryLimit 2 exhausted")
    assert st["restartCount"] == 2


def test_suspended_jobset():
    body = ftj(resources={"gpus": 8, "nodes": 2}, suspend=True)
    st = S.derive_status(body, jobset_obj(suspend=True), [], now=T1)
    assert st["phase"] == Phase.SUSPENDED


def test_jobset_restarting_says_the_gang_restarts_and_what_counted():
    body = ftj(resources={"gpus": 8, "nodes": 2}, retryLimit=3)
    pods = [gang_pod(0, 0, phase="Failed", exit_code=143), gang_pod(1, 0, phase="Failed", exit_code=143)]
    js = jobset_obj(restarts=1)
    js["status"]["restartsCountTowardsMax"] = 0
    st = S.derive_status(body, js, pods, now=T1)
    running = cond(st, CT.RUNNING)
    assert running["status"] == "False" and running["reason"] == Reason.RESTARTING
    assert "restarts the whole gang" in running["message"] and "0 of retryLimit 3 used" in running["message"]


def test_a_restarting_jobset_is_never_replaced_by_the_operator():
    """JobSet restarts its gang itself: the single-node Job's at-once replacement must not delete it."""
    pods = [gang_pod(0, 0, phase="Failed", exit_code=143), gang_pod(1, 0, phase="Failed", exit_code=143)]
    assert S.waits_for_backoff(jobset_obj(restarts=0), pods, T1) is None
    assert S.waits_for_backoff(jobset_obj(), [], "2026-01-01T05:00:00Z") is None
