"""The FineTunePipeline reconciler against the in-memory API server: stages created one at a time, owned and
named deterministically; hand-over by artifact URI; gates stop and (after a threshold fix) continue; retryFrom
replaces only the named stage and later ones; suspend; name conflicts; invalid specs; metrics."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import yaml

from kubetune_api import constants as C
from kubetune_operator.kube import EventRecorder
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.pipeline import RETRY_NONCE_ANNOTATION, PipelineReconciler, ftj_path, pipeline_path
from tests.unit.operator.builders import FakeKube

REPO = Path(__file__).resolve().parents[3]
NS = "ml"
PUID = "pipe-uid-1"


def pipeline_body(**spec_changes) -> dict:
    m = yaml.safe_load((REPO / "examples" / "local" / "pipeline-sft-dpo-grpo.yaml").read_text())
    m["metadata"] = {"name": "stack", "namespace": NS, "uid": PUID, "generation": 1}
    m["spec"]["model"]["source"] = "s3://models/base"
    for s in m["spec"]["stages"]:
        s["job"]["output"] = {"uri": "s3://results/ft"}
        s["job"]["dataset"]["train"] = [{"uri": f"s3://data/{s['name']}.jsonl"}]
        if s["job"].get("evaluation"):
            s["job"]["evaluation"]["reference"] = [{"uri": "s3://data/general.jsonl"}]
    m["spec"].update(spec_changes)
    return m


def setup(body=None):
    kube = FakeKube()
    kube.put(body or pipeline_body())
    metrics = OperatorMetrics()
    return kube, PipelineReconciler(kube, EventRecorder(kube, instance="test"), metrics=metrics), metrics


def run(rec, name="stack"):
    return asyncio.run(rec.reconcile(NS, name))


def pipeline(kube) -> dict:
    return kube.objects[pipeline_path(NS, "stack")]


def child(kube, stage):
    return kube.objects.get(ftj_path(NS, f"stack-{stage}"))


def finish(kube, stage, phase="Succeeded", **progress):
    obj = child(kube, stage)
    base = f"s3://results/ft/{NS}/stack-{stage}/runs/{obj['metadata']['uid']}"
    obj["status"] = {"phase": phase, "progress": {"evalLoss": 1.0, "metric": "m", **progress},
                     "forgetting": {"relativeChange": 0.01},
                     "artifacts": {"adapterUri": f"{base}/adapter", "mergedModelUri": f"{base}/merged",
                                   "runId": obj["metadata"]["uid"]}}


def cond(kube, type_):
    return next(c for c in pipeline(kube)["status"]["conditions"] if c["type"] == type_)


def test_first_stage_only_then_hand_over_after_the_gate():
    kube, rec, metrics = setup()
    run(rec)
    sft = child(kube, "sft")
    assert child(kube, "dpo") is None and child(kube, "grpo") is None
    assert sft["metadata"]["ownerReferences"][0]["uid"] == PUID
    assert sft["metadata"]["ownerReferences"][0]["controller"] is True
    assert sft["metadata"]["labels"]["kubetune.dev/pipeline"] == "stack"
    assert sft["spec"]["model"]["source"] == "s3://models/base"
    assert sft["spec"]["output"]["mergedModel"] is True  # dpo takes the merged model
    st = pipeline(kube)["status"]
    assert st["phase"] == "Running" and st["progress"] == "1/3" and st["currentStage"] == "sft"
    run(rec)  # nothing changed: nothing new
    assert child(kube, "dpo") is None

    finish(kube, "sft")
    run(rec)
    dpo = child(kube, "dpo")
    assert dpo["spec"]["model"]["source"].endswith(f"stack-sft/runs/{sft['metadata']['uid']}/merged")
    st = pipeline(kube)["status"]
    assert st["stages"][0]["gate"]["state"] == "Passed" and st["progress"] == "2/3"
    assert metrics.metrics["kubetune_operator_pipeline_current_stage"].labels(NS, "stack")._value.get() == 2
    assert metrics.metrics["kubetune_operator_pipeline_stage"].labels(NS, "stack", "sft", "stack-sft")._value.get() == 1


def _to_dpo_done(kube, rec, **dpo_progress):
    run(rec)
    finish(kube, "sft")
    run(rec)
    finish(kube, "dpo", **dpo_progress)
    run(rec)


def test_failed_gate_stops_naming_metric_then_threshold_fix_continues_without_rerun():
    kube, rec, _ = setup()
    _to_dpo_done(kube, rec, rewardAccuracy=0.2)  # gate: minRewardAccuracy 0.3
    assert child(kube, "grpo") is None
    failed = cond(kube, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "GateFailed"
    assert "rewardAccuracy 0.2 < 0.3 (gate.minRewardAccuracy)" in failed["message"]
    assert pipeline(kube)["status"]["phase"] == "Failed"
    assert any(e["reason"] == "GateFailed" and e["type"] == "Warning" for e in kube.events)
    uids = {s: child(kube, s)["metadata"]["uid"] for s in ("sft", "dpo")}
    before = len(kube.mutations())

    body = pipeline(kube)
    body["spec"]["stages"][1]["gate"]["minRewardAccuracy"] = 0.1  # the fix
    body["metadata"]["generation"] = 2
    run(rec)
    assert child(kube, "grpo") is not None
    assert {s: child(kube, s)["metadata"]["uid"] for s in ("sft", "dpo")} == uids
    assert not [m for m in kube.mutations()[before:] if m[0] == "DELETE"]
    assert cond(kube, "Failed")["status"] == "False" and pipeline(kube)["status"]["phase"] == "Running"
    # tightening a gate after the next stage started does not undo it
    body["spec"]["stages"][1]["gate"]["minRewardAccuracy"] = 0.9
    run(rec)
    assert pipeline(kube)["status"]["stages"][1]["gate"]["state"] == "Passed"
    finish(kube, "grpo", meanReward=0.5)
    run(rec)
    st = pipeline(kube)["status"]
    assert st["phase"] == "Succeeded" and cond(kube, "Succeeded")["status"] == "True"
    assert "stack-grpo" in cond(kube, "Succeeded")["message"]


def test_retry_from_replaces_that_stage_and_later_only_once():
    kube, rec, _ = setup()
    _to_dpo_done(kube, rec, rewardAccuracy=0.9)
    sft_uid = child(kube, "sft")["metadata"]["uid"]
    old_dpo = child(kube, "dpo")["metadata"]["uid"]
    assert child(kube, "grpo") is not None
    pipeline(kube)["spec"]["retryFrom"] = "dpo"
    run(rec)
    assert child(kube, "dpo") is None and child(kube, "grpo") is None
    assert child(kube, "sft")["metadata"]["uid"] == sft_uid
    assert pipeline(kube)["status"]["handledRetry"] == "dpo/"
    run(rec)
    new_dpo = child(kube, "dpo")
    assert new_dpo["metadata"]["uid"] != old_dpo and child(kube, "grpo") is None
    assert new_dpo["spec"]["model"]["source"].endswith(f"/runs/{sft_uid}/merged")
    finish(kube, "dpo", rewardAccuracy=0.9)
    run(rec)
    run(rec)  # the same retryFrom is not acted on again
    assert child(kube, "dpo")["metadata"]["uid"] == new_dpo["metadata"]["uid"] and child(kube, "grpo")
    pipeline(kube)["metadata"]["annotations"] = {RETRY_NONCE_ANNOTATION: "2"}  # ... unless the nonce changes
    run(rec)
    assert child(kube, "dpo") is None


def test_suspend_reaches_the_running_stage_and_holds_the_next():
    kube, rec, _ = setup()
    run(rec)
    pipeline(kube)["spec"]["suspend"] = True
    run(rec)
    assert child(kube, "sft")["spec"]["suspend"] is True
    assert pipeline(kube)["status"]["phase"] == "Suspended"
    finish(kube, "sft")
    run(rec)
    assert child(kube, "dpo") is None and pipeline(kube)["status"]["phase"] == "Suspended"
    pipeline(kube)["spec"]["suspend"] = False
    run(rec)
    assert child(kube, "dpo")["spec"]["suspend"] is False


def test_foreign_job_with_the_stage_name_is_a_conflict_not_adopted():
    kube, rec, _ = setup()
    kube.put({"apiVersion": C.API_VERSION, "kind": C.KIND, "metadata": {"name": "stack-sft", "namespace": NS},
              "spec": {}})
    result = run(rec)
    assert result.state == "waiting"
    assert cond(kube, "Running")["reason"] == "ChildNameConflict"
    assert "stack-sft" in pipeline(kube)["status"]["message"] and "delete or rename" in pipeline(kube)["status"]["message"]
    assert "ownerReferences" not in child(kube, "sft")["metadata"]


def test_earlier_pipeline_of_the_same_name_is_waited_for():
    kube, rec, _ = setup()
    run(rec)
    child(kube, "sft")["metadata"]["ownerReferences"][0]["uid"] = "old-pipeline-uid"
    result = run(rec)
    assert result.state == "waiting" and "waiting for the previous FineTuneJob stack-sft" in result.message


def test_manual_approval_waits_for_the_annotation():
    body = pipeline_body()
    body["spec"]["stages"][0]["gate"]["manualApproval"] = True
    kube, rec, _ = setup(body)
    run(rec)
    finish(kube, "sft")
    run(rec)
    assert child(kube, "dpo") is None
    st = pipeline(kube)["status"]
    assert st["stages"][0]["gate"]["state"] == "AwaitingApproval"
    assert "kubectl annotate ftp/stack -n ml gates.kubetune.dev/sft=approved" in st["message"]
    pipeline(kube)["metadata"]["annotations"] = {"gates.kubetune.dev/sft": "approved"}
    run(rec)
    assert child(kube, "dpo") is not None


def test_failed_stage_fails_the_pipeline_with_its_message():
    kube, rec, _ = setup()
    run(rec)
    finish(kube, "sft", phase="Failed")
    child(kube, "sft")["status"]["message"] = "spec.dataset.train: no rows"
    run(rec)
    failed = cond(kube, "Failed")
    assert failed["reason"] == "StageFailed" and "no rows" in failed["message"] and "retryFrom: sft" in failed["message"]


@pytest.mark.parametrize("handover, says", [
    ("weights", "spec.stages[1].handover"),
    ("continue", "use handover merge"),  # continue into dpo: its reference would be the bare base
])
def test_invalid_pipeline_fails_with_the_field_before_any_stage_starts(handover, says):
    body = pipeline_body()
    body["spec"]["stages"][1]["handover"] = handover
    kube, rec, _ = setup(body)
    result = run(rec)
    assert result.state == "invalid" and child(kube, "sft") is None
    failed = cond(kube, "Failed")
    assert failed["reason"] == "InvalidSpec" and says in failed["message"]


def test_continue_hands_over_the_same_base_and_the_previous_adapter():
    """handover continue: the next stage's FineTuneJob trains the base the previous stage trained on (here sft's
    merged model, which dpo trained on) starting from the previous stage's adapter; the previous stage writes
    no merged model; the status names the adapter each stage started from."""
    body = pipeline_body()
    body["spec"]["stages"][2]["handover"] = "continue"
    kube, rec, _ = setup(body)
    _to_dpo_done(kube, rec, rewardAccuracy=0.9)
    sft_uid, dpo = child(kube, "sft")["metadata"]["uid"], child(kube, "dpo")
    assert dpo["spec"]["output"].get("mergedModel", False) is False
    grpo = child(kube, "grpo")
    dpo_base = f"s3://results/ft/{NS}/stack-sft/runs/{sft_uid}/merged"
    assert dpo["spec"]["model"]["source"] == dpo_base and "adapter" not in dpo["spec"]["model"]
    assert grpo["spec"]["model"] == {**dpo["spec"]["model"],
                                     "adapter": f"s3://results/ft/{NS}/stack-dpo/runs/{dpo['metadata']['uid']}/adapter"}
    stages = pipeline(kube)["status"]["stages"]
    assert stages[2]["modelSource"] == dpo_base and stages[2]["modelAdapter"] == grpo["spec"]["model"]["adapter"]
    assert "modelAdapter" not in stages[1]
    run(rec)  # a repeated reconcile works the same hand-over out again: nothing changes
    assert child(kube, "grpo") == grpo
