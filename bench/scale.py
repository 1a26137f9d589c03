"""How the operator scales: time from creating N FineTuneJobs until all their pods are scheduled, against N
plain batch/v1 Jobs with the same pod template, on the local cluster's KWOK GPU nodes; plus the operator's
peak RSS, CPU seconds per job and reconcile errors.

    scripts/cluster/up.sh && source /tmp/kubetune-cluster/env          # the local cluster (scripts/cluster)
    .venv/bin/python bench/scale.py                                       # N = 100, 1000; 1 repeat per arm
    .venv/bin/python bench/scale.py --sizes 100,1000,3000 --repeats 2     # alternating arms (ABBA)
    .venv/bin/python bench/scale.py --sizes 5 --hold 0                    # smoke run (seconds)
    .venv/bin/python bench/scale.py --sizes 1000 --arms ftj --py-spy /tmp/op.svg   # profile the operator
    .venv/bin/python bench/scale.py --sizes 1000 --arms ftj --tracemalloc          # where its memory goes
    .venv/bin/python bench/scale.py --sizes 1000 --arms ftj --memstats             # live vs held, at full speed

What one run of an arm does (each in a fresh namespace, deleted afterwards):
- `ftj`: starts the operator (`python -m kubetune_operator --standalone --namespace NS`, the product's
  defaults), then creates N FineTuneJobs (1 GPU, pods annotated `kubetune.dev/kwok-outcome: hold`, so they
  stay Running like a long training run); `job`: creates N Jobs whose spec is what the operator renders for
  the same FineTuneJob (render.render_children), with no operator running.
- Creation uses 8 client threads for both arms. A pod watch records when the N-th pod got a node
  (`scheduled`); for `ftj`, a FineTuneJob watch records when the N-th reported phase Running (`status`).
- Operator figures from /proc: CPU (user+system) from start of creation until all statuses are Running,
  divided by N; peak RSS (VmHWM) over the whole run including `--hold` seconds of steady state afterwards
  (N Running jobs: progress scraping and resync), whose CPU is reported per 1000 jobs per minute;
  reconcile errors = kubetune_operator_reconcile_errors_total from its /metrics plus ERROR lines and
  tracebacks in its log; the part of its CPU per job its garbage collector took
  (kubetune_operator_gc_seconds_total); what it did per job in the CPU window and per job per minute of
  `--hold` (results.json: reconciles by trigger, /progress scrapes by result).
- Pods land on `bench-node-*` KWOK nodes the script adds (2000 pods, 4000 GPUs each, a taint of their own
  that only the bench's pods tolerate; removed with --cleanup-nodes), so node capacity never limits either arm.

Arms alternate between repeats (ftj, job, job, ftj, ...); the table shows the median and the spread
(min-max) per arm and the ratio of the medians, all from this one run. The cluster is shared with the API
server, etcd, scheduler, controller-manager and KWOK on the same cores: the `job` arm is what the cluster
alone achieves, and the ratio is the operator's cost on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import statistics
import string
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator")]

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
HOLD = {"kubetune.dev/kwok-outcome": "hold"}
NODE_PODS = 2000
# the runtime every bench FineTuneJob names (what the chart's default runtime allows, plus the bench's taint)
RUNTIME = {
    "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterFineTuneRuntime", "metadata": {"name": "kubetune-bench"},
    "spec": {"template": {"image": "ghcr.io/kubetune/trainer:0.1.0"},
             "storage": {"credentials": {"secretName": "s3-creds"}},
             "policy": {"overrides": ["nodeSelector", "tolerations"]}},
}
# bench nodes carry their own taint too: other tests' pods (which expect gpu-node-0/1) never land on them
BENCH_TAINT = {"key": "kubetune.dev/bench", "value": "scale", "effect": "NoSchedule"}
BENCH_TOLERATION = {"key": "kubetune.dev/bench", "operator": "Equal", "value": "scale", "effect": "NoSchedule"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def finetunejob(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "stage": "sft",
            "model": {"source": "s3://models/tiny"},
            "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
            "output": {"uri": "s3://kubetune/runs"},
            "runtimeRef": {"kind": "ClusterFineTuneRuntime", "name": RUNTIME["metadata"]["name"]},
            "resources": {"gpus": 1, "podAnnotations": dict(HOLD), "nodeSelector": {"type": "kwok-bench"},
                          "tolerations": [BENCH_TOLERATION]},
            "retryLimit": 0,
        },
    }


def plain_job(name: str, namespace: str) -> dict:
    """The Job the operator would create for finetunejob(name) under the bench's runtime, without owner
    reference (nothing owns it)."""
    from kubetune_operator import runtimes
    from kubetune_operator.render import render_children
    from kubetune_operator.settings import OperatorSettings
    from kubetune_operator.validation import validate

    body = finetunejob(name)
    body["metadata"].update(namespace=namespace, uid="00000000-0000-0000-0000-000000000000", generation=1)
    model, problems = validate(body)
    assert not problems, problems
    runtime = runtimes.parse_runtime(RUNTIME["spec"])
    job = render_children(runtimes.apply_defaults(model, runtime), body, OperatorSettings(), runtime).job
    job["metadata"].pop("ownerReferences", None)
    return job


# ------------------------------------------------------------------------------------------------ cluster
def kube_client():
    from kubernetes import client, config

    config.load_kube_config(config_file=kubeconfig())
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = 16
    return client.ApiClient(cfg)


def request(api, method: str, path: str, body: Optional[dict] = None, query: Optional[list] = None,
            timeout: float = 60):
    """A raw call over the official client's connection pool and auth (no model conversion)."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    m, url, h, b, p = api.param_serialize(method, path, query_params=query, header_params=headers, body=body,
                                          auth_settings=["BearerToken"])
    return api.call_api(m, url, h, b, p, _request_timeout=timeout)


