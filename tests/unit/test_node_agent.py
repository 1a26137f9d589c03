"""The local cluster's node agent (scripts/cluster/node_agent.py) prepares a container the way a kubelet would:
container paths the pod spec names are rewritten to the pod's sandbox, host values never are.

    .venv/bin/python -m pytest tests/unit/test_node_agent.py -q
"""
from __future__ import annotations

import importlib.util
import os
import threading
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


def _agent(mod):
    """A real Agent without its API client (__init__ loads a kubeconfig): emptyDir volumes and plain env values
    need no API calls."""
    agent = object.__new__(mod.Agent)
    agent.api_host_port = ("127.0.0.1", "6443")
    agent.lock, agent.runs, agent.ips, agent.names, agent.name_users = threading.Lock(), {}, {}, {}, {}
    return agent


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
    run = agent_mod.PodRun(_agent(agent_mod), _pod(container, volumes))
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
    run = agent_mod.PodRun(_agent(agent_mod), _pod(container, []))
    os.makedirs(run.sandbox)                                # run_containers() creates it before prepare()
    argv, _, _ = run.prepare(container, run.materialize_volumes(), "")
    assert argv[-1] == f"echo done > {run.term_file}"


def _gang_pod(name, uid, hostname, args):
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid},
            "spec": {"hostname": hostname, "subdomain": "js", "volumes": [],
                     "containers": [{"name": "c", "command": ["sh", "-c"], "args": args,
                                     "env": [{"name": "MASTER_ADDR", "value": "js-server-0-0.js"}]}]}}


def test_gang_hostnames_resolve_to_the_peers_pod_ip_even_before_the_peer_starts(agent_mod, monkeypatch):
    """torch c10d / sockets resolve MASTER_ADDR with getaddrinfo; nothing on the host knows pod DNS names."""
    monkeypatch.setenv("PATH", os.environ["PATH"])
    agent = _agent(agent_mod)
    client = agent_mod.PodRun(agent, _gang_pod("js-client-0-0-x", "u-client", "js-client-0-0", [
        "connect js-server-0-0.js:9000 js-server-0-0.js.ns.svc.cluster.local js-server-0-0.js.ns.svc. "
        "keep: other.js.otherns data.json js-server-0-0.jsx x.js-server-0-0.js"]))
    agent.runs["u-client"] = client
    client.ip = agent.alloc_ip("u-client", None, client.dns_key)
    os.makedirs(client.sandbox)
    argv, env, _ = client.prepare(client.pod["spec"]["containers"][0], {}, "")
    reserved = agent.names[("ns", "js", "js-server-0-0")]
    assert reserved != client.ip
    assert env["MASTER_ADDR"] == reserved
    assert env["HOSTNAME"] == "js-client-0-0"
    assert argv[-1] == (f"connect {reserved}:9000 {reserved} {reserved} "
                        "keep: other.js.otherns data.json js-server-0-0.jsx x.js-server-0-0.js")
    # the server starts later and gets the IP its peer was given
    server = agent_mod.PodRun(agent, _gang_pod("js-server-0-0-y", "u-server", "js-server-0-0", ["serve"]))
    assert agent.alloc_ip("u-server", None, server.dns_key) == reserved
    # reservations end with the last pod that holds or named them
    agent.release(client)
    assert agent.names[("ns", "js", "js-server-0-0")] == reserved
    agent.release(server)
    assert agent.names == {} and agent.ips == {}
