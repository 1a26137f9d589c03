"""The children the operator renders for a FineTuneJob: the trainer Job (command, env, resources, scheduling,
restricted security), the config it mounts, multi-node wiring, and determinism."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune_api import constants as C
from kubetune_api.finetunejob import parse_job
from kubetune_api.finetuneruntime import parse_runtime
from kubetune_operator import render as R
from kubetune_operator.settings import OperatorSettings
from tests.unit.operator.builders import NS, SECRET_VALUE, UID, ftj, model

REPO = Path(__file__).resolve().parents[3]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def render_job(body, settings=None, runtime=None):
    return R.render_job(model(body), body, settings, parse_runtime(runtime) if runtime is not None else None)


def runtime(**parts):
    """A runtime spec (dict) with the test image; `parts` replace its top-level blocks."""
    return {"template": {"image": "registry/trainer:1.0"}, **parts}


def job_spec(obj):
    """The batch/v1 JobSpec of a Job, or of a JobSet's one replicatedJob."""
    return obj["spec"]["replicatedJobs"][0]["template"]["spec"] if obj["kind"] == "JobSet" else obj["spec"]


def pod_spec(job):
    return job_spec(job)["template"]["spec"]


def container(job):
    (c,) = pod_spec(job)["containers"]
    return c


def env_of(job) -> dict:
    return {e["name"]: e for e in container(job)["env"]}


# ------------------------------------------------------------------------------------------------ Pod Security
ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """The checks of the `restricted` Pod Security Standard (baseline + restricted) that apply to a pod spec."""
    out = []
    spec = pod
    psc = spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            out.append(f"{host} set")
    for vol in spec.get("volumes") or []:
        types = set(vol) - {"name"}
        if not types <= ALLOWED_VOLUME_TYPES:
            out.append(f"volume {vol['name']} has type {types}")
    if psc.get("sysctls"):
        out.append("sysctls")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        pod_seccomp_ok = False
    else:
        pod_seccomp_ok = True
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            out.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser") == 0 or (psc.get("runAsUser") == 0 and "runAsUser" not in sc):
            out.append(f"{name}: runs as UID 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if not (seccomp in ("RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp_ok)):
            out.append(f"{name}: seccompProfile")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{name}: hostPort")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount")
    return out


def test_restricted_checker_catches_violations():
    bad = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True}}]}
    found = " ".join(restricted_violations(bad))
    for word in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "drop ALL", "runAsNonRoot",
                 "seccompProfile"):
        assert word in found, word


@pytest.mark.parametrize("spec", [{}, {"resources": {"gpus": 8, "nodes": 3, "sharedMemory": "16Gi"}},
                                  {"output": {"uri": "pvc://results/runs"}}])
