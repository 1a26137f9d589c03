"""What the real Job controller does with a pod that ended for a reason that is not a crash: does it count
against backoffLimit (Job status.failed), and how long until the replacement pod exists?

    scripts/cluster/up.sh && source /tmp/kubetune-cluster/env        # a cluster from scripts/cluster/up.sh
    .venv/bin/python bench/restart_backoff.py --kills 3             # ~3 min: every variant, 3 kills each

Each variant is a plain batch/v1 Job on the local-runner node (the node agent runs the command as a process)
whose container exits 143 on SIGTERM, as the trainer does after its SIGTERM checkpoint. The bench deletes
(or evicts, which adds the DisruptionTarget condition) the running pod `--kills` times and prints, per kill,
the seconds from the delete call to the replacement pod's creation, and the Job's status.failed at the end.
Variants: no podFailurePolicy (podReplacementPolicy TerminatingOrFailed, the default then); Ignore on exit
143 (+ podReplacementPolicy Failed, required with a podFailurePolicy); Ignore on DisruptionTarget with
evictions; and the operator's way: the same Job replaced by a new one after each ignored end.
Results are in docs/restarts.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid

CMD = ["/bin/sh", "-c", "trap 'exit 143' TERM; while :; do sleep 0.2; done"]


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def job(name: str, ns: str, policy: dict | None, replacement: str | None) -> dict:
    spec: dict = {"backoffLimit": 10, "completions": 1, "parallelism": 1, "completionMode": "Indexed",
                  "template": {"metadata": {"labels": {"bench": name}}, "spec": {
                      "restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
                      "nodeSelector": {"kubetune.dev/local-runner": "true"},
                      "containers": [{"name": "trainer", "image": "busybox", "command": CMD}]}}}
    if policy:
        spec["podFailurePolicy"] = policy
    if replacement:
        spec["podReplacementPolicy"] = replacement
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pods(ns: str, name: str) -> list[dict]:
    return json.loads(kubectl("get", "pods", "-n", ns, "-l", f"bench={name}", "-o", "json"))["items"]


def running(ns: str, name: str, exclude: set[str], timeout: float = 700) -> tuple[dict, float]:
    """The first pod not in `exclude` that is Running, and when it was first seen to exist."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        for p in pods(ns, name):
            if p["metadata"]["uid"] in exclude or p["metadata"].get("deletionTimestamp"):
                continue
            seen = seen or time.monotonic()
            if (p.get("status") or {}).get("phase") == "Running":
                return p, seen
        time.sleep(0.2)
    raise TimeoutError(f"no new pod of {name} within {timeout}s")


def variant(ns: str, label: str, obj: dict, kills: int, evict: bool, replace_job: bool) -> dict:
    name = obj["metadata"]["name"]
    kubectl("apply", "-f", "-", input=json.dumps(obj))
    done: set[str] = set()
    pod, _ = running(ns, name, done)
    delays = []
    for _ in range(kills):
        done.add(pod["metadata"]["uid"])
        t0 = time.monotonic()
        if evict:
            body = {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": pod["metadata"]["name"], "namespace": ns}}
            kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/eviction",
                    "-f", "-", input=json.dumps(body))
        else:
            kubectl("delete", "pod", "-n", ns, pod["metadata"]["name"], "--wait=false")
        if replace_job:  # what the operator does: wait for the pod to end, then a new Job of the same name
            while any(p["metadata"]["uid"] in done and (p.get("status") or {}).get("phase") != "Failed"
                      for p in pods(ns, name)):
                time.sleep(0.2)
            kubectl("delete", "job", "-n", ns, name, "--wait=true", "--cascade=background")
            kubectl("apply", "-f", "-", input=json.dumps(obj))
        pod, seen = running(ns, name, done)
        delays.append(round(seen - t0, 1))
    status = json.loads(kubectl("get", "job", "-n", ns, name, "-o", "json")).get("status") or {}
    kubectl("delete", "job", "-n", ns, name, "--wait=false")
    return {"variant": label, "seconds_to_next_pod": delays, "job_failed": status.get("failed", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=3)
    args = ap.parse_args()
    ns = f"bench-backoff-{uuid.uuid4().hex[:5]}"
    kubectl("create", "namespace", ns)
    ignore143 = {"rules": [{"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                                 "values": [143]}}]}
    disruption = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    try:
        # a podFailurePolicy with TerminatingOrFailed: does the API take it?
        probe = job("probe", ns, ignore143, "TerminatingOrFailed")
        proc = subprocess.run(["kubectl", "apply", "--dry-run=server", "-f", "-"], input=json.dumps(probe),
                              capture_output=True, text=True)
        print(json.dumps({"variant": "Ignore 143 + TerminatingOrFailed", "accepted": proc.returncode == 0,
                          "api": (proc.stderr or proc.stdout).strip()[:300]}), flush=True)
        for label, obj, evict, replace in [
            ("no podFailurePolicy, delete", job("plain", ns, None, None), False, False),
            ("Ignore exit 143 + Failed, delete", job("ign143", ns, ignore143, "Failed"), False, False),
            ("Ignore DisruptionTarget + Failed, evict", job("disrupt", ns, disruption, "Failed"), True, False),
            ("Ignore exit 143 + Failed, delete, Job replaced", job("replaced", ns, ignore143, "Failed"), False, True),
        ]:
            print(json.dumps(variant(ns, label, obj, args.kills, evict, replace)), flush=True)
    finally:
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


if __name__ == "__main__":
    os.environ.setdefault("KUBECONFIG", os.path.join(os.environ.get("KUBETUNE_CLUSTER_DIR", ""), "kubeconfig"))
    main()
