"""Smoke tests of the local test cluster itself (scripts/cluster/): if these fail, every other e2e test would.

Covers: fake GPU nodes (KWOK) and their pod outcomes, a Job really run by the node agent on `local-runner`
(secret env, configMap volume, emptyDir, termination message), TokenRequest, S3 (SeaweedFS) auth, and
Prometheus discovering and scraping an annotated pod through the apiserver.
"""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_pod(name: str, annotations: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "tolerations": [GPU_TOLERATION],
            "containers": [{"name": "trainer", "image": "kubetune/trainer:dev",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }


def pod_phase(cluster, ns: str, name: str) -> str:
    return cluster.kubectl("get", "pod", name, "-n", ns, "-o", "jsonpath={.status.phase}").stdout


@pytest.mark.parametrize("node", ["gpu-node-0", "gpu-node-1"])
def test_gpu_nodes_advertise_8_gpus(cluster, node):
    n = cluster.kubectl_json("get", "node", node)
    assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert n["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert n["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert n["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
    ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"


def test_local_runner_node(cluster):
    n = cluster.kubectl_json("get", "node", "local-runner")
    assert n["metadata"]["labels"]["kubetune.dev/local-runner"] == "true"
    assert "nvidia.com/gpu" not in n["status"]["allocatable"]
    assert [c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready"] == ["True"]


def test_kwok_gpu_pod_succeeds(cluster, namespace):
    cluster.apply(gpu_pod("ok"), namespace)
    cluster.wait_for(lambda: pod_phase(cluster, namespace, "ok") == "Succeeded", timeout=60, desc="pod Succeeded")
    pod = cluster.kubectl_json("get", "pod", "ok", "-n", namespace)
    assert pod["spec"]["nodeName"] in ("gpu-node-0", "gpu-node-1")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")


def test_kwok_gpu_pod_fails_with_annotated_exit_code(cluster, namespace):
    cluster.apply(gpu_pod("bad", {"kubetune.dev/kwok-outcome": "fail", "kubetune.dev/kwok-exit-code": "3",
                                  "kubetune.dev/kwok-message": "CUDA out of memory"}), namespace)
    cluster.wait_for(lambda: pod_phase(cluster, namespace, "bad") == "Failed", timeout=60, desc="pod Failed")
    term = cluster.kubectl_json("get", "pod", "bad", "-n", namespace)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", "CUDA out of memory")


def test_kwok_hold_pod_runs_until_deleted(cluster, namespace):
    cluster.apply(gpu_pod("hold", {"kubetune.dev/kwok-outcome": "hold", "kubetune.dev/kwok-duration": "1s"}), namespace)
    cluster.wait_for(lambda: pod_phase(cluster, namespace, "hold") == "Running", timeout=60, desc="pod Running")
    time.sleep(3)                       # well past the 1 s a non-held pod would run
    assert pod_phase(cluster, namespace, "hold") == "Running"
    cluster.kubectl("delete", "pod", "hold", "-n", namespace, "--timeout=30s")


def test_job_runs_on_local_runner(cluster, namespace):
    cluster.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=token=s3cr3t")
    cluster.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=greeting.txt=hello")
    script = (
        "import os, sys\n"
        "open('/scratch/token.txt', 'w').write(os.environ['TOKEN'])\n"
        "greeting = open(sys.argv[1]).read()\n"
        "print('greeting', greeting, 'index', os.environ['INDEX'], flush=True)\n"
        "msg = f\"{open('/scratch/token.txt').read()}:{greeting}:{os.environ['INDEX']}:{os.environ['POD_NAME']}\"\n"
        "open('/dev/termination-log', 'w').write(msg)\n"
    )
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "echo"},
        "spec": {
            "completions": 1, "completionMode": "Indexed", "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"kubetune.dev/local-runner": "true"},
                "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}}],
                "containers": [{
                    "name": "main", "image": "kubetune/trainer:dev",
                    "command": ["python", "-c", script], "args": ["$(CFG_DIR)/greeting.txt"],
                    "env": [
                        {"name": "CFG_DIR", "value": "/etc/kubetune"},
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "INDEX", "valueFrom": {"fieldRef": {
                            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                    ],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                                     {"name": "cfg", "mountPath": "/etc/kubetune"}],
                }],
            }},
        },
    }
    cluster.apply(job, namespace)

    def complete():
        conds = cluster.kubectl_json("get", "job", "echo", "-n", namespace)["status"].get("conditions") or []
        assert not [c for c in conds if c["type"] == "Failed" and c["status"] == "True"], conds
        return [c for c in conds if c["type"] == "Complete" and c["status"] == "True"]

    cluster.wait_for(complete, timeout=90, desc="Job Complete")
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=echo")["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] == "local-runner"
    assert pod["status"]["podIP"].startswith(cluster.env.get("KUBETUNE_POD_IP_PREFIX", "127.0.1") + ".")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["message"] == f"s3cr3t:hello:0:{pod['metadata']['name']}"
    log = cluster.dir / "pods" / f"{namespace}_{pod['metadata']['name']}" / "container.log"
    assert "greeting hello index 0" in log.read_text()


def test_token_request_for_service_account(cluster, namespace):
    token = cluster.kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    assert token.count(".") == 2
    who = cluster.kubectl("auth", "whoami", "--token", token, "-o", "json")
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:default"


def test_s3_with_credentials_and_anonymous_refused(cluster):
    boto3 = pytest.importorskip("boto3")
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    env = cluster.env
    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    bucket = env["KUBETUNE_S3_BUCKET"]
    s3.put_object(Bucket=bucket, Key="smoke/hello.txt", Body=b"hello s3")
    assert s3.get_object(Bucket=bucket, Key="smoke/hello.txt")["Body"].read() == b"hello s3"
    assert "smoke/hello.txt" in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="smoke/")["Contents"]]

    anon = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as e:
        anon.get_object(Bucket=bucket, Key="smoke/hello.txt")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def prom_query(cluster, query: str) -> list:
    url = f"{cluster.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_ready_and_answers_queries(cluster):
    with urllib.request.urlopen(f"{cluster.prometheus_url}/-/ready", timeout=10) as resp:
        assert resp.status == 200
    # the kubetune-operator job has a static target, so `up` has a series even with no operator running
    result = cluster.wait_for(lambda: prom_query(cluster, 'up{job="kubetune-operator"}'), timeout=30, desc="up series")
    assert result[0]["metric"]["instance"].startswith("127.0.0.1:")


