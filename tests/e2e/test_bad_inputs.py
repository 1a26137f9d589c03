"""Every bad input ends in a clear condition on the FineTuneJob, against the real API server and operator:

- children the API server refuses (a cluster policy here, core/v1 validation in the sweep) -> Failed with
  InvalidPodTemplate naming the spec field, one event, nothing created, no traceback;
- pods Kubernetes will not create (ResourceQuota, missing PriorityClass or ServiceAccount) -> PodsBlocked with
  the Job's own event message;
- edits take effect: resources + unsuspend in one update start the new template, retryLimit and
  activeDeadlineSeconds reach the live Job, observedGeneration follows;
- the sweep: >= 60 malformed manifests, each refused at admission or Failed by the operator naming its field;
  zero retry loops, zero silent hangs, zero operator tracebacks, zero pods;
- two data errors through real trainer pods (exit 65 naming the file and row).

    .venv/bin/python -m pytest tests/e2e/test_bad_inputs.py -q
"""

from __future__ import annotations

import copy
import json
import time
import uuid

import pytest
import yaml

from tests.e2e.bad_manifests import CASES, build
from tests.e2e.kubetune_fixtures import OperatorProcess, crd, operator, wait_for  # noqa: F401

GROUP, VERSION, PLURAL = "kubetune.dev", "v1alpha1", "finetunejobs"
FAILURE_REASONS = {"InvalidSpec", "InvalidPodTemplate", "ConfigTooLarge"}
HOLD = {"kubetune.dev/kwok-outcome": "hold"}
APISERVER_NOTE = ("<nil>: Invalid value: null: some validation rules were not checked because the object was invalid; "
                  "correct the existing errors to complete validation")


def ftj(name: str, **spec) -> dict:
    obj = build(name, {})
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def apply(cluster, namespace, obj):
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))


def get(cluster, namespace, kind, name):
    r = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def items(cluster, namespace, kind, *selector):
    return json.loads(cluster.kubectl("get", kind, "-n", namespace, *selector, "-o", "json").stdout)["items"]


def condition(obj, ctype):
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return c
    return None


def events_for(cluster, namespace, name, reason):
    return [e for e in items(cluster, namespace, "events", "--field-selector",
                             f"involvedObject.name={name},involvedObject.kind=FineTuneJob")
            if e["reason"] == reason]


def assert_clean_log(op):
    log = op.logs()
    assert "Traceback" not in log, log[-3000:]
    assert "failed temporarily" not in log and "Will retry" not in log, log[-3000:]


# ------------------------------------------------------------------------------------------------ refused children
@pytest.fixture
def job_policy(cluster, namespace):
    """A site policy as many clusters have one (ValidatingAdmissionPolicy, no webhook): trainer images only from
    the internal registry, and every pod labelled with its team. It refuses the Job with 422 + the field."""
    name = f"kubetune-e2e-{namespace}"[:63]
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                    "operations": ["CREATE"], "resources": ["jobs"]}]},
            "validations": [
                {"expression": "object.spec.template.spec.containers.all(c, c.image.startsWith('registry.internal/'))",
                 "message": "images must come from registry.internal/", "reason": "Invalid"},
                {"expression": "has(object.spec.template.metadata.labels) && "
                               "'team' in object.spec.template.metadata.labels",
                 "message": "pods must carry a team label", "reason": "Invalid"},
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}},
    }
    cluster.apply([policy, binding])
    # the policy reaches the admission plugin asynchronously: wait until it refuses a probe Job
    probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe", "namespace": namespace},
             "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}
    wait_for(lambda: cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe),
                                     check=False).returncode != 0, 30, message="policy active")
    yield
    cluster.kubectl("delete", "validatingadmissionpolicybinding", name, "--ignore-not-found", check=False)
    cluster.kubectl("delete", "validatingadmissionpolicy", name, "--ignore-not-found", check=False)