def kubeconfig() -> str:
    return os.environ.get("KUBECONFIG") or \
        f"{os.environ.get('KUBETUNE_CLUSTER_DIR', '/tmp/kubetune-cluster')}/kubeconfig"


def kubectl(*args: str, input: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", "--kubeconfig", kubeconfig(), *args], input=input, text=True,
                          capture_output=True, check=check)


def bench_node(name: str) -> dict:
    cap = {"cpu": str(NODE_PODS), "memory": f"{NODE_PODS * 4}Gi", "pods": str(NODE_PODS),
           "nvidia.com/gpu": str(NODE_PODS * 2), "ephemeral-storage": "100Ti"}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                         "labels": {"kubernetes.io/hostname": name, "type": "kwok-bench",
                                    "nvidia.com/gpu.present": "true"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}, BENCH_TAINT]},
            "status": {"capacity": cap, "allocatable": cap}}


def ensure_nodes(count: int) -> None:
    from kubernetes.utils import parse_quantity

    docs = [bench_node(f"bench-node-{i}") for i in range(count)]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        nodes = json.loads(kubectl("get", "nodes", "-l", "type=kwok-bench", "-o", "json").stdout)["items"]
        ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in n.get("status", {}).get("conditions", []))
                 and parse_quantity(n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")) == NODE_PODS * 2]
        if len(ready) >= count:
            return
        time.sleep(1)
    raise SystemExit(f"bench nodes not Ready with {NODE_PODS * 2} GPUs after 120 s")


def ensure_crd() -> None:
    """The CRDs from crds/ and the bench's ClusterFineTuneRuntime."""
    for path in sorted((REPO / "crds").glob("kubetune.dev_*.yaml")):
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    for _ in range(30):  # `wait` fails at once while a new CRD is not visible yet
        if kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.dev",
                   "crd/clusterfinetuneruntimes.kubetune.dev", check=False).returncode == 0:
            break
        time.sleep(1)
    else:
        raise SystemExit("the kubetune CRDs are not Established")
    kubectl("apply", "-f", "-", input=json.dumps(RUNTIME))