def test_trainer_pod_passes_restricted_pod_security(spec):
    job = render_job(ftj(**spec))
    assert restricted_violations(pod_spec(job)) == []
    assert pod_spec(job)["automountServiceAccountToken"] is False
    assert container(job)["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec(job)["securityContext"]["runAsUser"] == 1000


# ------------------------------------------------------------------------------------------------ single node
def test_single_node_job():
    body = ftj()
    job = render_job(body)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == "demo-trainer" and job["metadata"]["namespace"] == NS
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 1
    assert spec["backoffLimit"] == 3  # the API default retryLimit
    assert spec["suspend"] is False
    assert "activeDeadlineSeconds" not in spec
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert pod_spec(job)["terminationGracePeriodSeconds"] == 300
    assert "subdomain" not in pod_spec(job)
    c = container(job)
    assert c["name"] == "trainer"
    assert c["command"] == ["python", "-m", "kubetune_trainer", "--config", "/etc/kubetune/job.yaml"]
    assert "args" not in c
    assert c["image"] == "ghcr.io/kubetune/trainer:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "metrics", "containerPort": C.DEFAULT_METRICS_PORT, "protocol": "TCP"} in c["ports"]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(C.DEFAULT_METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert set(vars(R.render_children(model(body), body))) == {"config_map", "job"}  # no Service


def test_env_contract():
    job = render_job(ftj(output={"uri": "s3://kubetune/runs"}), runtime=runtime(storage={
        "endpoint": "http://seaweed:9000", "region": "eu-1", "credentials": {"secretName": "s3-creds"}}))
    env = env_of(job)
    values = {k: v.get("value") for k, v in env.items()}
    assert values["KUBETUNE_JOB_NAME"] == "demo" and values["KUBETUNE_NAMESPACE"] == NS
    # the run id is the FineTuneJob's uid: a re-created job (new uid) never resumes the old run's checkpoints
    body = ftj()
    assert values["KUBETUNE_RUN_ID"] == body["metadata"]["uid"]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    names = [e["name"] for e in container(job)["env"]]
    assert names.index("POD_IP") < names.index("KUBETUNE_METRICS_HOST"), "$(POD_IP) expands only if defined before"
    assert values["KUBETUNE_METRICS_HOST"] == "$(POD_IP)"
    assert values["KUBETUNE_METRICS_PORT"] == "9400"
    assert values["KUBETUNE_TERMINATION_LOG"] == "/dev/termination-log"
    assert values["KUBETUNE_WORK_DIR"] == "/var/lib/kubetune"
    assert values["HOME"] == "/tmp"
    assert values["HF_HUB_OFFLINE"] == "1"
    assert values["AWS_ENDPOINT_URL"] == "http://seaweed:9000"
    assert values["AWS_REGION"] == "eu-1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": key}
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True
    assert "/var/lib/kubetune" in mounts and "/tmp" in mounts


def test_runtime_secret_keys_and_no_secret_values_anywhere():
    body = ftj(output={"uri": "s3://kubetune/runs"})
    rt = parse_runtime(runtime(storage={"credentials": {
        "secretName": "store", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}}))
    children = R.render_children(model(body), body, None, rt)
    env = env_of(children.job)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "store", "key": "id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "store", "key": "key"}
    everything = json.dumps([children.job, children.config_map])
    assert SECRET_VALUE not in everything and "AKIA-ACCESS-KEY-ID" not in everything


def test_default_s3_settings_and_optional_default_secret():
    s = OperatorSettings(s3_endpoint="http://s3.local:9000", s3_region="us-east-1", default_credentials_secret="dflt")
    body = ftj(output={"uri": "s3://kubetune/runs"})
    env = env_of(render_job(body, s))
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.local:9000"
    assert env["AWS_REGION"]["value"] == "us-east-1"
    ref = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "dflt", "key": "AWS_SECRET_ACCESS_KEY", "optional": True}
    # the runtime's endpoint wins over the operator's
    env = env_of(render_job(ftj(output={"uri": "s3://x/y"}), s, runtime(storage={"endpoint": "https://mine"})))
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://mine"


def test_no_aws_env_without_s3():
    env = env_of(render_job(ftj(model={"source": "pvc://models/tiny"},
                                dataset={"format": "chat", "train": [{"uri": "file:///data/chat.jsonl"}]},
                                output={"uri": "pvc://results/runs"})))
    assert not [k for k in env if k.startswith("AWS_")]


def test_hf_sources_allow_hub_access():
    env = env_of(render_job(ftj(model={"source": "hf://org/tiny"})))
    assert "HF_HUB_OFFLINE" not in env
    assert env_of(render_job(ftj()))["HF_HUB_OFFLINE"]["value"] == "1"


def test_gpu_resources_and_automatic_toleration():
    job = render_job(ftj(resources={"gpus": 2, "cpu": "8", "memory": "64Gi"}))
    res = container(job)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "2"
    assert res["requests"]["cpu"] == "8"
    assert res["requests"]["memory"] == res["limits"]["memory"] == "64Gi"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(job)["tolerations"]