# A cluster policy names no field (ValidatingAdmissionPolicy has no fieldPath): the condition says `spec` and
# quotes the policy. Refusals that name a field are mapped back to the spec field (tests/unit/operator/
# test_bad_inputs.py, with the API server's own cause paths); the CRD now refuses every static one at apply.
@pytest.mark.parametrize("name, image, resources, field, words", [
    ("wrong-registry", "docker.io/me/trainer:1", {"gpus": 1, "podLabels": {"team": "a"}},
     "spec", "images must come from registry.internal/"),
    ("no-team-label", "registry.internal/trainer:1", {"gpus": 1},
     "spec", "pods must carry a team label"),
])
def test_a_child_the_api_server_refuses_fails_once_naming_the_field(cluster, namespace, operator, job_policy,
                                                                     name, image, resources, field, words):
    # the image is the runtime's: a namespaced runtime with that image, named by the job
    cluster.apply({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneRuntime", "metadata": {"name": name},
                   "spec": {"template": {"image": image}}}, namespace)
    apply(cluster, namespace, ftj(name, resources=resources, runtimeRef={"kind": "FineTuneRuntime", "name": name}))
    cluster.wait_job(namespace, name, "Failed", timeout=30)
    obj = get(cluster, namespace, "ftj", name)
    failed = condition(obj, "Failed")
    assert failed["reason"] == "InvalidPodTemplate"
    assert failed["message"].startswith(field + ":") and words in failed["message"], failed["message"]
    assert obj["status"]["phase"] == "Failed"
    time.sleep(3)  # long enough for a retry loop to show (kopf's backoff and the 2 s progress tick)
    assert len(events_for(cluster, namespace, name, "InvalidPodTemplate")) == 1
    for kind in ("job", "configmap"):
        assert get(cluster, namespace, kind, f"{name}-{'trainer' if kind == 'job' else 'config'}") is None, \
            "a refused Job leaves nothing behind (its ConfigMap goes again)"
    assert items(cluster, namespace, "pods") == []
    assert_clean_log(operator)


# ------------------------------------------------------------------------------------------------ blocked pods
SA_RUNTIME = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneRuntime", "metadata": {"name": "with-sa"},
              "spec": {"template": {"image": "ghcr.io/kubetune/trainer:0.1.0", "serviceAccountName": "trainer-sa"},
                       "storage": {"credentials": {"secretName": "s3-creds"}}}}


@pytest.mark.parametrize("name, setup, spec, words, field", [
    ("quota", [{"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "small"},
                "spec": {"hard": {"requests.cpu": "1"}}}],
     {"resources": {"gpus": 1, "cpu": "4"}}, "exceeded quota", "spec.resources"),
    ("no-priority-class", [], {"resources": {"gpus": 1, "priorityClassName": "does-not-exist"}}, "does-not-exist",
     "spec.resources.priorityClassName"),
    # the runtime names the ServiceAccount: the job can only name the runtime
    ("no-service-account", [SA_RUNTIME], {"resources": {"gpus": 1},
                                          "runtimeRef": {"kind": "FineTuneRuntime", "name": "with-sa"}},
     "trainer-sa", "spec.runtimeRef"),
])
def test_pods_kubernetes_will_not_create_show_as_pods_blocked(cluster, namespace, operator, name, setup,
                                                              spec, words, field):
    for obj in setup:
        cluster.apply(obj, namespace)
    apply(cluster, namespace, ftj(name, **spec))

    def blocked():
        running = condition(get(cluster, namespace, "ftj", name), "Running")
        return running if running and running["reason"] == "PodsBlocked" else None

    running = wait_for(blocked, 30, message="Running=False/PodsBlocked")
    assert running["status"] == "False" and words in running["message"], running["message"]
    assert running["message"].startswith(field), running["message"]
    assert events_for(cluster, namespace, name, "PodsBlocked")
    assert items(cluster, namespace, "pods") == []
    assert_clean_log(operator)


def test_pods_blocked_past_the_configured_time_fail_the_job(cluster, crd, namespace, tmp_path):
    op = OperatorProcess(cluster, [namespace], tmp_path / "operator.log",
                         extra_env={"KUBETUNE_PODS_BLOCKED_TIMEOUT_SECONDS": "3"}).start()
    try:
        apply(cluster, namespace, ftj("gives-up", resources={"gpus": 1, "priorityClassName": "nope"}))
        cluster.wait_job(namespace, "gives-up", "Failed", timeout=45)
        failed = condition(get(cluster, namespace, "ftj", "gives-up"), "Failed")
        assert failed["reason"] == "PodsBlocked" and "priorityClassName" in failed["message"]
        wait_for(lambda: get(cluster, namespace, "job", "gives-up-trainer") is None, 30, message="Job removed")
        assert_clean_log(op)
    finally:
        op.stop()