# ------------------------------------------------------------------------------------------------ watching
class Counter(threading.Thread):
    """Counts distinct objects of a collection matching `done(obj)` from one watch; `when(n)` is the monotonic
    time the n-th matched."""

    def __init__(self, api, path: str, done):
        super().__init__(daemon=True)
        self.api, self.path, self.done = api, path, done
        self.seen: set[str] = set()
        self.times: list[float] = []
        self.stopped = threading.Event()
        self.cond = threading.Condition()

    def run(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        rv = "0"
        while not self.stopped.is_set():
            try:
                resp = request(self.api, "GET", self.path, query=[("watch", "true"), ("resourceVersion", rv),
                                                                  ("timeoutSeconds", "60")], timeout=90)
                for line in iter_resp_lines(resp.response):
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    name = (obj.get("metadata") or {}).get("name")
                    if ev.get("type") in ("ADDED", "MODIFIED") and name not in self.seen and self.done(obj):
                        with self.cond:
                            self.seen.add(name)
                            self.times.append(time.monotonic())
                            self.cond.notify_all()
                    if self.stopped.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - a broken watch is resumed from the last resourceVersion
                if not self.stopped.is_set():
                    print(f"  (watch {self.path} restarted: {exc})", file=sys.stderr)
                    time.sleep(0.5)

    def wait(self, n: int, timeout: float) -> Optional[float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.times) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 1.0))
            return self.times[n - 1]


