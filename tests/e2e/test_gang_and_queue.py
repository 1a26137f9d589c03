"""The local cluster's gang and queueing ground, without training: the real JobSet and Kueue controllers that
scripts/cluster/up.sh runs, and the node agent resolving gang pod names to pod IPs.

- a 2-pod JobSet on `local-runner` whose pods reach each other by DNS name completes;
- JobSet's failurePolicy.maxRestarts recreates the whole gang after one pod fails, survivors included;
- 3 batch/v1 Jobs x 8 GPUs queued through Kueue against the 16-GPU ClusterQueue: never more than 2 admitted
  at once (the third stays suspended, without pods), all complete.

    .venv/bin/python -m pytest tests/e2e/test_gang_and_queue.py -q
"""
from __future__ import annotations

import json
import time
from pathlib import Path

LOCAL = {"kubetune.dev/local-runner": "true"}


def _pod_spec(command: list[str], env: list[dict] | None = None) -> dict:
    return {"restartPolicy": "Never", "nodeSelector": LOCAL, "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "python:3.11-slim", "command": command, "env": env or []}]}


def _replicated_job(name: str, pod_spec: dict, replicas: int = 1) -> dict:
    return {"name": name, "replicas": replicas,
            "template": {"spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0,
                                  "template": {"spec": pod_spec}}}}


def _jobset_condition(cluster, ns: str, name: str, ctype: str) -> dict | None:
    obj = cluster.kubectl_json("get", "jobsets.jobset.x-k8s.io", name, "-n", ns)
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype
                 and c["status"] == "True"), None)


def _wait_jobset(cluster, ns: str, name: str, timeout: float) -> dict:
    """Completed, or fail at once with the JobSet's conditions and its pods' logs when it Failed."""
    def done():
        if _jobset_condition(cluster, ns, name, "Failed"):
            raise AssertionError(f"JobSet {name} failed:\n{_describe(cluster, ns, name)}")
        return cluster.kubectl_json("get", "jobsets.jobset.x-k8s.io", name, "-n", ns) \
            if _jobset_condition(cluster, ns, name, "Completed") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = done()
        if obj:
            return obj
        time.sleep(0.5)
    raise AssertionError(f"JobSet {name} not Completed after {timeout}s:\n{_describe(cluster, ns, name)}")


def _describe(cluster, ns: str, name: str) -> str:
    obj = cluster.kubectl_json("get", "jobsets.jobset.x-k8s.io", name, "-n", ns)
    logs = "\n".join(f"--- {p.name}\n{_log(p)[-1500:]}" for p in _sandboxes(cluster, ns))
    pods = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout
    return f"{json.dumps(obj.get('status'), indent=1)}\n{pods}\n{logs}"


def _sandboxes(cluster, ns: str) -> list[Path]:
    return sorted((cluster.dir / "pods").glob(f"{ns}_*"))


def _log(sandbox: Path) -> str:
    f = sandbox / "container.log"
    return f.read_text(errors="replace") if f.exists() else ""


SERVER = """
import os, socket
srv = socket.create_server((os.environ["POD_IP"], 7000))
srv.settimeout(60)
conn, peer = srv.accept()
conn.sendall(b"pong:" + conn.recv(64))
print("served", peer[0], flush=True)
"""

CLIENT = """
import os, socket, time
deadline = time.time() + 60
while True:
    try:
        conn = socket.create_connection((os.environ["PEER"], 7000), timeout=2,
                                        source_address=(os.environ["POD_IP"], 0))  # loopback would say 127.0.0.1
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
conn.sendall(b"ping")
print("got", conn.recv(64).decode(), "from", os.environ["PEER"], "as", os.environ["POD_IP"], flush=True)
"""


def test_jobset_pods_reach_each_other_by_hostname(cluster, namespace):
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    peer = {"name": "PEER", "value": "pingpong-server-0-0.pingpong"}     # how MASTER_ADDR names rank 0
    cluster.apply({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                   "metadata": {"name": "pingpong", "namespace": namespace},
                   "spec": {"network": {"enableDNSHostnames": True}, "replicatedJobs": [
                       _replicated_job("server", _pod_spec(["python", "-c", SERVER], [pod_ip])),
                       _replicated_job("client", _pod_spec(["python", "-c", CLIENT], [pod_ip, peer]))]}})
    _wait_jobset(cluster, namespace, "pingpong", timeout=90)
    pods = {p["metadata"]["labels"]["jobset.sigs.k8s.io/replicatedjob-name"]: p for p in
            cluster.kubectl_json("get", "pods", "-n", namespace)["items"]}
    # JobSet (through its webhook and Job template) gave the pods their stable DNS identity
    assert pods["server"]["spec"]["hostname"] == "pingpong-server-0-0"
    assert pods["server"]["spec"]["subdomain"] == "pingpong"
    server_ip = pods["server"]["status"]["podIP"]
    client_log = _log(cluster.dir / "pods" / f"{namespace}_{pods['client']['metadata']['name']}")
    server_log = _log(cluster.dir / "pods" / f"{namespace}_{pods['server']['metadata']['name']}")
    assert f"got pong:ping from {server_ip} as {pods['client']['status']['podIP']}" in client_log, client_log
    assert f"served {pods['client']['status']['podIP']}" in server_log, server_log
    # the headless Service JobSet creates for the subdomain
    svc = cluster.kubectl_json("get", "service", "pingpong", "-n", namespace)
    assert svc["spec"]["clusterIP"] == "None"