# ------------------------------------------------------------------------------------------------ edits
def test_resources_and_unsuspend_in_one_update_start_the_new_template(cluster, namespace, operator):
    """What Kueue does on admission: one update writes the admitted resources and suspend: false."""
    res = {"gpus": 1, "memory": "8Gi", "podAnnotations": HOLD}
    apply(cluster, namespace, ftj("kueued", suspend=True, resources=res))
    cluster.wait_job(namespace, "kueued", "Suspended", timeout=30)
    old_uid = get(cluster, namespace, "job", "kueued-trainer")["metadata"]["uid"]
    apply(cluster, namespace, ftj("kueued", suspend=False, resources={**res, "gpus": 2, "memory": "16Gi"}))
    pods = wait_for(lambda: items(cluster, namespace, "pods", "-l", "kubetune.dev/job-name=kueued"), 60,
                    message="pods after admission")
    limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2" and limits["memory"] == "16Gi", "started from the NEW template"
    job = get(cluster, namespace, "job", "kueued-trainer")
    assert job["metadata"]["uid"] != old_uid
    cluster.wait_job(namespace, "kueued", "Running", timeout=60)
    obj = get(cluster, namespace, "ftj", "kueued")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert_clean_log(operator)


def test_retry_limit_and_deadline_reach_the_running_job(cluster, namespace, operator):
    apply(cluster, namespace, ftj("mutable", activeDeadlineSeconds=3600, retryLimit=1,
                                  resources={"gpus": 1, "podAnnotations": HOLD}))
    cluster.wait_job(namespace, "mutable", "Running", timeout=60)
    uid = get(cluster, namespace, "job", "mutable-trainer")["metadata"]["uid"]
    cluster.kubectl("patch", "ftj", "mutable", "-n", namespace, "--type", "merge",
                    "-p", json.dumps({"spec": {"retryLimit": 4, "activeDeadlineSeconds": 1800}}))

    def applied():
        job = get(cluster, namespace, "job", "mutable-trainer")
        obj = get(cluster, namespace, "ftj", "mutable")
        ok = job["spec"].get("backoffLimit") == 4 and job["spec"].get("activeDeadlineSeconds") == 1800 and \
            obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
        return job if ok else None

    job = wait_for(applied, 30, message="backoffLimit 4, activeDeadlineSeconds 1800, observedGeneration")
    assert job["metadata"]["uid"] == uid, "patched in place: the running pods keep running"
    # lowering the deadline below the time already run ends the job, as the Job controller decides
    cluster.kubectl("patch", "ftj", "mutable", "-n", namespace, "--type", "merge",
                    "-p", json.dumps({"spec": {"activeDeadlineSeconds": 1}}))
    cluster.wait_job(namespace, "mutable", "Failed", timeout=60)
    assert condition(get(cluster, namespace, "ftj", "mutable"), "Failed")["reason"] == "DeadlineExceeded"
    assert_clean_log(operator)


# ------------------------------------------------------------------------------------------------ the sweep
def _api(cluster):
    from kubernetes import client, config

    return client.CustomObjectsApi(config.new_client_from_config(config_file=cluster.kubeconfig))


