"""The operator against the real control plane, with pods on KWOK's fake GPU nodes: scheduling with GPU
requests, status that follows the pods to Succeeded/Failed, multi-node wiring, suspend, deletion, and an
operator restart mid-job. (The real trainer runs in test_sft_lora_end_to_end.py.)"""

from __future__ import annotations

import copy
import json
import signal

import yaml

from tests.e2e.kubetune_fixtures import crd, operator, wait_for  # noqa: F401

BASE = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "gpu"},
    "spec": {
        "stage": "sft",
        "model": {"source": "s3://models/tiny"},
        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
        "output": {"uri": "s3://kubetune/runs"},
        "resources": {"gpus": 2},
        "retryLimit": 0,
    },
}


def ftj(name: str, annotations: dict | None = None, **spec) -> dict:
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = name
    for key, value in spec.items():
        obj["spec"][key] = value
    if annotations:
        obj["spec"].setdefault("resources", {})["podAnnotations"] = annotations
    return obj


def apply(cluster, namespace, obj):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))


def get(cluster, namespace, kind, name):
    r = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def condition(obj, ctype):
    for c in (obj or {}).get("status", {}).get("conditions", []) or []:
        if c["type"] == ctype:
            return c
    return None


def pods_of(cluster, namespace, name):
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"kubetune.dev/job-name={name}", "-o", "json").stdout
    return json.loads(out)["items"]


def test_gpu_job_lands_on_gpu_node_and_succeeds(cluster, namespace, operator):
    apply(cluster, namespace, ftj("gpu"))
    cluster.wait_job(namespace, "gpu", want="Succeeded", timeout=90, context=operator.logs)
    pods = pods_of(cluster, namespace, "gpu")
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] in ("gpu-node-0", "gpu-node-1")
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    obj = get(cluster, namespace, "ftj", "gpu")
    assert obj["status"]["phase"] == "Succeeded"
    assert condition(obj, "Succeeded")["status"] == "True"
    assert condition(obj, "Succeeded")["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["workload"]["name"] == "gpu-trainer"
    # Events tell the story for `kubectl describe`.
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "involvedObject.name=gpu,involvedObject.kind=FineTuneJob", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert reasons, "no events recorded for the FineTuneJob"
    described = cluster.kubectl("describe", "ftj", "gpu", "-n", namespace).stdout
    assert "Succeeded" in described


def test_permanent_trainer_error_fails_at_once_with_the_trainers_message(cluster, namespace, operator):
    report = {"state": "failed", "reason": "InvalidDataset", "exitCode": 65,
              "message": "spec.dataset.train[0]: file chat.jsonl has no column 'messages' (found: text)"}
    apply(cluster, namespace, ftj("broken", annotations={
        "kubetune.dev/kwok-outcome": "fail", "kubetune.dev/kwok-exit-code": "65",
        "kubetune.dev/kwok-message": json.dumps(report)}, retryLimit=3))
    cluster.wait_job(namespace, "broken", want="Failed", timeout=90, context=operator.logs)
    obj = get(cluster, namespace, "ftj", "broken")
    failed = condition(obj, "Failed")
    assert failed["reason"] == "TrainerError"
    assert "no column 'messages'" in failed["message"]
    assert obj["status"]["phase"] == "Failed"
    # permanent: no retries although retryLimit is 3
    assert len(pods_of(cluster, namespace, "broken")) == 1


def test_retriable_failure_exhausts_retry_limit(cluster, namespace, operator):
    apply(cluster, namespace, ftj("flaky", annotations={
        "kubetune.dev/kwok-outcome": "fail", "kubetune.dev/kwok-exit-code": "1",
        "kubetune.dev/kwok-message": "CUDA error: an illegal memory access was encountered"}, retryLimit=1))
    cluster.wait_job(namespace, "flaky", want="Failed", timeout=120, context=operator.logs)
    obj = get(cluster, namespace, "ftj", "flaky")
    assert condition(obj, "Failed")["reason"] == "BackoffLimitExceeded"
    assert len(pods_of(cluster, namespace, "flaky")) == 2  # first try + 1 retry
    assert obj["status"].get("restartCount", 0) >= 1


def test_multi_node_job_is_a_jobset_with_a_stable_rank0_address(cluster, namespace, operator):
    """nodes > 1 runs as a JobSet (render_jobset.py): no plain Job, no operator-made Service; rank 0's address is
    pod 0's DNS hostname, and the real JobSet controller creates the Indexed child Job with that subdomain."""
    apply(cluster, namespace, ftj("multi", annotations={"kubetune.dev/kwok-outcome": "hold"},
                                  resources={"gpus": 8, "nodes": 2}))
    js = wait_for(lambda: get(cluster, namespace, "jobsets.jobset.x-k8s.io", "multi"), 30, message="JobSet")
    assert js["spec"]["network"]["enableDNSHostnames"] and js["spec"]["network"]["subdomain"] == "multi-workers"
    child = wait_for(lambda: get(cluster, namespace, "job", "multi-node-0"), 60, message="JobSet's child Job")
    assert child["spec"]["completionMode"] == "Indexed"
    assert child["spec"]["completions"] == child["spec"]["parallelism"] == 2
    assert get(cluster, namespace, "job", "multi-trainer") is None, "no plain Job for a multi-node job"
    tmpl = child["spec"]["template"]["spec"]
    cmd = " ".join(tmpl["containers"][0]["command"] + tmpl["containers"][0].get("args", []))
    assert "kubetune_trainer.launch" in cmd and "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd
    assert f"multi-node-0-0.multi-workers.{namespace}.svc" in cmd, cmd
    pods = wait_for(lambda: [p for p in pods_of(cluster, namespace, "multi") if p["spec"].get("nodeName")]
                    if len([p for p in pods_of(cluster, namespace, "multi") if p["spec"].get("nodeName")]) == 2 else None,
                    60, message="2 scheduled pods")
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-node-0", "gpu-node-1"}  # 8 GPUs each: one pod per node
    assert {p["spec"].get("subdomain") for p in pods} == {"multi-workers"}
    cluster.wait_job(namespace, "multi", want="Running", timeout=60, context=operator.logs)
    assert get(cluster, namespace, "ftj", "multi")["status"]["workload"]["kind"] == "JobSet"


def test_suspend_maps_to_the_job_and_back(cluster, namespace, operator):
    apply(cluster, namespace, ftj("pausable", annotations={"kubetune.dev/kwok-outcome": "hold"}))
    wait_for(lambda: get(cluster, namespace, "job", "pausable-trainer"), 30, message="Job")
    cluster.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: (get(cluster, namespace, "job", "pausable-trainer") or {}).get("spec", {}).get("suspend"),
             30, message="Job suspended")
    cluster.wait_job(namespace, "pausable", want="Suspended", timeout=60, context=operator.logs)
    wait_for(lambda: not pods_of(cluster, namespace, "pausable"), 60, message="pods gone while suspended")
    assert get(cluster, namespace, "ftj", "pausable")["status"]["phase"] == "Suspended"
    cluster.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: pods_of(cluster, namespace, "pausable"), 60, message="pods back after resume")


