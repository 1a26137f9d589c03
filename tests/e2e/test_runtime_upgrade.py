"""`helm upgrade` from the chart before runtimes (issue 9) keeps a running FineTuneJob running: the job was
created with fields that moved to runtimes (resources.image, output.credentials) and started by the previous
operator; after the upgrade (new CRDs, default runtime hook, admission policies) and the new operator, the same
Job (same uid) runs to completion, and the job's runtime is recorded in its status.

The previous chart and operator are read from git: the parent of the commit that added the runtime API.

    .venv/bin/python -m pytest tests/e2e/test_runtime_upgrade.py -q
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import uuid

import pytest
import yaml

from tests.e2e.kubetune_fixtures import OperatorProcess, crd, wait_for  # noqa: F401
from tests.e2e.test_helm_install import CHART, PENDING, REPO, helm, helm_bin, values_args  # noqa: F401

RUNTIME_API = "operator/kubetune_api/finetuneruntime/spec.py"


def previous_tree(dest) -> str:
    """Extract helm/kubetune and operator/ of the commit before the runtime API into `dest`; its sha."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False)

    added = git("log", "--diff-filter=A", "--format=%H", "--", RUNTIME_API).stdout.decode().split()
    if not added:
        pytest.skip("no git history for the runtime API (shallow clone?)")
    base = f"{added[-1]}^"
    archive = git("archive", base, "helm/kubetune", "operator")
    if archive.returncode != 0:
        pytest.skip(f"cannot read the previous chart from git: {archive.stderr.decode()[:200]}")
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(dest)
    return base


def test_helm_upgrade_from_the_chart_before_runtimes_keeps_jobs_running(cluster, crd, namespace, helm, tmp_path):
    old = tmp_path / "old"
    previous_tree(old)
    release = f"up-{uuid.uuid4().hex[:5]}"
    old_values = {k: v for k, v in PENDING.items() if k != "runtime"}  # the old schema has no `runtime`
    op = None
    try:
        helm("install", release, str(old / "helm" / "kubetune"), "-n", namespace, "--take-ownership",
             *values_args(old_values))
        # the previous operator (its own code, via PYTHONPATH) starts a job written for the previous API
        op = OperatorProcess(cluster, [namespace], tmp_path / "old-operator.log",
                             extra_env={"PYTHONPATH": str(old / "operator")}).start()
        ftj = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "before"},
               "spec": {"stage": "sft", "model": {"source": "s3://models/tiny"},
                        "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
                        "output": {"uri": "s3://kubetune/runs", "credentials": {"secretName": "s3-creds"}},
                        "resources": {"gpus": 1, "image": "ghcr.io/kubetune/trainer:0.1.0",
                                      "podAnnotations": {"kubetune.dev/kwok-duration": "40s"}}}}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(ftj))

        def phase():
            obj = json.loads(cluster.kubectl("get", "ftj", "before", "-n", namespace, "-o", "json").stdout)
            return (obj.get("status") or {}).get("phase")

        wait_for(lambda: phase() == "Running", 40, message="running under the previous operator")
        job = json.loads(cluster.kubectl("get", "job", "before-trainer", "-n", namespace, "-o", "json").stdout)
        op.stop()

        # --take-ownership: earlier tests of this session left the runtime CRDs (kept) owned by their releases
        helm("upgrade", release, str(CHART), "-n", namespace, "--take-ownership", *values_args(PENDING))
        assert json.loads(cluster.kubectl("get", "clusterfinetuneruntime", PENDING["runtime"]["name"],
                                          "-o", "json").stdout)["spec"]["template"]["image"]
        op = OperatorProcess(cluster, [namespace], tmp_path / "new-operator.log").start()
        cluster.wait_job(namespace, "before", timeout=90, context=lambda: op.logs()[-4000:])
        obj = json.loads(cluster.kubectl("get", "ftj", "before", "-n", namespace, "-o", "json").stdout)
        assert obj["status"]["phase"] == "Succeeded"
        # the moved fields are gone from the stored object (pruned by the new schema); the default ref filled in
        assert "image" not in obj["spec"]["resources"] and "credentials" not in obj["spec"]["output"]
        assert obj["spec"]["runtimeRef"] == {"kind": "ClusterFineTuneRuntime", "name": "default"}
        assert (obj["status"]["runtime"]["kind"], obj["status"]["runtime"]["name"]) == \
            ("ClusterFineTuneRuntime", "default")
        after = json.loads(cluster.kubectl("get", "job", "before-trainer", "-n", namespace, "-o", "json").stdout)
        assert after["metadata"]["uid"] == job["metadata"]["uid"], "the running Job was not replaced"
        assert "Failed" not in {c["type"] for c in obj["status"]["conditions"] if c["status"] == "True"}
    finally:
        if op:
            op.stop()
        helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", check=False)
        cluster.kubectl("delete", "clusterfinetuneruntime", PENDING["runtime"]["name"], "--ignore-not-found",
                        check=False)
        # the previous chart replaced the CRDs with its own: put the current ones back for the next tests
        crd_paths = sorted((REPO / "crds").glob("*.yaml"))
        cluster.kubectl("apply", "--server-side", "--force-conflicts", *[a for p in crd_paths for a in ("-f", str(p))])
