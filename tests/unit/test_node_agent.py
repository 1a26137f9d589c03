"""The local cluster's node agent (scripts/cluster/node_agent.py) prepares a container the way a kubelet would:
container paths the pod spec names are rewritten to the pod's sandbox, host values never are.

    .venv/bin/python -m pytest tests/unit/test_node_agent.py -q
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

AGENT_FILE = Path(__file__).resolve().parents[2] / "scripts" / "cluster" / "node_agent.py"


@pytest.fixture
def agent_mod(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("kubetune_node_agent", AGENT_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "PODS_DIR", str(tmp_path / "pods"))
    return mod


class _Agent:
    """Only what PodRun.prepare reads; emptyDir volumes and plain env values need no API calls."""
    api_host_port = ("127.0.0.1", "6443")


def _pod(container, volumes):
    return {"metadata": {"namespace": "ns", "name": "trainer-0", "uid": "u1"},
            "spec": {"containers": [container], "volumes": volumes}}


def test_host_paths_under_a_mount_path_are_never_rewritten(agent_mod, tmp_path, monkeypatch):
    """A checkout under /tmp: the venv on PATH starts with /tmp, which the trainer pod mounts an emptyDir at."""
    venv_bin = tmp_path / "checkout" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "trainer").write_text("#!/bin/sh\n")
    (venv_bin / "trainer").chmod(0o755)
    host_path = f"/tmp/kt-checkout/.venv/bin:{venv_bin}:/usr/bin:/bin"
    monkeypatch.setenv("PATH", host_path)
    monkeypatch.setenv("HF_HOME", "/tmp/hf-cache")
    container = {
        "name": "trainer", "command": ["trainer"],
        "args": ["--out", "/tmp/out", "--config=/etc/kubetune/job.json", "--keep", "/tmpfoo", "$(EXTRA)"],
        "workingDir": "/work",
        "env": [{"name": "SCRATCH", "value": "/tmp/scratch"},
                {"name": "MIXED", "value": "/tmp/a:$(PATH)"},       # container path + host value
                {"name": "EXTRA", "value": "/work/x"}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "work", "mountPath": "/work"},
                         {"name": "config", "mountPath": "/etc/kubetune"}],
    }
    volumes = [{"name": n, "emptyDir": {}} for n in ("tmp", "work", "config")]
    run = agent_mod.PodRun(_Agent(), _pod(container, volumes))
    vols = run.materialize_volumes()
    argv, env, cwd = run.prepare(container, vols, "")
    sandbox = Path(run.sandbox) / "volumes"

    assert env["PATH"] == host_path                      # unchanged: the venv stays reachable
    assert env["HF_HOME"] == "/tmp/hf-cache"
    assert env["SCRATCH"] == f"{sandbox}/tmp/scratch"
    assert env["MIXED"] == f"{sandbox}/tmp/a:{host_path}"   # the spec's part rewritten, the host's part not
    assert argv[0] == str(venv_bin / "trainer")
    assert argv[1:] == ["--out", f"{sandbox}/tmp/out", f"--config={sandbox}/config/job.json",
                        "--keep", "/tmpfoo", f"{sandbox}/work/x"]
    assert cwd == f"{sandbox}/work"
    assert env["HOME"].startswith(run.sandbox) and env["TMPDIR"].startswith(run.sandbox)


def test_termination_message_path_is_rewritten(agent_mod, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])
    container = {"name": "c", "command": ["sh", "-c", "echo done > /dev/termination-log"]}
    run = agent_mod.PodRun(_Agent(), _pod(container, []))
    os.makedirs(run.sandbox)                                # run_containers() creates it before prepare()
    argv, _, _ = run.prepare(container, run.materialize_volumes(), "")
    assert argv[-1] == f"echo done > {run.term_file}"
