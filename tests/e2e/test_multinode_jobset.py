"""A multi-node FineTuneJob as a JobSet gang on the real control plane, with the real JobSet controller and the
real trainer: 2 pods x 1 process, gloo, the tiny model.

1. the operator renders a JobSet (not an Indexed Job): its pods rendezvous through rank 0's DNS name and train
   together; one pod is deleted after the first complete checkpoint (SIGTERM, as on preemption); the whole gang
   checkpoints and stops (exit 143), the JobSet's failure policy restarts it WITHOUT using retryLimit
   (RestartJobSetAndIgnoreMaxRestarts on the child Job's podFailurePolicy rule), and the new gang resumes from
   that checkpoint and publishes ONE adapter; every pod of the last gang exits 0, rank 1's included.

    .venv/bin/python -m pytest tests/e2e/test_multinode_jobset.py -q
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd, wait_for  # noqa: F401
from tests.e2e.test_sft_lora_end_to_end import BUCKET, create_s3_secret, ensure_bucket, s3_client, upload_tiny_inputs

NAME = "gang"
STEPS = 20


@pytest.fixture(scope="module")
def env(cluster, crd, tmp_path_factory):
    work = tmp_path_factory.mktemp("jobset")
    ns = f"e2e-gang-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(ns)
    s3 = s3_client(cluster)
    ensure_bucket(s3)
    tag = uuid.uuid4().hex[:6]
    upload_tiny_inputs(s3, work, tag, 120)
    create_s3_secret(cluster, ns)
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": NAME, "namespace": ns},
        "spec": {
            "stage": "sft", "model": {"source": f"s3://{BUCKET}/models/tiny-{tag}"},
            "dataset": {"format": "chat", "train": [{"uri": f"s3://{BUCKET}/data/{tag}/chat.jsonl"}]},
            "adapter": {"type": "lora", "rank": 8},
            "training": {"maxSteps": STEPS, "batchSize": 2, "learningRate": 0.005, "maxLength": 48,
                         "logEverySteps": 5, "checkpointEverySteps": 5, "keepCheckpoints": 2},
            "distributed": {"backend": "gloo", "processesPerNode": 1},
            "resources": {"gpus": 0, "nodes": 2, "cpu": "500m", "memory": "3Gi",
                          "nodeSelector": {"kubetune.dev/local-runner": "true"}},
            "output": {"uri": f"s3://{BUCKET}/runs-{tag}"},  # endpoint: the operator's; Secret: the runtime's
            "retryLimit": 0,  # the restart below must not need one: a disruption is not a failure
        },
    }
    # Grace 90 s, not the fixture's 30: after the SIGTERM checkpoint two torch processes per gang still have to
    # exit, and on a loaded 2-core machine torch's teardown plus torchrun's took 20-30 s (a pod killed at the end
    # of its grace exits 137, which counts against retryLimit like a crash). Production default: 300 s.
    op = OperatorProcess(cluster, [ns], work / "operator.log",
                         extra_env={"KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS": "90"}).start()
    try:
        yield {"ns": ns, "s3": s3, "manifest": manifest, "prefix": f"runs-{tag}/{ns}/{NAME}", "operator": op}
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _keys(s3, prefix: str) -> list[str]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _pods(cluster, ns: str) -> list[dict]:
    return cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"kubetune.dev/job-name={NAME}")["items"]


def _exit_code(pod: dict):
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term["exitCode"]
    return None


def test_two_pod_gang_trains_restarts_whole_after_a_pod_is_deleted_and_resumes(cluster, env):
    ns, s3, prefix = env["ns"], env["s3"], env["prefix"]
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(env["manifest"]))
    uid = cluster.kubectl_json("get", "ftj", NAME, "-n", ns)["metadata"]["uid"]
    run = f"{prefix}/runs/{uid}"

    # the operator made a JobSet whose one child Job is the 2-pod gang, not a plain Job
    js = wait_for(lambda: cluster.kubectl_json("get", "jobsets.jobset.x-k8s.io", NAME, "-n", ns)
                  if cluster.kubectl("get", "jobsets.jobset.x-k8s.io", NAME, "-n", ns, check=False).returncode == 0
                  else None, 30, message="the JobSet")
    assert js["metadata"]["ownerReferences"][0]["uid"] == uid
    jobs = cluster.kubectl_json("get", "jobs", "-n", ns)["items"]
    assert [j["metadata"]["name"] for j in jobs] == [f"{NAME}-node-0"]
    assert jobs[0]["spec"]["completions"] == 2

    # both ranks train: delete rank 1's pod once the run has a complete checkpoint
    wait_for(lambda: any(k.endswith("/_COMPLETE") for k in _keys(s3, f"{run}/checkpoints/")), 300, interval=0.5,
             message=f"a complete checkpoint under {run}/checkpoints/ "
                     f"(operator log: {env['operator'].logs()[-2000:]})")
    first = {p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]: p for p in _pods(cluster, ns)}
    assert sorted(first) == ["0", "1"], first.keys()
    assert first["0"]["spec"]["hostname"] == f"{NAME}-node-0-0" and first["0"]["spec"]["subdomain"] == f"{NAME}-workers"
    cluster.kubectl("delete", "pod", "-n", ns, first["1"]["metadata"]["name"], "--wait=false")

    obj = cluster.wait_job(ns, NAME, timeout=420, context=lambda: env["operator"].logs()[-3000:])
    elapsed = time.monotonic() - started

    # the gang restarted once, and the restart did not count against retryLimit (0)
    js = cluster.kubectl_json("get", "jobsets.jobset.x-k8s.io", NAME, "-n", ns)
    assert js["status"]["restarts"] == 1, js["status"]
    assert js["status"].get("restartsCountTowardsMax", 0) == 0, js["status"]
    assert obj["status"]["restartCount"] == 1
    assert obj["status"]["workload"]["kind"] == "JobSet"

    # the restarted gang resumed this run's checkpoint (step > 0), and the run published one adapter
    manifest = _json(s3, f"{run}/manifest.json")
    assert manifest["run"]["id"] == uid
    resumed = re.search(r"/checkpoints/checkpoint-(\d+)/?$", manifest["resumedFrom"] or "")
    assert resumed and int(resumed.group(1)) > 0, manifest["resumedFrom"]
    assert manifest["metrics"]["steps"] == STEPS
    adapters = [k for k in _keys(s3, f"{prefix}/") if k.endswith("adapter_model.safetensors")
                and "/checkpoints/" not in k]
    assert adapters == [f"{run}/adapter/adapter_model.safetensors"], adapters
    index = _json(s3, f"{prefix}/runs.json")
    assert [r["runId"] for r in index["runs"]] == [uid]
    assert obj["status"]["artifacts"]["adapterUri"] == f"s3://{BUCKET}/{run}/adapter"

    # the last gang: new pods (not the deleted one's survivor), both exited 0, rank 1 included
    last = _pods(cluster, ns)
    assert len(last) == 2 and not {p["metadata"]["uid"] for p in last} & {p["metadata"]["uid"] for p in first.values()}
    assert sorted(_exit_code(p) for p in last) == [0, 0], [p["status"] for p in last]
    print(f"2-pod gang: {STEPS} steps with one whole-gang restart in {elapsed:.0f} s, resumed from step "
          f"{resumed.group(1)}")


# ------------------------------------------------------------------------------------------------ failure policy
# The failure handling the operator renders (render_jobset.failure_policy + pod_failure_policy), checked against
# the real JobSet and Job controllers with pods that only exit: attempt -> {completion index: exit code}.
POLICY_MEMBER = """
import os, sys, time, json
attempt, index = os.environ["ATTEMPT"], os.environ["JOB_COMPLETION_INDEX"]
code = json.loads(os.environ["PLAN"]).get(attempt, {}).get(index)
print(f"attempt={attempt} index={index} exit={code}", flush=True)
if code is None:
    time.sleep(60)   # a survivor: the child Job's failure must stop it
    sys.exit(0)