def api_requests(api) -> dict[str, float]:
    """apiserver_request_total summed by verb and resource (all clients), from the API server's /metrics."""
    resp = request(api, "GET", "/metrics", timeout=60)
    resp.read()
    out: dict[str, float] = {}
    for line in resp.data.decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            key = f"{labels.get('verb')} {labels.get('resource')}{'/' + labels['subresource'] if labels.get('subresource') else ''}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def cluster_cpu() -> dict[str, float]:
    """CPU seconds so far of each server the local cluster runs (scripts/cluster writes their pids to
    $KUBETUNE_CLUSTER_DIR/run/NAME.pid); servers not running are left out."""
    out = {}
    run = Path(os.environ.get("KUBETUNE_CLUSTER_DIR", "/tmp/kubetune-cluster")) / "run"
    for pidfile in sorted(run.glob("*.pid")):
        try:
            out[pidfile.stem] = proc_cpu_seconds(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def scheduled(pod: dict) -> bool:
    return bool((pod.get("spec") or {}).get("nodeName"))


def running(ftj: dict) -> bool:
    return (ftj.get("status") or {}).get("phase") == "Running"


# ------------------------------------------------------------------------------------------------ operator
class Operator:
    def __init__(self, namespace: str, log_path: Path, py_spy: Optional[str], tracemalloc_out: Optional[Path] = None,
                 trace: bool = True):
        env = dict(os.environ, KUBECONFIG=kubeconfig(), KUBETUNE_METRICS_PORT="0", KUBETUNE_METRICS_HOST="127.0.0.1",
                   PYTHONUNBUFFERED="1")
        args = [sys.executable, "-m", "kubetune_operator", "--standalone", "--namespace", namespace]
        if tracemalloc_out:
            env["KUBETUNE_TRACEMALLOC_OUT"] = str(tracemalloc_out)
            env["KUBETUNE_TRACEMALLOC_FRAMES"] = env.get("KUBETUNE_TRACEMALLOC_FRAMES", "6") if trace else "0"
            args[1:3] = [str(Path(__file__).with_name("operator_tracemalloc.py"))]
        if py_spy:
            fmt = ["--format", "raw"] if py_spy.endswith(".txt") else []  # raw: collapsed stacks, for grep
            venv_spy = Path(sys.executable).with_name("py-spy")
            args = [str(venv_spy) if venv_spy.exists() else "py-spy", "record", "--nonblocking", "-r", "50", *fmt, "-o",
                    py_spy, "--", *args]
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.metrics_url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.metrics_url is None:
            if self.proc.poll() is not None:
                raise SystemExit(f"operator exited:\n{log_path.read_text()[-3000:]}")
            m = re.search(r"serving metrics on (http://\S+/metrics)", log_path.read_text(errors="replace"))
            if m:
                self.metrics_url = m.group(1)
            time.sleep(0.2)
        if py_spy:  # the python process is py-spy's child
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            self.pid = int(out[0])
        time.sleep(1.0)  # watches established

    def dump_memory(self, out: Path, timeout: float = 600) -> None:
        """bench/operator_tracemalloc.py appends its allocation sites to `out` (only when started with it); waits
        until it has (walking every traced block takes a while)."""
        before = out.stat().st_size if out.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (out.stat().st_size if out.exists() else 0) == before:
            time.sleep(1)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _metrics_text(self) -> Optional[str]:
        """The operator's /metrics exposition (None: not answering)."""
        try:
            return urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        except OSError:
            return None

    def _metric_sum(self, name: str) -> Optional[float]:
        """Sum over all series of one metric of the operator's /metrics (None: not answering)."""
        text = self._metrics_text()
        if text is None:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def work(self) -> dict[str, float]:
        """What the operator has done so far, by kind: reconciles by trigger and /progress scrapes by result
        (kubetune_operator_reconciles_total, kubetune_operator_progress_scrapes_total; empty: not answering)."""
        found = {}
        for line in (self._metrics_text() or "").splitlines():
            m = re.match(r'kubetune_operator_(reconciles|progress_scrapes)_total\{\w+="(\w+)"\} (\S+)$', line)
            if m:
                found[f"{'reconcile' if m.group(1) == 'reconciles' else 'scrape'} {m.group(2)}"] = float(m.group(3))
        return found

    def reconcile_errors(self) -> int:
        errors = self._metric_sum("kubetune_operator_reconcile_errors_total")
        return -1 if errors is None else int(errors)

    def gc_seconds(self) -> Optional[float]:
        """CPU seconds its garbage collector took so far (kubetune_operator_gc_seconds_total, all generations;
        None: /metrics did not answer)."""
        return self._metric_sum("kubetune_operator_gc_seconds_total")

    def log_errors(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if re.search(r"\bERROR\b|^Traceback", line))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT if self.pid != self.proc.pid else signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------ one run
def create_all(api, namespace: str, objs: list[dict], path: str, threads: int = 8) -> None:
    def post(obj: dict) -> None:
        resp = request(api, "POST", path, body=obj)
        resp.read()
        if resp.status >= 300:
            raise SystemExit(f"POST {path} {obj['metadata']['name']}: {resp.status} {resp.data[:300]!r}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, objs))


def run_arm(api, arm: str, n: int, args, workdir: Path) -> dict:
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=4))
    ns = f"scale-{arm}-{n}-{suffix}"
    kubectl("create", "namespace", ns)
    traced = workdir / f"{'tracemalloc' if args.tracemalloc else 'memstats'}-{ns}.txt" \
        if args.tracemalloc or args.memstats else None
    op = Operator(ns, workdir / f"operator-{ns}.log", args.py_spy, traced, trace=args.tracemalloc) \
        if arm == "ftj" else None
    pods = Counter(api, f"/api/v1/namespaces/{ns}/pods", scheduled)
    pods.start()
    status = None
    if op:
        status = Counter(api, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}", running)
        status.start()
        objs = [finetunejob(f"j{i:05d}") for i in range(n)]
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
        cpu0 = op.cpu_seconds()
    else:
        objs = [plain_job(f"j{i:05d}", ns) for i in range(n)]
        path = f"/apis/batch/v1/namespaces/{ns}/jobs"
    timeout = args.timeout_base + args.timeout_per_job * n
    requests0 = api_requests(api)
    servers0 = cluster_cpu()
    op0 = op.cpu_seconds() if op else 0.0
    gc0 = op.gc_seconds() if op else None
    work0 = op.work() if op else {}
    t0 = time.monotonic()
    create_all(api, ns, objs, path)
    t_created = time.monotonic()
    t_sched = pods.wait(n, timeout)
    # where the CPU went until the N-th pod got a node, per job: the same window for both arms (the machine's
    # cores are shared, so the arm that needs more CPU in all takes longer)
    servers1, op1 = cluster_cpu(), (op.cpu_seconds() if op else 0.0)
    window_cpu = {k: 1000 * (v - servers0[k]) / n for k, v in servers1.items() if k in servers0}
    if op:
        window_cpu["operator"] = 1000 * (op1 - op0) / n
    row = {"arm": arm, "n": n, "namespace": ns, "create_s": t_created - t0,
           "scheduled_s": (t_sched - t0) if t_sched else None, "scheduled_count": len(pods.times),
           "cpu_ms_per_job_until_scheduled": {k: round(v, 1) for k, v in
                                              sorted(window_cpu.items(), key=lambda kv: -kv[1])},
           "cpu_ms_per_job_until_scheduled_total": round(sum(window_cpu.values()), 1)}
    if op:
        t_status = status.wait(n, max(30.0, timeout - (time.monotonic() - t0)))
        cpu1 = op.cpu_seconds()
        gc1 = op.gc_seconds()
        work1 = op.work()
        # per job, creation until all statuses are Running (the CPU figure's window): what the CPU went into
        row["operator_work_per_job"] = {k: round((v - work0.get(k, 0.0)) / n, 2) for k, v in work1.items()}
        row.update(status_s=(t_status - t0) if t_status else None, running_count=len(status.times),
                   cpu_per_job_ms=1000 * (cpu1 - cpu0) / n)
        if gc0 is not None and gc1 is not None:
            row["gc_per_job_ms"] = 1000 * (gc1 - gc0) / n  # the part of it its garbage collector took
        if traced:
            op.dump_memory(traced)
    requests1 = api_requests(api)
    delta = {k: v - requests0.get(k, 0.0) for k, v in requests1.items() if v - requests0.get(k, 0.0) > 0}
    row["api_requests_per_job"] = sum(delta.values()) / n
    per_job = {k: round(v / n, 3) for k, v in sorted(delta.items(), key=lambda kv: -kv[1])}
    row["api_requests_top"] = dict(list(per_job.items())[:8])
    row["api_requests_all"] = per_job  # results.json: every verb and resource
    if op:
        if args.hold > 0:
            time.sleep(args.hold)
            row["hold_cpu_per_1k_jobs_min"] = (op.cpu_seconds() - cpu1) / args.hold * 60 * 1000 / n
            row["hold_work_per_job_min"] = {k: round((v - work1.get(k, 0.0)) / args.hold * 60 / n, 2)
                                            for k, v in op.work().items()}
        if traced:
            op.dump_memory(traced)
        row.update(rss_mb=op.peak_rss_mb(), reconcile_errors=op.reconcile_errors(), log_errors=op.log_errors())
        op.stop()
    pods.stopped.set()
    if status:
        status.stopped.set()
    return row


