"""FineTuneJobs queued through the real Kueue controller (v0.17.0, run by scripts/cluster/up.sh) and the operator:

1. quota: 6 FineTuneJobs x 8 GPUs (fake pods on the KWOK GPU nodes) against the 16-GPU ClusterQueue `kubetune`:
   never more than 2 trainer Jobs unsuspended at once, the others show phase Queued (Admitted=False,
   WaitingForAdmission), all succeed, and each one's GPU-seconds are in status and in the operator's
   kubetune_job_gpu_seconds_total;
2. preemption: a real trainer (tiny model, local runner) in a low WorkloadPriorityClass is preempted by a
   high-priority job in a 1-CPU ClusterQueue of its own; Kueue suspends its Job, the trainer checkpoints on
   SIGTERM (exit 143), the FineTuneJob shows Admitted=False/Preempted, and when re-admitted the trainer resumes
   from that very checkpoint step and finishes.

    .venv/bin/python -m pytest tests/e2e/test_kueue_queueing.py -q -s
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import urllib.request
import uuid

import pytest
import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd, wait_for  # noqa: F401
from tests.e2e.test_sft_lora_end_to_end import BUCKET, create_s3_secret, ensure_bucket, s3_client, upload_tiny_inputs

FAKE = {
    "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
    "spec": {
        "stage": "sft", "model": {"source": "s3://models/tiny"},
        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
        "output": {"uri": "s3://kubetune/runs"},
        "resources": {"gpus": 8, "podAnnotations": {"kubetune.dev/kwok-duration": "4s"}},
        "retryLimit": 0,
    },
}


def _apply(cluster, ns: str, obj: dict | list) -> None:
    docs = obj if isinstance(obj, list) else [obj]
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))


def _ftjs(cluster, ns: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in cluster.kubectl_json("get", "finetunejobs", "-n", ns)["items"]}


def _cond(obj: dict, ctype: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def _operator_metric(name: str, **labels: str) -> float | None:
    port = os.environ.get("KUBETUNE_OPERATOR_METRICS_PORT", "18080")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def operator_proc(cluster, crd, namespace, tmp_path):
    op = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
    yield op
    op.stop()


def test_six_8_gpu_jobs_share_a_16_gpu_queue_two_at_a_time(cluster, namespace, local_queue, operator_proc):
    names = [f"q{i}" for i in range(6)]
    jobs = []
    for n in names:
        obj = copy.deepcopy(FAKE)
        obj["metadata"]["name"] = n
        obj["spec"]["queueName"] = local_queue
        jobs.append(obj)
    _apply(cluster, namespace, jobs)
    max_running, queued_seen, done = 0, set(), {}
    deadline = time.monotonic() + 150
    while len(done) < len(names):
        assert time.monotonic() < deadline, f"not all succeeded: {sorted(done)}\n{operator_proc.logs()[-3000:]}"
        children = cluster.kubectl_json("get", "jobs", "-n", namespace)["items"]
        unsuspended = [j["metadata"]["name"] for j in children if not j["spec"].get("suspend") and not any(
            c["type"] == "Complete" and c["status"] == "True" for c in (j.get("status") or {}).get("conditions") or [])]
        max_running = max(max_running, len(unsuspended))
        assert len(unsuspended) <= 2, f"{unsuspended} run at once against a 16-GPU quota"
        for name, obj in _ftjs(cluster, namespace).items():
            phase = (obj.get("status") or {}).get("phase")
            assert phase != "Failed", cluster.describe_job(namespace, name, obj)
            if phase == "Queued":
                adm = _cond(obj, "Admitted")
                assert adm.get("status") == "False" and adm["reason"] == "WaitingForAdmission", adm
                assert f"LocalQueue {local_queue}" in adm["message"], adm
                queued_seen.add(name)
            if phase == "Succeeded":
                done[name] = obj
        time.sleep(0.3)
    print(f"\nmax trainer Jobs running at once: {max_running}; FineTuneJobs seen Queued: {sorted(queued_seen)}")
    assert max_running == 2, max_running
    assert len(queued_seen) >= 3, "4 of 6 jobs had to wait while two ran"
    for name, obj in done.items():
        child = cluster.kubectl_json("get", "job", f"{name}-trainer", "-n", namespace)
        assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == local_queue
        assert _cond(obj, "Admitted")["status"] == "True"
        seconds = obj["status"]["gpuSeconds"]
        # 8 GPUs x a fake pod of ~4 s (KWOK's whole-second timestamps): the queued time is not charged
        assert 8 * 2 <= seconds <= 8 * 8, (name, seconds, obj["status"].get("gpuUsage"))
        assert _operator_metric("kubetune_job_gpu_seconds_total", namespace=namespace, finetunejob=name,
                                queue=local_queue) == seconds
    print("gpuSeconds:", {n: o["status"]["gpuSeconds"] for n, o in sorted(done.items())})


# ------------------------------------------------------------------------------------------------ preemption
STEPS = 24


@pytest.fixture
def preempt_env(cluster, crd, namespace, tmp_path):
    """A 1-CPU ClusterQueue for this namespace only, two WorkloadPriorityClasses, S3 data and a tiny model."""
    tag = uuid.uuid4().hex[:6]
    cq, low, high = f"kt-preempt-{tag}", f"kt-low-{tag}", f"kt-high-{tag}"
    cluster_objs = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": low},
         "value": 10},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": high},
         "value": 1000},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cq},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                  "preemption": {"withinClusterQueue": "LowerPriority"},
                  "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{
                      "name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "1"},
                                                              {"name": "memory", "nominalQuota": "64Gi"}]}]}]}},
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(cluster_objs))
    cluster.local_queue(namespace, name="preempt", cluster_queue=cq)
    s3 = s3_client(cluster)
    ensure_bucket(s3)
    upload_tiny_inputs(s3, tmp_path, tag, 120)
    create_s3_secret(cluster, namespace)
    op = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
    try:
        yield {"tag": tag, "low": low, "high": high, "s3": s3, "operator": op}
    finally:
        op.stop()
        cluster.kubectl("delete", "finetunejobs", "--all", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)
        cluster.kubectl("delete", "workloadpriorityclass", low, high, check=False)


def _keys(s3, prefix: str) -> list[str]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _complete_steps(s3, prefix: str) -> list[int]:
    return sorted(int(m.group(1)) for k in _keys(s3, prefix)
                  if (m := re.search(r"checkpoint-(\d+)/_COMPLETE$", k)))


def test_higher_priority_job_preempts_a_trainer_which_resumes_from_its_sigterm_checkpoint(cluster, namespace,
                                                                                       preempt_env):
    env, s3 = preempt_env, preempt_env["s3"]
    tag = env["tag"]
    low = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "low"},
        "spec": {
            "stage": "sft", "model": {"source": f"s3://{BUCKET}/models/tiny-{tag}"},
            "dataset": {"format": "chat", "train": [{"uri": f"s3://{BUCKET}/data/{tag}/chat.jsonl"}]},
            "adapter": {"type": "lora", "rank": 8},
            "training": {"maxSteps": STEPS, "batchSize": 2, "learningRate": 0.005, "maxLength": 48,
                         "logEverySteps": 2, "checkpointEverySteps": 4, "keepCheckpoints": 3},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi",
                          "nodeSelector": {"kubetune.dev/local-runner": "true"}},
            "output": {"uri": f"s3://{BUCKET}/runs-{tag}"},  # endpoint and credentials: the default runtime's
            "queueName": "preempt", "workloadPriorityClassName": env["low"], "retryLimit": 1,
        },
    }
    high = copy.deepcopy(FAKE)
    high["metadata"]["name"] = "high"
    high["spec"]["resources"] = {"gpus": 0, "cpu": "1", "nodeSelector": {"type": "kwok"},
                                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                  "effect": "NoSchedule"}],
                                 "podAnnotations": {"kubetune.dev/kwok-duration": "2s"}}
    high["spec"].update(queueName="preempt", workloadPriorityClassName=env["high"])
    _apply(cluster, namespace, low)
    uid = cluster.kubectl_json("get", "finetunejob", "low", "-n", namespace)["metadata"]["uid"]
    ckpts = f"runs-{tag}/{namespace}/low/runs/{uid}/checkpoints/"
    context = lambda: env["operator"].logs()[-3000:]  # noqa: E731

    # the low job trains until its first periodic checkpoint is complete, then the high one arrives
    t0, timeline = time.monotonic(), {}
    wait_for(lambda: _complete_steps(s3, ckpts), 300, interval=0.5, message="a first complete checkpoint")
    timeline["first checkpoint"] = round(time.monotonic() - t0)
    _apply(cluster, namespace, high)

    def preempted():
        obj = cluster.kubectl_json("get", "finetunejob", "low", "-n", namespace)
        adm = _cond(obj, "Admitted")
        return obj if adm.get("status") == "False" and adm.get("reason") == "Preempted" else None
    obj = wait_for(preempted, 60, interval=0.3, message="low shows Admitted=False/Preempted")
    assert obj["status"]["phase"] == "Queued" and "resumes from the latest checkpoint" in obj["status"]["message"]
    # Kueue admits the high job once the low one's Job has no active pod. A pod that is terminating no longer counts
    # as active, so the admission can come while the low trainer is still finishing the step it was in when SIGTERM
    # arrived (seen in CI: the log ended at "SIGTERM received"); its "stopping at step N" line follows a moment later.
    wait_for(lambda: _cond(cluster.kubectl_json("get", "finetunejob", "high", "-n", namespace), "Admitted")
             .get("status") == "True", 120, interval=0.5, message="high admitted")
    timeline["high admitted"] = round(time.monotonic() - t0)

    def low_logs():
        return [(p / "container.log").read_text(errors="replace")
                for p in sorted((cluster.dir / "pods").glob(f"{namespace}_low-trainer-*"))
                if (p / "container.log").exists()]
    wait_for(lambda: any("for SIGTERM" in log for log in low_logs()), 60, interval=0.3,
             message="the low trainer logs that it stops for SIGTERM", context=lambda: [g[-1500:] for g in low_logs()])
    logs = low_logs()
    sigterm = [log for log in logs if "for SIGTERM" in log]
    assert len(sigterm) == 1, [log[-1500:] for log in logs]
    stop = re.search(r"stopping at step (\d+) for SIGTERM", sigterm[0])
    assert stop, sigterm[0][-2000:]
    at_preemption = int(stop.group(1))
    # the SIGTERM checkpoint is the newest complete one (its upload may finish a moment after Kueue's admission)
    wait_for(lambda: _complete_steps(s3, ckpts)[-1:] == [at_preemption], 60, interval=0.5,
             message=f"checkpoint-{at_preemption} (saved for SIGTERM) complete")

    high_done = cluster.wait_job(namespace, "high", timeout=120, context=context)
    done = cluster.wait_job(namespace, "low", timeout=300, context=context)
    timeline["low succeeded"] = round(time.monotonic() - t0)
    print(f"\ntimeline (s): {timeline}")
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs-{tag}/{namespace}/low/runs/{uid}/manifest.json")
                          ["Body"].read())
    resumed = int(manifest["resumedFrom"].rstrip("/").rsplit("checkpoint-", 1)[1])
    metrics = s3.get_object(Bucket=BUCKET, Key=f"runs-{tag}/{namespace}/low/runs/{uid}/metrics.jsonl")["Body"]
    train_steps = [e["step"] for e in map(json.loads, metrics.read().decode().splitlines())
                   if e.get("event") == "train"]
    print(f"\ncheckpoint step at preemption: {at_preemption}; resumed from step: {resumed}; "
          f"first logged step after resume: {min(s for s in train_steps if s > resumed)}; final steps: "
          f"{manifest['metrics']['steps']}/{STEPS}; high job gpuSeconds {high_done['status'].get('gpuSeconds')}")
    assert 0 < at_preemption < STEPS
    assert resumed == at_preemption, (resumed, at_preemption)
    assert manifest["metrics"]["steps"] == STEPS
    assert _cond(done, "Admitted")["status"] == "True"
    # both attempts are in the cost ledger (0 GPUs here: the local runner has none, so 0 GPU-seconds)
    assert len(done["status"]["gpuUsage"]["closedPods"]) == 2, done["status"]["gpuUsage"]
