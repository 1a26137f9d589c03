"""Fixtures for the end-to-end tests: a real local control plane from scripts/cluster/up.sh.

`cluster` (session): brings the cluster up (idempotent: an already running one is reused and repaired) and
tears it down at the end only if this session started it (KUBETUNE_KEEP_CLUSTER=1 keeps it running).
`namespace` (function): a fresh namespace per test, deleted afterwards.
`local_queue` (function): a Kueue LocalQueue `kubetune` in `namespace` (also `cluster.local_queue(ns)`).
`cluster.wait_job(ns, name, want="Succeeded", timeout=...)`: waits for a FineTuneJob condition and stops at once,
with the job's message, conditions and pod log tails, when the job ends otherwise.

Env: KUBETUNE_CLUSTER_DIR (state dir, default /tmp/kubetune-cluster), KUBETUNE_SKIP_BUILD=1 (skip the e2e
tests instead of building missing binaries, which takes 20-35 min once), KUBETUNE_KEEP_CLUSTER=1.
Every test under tests/e2e/ gets the `e2e` marker, so `-m "not e2e"` deselects them. Under pytest-xdist (what
scripts/test.sh runs) they all run on one worker, in order (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "cluster"
E2E_DIR = Path(__file__).resolve().parent
NEEDED_BINARIES = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "prometheus",
                   "jobset", "kueue"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test against the local cluster (scripts/cluster/up.sh)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {(self.stderr or self.output or '').strip()}"


@dataclass
class Cluster:
    dir: Path
    kubeconfig: str
    env: dict[str, str]                 # pass to subprocesses: KUBECONFIG, AWS_*, KUBETUNE_*, PATH with bin dir
    s3_endpoint: str
    prometheus_url: str
    bin_dir: str
    started_here: bool = field(default=False, repr=False)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess:
        """Runs the installed kubectl against this cluster. timeout (s) defaults to kubectl's own
        --timeout=... plus a minute (`kubectl wait --timeout=900s`), else 5 minutes."""
        cmd = ["kubectl", "--kubeconfig", self.kubeconfig, *args]
        if timeout is None:
            own = [_go_duration(a.split("=", 1)[1]) for a in args if a.startswith("--timeout=")]
            timeout = (own[0] + 60) if own and own[0] else 300
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, obj: dict | list | str, namespace: str | None = None) -> None:
        """kubectl apply of a dict (or list of dicts) or a YAML/JSON string."""
        if isinstance(obj, list):
            obj = {"apiVersion": "v1", "kind": "List", "items": obj}
        text = obj if isinstance(obj, str) else json.dumps(obj)
        self.kubectl("apply", *(["-n", namespace] if namespace else []), "-f", "-", input=text)

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.5, desc: str = "",
                 errors: tuple = (KubectlError, KeyError, IndexError, TypeError),
                 context: Callable[[], str] | None = None) -> Any:
        """Polls predicate until it returns a truthy value (returned) or fails the test after timeout s.
        Exceptions of the types in `errors` count as "not yet". `context` adds what a person needs to see why
        (e.g. Cluster.describe_job) to the failure."""
        deadline, last_exc = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except errors as e:
                last_exc = e
            time.sleep(interval)
        report = ""
        if context:
            try:
                report = "\n" + context()
            except Exception as e:  # the report must not hide the failure it reports
                report = f"\n(context unavailable: {e})"
        pytest.fail(f"timed out after {timeout}s waiting for {desc or predicate}"
                    + (f" (last error: {last_exc})" if last_exc else "") + report)


    # ---- S3 outages (tests/e2e/test_storage_outage.py): stop and restart THIS cluster's SeaweedFS
    def create_namespace(self, name: str) -> str:
        """Create namespace `name` and wait for its `default` ServiceAccount, which pods need and which the
        controller-manager creates a moment later."""
        self.kubectl("create", "namespace", name)
        self.wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
                      timeout=30, desc=f"ServiceAccount default in {name}")
        return name

    def stop_s3(self) -> None:
        """Stops this cluster's S3 server (SeaweedFS, started by up.sh) the way a crash would look to clients:
        connections are refused until start_s3(). Its data dir stays."""
        run = self.dir / "run"
        pgid = int((run / "s3.pid").read_text().strip())
        self._s3_argv = (Path(f"/proc/{pgid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0"))
        self._s3_stopped = True
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)

    def start_s3(self, timeout: float = 60) -> None:
        """Starts the S3 server stop_s3() stopped, with the same command line (ports, data dir, credentials),
        records it as up.sh does (so down.sh stops it) and waits until signed requests work again. A no-op when
        it was not stopped (safe in a fixture's cleanup)."""
        if not getattr(self, "_s3_stopped", False):
            return  # running (never stopped, or started again already): a second weed would fight for the ports
        self._s3_stopped = False
        argv = [a.decode() for a in self._s3_argv]
        run, logs = self.dir / "run", self.dir / "logs"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.env["AWS_ACCESS_KEY_ID"],
               "AWS_SECRET_ACCESS_KEY": self.env["AWS_SECRET_ACCESS_KEY"]}
        with open(logs / "s3.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        (run / "s3.pid").write_text(str(proc.pid))
        (run / "s3.cmd").write_text(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}")
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, connect_timeout=2))
        self.wait_for(lambda: client.list_buckets() is not None, timeout=timeout, interval=0.3,
                      desc=f"S3 back on {self.s3_endpoint}", errors=(Exception,))

    def local_queue(self, ns: str, name: str = "kubetune", cluster_queue: str = "kubetune") -> str:
        """Creates Kueue LocalQueue ns/name pointing at the cluster's ClusterQueue (up.sh makes `kubetune`: 16
        nvidia.com/gpu, cpu, memory) and returns its name, the value of a Job's `kueue.x-k8s.io/queue-name`."""
        self.apply({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                    "metadata": {"name": name, "namespace": ns}, "spec": {"clusterQueue": cluster_queue}})
        return name

    def wait_job(self, ns: str, name: str, want: str = "Succeeded", timeout: float = 300,
                 context: Callable[[], str] | None = None) -> dict:
        """Waits until FineTuneJob ns/name has condition `want` True and returns the object. Stops early, failing
        the test with the job's message, conditions, pods and the tail of each pod's log, when the job reaches a
        terminal condition (Succeeded/Failed) other than `want`, or at the timeout. `context` adds text to that
        report (e.g. the operator's log tail). Use it instead of `kubectl wait --for=condition=...`, which waits
        out its whole timeout for a job that has already failed."""
        deadline, obj, last_err = time.monotonic() + timeout, None, ""
        while True:
            proc = self.kubectl("get", "finetunejob", name, "-n", ns, "-o", "json", check=False)
            if proc.returncode == 0:
                obj = json.loads(proc.stdout)
                conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []
                         if c.get("status") == "True"}
                if want in conds:
                    return obj
                ended = [t for t in ("Succeeded", "Failed") if t in conds and t != want]
                if ended:
                    pytest.fail(f"FineTuneJob {ns}/{name} ended {ended[0]} while waiting for {want}:\n"
                                + self.describe_job(ns, name, obj, context))
            else:
                last_err = proc.stderr.strip()
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout}s waiting for FineTuneJob {ns}/{name} to be {want}"
                            + (f" (last error: {last_err})" if obj is None else "") + ":\n"
                            + self.describe_job(ns, name, obj, context))
            time.sleep(1)

    def describe_job(self, ns: str, name: str, obj: dict | None = None,
                     context: Callable[[], str] | None = None, log_bytes: int = 3000) -> str:
        """What a person needs to see why a FineTuneJob is where it is: status message and conditions, its pods
        and their states, and the tail of each pod's container log from the node agent's sandbox."""
        out = []
        status = (obj or {}).get("status") or {}
        out.append(f"phase={status.get('phase')} message={status.get('message')!r}")
        for c in status.get("conditions") or []:
            out.append(f"  {c.get('type')}={c.get('status')} reason={c.get('reason')} message={c.get('message')!r}")
        pods = self.kubectl("get", "pods", "-n", ns, "-l", f"kubetune.dev/job-name={name}", "-o", "json", check=False)
        names = []
        if pods.returncode == 0:
            for p in json.loads(pods.stdout)["items"]:
                names.append(p["metadata"]["name"])
                states = [cs.get("state") for cs in (p.get("status") or {}).get("containerStatuses") or []]
                out.append(f"pod {p['metadata']['name']} on {p['spec'].get('nodeName')}: "
                           f"{(p.get('status') or {}).get('phase')} {json.dumps(states)[:600]}")
        for pod in names:
            for log in sorted((self.dir / "pods" / f"{ns}_{pod}").glob("*log")):
                if log.is_file() and log.stat().st_size:
                    with log.open("rb") as f:
                        f.seek(max(0, log.stat().st_size - log_bytes))
                        out.append(f"--- tail of {log}\n{f.read().decode(errors='replace')}")
        if context:
            try:
                out.append("--- context\n" + context()[-4000:])
            except Exception as e:  # the report must not hide the failure it reports
                out.append(f"(context unavailable: {e})")
        return "\n".join(out)