def clean_up(api, ns: str, n: int, keep: bool) -> None:
    """Delete an arm's objects and namespace (after its row is printed: a failure here loses no measurement)."""
    # the namespace controller alone was seen leaving Jobs behind for minutes on a loaded machine
    for coll in (f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}", f"/apis/batch/v1/namespaces/{ns}/jobs"):
        try:
            request(api, "DELETE", coll, body={"kind": "DeleteOptions", "apiVersion": "v1",
                                               "propagationPolicy": "Background"}).read()
        except Exception as exc:  # noqa: BLE001 - 5,000 Jobs outlast the API server's 60 s request timeout
            print(f"# deleting {coll} did not finish ({type(exc).__name__}); the namespace deletion goes on",
                  file=sys.stderr, flush=True)
    kubectl("delete", "namespace", ns, "--wait=false")
    if not keep:
        wait_gone(ns, timeout=max(120.0, n * 0.2))


def wait_gone(ns: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kubectl("get", "namespace", ns, check=False).returncode != 0:
            return
        time.sleep(2)
    print(f"  (namespace {ns} still terminating after {timeout:.0f} s; going on)", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ report
def spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.1f}" if len(values) == 1 else f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def table(rows: list[dict]) -> str:
    out = ["| N | FineTuneJobs: pods scheduled s | plain Jobs: pods scheduled s | ratio | FTJ status Running s "
           "| operator CPU ms/job | of it GC ms/job | operator peak RSS MB | idle CPU s/1k jobs/min "
           "| API requests/job (FTJ / Job) | reconcile errors (metric / log) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows}):
        f = [r for r in rows if r["n"] == n and r["arm"] == "ftj"]
        j = [r for r in rows if r["n"] == n and r["arm"] == "job"]
        fs = [r["scheduled_s"] for r in f if r["scheduled_s"] is not None]
        js = [r["scheduled_s"] for r in j if r["scheduled_s"] is not None]
        ratio = f"{statistics.median(fs) / statistics.median(js):.2f}x" if fs and js else "-"
        if len(fs) < len(f) or len(js) < len(j):
            ratio += " (timeouts)"
        hold = [r["hold_cpu_per_1k_jobs_min"] for r in f if "hold_cpu_per_1k_jobs_min" in r]
        out.append("| " + " | ".join([
            f"{n:,}", spread(fs), spread(js), ratio,
            spread([r["status_s"] for r in f if r.get("status_s") is not None]),
            spread([r["cpu_per_job_ms"] for r in f]),
            spread([r["gc_per_job_ms"] for r in f if "gc_per_job_ms" in r]),
            spread([r["rss_mb"] for r in f]), spread(hold),
            f"{spread([r['api_requests_per_job'] for r in f])} / {spread([r['api_requests_per_job'] for r in j])}",
            " ".join(f"{r['reconcile_errors']}/{r['log_errors']}" for r in f) or "-"]) + " |")
    return "\n".join(out)


def cpu_table(rows: list[dict]) -> str:
    """CPU ms per job of each process from the first create until the N-th pod had a node, median per arm: what
    the operator costs the machine, and (the `job` arm's servers as N grows) how the cluster's own cost per
    job grows on the same cores."""
    names = sorted({k for r in rows for k in r.get("cpu_ms_per_job_until_scheduled", {})},
                   key=lambda k: (k != "operator", k))
    out = ["| N | arm | total | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for n in sorted({r["n"] for r in rows}):
        for arm in ("ftj", "job"):
            rs = [r for r in rows if r["n"] == n and r["arm"] == arm and "cpu_ms_per_job_until_scheduled" in r]
            if rs:
                cells = [spread([r["cpu_ms_per_job_until_scheduled"].get(k, 0.0) for r in rs]) for k in names]
                total = spread([r["cpu_ms_per_job_until_scheduled_total"] for r in rs])
                out.append(f"| {n:,} | {arm} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000", help="comma-separated N (default 100,1000)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per arm and N, arms alternating (default 1)")
    ap.add_argument("--arms", default="ftj,job", help="ftj, job or both (default ftj,job)")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds to keep N Running FineTuneJobs after the "
                    "status settled, measuring the operator's steady-state CPU (default 20; 0: skip)")
    ap.add_argument("--timeout-base", type=float, default=60.0)
    ap.add_argument("--timeout-per-job", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kubetune-scale"), help="operator logs, results.json")
    ap.add_argument("--py-spy", help="record the operator with py-spy into this flamegraph (svg)")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="run the operator under bench/operator_tracemalloc.py: its allocation sites once all jobs "
                         "run and after the hold, in WORKDIR/tracemalloc-NS.txt (slows the operator: no timings)")
    ap.add_argument("--memstats", action="store_true",
                    help="the same wrapper without tracing (full speed): RSS timeline, glibc heap in use vs kept, "
                         "pymalloc arenas, live objects per type, in WORKDIR/memstats-NS.txt")
    ap.add_argument("--keep", action="store_true", help="do not wait for namespaces to be deleted")
    ap.add_argument("--cleanup-nodes", action="store_true", help="delete the bench nodes at the end")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    args.workdir.mkdir(parents=True, exist_ok=True)

    ensure_crd()
    ensure_nodes(math.ceil(max(sizes) / NODE_PODS) + 1)
    api = kube_client()
    rows: list[dict] = []
    for n in sizes:
        for rep in range(args.repeats):
            order = arms if rep % 2 == 0 else arms[::-1]
            for arm in order:
                row = run_arm(api, arm, n, args, args.workdir)
                rows.append(row)
                print(json.dumps(row), flush=True)
                (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))
                clean_up(api, row["namespace"], n, args.keep)
    if args.cleanup_nodes:
        kubectl("delete", "nodes", "-l", "type=kwok-bench")
    print()
    print(table(rows))
    print()
    print(cpu_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
