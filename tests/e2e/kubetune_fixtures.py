"""Fixtures shared by kubetune's end-to-end tests (on top of the `cluster`/`namespace` fixtures of conftest.py):
the CRDs installed from crds/ with the default ClusterFineTuneRuntime every job without spec.runtimeRef uses,
and a real operator process running against the local control plane.

Import into a test module with `from tests.e2e.kubetune_fixtures import crd, operator  # noqa: F401`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "kubetune.dev_finetunejobs.yaml"
RUNTIME_CRDS = [REPO / "crds" / "kubetune.dev_clusterfinetuneruntimes.yaml",
                REPO / "crds" / "kubetune.dev_finetuneruntimes.yaml"]
PIPELINE_CRD = REPO / "crds" / "kubetune.dev_finetunepipelines.yaml"
# What the chart installs as ClusterFineTuneRuntime/default, as the e2e tests need it: the Secret they create
# (s3-creds), custom rewards and remote code allowed, scheduling overrides allowed (the bad-input tests set them).
DEFAULT_RUNTIME = {
    "apiVersion": "kubetune.dev/v1alpha1", "kind": "ClusterFineTuneRuntime", "metadata": {"name": "default"},
    "spec": {"template": {"image": "ghcr.io/kubetune/trainer:0.1.0"},
             "storage": {"credentials": {"secretName": "s3-creds"}},
             "policy": {"allowTrustRemoteCode": True, "allowCustomCode": True,
                        "overrides": ["nodeSelector", "tolerations", "affinity", "priorityClassName"]}},
}


@pytest.fixture(scope="session")
def crd(cluster):
    for path in (CRD_FILE, *RUNTIME_CRDS, PIPELINE_CRD):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.dev",
                    "crd/clusterfinetuneruntimes.kubetune.dev", "crd/finetuneruntimes.kubetune.dev",
                    "crd/finetunepipelines.kubetune.dev")
    cluster.apply(DEFAULT_RUNTIME)
    return CRD_FILE


class OperatorProcess:
    """`python -m kubetune_operator` as a child process; restartable (tests kill it mid-job)."""

    def __init__(self, cluster, namespaces: list[str], log_path: Path, extra_env: dict | None = None,
                 token: str | None = None):
        self.cluster = cluster
        self.namespaces = namespaces
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.token = token
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(self.cluster.env)
        env.update({
            "KUBETUNE_S3_ENDPOINT": self.cluster.s3_endpoint,
            "KUBETUNE_METRICS_PORT": env.get("KUBETUNE_OPERATOR_METRICS_PORT", "18080"),
            "KUBETUNE_METRICS_HOST": "127.0.0.1",
            "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "2",
            "KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS": "30",
        })
        env.update(self.extra_env)
        return env

    def start(self) -> "OperatorProcess":
        args = [sys.executable, "-m", "kubetune_operator", "--standalone"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        time.sleep(1.0)
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def operator(cluster, crd, namespace, tmp_path):
    op = OperatorProcess(cluster, [namespace], tmp_path / "operator.log").start()
    yield op
    op.stop()


def wait_for(predicate, timeout: float, interval: float = 0.5, message: str = "", context=None):
    """Polls predicate until it is truthy (returned) or fails after timeout s; `context()` adds what a person needs
    to see why to the failure."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{context()}" if context else ""
    raise AssertionError(f"timed out after {timeout}s: {message} (last={last!r}){extra}")