def test_delete_removes_children(cluster, namespace, operator):
    apply(cluster, namespace, ftj("doomed", annotations={"kubetune.dev/kwok-outcome": "hold"}, resources={"gpus": 1, "nodes": 2}))
    wait_for(lambda: get(cluster, namespace, "jobsets.jobset.x-k8s.io", "doomed"), 30, message="children")
    wait_for(lambda: pods_of(cluster, namespace, "doomed"), 60, message="pods")
    cluster.kubectl("delete", "ftj", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    for kind, name in (("jobsets.jobset.x-k8s.io", "doomed"), ("job", "doomed-node-0"), ("configmap", "doomed-config")):
        wait_for(lambda: get(cluster, namespace, kind, name) is None, 60, message=f"{kind}/{name} deleted")
    wait_for(lambda: not pods_of(cluster, namespace, "doomed"), 90, message="pods deleted")


def test_operator_restart_mid_job_leaves_exactly_one_job(cluster, namespace, operator):
    apply(cluster, namespace, ftj("restart", annotations={"kubetune.dev/kwok-outcome": "hold"}))
    wait_for(lambda: get(cluster, namespace, "job", "restart-trainer"), 30, message="Job")
    operator.stop(signal.SIGKILL)  # no graceful shutdown: the worst case
    operator.start()
    cluster.wait_job(namespace, "restart", want="Running", timeout=60, context=operator.logs)
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-l", "kubetune.dev/job-name=restart",
                                      "-o", "json").stdout)["items"]
    assert len(jobs) == 1
    assert len(pods_of(cluster, namespace, "restart")) == 1
    # re-applying the same manifest is a no-op too
    apply(cluster, namespace, ftj("restart", annotations={"kubetune.dev/kwok-outcome": "hold"}))
    jobs = json.loads(cluster.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(jobs) == 1


def test_invalid_spec_that_passes_cel_fails_with_invalid_spec(cluster, namespace, operator):
    """Rules the operator checks (CEL cannot): a custom reward without its source file."""
    obj = ftj("badreward", stage="grpo",
              dataset={"format": "prompt_only", "train": [{"uri": "s3://d/p.jsonl"}]},
              training={"grpo": {"rewards": [{"name": "my_rewards:score"}]}})
    apply(cluster, namespace, obj)
    cluster.wait_job(namespace, "badreward", want="Failed", timeout=60, context=operator.logs)
    failed = condition(get(cluster, namespace, "ftj", "badreward"), "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "rewards[0].source" in failed["message"]
    assert get(cluster, namespace, "job", "badreward-trainer") is None