def test_prometheus_scrapes_annotated_pod_on_local_runner(cluster, namespace):
    # a pod serving a static /metrics on its own loopback pod IP, found via kubernetes_sd_configs (role pod)
    script = (
        "import http.server, os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = b'kubetune_smoke_info{source=\"pod\"} 1\\n'\n"
        "        self.send_response(200); self.send_header('Content-Type', 'text/plain'); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "http.server.HTTPServer((os.environ['POD_IP'], 8000), H).serve_forever()\n"
    )
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "exporter", "labels": {"kubetune.dev/job": "smoke"},
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                                     "prometheus.io/path": "/metrics"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                 "nodeSelector": {"kubetune.dev/local-runner": "true"},
                 "containers": [{"name": "main", "image": "python", "command": ["python", "-c", script],
                                 "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]},
    }
    cluster.apply(pod, namespace)
    result = cluster.wait_for(lambda: prom_query(cluster, f'kubetune_smoke_info{{namespace="{namespace}"}}'),
                              timeout=60, interval=1, desc="metric scraped from the pod")
    labels = result[0]["metric"]
    assert labels["pod"] == "exporter" and labels["kubetune_dev_job"] == "smoke"
    cluster.kubectl("delete", "pod", "exporter", "-n", namespace, "--timeout=30s")