GANG_MEMBER = """
import os, sys, time
attempt, index = os.environ["ATTEMPT"], os.environ["INDEX"]
print(f"attempt={attempt} index={index} start", flush=True)
if attempt == "0":
    if index == "1":
        time.sleep(1)
        sys.exit(3)          # one member fails...
    time.sleep(120)          # ...while the other would wait for it (a collective) until the gang restarts
print(f"attempt={attempt} index={index} done", flush=True)
"""


def test_jobset_max_restarts_recreates_the_whole_gang(cluster, namespace):
    ann = "metadata.annotations['jobset.sigs.k8s.io/{}']"
    env = [{"name": "ATTEMPT", "valueFrom": {"fieldRef": {"fieldPath": ann.format("restart-attempt")}}},
           {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": ann.format("job-index")}}}]
    cluster.apply({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                   "metadata": {"name": "gang", "namespace": namespace},
                   "spec": {"failurePolicy": {"maxRestarts": 2}, "replicatedJobs": [
                       _replicated_job("w", _pod_spec(["python", "-c", GANG_MEMBER], env), replicas=2)]}})
    started = time.monotonic()
    obj = _wait_jobset(cluster, namespace, "gang", timeout=90)
    assert time.monotonic() - started < 60, "the survivor was not stopped by the gang restart"
    assert obj["status"]["restarts"] == 1
    logs = [_log(p) for p in _sandboxes(cluster, namespace)]
    starts = sorted(line for log in logs for line in log.splitlines() if line.endswith(" start"))
    assert starts == ["attempt=0 index=0 start", "attempt=0 index=1 start",
                      "attempt=1 index=0 start", "attempt=1 index=1 start"], logs
    done = sorted(line for log in logs for line in log.splitlines() if line.endswith(" done"))
    assert done == ["attempt=1 index=0 done", "attempt=1 index=1 done"], logs   # attempt 0's survivor was killed


def _gpu_job(name: str, queue: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": queue}},
            "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0, "template": {
                "metadata": {"annotations": {"kubetune.dev/kwok-duration": "5s"}},
                "spec": {"restartPolicy": "Never", "nodeSelector": {"type": "kwok"},
                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                         "containers": [{"name": "main", "image": "trainer:latest",
                                         "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}}}


def test_kueue_admits_8_gpu_jobs_two_at_a_time_within_a_16_gpu_quota(cluster, namespace, local_queue):
    names = ["q-0", "q-1", "q-2"]
    cluster.apply([_gpu_job(n, local_queue) for n in names], namespace=namespace)
    # Kueue's webhook suspended them at creation, whatever the manifest said
    created = cluster.kubectl_json("get", "jobs", "-n", namespace)["items"]
    assert len(created) == 3 and any(j["spec"].get("suspend") for j in created), created
    max_active, saw_one_waiting, complete = 0, False, set()
    deadline = time.monotonic() + 90
    while complete != set(names):
        assert time.monotonic() < deadline, f"not all complete: {complete}"
        jobs = {j["metadata"]["name"]: j for j in cluster.kubectl_json("get", "jobs", "-n", namespace)["items"]}
        complete = {n for n, j in jobs.items()
                    if any(c["type"] == "Complete" and c["status"] == "True" for c in j["status"].get("conditions", []))}
        failed = [n for n, j in jobs.items() if j["status"].get("failed")]
        assert not failed, f"jobs failed: {failed}"
        active = [n for n, j in jobs.items() if not j["spec"].get("suspend") and n not in complete]
        waiting = [n for n, j in jobs.items() if j["spec"].get("suspend")]
        max_active = max(max_active, len(active))
        if len(active) == 2 and waiting:
            saw_one_waiting = True
            pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"job-name={waiting[0]}")["items"]
            assert not pods, f"suspended {waiting[0]} has pods"
        time.sleep(0.3)
    assert max_active <= 2, f"{max_active} jobs x 8 GPUs ran at once against a 16-GPU quota"
    assert saw_one_waiting, "never saw a job queued while two ran"
    workloads = cluster.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", namespace)["items"]
    assert len(workloads) == 3
    for wl in workloads:
        assert wl["status"]["admission"]["clusterQueue"] == "kubetune"
        usage = wl["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]
        assert usage["nvidia.com/gpu"] == "8"
