"""Every run is its own, on the real control plane with the real trainer (runs.py):

1. a FineTuneJob's pod is deleted mid-run (SIGTERM, as on preemption or a node drain): the Job's next pod resumes
   from the checkpoint of the SAME run (runs/<uid>/checkpoints/...) and finishes;
2. the FineTuneJob is deleted and applied again with another learning rate (what a GitOps tool does): the new
   object has a new uid, so a new run starts at step 0 beside the first one; both results stay intact, and
   status.artifacts and runs.json name the new run.

    .venv/bin/python -m pytest tests/e2e/test_run_identity.py -q
"""

from __future__ import annotations

import copy
import json
import time
import uuid

import pytest
import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd, wait_for  # noqa: F401
from tests.e2e.test_sft_lora_end_to_end import BUCKET, create_s3_secret, ensure_bucket, s3_client, upload_tiny_inputs

NAME = "again"
STEPS = 60


@pytest.fixture(scope="module")
def env(cluster, crd, tmp_path_factory):
    work = tmp_path_factory.mktemp("run-identity")
    ns = f"e2e-runid-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(ns)
    s3 = s3_client(cluster)
    ensure_bucket(s3)
    tag = uuid.uuid4().hex[:6]
    upload_tiny_inputs(s3, work, tag, 200)
    create_s3_secret(cluster, ns)
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": NAME, "namespace": ns},
        "spec": {
            "stage": "sft", "model": {"source": f"s3://{BUCKET}/models/tiny-{tag}"},
            "dataset": {"format": "chat", "train": [{"uri": f"s3://{BUCKET}/data/{tag}/chat.jsonl"}],
                        "evalFraction": 0.05},
            "adapter": {"type": "lora", "rank": 8},
            "training": {"maxSteps": STEPS, "batchSize": 2, "learningRate": 0.005, "maxLength": 48,
                         "logEverySteps": 5, "evalEverySteps": 30, "checkpointEverySteps": 10,
                         "keepCheckpoints": 2},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi",
                          "nodeSelector": {"kubetune.dev/local-runner": "true"}},
            "output": {"uri": f"s3://{BUCKET}/runs-{tag}"},
            "retryLimit": 2,
        },
    }
    op = OperatorProcess(cluster, [ns], work / "operator.log").start()
    try:
        yield {"ns": ns, "s3": s3, "manifest": manifest, "prefix": f"runs-{tag}/{ns}/{NAME}", "operator": op}
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _keys(s3, prefix: str) -> dict[str, str]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def _json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _ftj(cluster, ns: str) -> dict:
    return json.loads(cluster.kubectl("get", "ftj", NAME, "-n", ns, "-o", "json").stdout)


def _succeeded(cluster, env) -> dict:
    return cluster.wait_job(env["ns"], NAME, timeout=600, context=lambda: env["operator"].logs()[-3000:])


def _train_steps(s3, run_prefix: str) -> list[int]:
    text = s3.get_object(Bucket=BUCKET, Key=f"{run_prefix}/metrics.jsonl")["Body"].read().decode()
    return [e["step"] for e in map(json.loads, text.splitlines()) if e.get("event") == "train"]


def test_pod_kill_resumes_the_same_run_and_a_recreated_job_starts_fresh_beside_it(cluster, env):
    ns, s3, prefix = env["ns"], env["s3"], env["prefix"]
    first = copy.deepcopy(env["manifest"])
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(first))
    uid1 = _ftj(cluster, ns)["metadata"]["uid"]
    run1 = f"{prefix}/runs/{uid1}"

    # 1. kill the pod once the run has a complete checkpoint; the next pod resumes it
    wait_for(lambda: any(k.endswith("/_COMPLETE") for k in _keys(s3, f"{run1}/checkpoints/")), 300, interval=0.5,
             message=f"a complete checkpoint under {run1}/checkpoints/")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-l", f"kubetune.dev/job-name={NAME}",
                                      "-o", "json").stdout)["items"]
    assert pods, "no trainer pod"
    cluster.kubectl("delete", "pod", "-n", ns, pods[0]["metadata"]["name"], "--wait=false")
    obj1 = _succeeded(cluster, env)
    m1 = _json(s3, f"{run1}/manifest.json")
    assert m1["run"]["id"] == uid1
    assert m1["resumedFrom"] and m1["resumedFrom"].startswith(f"s3://{BUCKET}/{run1}/checkpoints/checkpoint-"), m1
    assert m1["metrics"]["steps"] == STEPS
    assert obj1["status"]["artifacts"]["runId"] == uid1
    before = {k: v for k, v in _keys(s3, f"{run1}/").items()}

    # 2. delete and re-apply with another learning rate: a new uid, a fresh run beside the first
    cluster.kubectl("delete", "ftj", NAME, "-n", ns, "--wait=true", "--timeout=60s")
    second = copy.deepcopy(env["manifest"])
    second["spec"]["training"]["learningRate"] = 0.002
    started = time.time()
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(second))
    uid2 = _ftj(cluster, ns)["metadata"]["uid"]
    assert uid2 != uid1
    obj2 = _succeeded(cluster, env)
    run2 = f"{prefix}/runs/{uid2}"
    m2 = _json(s3, f"{run2}/manifest.json")
    assert m2["run"]["id"] == uid2 and m2["resumedFrom"] is None
    assert m2["config"]["spec"]["training"]["learningRate"] == 0.002
    steps = _train_steps(s3, run2)
    assert min(steps) == 1 and max(steps) == STEPS  # from step 0: a new loss curve, not the old run's 61/60
    arts = obj2["status"]["artifacts"]
    assert arts["runId"] == uid2 and arts["outputUri"] == f"s3://{BUCKET}/{run2}/"
    assert arts["adapterUri"] == f"s3://{BUCKET}/{run2}/adapter" and arts["indexUri"] == f"s3://{BUCKET}/{prefix}/runs.json"
    index = _json(s3, f"{prefix}/runs.json")
    assert index["latest"] == uid2 and [r["runId"] for r in index["runs"]] == [uid1, uid2]
    # the first run: every object as it was (same keys, same ETags), its result complete
    assert {k: v for k, v in _keys(s3, f"{run1}/").items()} == before
    assert f"{run1}/adapter/adapter_model.safetensors" in before and f"{run1}/manifest.json" in before
    print(f"re-created job: fresh run of {STEPS} steps in {time.time() - started:.0f} s")