time.sleep(1)
sys.exit(code)
"""


def _policy_jobset(name: str, plan: dict, max_restarts: int) -> dict:
    from kubetune_operator import render_jobset as JS

    env = [{"name": "ATTEMPT", "valueFrom": {"fieldRef": {
               "fieldPath": f"metadata.annotations['{JS.RESTART_ATTEMPT_LABEL}']"}}},
           {"name": "PLAN", "value": json.dumps(plan)}]
    pod = {"restartPolicy": "Never", "nodeSelector": {"kubetune.dev/local-runner": "true"},
           "terminationGracePeriodSeconds": 2,
           "containers": [{"name": "trainer", "image": "python:3.11-slim", "command": ["python", "-c", POLICY_MEMBER],
                           "env": env}]}
    job = {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
           "podFailurePolicy": JS.pod_failure_policy("trainer"), "template": {"spec": pod}}
    return {"apiVersion": JS.API_VERSION, "kind": JS.KIND, "metadata": {"name": name},
            "spec": {"failurePolicy": JS.failure_policy(max_restarts),
                     "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": job}}]}}


def _jobset_done(cluster, ns: str, name: str):
    obj = cluster.kubectl_json("get", "jobsets.jobset.x-k8s.io", name, "-n", ns)
    done = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] in ("Completed", "Failed")
            and c["status"] == "True"]
    return (obj, done[0]) if done else None


def test_jobset_failure_policy_against_the_real_controllers(cluster, namespace):
    """143 (SIGTERM after a checkpoint) and an eviction restart the gang without counting; a crash (exit 1) counts
    against maxRestarts; a permanent exit code (78) fails the JobSet at once, without a restart."""
    cluster.apply([_policy_jobset("free-then-counted", {"0": {"1": 143}, "1": {"0": 1}, "2": {"0": 0, "1": 0}}, 1),
                   _policy_jobset("permanent", {"0": {"0": 78}}, 3),
                   _policy_jobset("evicted", {"1": {"0": 0, "1": 0}}, 0)], namespace=namespace)
    # an eviction (as for preemption or a node drain: the API server marks the pod DisruptionTarget) restarts the
    # gang for free, even with maxRestarts 0

    def running_pod():
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "jobset.sigs.k8s.io/jobset-name=evicted")
        return next((p for p in pods["items"] if p["status"].get("phase") == "Running"), None)
    victim = cluster.wait_for(running_pod, timeout=60, desc="a running pod of JobSet evicted")
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": victim["metadata"]["name"], "namespace": namespace}}
    cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{victim['metadata']['name']}/eviction",
                    "-f", "-", input=json.dumps(eviction))
    restarted, cond = cluster.wait_for(lambda: _jobset_done(cluster, namespace, "free-then-counted"), timeout=120,
                                       desc="JobSet free-then-counted finished")
    assert cond["type"] == "Completed", (cond, restarted["status"])
    # two gang restarts, only the crash counted: maxRestarts 1 was enough
    assert restarted["status"]["restarts"] == 2 and restarted["status"]["restartsCountTowardsMax"] == 1
    failed, cond = cluster.wait_for(lambda: _jobset_done(cluster, namespace, "permanent"), timeout=60,
                                    desc="JobSet permanent finished")
    assert cond["type"] == "Failed" and cond["reason"] == "FailJobSetFailurePolicyAction", cond
    assert failed["status"].get("restarts", 0) == 0
    evicted, cond = cluster.wait_for(lambda: _jobset_done(cluster, namespace, "evicted"), timeout=90,
                                     desc="JobSet evicted finished")
    assert cond["type"] == "Completed", (cond, evicted["status"])
    assert evicted["status"]["restarts"] == 1 and evicted["status"].get("restartsCountTowardsMax", 0) == 0