def test_sweep_of_malformed_manifests(cluster, namespace, operator):
    from kubernetes.client.exceptions import ApiException

    assert len(CASES) >= 60
    api = _api(cluster)
    refused, accepted, problems = {}, {}, []
    started = time.monotonic()
    for name, changes, field in CASES:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, build(name, changes),
                                                field_validation="Strict")
            accepted[name] = field
        except ApiException as exc:
            message = json.loads(exc.body).get("message", "") if exc.body else str(exc)
            refused[name] = message
            if exc.status not in (400, 422) or field not in message:
                problems.append(f"{name}: refused with {exc.status} but the message does not name {field}: "
                                f"{message[:300]}")
            # The API server appends "<nil>: Invalid value: null: some validation rules were not checked because the
            # object was invalid" whenever a schema error stops CEL: its own note, next to the error that names the
            # field. What must not appear is a rule of ours reporting <nil> or the type ("object") as the value.
            own = message.replace(APISERVER_NOTE, "")
            if "<nil>" in own or 'Invalid value: "object"' in own:
                problems.append(f"{name}: unhelpful admission message: {message[:300]}")
    admission_s = time.monotonic() - started

    def settled():
        objs = {o["metadata"]["name"]: o for o in api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL)["items"]}
        return objs if all(condition(objs.get(n), "Failed") for n in accepted) else None

    objs = wait_for(settled, 60, message=f"every accepted manifest Failed ({sorted(accepted)})") if accepted else {}
    for name, field in accepted.items():
        failed = condition(objs[name], "Failed")
        if failed["reason"] not in FAILURE_REASONS or field not in failed["message"]:
            problems.append(f"{name}: {failed['reason']}: {failed['message'][:300]} (expected {field})")
    time.sleep(3)  # a retry loop would show within kopf's 5 s backoff
    pods = items(cluster, namespace, "pods")
    jobs = items(cluster, namespace, "jobs")
    events = items(cluster, namespace, "events", "--field-selector", "involvedObject.kind=FineTuneJob")
    per_job: dict[str, int] = {}
    for e in events:
        if e["reason"] in FAILURE_REASONS:
            per_job[e["involvedObject"]["name"]] = per_job.get(e["involvedObject"]["name"], 0) + e.get("count", 1)
    loops = {n: c for n, c in per_job.items() if c > 1}
    log = operator.logs()
    report = (f"sweep: {len(CASES)} manifests, {len(refused)} refused at admission in {admission_s:.1f} s, "
              f"{len(accepted)} failed by the operator; retry loops {len(loops)}, hangs 0, tracebacks "
              f"{log.count('Traceback')}, pods {len(pods)}, jobs {len(jobs)}")
    print(report)
    assert not problems, "\n".join(problems)
    assert not loops, loops
    assert pods == [] and jobs == [], report
    assert_clean_log(operator)


# ------------------------------------------------------------------------------------------------ real pods
def test_data_errors_in_real_trainer_pods_name_file_and_row(cluster, crd, tmp_path):
    """Two data problems through the real trainer (node agent): exit 65 at once (one pod each, although
    retryLimit allows 2 retries), the condition names the file and the row."""
    import boto3

    from kubetune_trainer import tiny

    ns = f"e2e-baddata-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=cluster.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster.env["AWS_SECRET_ACCESS_KEY"])
    try:
        s3.create_bucket(Bucket="kubetune")
    except Exception as exc:  # noqa: BLE001 - exists already
        if "BucketAlready" not in str(exc):
            raise
    run = uuid.uuid4().hex[:6]
    for path in tiny.cached_model().rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "kubetune", f"models/tiny-{run}/{path.relative_to(tiny.cached_model())}")
    ok = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    files = {
        "no-assistant": [ok, ok, {"messages": [{"role": "user", "content": "hello?"}]}],
        "bad-line": [ok, "{broken"],
    }
    for key, rows in files.items():
        body = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        s3.put_object(Bucket="kubetune", Key=f"data/{run}/{key}.jsonl", Body=body.encode())
    cluster.kubectl("create", "secret", "generic", "s3-creds", "-n", ns,
                    f"--from-literal=AWS_ACCESS_KEY_ID={cluster.env['AWS_ACCESS_KEY_ID']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster.env['AWS_SECRET_ACCESS_KEY']}")
    op = OperatorProcess(cluster, [ns], tmp_path / "operator.log").start()
    try:
        for key in files:
            obj = ftj(key, retryLimit=2, model={"source": f"s3://kubetune/models/tiny-{run}"},
                      dataset={"format": "chat", "train": [{"uri": f"s3://kubetune/data/{run}/{key}.jsonl"}]},
                      training={"maxSteps": 2, "batchSize": 2, "maxLength": 32},
                      resources={"gpus": 0, "cpu": "1", "memory": "4Gi",
                                 "nodeSelector": {"kubetune.dev/local-runner": "true"}},
                      output={"uri": "s3://kubetune/runs"})
            apply(cluster, ns, obj)
        expected = {"no-assistant": "row 3 has no assistant turn", "bad-line": "line 2 is not valid JSON"}
        for key, words in expected.items():
            obj = cluster.wait_job(ns, key, "Failed", timeout=300, context=lambda: op.logs()[-3000:])
            failed = condition(obj, "Failed")
            assert failed["reason"] == "TrainerError", failed
            assert f"s3://kubetune/data/{run}/{key}.jsonl" in failed["message"] and words in failed["message"]
            assert len(items(cluster, ns, "pods", "-l", f"kubetune.dev/job-name={key}")) == 1, "exit 65: no retry"
        assert_clean_log(op)
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