def _group_alive(pgid: int) -> bool:
    """A live (non-zombie) process in group pgid (weed mini runs several)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _go_duration(text: str) -> float:
    """Seconds in a Go duration such as 90s, 2m, 1h30m; 0 if unparsable."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([\d.]+)(ms|h|m|s)", text)
    return sum(float(n) * units[u] for n, u in parts) if parts else 0


def _read_env_file(path: Path, bin_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    for line in path.read_text().splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m and m.group(1) != "PATH":
            env[m.group(1)] = m.group(2)
    venv_bin = os.environ.get("KUBETUNE_PYTHON_BIN_DIR", str(REPO / ".venv" / "bin"))
    env["PATH"] = os.pathsep.join([bin_dir, venv_bin, os.environ.get("PATH", "")])
    return env


def _apiserver_answers(kubeconfig: Path) -> bool:
    if not kubeconfig.exists() or not shutil.which("kubectl"):
        return False
    try:
        proc = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"],
                              capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "ok"


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    state = Path(os.environ.get("KUBETUNE_CLUSTER_DIR", "/tmp/kubetune-cluster"))
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))
    bin_dir = os.environ.get("KUBETUNE_BIN_DIR", str(cache / "bin" / "current"))
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not on PATH")
    missing = [b for b in NEEDED_BINARIES if not os.access(os.path.join(bin_dir, b), os.X_OK)]
    if missing and os.environ.get("KUBETUNE_SKIP_BUILD") == "1":
        pytest.skip(f"cluster binaries missing in {bin_dir} ({', '.join(missing)}) and KUBETUNE_SKIP_BUILD=1; "
                    "build them with scripts/cluster/build-binaries.sh")
    was_up = _apiserver_answers(state / "kubeconfig")
    dir_existed = state.exists()
    # up.sh also runs for a cluster that is up: it is idempotent and restarts a component that died;
    # it builds missing binaries itself (20-35 min the first time)
    def up() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPTS / "up.sh")], capture_output=True, text=True,
                              env=dict(os.environ, KUBETUNE_CLUSTER_DIR=str(state)), timeout=3600)

    def excerpt(p: subprocess.CompletedProcess) -> str:  # the start (what it did first) and the end (why it stopped)
        err = p.stderr
        return err if len(err) <= 6000 else f"{err[:1500]}\n[... {len(err) - 5500} characters ...]\n{err[-4000:]}"

    proc = up()
    if proc.returncode != 0 and "NOT running" in proc.stderr:
        # Every e2e test needs this cluster, so one component that died at start would error all of them: up.sh
        # gets one more go (it starts only what is not running) and the first failure stays visible as a warning
        # in the summary. Other failures (a port taken, a missing binary) would only fail again: not retried.
        first = proc
        warnings.warn(f"scripts/cluster/up.sh failed ({first.returncode}), running it once more:\n"
                      f"{first.stderr[-3000:]}", stacklevel=1)
        proc = up()
        failed = (f"scripts/cluster/up.sh failed twice ({first.returncode}, {proc.returncode}); logs in {state}/logs."
                  f"\nFirst run:\n{excerpt(first)}\nSecond run:\n{excerpt(proc)}")
    else:
        failed = f"scripts/cluster/up.sh failed ({proc.returncode}); logs in {state}/logs:\n{excerpt(proc)}"
    if proc.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "down.sh")], env=dict(os.environ, KUBETUNE_CLUSTER_DIR=str(state)),
                       capture_output=True, timeout=120)
        pytest.fail(failed)
    env = _read_env_file(state / "env", bin_dir)
    c = Cluster(dir=state, kubeconfig=env["KUBECONFIG"], env=env, s3_endpoint=env["KUBETUNE_S3_ENDPOINT"],
                prometheus_url=env["KUBETUNE_PROMETHEUS_URL"], bin_dir=bin_dir, started_here=not was_up)
    yield c
    if c.started_here and os.environ.get("KUBETUNE_KEEP_CLUSTER") != "1":
        # a state dir this session created is removed with the cluster; an older one keeps its data
        args = [] if dir_existed else ["--purge"]
        subprocess.run(["bash", str(SCRIPTS / "down.sh"), *args], env=dict(os.environ, KUBETUNE_CLUSTER_DIR=str(state)),
                       capture_output=True, timeout=300)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace for one test; deleted (without waiting) afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{base}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def local_queue(cluster: Cluster, namespace: str) -> str:
    """A Kueue LocalQueue in the test's namespace; label workloads with kueue.x-k8s.io/queue-name=<this>."""
    return cluster.local_queue(namespace)