def test_gpu_resource_name_user_tolerations_and_scheduling():
    rt = runtime(template={"image": "registry/trainer:dev", "serviceAccountName": "trainer",
                           "runtimeClassName": "nvidia", "nodeSelector": {"zone": "a"},
                           "tolerations": [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                                            "tolerationSeconds": 60}],
                           "podLabels": {"cost-center": "ml", "team": "platform"}},
                 resources={"gpuResourceName": "amd.com/gpu"})
    job = render_job(ftj(resources={
        "gpus": 1, "nodeSelector": {"pool": "mi300", "zone": "b"},
        "tolerations": [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                         "tolerationSeconds": 60}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "priorityClassName": "training",
        "podLabels": {"team": "nlp", C.Label.JOB_NAME: "spoofed"}, "podAnnotations": {"prometheus.io/scrape": "false"},
    }), runtime=rt)
    ps = pod_spec(job)
    assert container(job)["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert [t["key"] for t in ps["tolerations"]].count("amd.com/gpu") == 1, "no duplicate automatic toleration"
    assert {"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 60} \
        in ps["tolerations"]
    assert ps["nodeSelector"] == {"pool": "mi300", "zone": "a"}, "the runtime's keys win"
    assert ps["runtimeClassName"] == "nvidia"
    assert ps["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert ps["priorityClassName"] == "training" and ps["serviceAccountName"] == "trainer"
    assert container(job)["image"] == "registry/trainer:dev"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[C.Label.JOB_NAME] == "demo", "the operator's labels win"
    assert labels["team"] == "platform" and labels["cost-center"] == "ml", "then the runtime's"
    assert job["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "false"


def test_cpu_only_job_has_no_gpu_resources_or_toleration():
    job = render_job(ftj(resources={"gpus": 0}))
    assert container(job)["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}}
    assert "tolerations" not in pod_spec(job)


def test_settings_resources_and_grace():
    s = OperatorSettings(trainer_resources={"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "32Gi"}},
                         trainer_termination_grace_seconds=30, trainer_image="img:1", image_pull_policy="Always")
    job = render_job(ftj(resources={"gpus": 0, "cpu": "2"}), s)
    assert container(job)["resources"] == {"requests": {"cpu": "2", "memory": "32Gi"}, "limits": {"memory": "32Gi"}}
    assert pod_spec(job)["terminationGracePeriodSeconds"] == 30
    # the launcher sizes torchrun's shutdown timeout from it (the pod cannot read its own grace period)
    assert env_of(job)["KUBETUNE_TERMINATION_GRACE_SECONDS"]["value"] == "30"
    assert container(job)["image"] == "img:1" and container(job)["imagePullPolicy"] == "Always"
    job = render_job(ftj(resources={"gpus": 0}), s, runtime(template={"image": "rt:2", "imagePullPolicy": "Never"}))
    assert container(job)["image"] == "rt:2" and container(job)["imagePullPolicy"] == "Never"


def test_runtime_policy_and_gpu_memory_reach_the_trainer_env():
    env = env_of(render_job(ftj(), runtime=runtime(gpu={"memoryGiB": 80})))
    assert env["KUBETUNE_ALLOW_CUSTOM_CODE"]["value"] == "false"  # the schema's default: refused
    assert env["KUBETUNE_GPU_MEMORY"]["value"] == "81920Mi"
    env = env_of(render_job(ftj(), runtime=runtime(policy={"allowCustomCode": True})))
    assert env["KUBETUNE_ALLOW_CUSTOM_CODE"]["value"] == "true" and "KUBETUNE_GPU_MEMORY" not in env


def test_pod_failure_policy():
    job = render_job(ftj(retryLimit=5, activeDeadlineSeconds=3600))
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert len(fail) == 1
    assert fail[0]["onExitCodes"]["operator"] == "In"
    values = fail[0]["onExitCodes"]["values"]
    assert set(values) == set(C.ExitCode.PERMANENT) and values == sorted(values), "batch/v1 wants them ordered"
    assert fail[0]["onExitCodes"]["containerName"] == container(job)["name"]
    assert C.ExitCode.RETRIABLE not in fail[0]["onExitCodes"]["values"]
    assert C.ExitCode.PREEMPTED not in fail[0]["onExitCodes"]["values"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert ignore == [
        {"action": "Ignore", "onExitCodes": {"containerName": container(job)["name"], "operator": "In",
                                             "values": [C.ExitCode.PREEMPTED]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert rules.index(fail[0]) < rules.index(ignore[0]), "a permanent error fails the Job even when disrupted"
    assert job["spec"]["backoffLimit"] == 5 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["podReplacementPolicy"] == "Failed"


def test_a_replacement_job_gets_what_is_left_of_retry_limit():
    body = ftj(retryLimit=3)
    first = R.render_job(model(body), body)
    assert first["spec"]["backoffLimit"] == 3 and R.RETRIES_USED_ANNOTATION not in first["metadata"]["annotations"]
    later = R.render_job(model(body), body, retries_used=2)
    assert later["spec"]["backoffLimit"] == 1 and R.retries_used_by(later) == 2
    assert R.render_job(model(body), body, retries_used=7)["spec"]["backoffLimit"] == 0
    assert R.template_hash(first["spec"]) == R.template_hash(later["spec"]), "the same pods"
    assert first["spec"]["template"]["metadata"]["labels"][R.RUN_ID_LABEL] == body["metadata"]["uid"]


def test_suspend():
    assert render_job(ftj(suspend=True))["spec"]["suspend"] is True


def test_labels_and_owner_references_on_every_child():
    body = ftj(resources={"gpus": 1, "nodes": 2})
    children = list(R.iter_children(R.render_children(model(body), body)))
    assert [c["kind"] for c in children] == ["ConfigMap", "JobSet"]
    for child in children:
        labels = child["metadata"]["labels"]
        assert labels[C.Label.JOB_NAME] == "demo"
        assert labels[C.Label.STAGE] == "sft" and labels[C.Label.ADAPTER] == "lora"
        assert labels[C.Label.MANAGED_BY] == C.Label.MANAGED_BY_VALUE
        assert labels[C.Label.PART_OF] == "kubetune" and labels[C.Label.COMPONENT]
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": C.API_VERSION, "kind": C.KIND, "name": "demo", "uid": UID,
                       "controller": True, "blockOwnerDeletion": True}
        assert child["metadata"]["namespace"] == NS


def test_rendering_is_deterministic():
    body = ftj(resources={"gpus": 8, "nodes": 2})
    a = R.render_children(model(body), body)
    b = R.render_children(model(json.loads(json.dumps(body))), json.loads(json.dumps(body)))
    assert a == b
    names = R.child_names("demo")
    assert (a.job["metadata"]["name"], a.config_map["metadata"]["name"]) == ("demo", names.config_map) == \
        ("demo", "demo-config")
    single = R.render_children(model(ftj()), ftj())
    assert single.job["metadata"]["name"] == names.job == "demo-trainer"


def test_template_hash_ignores_suspend_but_not_resources():
    h = lambda body: render_job(body)["metadata"]["annotations"][R.TEMPLATE_HASH_ANNOTATION]  # noqa: E731
    assert h(ftj()) == h(ftj(suspend=True))
    assert h(ftj()) != h(ftj(resources={"gpus": 2}))


# ------------------------------------------------------------------------------------------------ multi node
def test_multi_node_renders_a_jobset_gang():
    body = ftj(resources={"gpus": 8, "nodes": 4}, retryLimit=2, activeDeadlineSeconds=7200)
    js = R.render_children(model(body), body).job
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
    assert js["metadata"]["name"] == "demo" and js["metadata"]["namespace"] == NS
    spec = js["spec"]
    assert spec["suspend"] is False
    assert spec["network"] == {"enableDNSHostnames": True, "subdomain": "demo-workers", "publishNotReadyAddresses": True}
    (rjob,) = spec["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    assert rjob["template"]["metadata"]["labels"][C.Label.JOB_NAME] == "demo"
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 4
    assert job["backoffLimit"] == 0  # one failed pod fails the child Job: the JobSet restarts the whole gang
    assert job["activeDeadlineSeconds"] == 7200
    assert "subdomain" not in pod_spec(js) and "hostname" not in pod_spec(js)  # JobSet sets them
    # failure handling: permanent exit codes fail the JobSet, disruptions and SIGTERM restart it for free,
    # anything else restarts it against maxRestarts = retryLimit
    fp = spec["failurePolicy"]
    assert fp["maxRestarts"] == 2 and fp["restartStrategy"] == "BlockingRecreate"
    rules = job["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob"] * 3
    assert rules[0]["onExitCodes"]["values"] == sorted(C.ExitCode.PERMANENT)
    assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[2]["onExitCodes"]["values"] == [C.ExitCode.PREEMPTED]
    permanent, disruption = fp["rules"]
    assert permanent["action"] == "FailJobSet" and disruption["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    for rule in fp["rules"]:
        assert rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    # the Job controller's failure message names the rule index: the patterns must tell 0 from 1 and 2
    msg = "Container trainer for pod {ns}/p failed with exit code {code} matching FailJob rule at index {i}"
    match = lambda rule, text: any(re.search(p, text) for p in rule["onJobFailureMessagePatterns"])  # noqa: E731
    assert match(permanent, msg.format(ns=NS, code=78, i=0)) and not match(disruption, msg.format(ns=NS, code=78, i=0))
    assert match(disruption, msg.format(ns=NS, code=143, i=2)) and not match(permanent, msg.format(ns=NS, code=143, i=2))
    assert match(disruption, f"Pod {NS}/p has condition DisruptionTarget matching FailJob rule at index 1")
    assert not match(permanent, msg.format(ns=NS, code=78, i=10))


def test_multi_node_rendezvous_is_consistent():
    body = ftj(resources={"gpus": 8, "nodes": 4})
    js = R.render_children(model(body), body).job
    job = job_spec(js)
    cmd = container(js)["command"]
    assert cmd[:3] == R.LAUNCHER
    args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    assert int(args["--nnodes"]) == job["completions"]
    assert args["--nproc-per-node"] == "8"
    # static rendezvous: node rank = completion index, so rank 0 is always pod index 0
    assert args["--node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert not any(a.startswith("--rdzv") for a in cmd)
    # JobSet names pod 0's host <jobset>-<replicatedJob>-<job index>-<pod index> in subdomain <network.subdomain>
    subdomain = js["spec"]["network"]["subdomain"]
    host = f"{js['metadata']['name']}-{js['spec']['replicatedJobs'][0]['name']}-0-0.{subdomain}.{NS}.svc"
    assert args["--master-addr"] == host
    port = int(args["--master-port"])
    assert R.C.DEFAULT_RENDEZVOUS_PORT <= port < R.C.DEFAULT_RENDEZVOUS_PORT + R.RENDEZVOUS_PORT_SPREAD
    assert cmd[-4:] == ["-m", "kubetune_trainer", "--config", "/etc/kubetune/job.yaml"]
    env = env_of(js)
    assert env["MASTER_ADDR"]["value"] == host and env["MASTER_PORT"]["value"] == str(port)
    assert {"name": "rendezvous", "containerPort": port, "protocol": "TCP"} in container(js)["ports"]


def test_rendezvous_port_is_stable_per_job_and_differs_between_jobs():
    ports = {R.rendezvous_port(model(ftj(resources={"nodes": 2}, uid=f"uid-{i}"))) for i in range(20)}
    assert len(ports) > 15  # gangs sharing a host network rarely meet
    body = ftj(resources={"nodes": 2})
    assert R.rendezvous_port(model(body)) == R.rendezvous_port(model(json.loads(json.dumps(body))))


def test_same_manifest_with_one_node_is_a_plain_job():
    multi, single = ftj(resources={"gpus": 8, "nodes": 2}), ftj(resources={"gpus": 8, "nodes": 1})
    assert R.render_job(model(multi), multi)["kind"] == "JobSet"
    job = R.render_job(model(single), single)
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("batch/v1", "Job", "demo-trainer")
    assert "--standalone" in container(job)["command"] and "MASTER_ADDR" not in env_of(job)


def test_jobset_suspend_and_template_hash():
    body = ftj(resources={"nodes": 2}, suspend=True)
    js = R.render_job(model(body), body)
    assert js["spec"]["suspend"] is True
    h = lambda b: R.render_job(model(b), b)["metadata"]["annotations"][R.TEMPLATE_HASH_ANNOTATION]  # noqa: E731
    assert h(body) == h(ftj(resources={"nodes": 2}))
    # a JobSet's failurePolicy is immutable: a retryLimit change needs a new JobSet, unlike a Job's backoffLimit
    assert h(ftj(resources={"nodes": 2}, retryLimit=7)) != h(body)
    assert h(ftj(retryLimit=7)) == h(ftj())
    assert R.mutable_fields(js) == () and R.mutable_fields(R.render_job(model(ftj()), ftj())) == R.MUTABLE_JOB_FIELDS


def test_jobset_paths_map_back_to_spec_fields():
    body = ftj(resources={"gpus": 1, "nodes": 2, "nodeSelector": {"pool": "a"}})
    job = model(body)
    js = R.render_job(job, body)
    base = "spec.replicatedJobs[0].template.spec.template.spec"
    single = R.render_job(model(ftj(resources={"gpus": 1, "nodeSelector": {"pool": "a"}})))
    for path in ("nodeSelector[pool]", "containers[0].image", "containers[0].resources.limits[nvidia.com/gpu]"):
        assert R.spec_field_of(job, js, f"{base}.{path}") == R.spec_field_of(job, single, f"spec.template.spec.{path}")
    assert R.spec_field_of(job, js, "spec.replicatedJobs[0].template.spec.activeDeadlineSeconds") == \
        "spec.activeDeadlineSeconds"
    assert R.spec_field_of(job, js, "spec.failurePolicy.maxRestarts") == "spec.retryLimit"


def test_processes_per_node_from_distributed_spec():
    job = render_job(ftj(resources={"gpus": 0, "nodes": 2}, distributed={"backend": "gloo", "processesPerNode": 3}))
    assert "--nproc-per-node=3" in container(job)["command"]


def test_single_node_multi_gpu_uses_standalone_torchrun():
    body = ftj(resources={"gpus": 4})
    job = render_job(body)
    cmd = container(job)["command"]
    assert cmd[:6] == [*R.LAUNCHER, "--nnodes=1", "--nproc-per-node=4", "--standalone"]
    assert not any(a.startswith(("--rdzv", "--master")) for a in cmd)


# ------------------------------------------------------------------------------------------------ volumes
def test_pvc_volumes():
    job = render_job(ftj(model={"source": "pvc://models/llama"},
                         dataset={"format": "chat", "train": [{"uri": "pvc://data.claim/chat.jsonl"}],
                                  "eval": [{"uri": "pvc://results/eval.jsonl"}]},
                         output={"uri": "pvc://results/runs"}))
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in volumes.values() if "persistentVolumeClaim" in v}
    assert set(claims) == {"models", "data.claim", "results"}
    assert claims["models"]["persistentVolumeClaim"]["readOnly"] is True
    assert claims["data.claim"]["persistentVolumeClaim"]["readOnly"] is True
    assert claims["results"]["persistentVolumeClaim"]["readOnly"] is False, "the output claim is written"
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    for claim, vol in claims.items():
        assert DNS_LABEL.match(vol["name"]) and len(vol["name"]) <= 63
        assert mounts[vol["name"]]["mountPath"] == f"/mnt/pvc/{claim}"
        assert mounts[vol["name"]]["readOnly"] == vol["persistentVolumeClaim"]["readOnly"]
    assert env_of(job)["KUBETUNE_PVC_ROOT"]["value"] == "/mnt/pvc"


def test_shared_memory_volume():
    job = render_job(ftj(resources={"gpus": 1, "sharedMemory": "8Gi"}))
    (dshm,) = [v for v in pod_spec(job)["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]
    assert "dshm" not in {v["name"] for v in pod_spec(render_job(ftj()))["volumes"]}


# ------------------------------------------------------------------------------------------------ config
def test_config_map_holds_the_resolved_job():
    body = ftj(training={"maxSteps": 10})
    cm = R.render_config_map(model(body), body)
    assert cm["metadata"]["name"] == "demo-config"
    text = cm["data"][C.CONFIG_FILE_NAME]
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == C.API_VERSION and doc["kind"] == C.KIND
    assert doc["metadata"] == {"name": "demo", "namespace": NS, "uid": UID, "generation": 1}
    assert "status" not in doc
    # defaults applied, so the trainer and the operator agree on them
    assert doc["spec"]["training"]["maxSteps"] == 10
    assert doc["spec"]["training"]["learningRate"] == 2e-4
    assert doc["spec"]["adapter"]["type"] == "lora"
    assert parse_job(doc).spec == model(body).spec
    mount = [v for v in pod_spec(render_job(body))["volumes"] if v["name"] == "config"][0]
    assert mount["configMap"]["name"] == cm["metadata"]["name"]


# ------------------------------------------------------------------------------------------------ examples
@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_renders(path):
    body = yaml.safe_load(path.read_text())
    body["metadata"].update(namespace="default", uid=UID, generation=1)
    children = R.render_children(parse_job(body), body)
    for child in R.iter_children(children):
        assert len(child["metadata"]["name"]) <= 63
    assert restricted_violations(pod_spec(children.job)) == []
    # the hostname of the highest-index pod must be a DNS label
    spec = job_spec(children.job)
    prefix = f"{children.job['metadata']['name']}-node-0" if children.job["kind"] == "JobSet" \
        else children.job["metadata"]["name"]
    host = f"{prefix}-{spec['completions'] - 1}"
    assert DNS_LABEL.match(host) and len(host) <= 63


def test_longest_name_keeps_jobset_hostnames_within_a_dns_label():
    name = "n" * 50  # the CRD's limit on FineTuneJob names
    body = ftj(name=name, resources={"nodes": 1024})  # the CRD's limit on nodes
    js = R.render_job(model(body), body)
    assert len(f"{js['metadata']['name']}-node-0-1023") <= 63
    assert len(js["spec"]["network"]["subdomain"]) <= 63


def test_cache_claim_mounts_a_download_cache_that_outlives_the_pod():
    plain = render_job(ftj())
    assert "KUBETUNE_CACHE_DIR" not in env_of(plain)
    job = render_job(ftj(resources={"gpus": 1, "cacheClaim": "model-cache"}))
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["download-cache"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    mounts = {m["name"]: m["mountPath"] for m in container(job)["volumeMounts"]}
    assert mounts["download-cache"] == R.CACHE_DIR
    assert env_of(job)["KUBETUNE_CACHE_DIR"]["value"] == R.CACHE_DIR


@pytest.mark.parametrize("nodes", [1, 2])
def test_pod_failure_policy_exit_codes_are_ordered(nodes):
    """batch/v1 refuses onExitCodes.values that are not in ascending order ("must be ordered")."""
    body = ftj(resources={"gpus": 1, "nodes": nodes})
    for rule in job_spec(R.render_job(model(body), body))["podFailurePolicy"]["rules"]:
        values = (rule.get("onExitCodes") or {}).get("values")
        if values:
            assert values == sorted(set(values)), rule
