"""Storage outages on the real control plane with the real trainer (storage/patience.py, uploader.py):

1. S3 stops mid-run for OUTAGE_S seconds (the cluster's SeaweedFS is killed: connections refused) and comes
   back: the trainer keeps training (checkpoint uploads wait in the background), the job Succeeds with 0 pod
   restarts, and its published metrics cover every step (nothing lost, nothing re-trained);
2. S3 stays down longer than spec.output.storagePatienceSeconds: the job fails at once (podFailurePolicy on exit
   75, no second pod) with reason StorageUnavailable naming the endpoint and the call, and nothing of the run
   looks final (no manifest.json, runs.json does not name it).

    .venv/bin/python -m pytest tests/e2e/test_storage_outage.py -q
"""

from __future__ import annotations

import copy
import json
import time
import uuid

import pytest
import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd, wait_for  # noqa: F401
from tests.e2e.test_run_identity import _json, _keys, _train_steps
from tests.e2e.test_sft_lora_end_to_end import BUCKET, create_s3_secret, ensure_bucket, s3_client, upload_tiny_inputs

STEPS = 80
OUTAGE_S = 60  # the "a 60 s S3 outage mid-run"
SHORT_PATIENCE_S = 15


@pytest.fixture(scope="module")
def env(cluster, crd, tmp_path_factory):
    work = tmp_path_factory.mktemp("storage-outage")
    ns = f"e2e-s3out-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(ns)
    s3 = s3_client(cluster)
    ensure_bucket(s3)
    tag = uuid.uuid4().hex[:6]
    upload_tiny_inputs(s3, work, tag, 200)
    create_s3_secret(cluster, ns)
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"namespace": ns},
        "spec": {
            "stage": "sft", "model": {"source": f"s3://{BUCKET}/models/tiny-{tag}"},
            "dataset": {"format": "chat", "train": [{"uri": f"s3://{BUCKET}/data/{tag}/chat.jsonl"}]},
            "adapter": {"type": "lora", "rank": 8},
            "training": {"maxSteps": STEPS, "batchSize": 2, "learningRate": 0.005, "maxLength": 48,
                         "logEverySteps": 1, "checkpointEverySteps": 4, "keepCheckpoints": 2},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi",
                          "nodeSelector": {"kubetune.dev/local-runner": "true"}},
            # endpoint and credentials come from the runtime (the fixtures' ClusterFineTuneRuntime/default and
            # the operator's configured endpoint: this cluster's SeaweedFS)
            "output": {"uri": f"s3://{BUCKET}/runs-{tag}"},
            "retryLimit": 2,
        },
    }
    op = OperatorProcess(cluster, [ns], work / "operator.log").start()
    try:
        yield {"ns": ns, "s3": s3, "manifest": manifest, "prefix": f"runs-{tag}/{ns}", "operator": op}
    finally:
        op.stop()
        try:
            cluster.start_s3()  # never leave the cluster without S3, whatever failed
        except Exception:  # noqa: BLE001 - it was running
            pass
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _apply(cluster, env, name: str, patience_s: int) -> str:
    m = copy.deepcopy(env["manifest"])
    m["metadata"]["name"] = name
    m["spec"]["output"]["storagePatienceSeconds"] = patience_s
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(m))
    uid = json.loads(cluster.kubectl("get", "ftj", name, "-n", env["ns"], "-o", "json").stdout)["metadata"]["uid"]
    return f"{env['prefix']}/{name}/runs/{uid}"


def _pods(cluster, ns: str, name: str) -> list[dict]:
    return json.loads(cluster.kubectl("get", "pods", "-n", ns, "-l", f"kubetune.dev/job-name={name}",
                                      "-o", "json").stdout)["items"]


def _wait_first_checkpoint(env, run: str) -> None:
    wait_for(lambda: any(k.endswith("/_COMPLETE") for k in _keys(env["s3"], f"{run}/checkpoints/")), 300,
             interval=0.3, message=f"a complete checkpoint under {run}/checkpoints/")


def _progress_step(cluster, ns: str, name: str) -> int:
    obj = json.loads(cluster.kubectl("get", "ftj", name, "-n", ns, "-o", "json").stdout)
    return int(((obj.get("status") or {}).get("progress") or {}).get("step") or 0)


def test_short_outage_costs_nothing(cluster, env):
    ns, name = env["ns"], "blip"
    run = _apply(cluster, env, name, patience_s=300)
    _wait_first_checkpoint(env, run)
    cluster.stop_s3()
    t0 = time.monotonic()
    try:
        time.sleep(OUTAGE_S)
        step_during = _progress_step(cluster, ns, name)
    finally:
        cluster.start_s3()
    print(f"S3 down {time.monotonic() - t0:.0f} s; trainer at step {step_during} when it came back")
    obj = cluster.wait_job(ns, name, timeout=600, context=lambda: env["operator"].logs()[-3000:])
    pods = _pods(cluster, ns, name)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]  # no pod was replaced
    assert all(cs.get("restartCount", 0) == 0 for cs in pods[0]["status"].get("containerStatuses") or [])
    assert not obj["status"].get("restartCount")
    man = _json(env["s3"], f"{run}/manifest.json")
    assert man["metrics"]["steps"] == STEPS and man["resumedFrom"] is None  # never restarted, never resumed
    assert _train_steps(env["s3"], run) == list(range(1, STEPS + 1))  # every step once: none lost or redone
    assert json.loads(env["s3"].get_object(Bucket=BUCKET, Key=f"{env['prefix']}/{name}/runs.json")["Body"]
                      .read())["latest"] == run.rsplit("/", 1)[1]


def test_outage_beyond_patience_fails_once_with_storage_reason(cluster, env):
    ns, name = env["ns"], "outage"
    run = _apply(cluster, env, name, patience_s=SHORT_PATIENCE_S)
    _wait_first_checkpoint(env, run)
    # the outage starts with the SIGTERM: a stopping weed refuses connections at once, and on a loaded machine
    # it can take seconds to exit, which stop_s3() waits out
    t0 = time.monotonic()
    cluster.stop_s3()
    try:
        obj = cluster.wait_job(ns, name, want="Failed", timeout=SHORT_PATIENCE_S + 120,
                               context=lambda: env["operator"].logs()[-3000:])
        failed_after = time.monotonic() - t0
    finally:
        cluster.start_s3()
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    print(f"Failed {failed_after:.0f} s into the outage (patience {SHORT_PATIENCE_S} s): {failed['message'][:300]}")
    assert failed["reason"] == "StorageUnavailable", failed
    assert cluster.s3_endpoint in failed["message"] and "last call:" in failed["message"], failed["message"]
    assert failed_after >= SHORT_PATIENCE_S
    # the retry budget is untouched: one pod, exit 75, failed by the podFailurePolicy, not by backoffLimit
    pods = _pods(cluster, ns, name)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    term = (pods[0]["status"]["containerStatuses"][0]["state"].get("terminated")
            or pods[0]["status"]["containerStatuses"][0]["lastState"].get("terminated"))
    assert term["exitCode"] == 75
    job = json.loads(cluster.kubectl("get", "job", "-n", ns, "-l", f"kubetune.dev/job-name={name}",
                                     "-o", "json").stdout)["items"][0]
    assert job["status"].get("failed") == 1
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"])
    assert not obj["status"].get("restartCount")
    # nothing half-written looks final
    keys = _keys(env["s3"], f"{run}/")
    assert f"{run}/manifest.json" not in keys
    index_key = f"{env['prefix']}/{name}/runs.json"
    assert index_key not in _keys(env["s3"], index_key)
