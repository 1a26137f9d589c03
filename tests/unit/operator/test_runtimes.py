"""The operator's half of the runtime contract (kubetune_operator.runtimes): a job is checked against its
runtime before any pod exists, each refusal names the field; the runtime is recorded in status at the first
reconcile and later renders read that record, so editing a runtime never changes a job that exists."""

from __future__ import annotations

import asyncio
import copy

import pytest

from kubetune_api import constants as C
from kubetune_api.finetuneruntime import parse_runtime
from kubetune_operator import runtimes
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconciler import Reconciler
from kubetune_operator.settings import OperatorSettings
from tests.unit.operator.builders import DEFAULT_RUNTIME_SPEC, NS, FakeKube, ftj, model

STRICT = {
    "template": {"image": "registry/trainer:1.0", "serviceAccountName": "trainer",
                 "nodeSelector": {"pool": "a100"}, "priorityClassName": "batch"},
    "resources": {"maxGpusPerNode": 2, "maxNodes": 1, "defaultMemory": "48Gi", "sharedMemory": "8Gi"},
    "gpu": {"type": "A100-40GB", "memoryGiB": 40},
    "storage": {"credentials": {"secretName": "team-s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"},
                "allowedSourcePrefixes": ["s3://models/", "s3://data/"], "allowedOutputPrefixes": ["s3://kubetune/"],
                "allowedClaims": ["shared"]},
    "policy": {"allowedStages": ["sft", "dpo"], "allowedAdapters": ["lora"], "maxActiveDeadlineSeconds": 3600,
               "overrides": ["nodeSelector"]},
}
GRPO = {"grpo": {"rewards": [{"name": "exact_match"}, {"name": "my_rewards:score", "source": "s3://data/r.py"}]}}


def problems(**spec):
    return runtimes.violations(model(ftj(**spec)), parse_runtime(STRICT), "strict")


def test_a_job_within_the_runtime_passes():
    assert problems() == []
    assert problems(resources={"gpus": 2, "nodeSelector": {"extra": "x", "pool": "a100"}}) == []


@pytest.mark.parametrize("spec, field", [
    ({"stage": "cpt"}, "spec.stage"),
    ({"adapter": {"type": "full"}}, "spec.adapter.type"),
    ({"model": {"source": "s3://models/tiny", "trustRemoteCode": True}}, "spec.model.trustRemoteCode"),
    ({"stage": "sft", "training": GRPO}, "spec.training.grpo.rewards[1].name"),
    ({"training": {"grpo": {"rewards": [{"name": "code_execution"}]}}}, "spec.training.grpo.rewards[0].name"),
    ({"activeDeadlineSeconds": 7200}, "spec.activeDeadlineSeconds"),
    ({"resources": {"gpus": 4}}, "spec.resources.gpus"),
    ({"resources": {"gpus": 1, "nodes": 2}}, "spec.resources.nodes"),
    ({"resources": {"gpus": 1, "nodeSelector": {"pool": "h100"}}}, "spec.resources.nodeSelector.pool"),
    ({"resources": {"gpus": 1, "tolerations": [{"key": "dedicated", "operator": "Exists"}]}},
     "spec.resources.tolerations"),
    ({"resources": {"gpus": 1, "affinity": {"nodeAffinity": {}}}}, "spec.resources.affinity"),
    ({"resources": {"gpus": 1, "priorityClassName": "urgent"}}, "spec.resources.priorityClassName"),
    ({"resources": {"gpus": 1, "cacheClaim": "other"}}, "spec.resources.cacheClaim"),
    ({"output": {"uri": "s3://elsewhere/runs"}}, "spec.output.uri"),
    ({"model": {"source": "hf://org/tiny"}}, "spec.model.source"),
    ({"model": {"source": "s3://models/tiny", "adapter": "s3://other-team/runs/sft/adapter"}}, "spec.model.adapter"),
    ({"model": {"source": "s3://models/tiny", "adapter": "pvc://secrets-of-b/adapter"}}, "spec.model.adapter"),
    ({"dataset": {"format": "chat", "train": [{"uri": "pvc://secrets-of-b/x.jsonl"}]}}, "spec.dataset.train[0].uri"),
])
def test_each_escalation_is_refused_naming_its_field(spec, field):
    found = problems(**spec)
    assert len(found) == 1 and found[0].startswith(f"{field}: "), found
    assert "strict" in found[0], "the message names the runtime"


def test_an_allowed_claim_and_a_permissive_runtime():
    assert problems(dataset={"format": "chat", "train": [{"uri": "pvc://shared/chat.jsonl"}]}) == []
    assert runtimes.violations(model(ftj(training=GRPO, stage="grpo", dataset={
        "format": "prompt_only", "train": [{"uri": "s3://data/p.jsonl"}]})), parse_runtime(DEFAULT_RUNTIME_SPEC)) == []


def test_namespace_selector_grants_a_cluster_runtime():
    rt = parse_runtime({**STRICT, "namespaceSelector": {"matchLabels": {"team": "nlp"}}})
    assert runtimes.namespace_problem(C.CLUSTER_RUNTIME_KIND, "x", rt, "ml", {"team": "nlp", "other": "1"}) is None
    problem = runtimes.namespace_problem(C.CLUSTER_RUNTIME_KIND, "x", rt, "ml", {"team": "cv"})
    assert problem.startswith("spec.runtimeRef.name: ") and "team=nlp" in problem
    # a namespaced runtime is usable only where it lives: the selector does not apply
    assert runtimes.namespace_problem(C.RUNTIME_KIND, "x", rt, "ml", {}) is None


def test_defaults_fill_only_what_the_job_leaves_unset():
    rt = parse_runtime(STRICT)
    job = runtimes.apply_defaults(model(ftj()), rt)
    assert job.spec.resources.memory == "48Gi" and job.spec.resources.shared_memory == "8Gi"
    assert job.spec.active_deadline_seconds == 3600
    job = runtimes.apply_defaults(model(ftj(resources={"gpus": 1, "memory": "8Gi"}, activeDeadlineSeconds=60)), rt)
    assert job.spec.resources.memory == "8Gi" and job.spec.active_deadline_seconds == 60


def test_runtime_storage_patience_defaults_and_caps_the_jobs():
    def patience(runtime_s, job_s):
        rt = parse_runtime({**STRICT, "storage": {**STRICT["storage"], "patienceSeconds": runtime_s}})
        out = {"uri": "s3://kubetune/out", **({"storagePatienceSeconds": job_s} if job_s is not None else {})}
        return runtimes.apply_defaults(model(ftj(output=out)), rt).spec.output.storage_patience_seconds

    assert patience(120, None) == 120   # the runtime's default
    assert patience(120, 30) == 30      # a job may wait less
    assert patience(120, 900) == 120    # never longer than the runtime allows
    assert patience(None, 900) == 900 and patience(None, None) is None  # no runtime value: the job's (or 600)


# ------------------------------------------------------------------------------------------------ reconciler
class _Recorder:
    async def event(self, *a, **k):
        return None


class _Lookup:
    def jobs(self, namespace, name):
        return []

    def pods(self, namespace, name):
        return []


def _reconciler(kube):
    return Reconciler(kube, OperatorSettings(), OperatorMetrics(), _Recorder(), _Lookup(),
                      now=lambda: "2026-01-01T00:00:00Z")


def _run(coro):
    return asyncio.run(coro)


def _created(kube):
    return sorted(o["kind"] for o in kube.objects.values() if o["kind"] in ("Job", "ConfigMap", "Service"))


def test_a_violation_fails_the_job_before_anything_is_created():
    kube = FakeKube()
    kube.put_runtime(C.RUNTIME_KIND, "strict", STRICT)
    kube.put(ftj(runtimeRef={"kind": "FineTuneRuntime", "name": "strict"}, resources={"gpus": 8}))
    result = _run(_reconciler(kube).reconcile(NS, "demo", ensure_all=True))
    assert result.state == "invalid" and result.message.startswith("spec.resources.gpus: ")
    assert _created(kube) == [] and not [c for c in kube.calls if c[0] == "POST" and "/events" not in c[1]]
    (obj,) = kube.find(C.KIND)
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == C.Reason.RUNTIME_VIOLATION
    # a second reconcile does not retry anything: the job is terminal
    assert _run(_reconciler(kube).reconcile(NS, "demo", ensure_all=True)).state == "terminal"


def test_a_missing_runtime_or_one_from_another_namespace_fails_the_job():
    kube = FakeKube()
    kube.put_runtime(C.RUNTIME_KIND, "theirs", STRICT, namespace="other-team")
    kube.put(ftj(runtimeRef={"kind": "FineTuneRuntime", "name": "theirs"}))
    result = _run(_reconciler(kube).reconcile(NS, "demo", ensure_all=True))
    assert result.state == "invalid" and result.message.startswith("spec.runtimeRef: FineTuneRuntime 'theirs' "
                                                                   "does not exist in namespace 'ml'")
    assert _created(kube) == []
    (obj,) = kube.find(C.KIND)
    assert obj["status"]["conditions"][0]["reason"] == C.Reason.RUNTIME_NOT_FOUND


def test_a_cluster_runtime_not_granted_to_the_namespace_fails_the_job():
    kube = FakeKube()
    kube.put_namespace(NS, {"team": "cv"})
    kube.put_runtime(C.CLUSTER_RUNTIME_KIND, "nlp-only", {**STRICT, "namespaceSelector": {"matchLabels": {"team": "nlp"}}})
    kube.put(ftj(runtimeRef={"kind": "ClusterFineTuneRuntime", "name": "nlp-only"}))
    result = _run(_reconciler(kube).reconcile(NS, "demo", ensure_all=True))
    assert result.state == "invalid" and result.message.startswith("spec.runtimeRef.name: ")
    assert _created(kube) == []


def test_the_runtime_is_recorded_and_later_edits_do_not_change_the_job():
    kube = FakeKube()
    kube.put_runtime(C.RUNTIME_KIND, "strict", STRICT, generation=3)
    kube.put(ftj(runtimeRef={"kind": "FineTuneRuntime", "name": "strict"}))
    rec = _reconciler(kube)
    assert _run(rec.reconcile(NS, "demo", ensure_all=True)).state == "ok"
    (obj,) = kube.find(C.KIND)
    snap = obj["status"]["runtime"]
    assert (snap["kind"], snap["name"], snap["generation"]) == ("FineTuneRuntime", "strict", 3)
    assert snap["spec"]["template"]["image"] == "registry/trainer:1.0" and len(snap["digest"]) == 16
    (job,) = kube.find("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry/trainer:1.0" and pod["serviceAccountName"] == "trainer"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "key"}
    assert env["KUBETUNE_ALLOW_CUSTOM_CODE"]["value"] == "false"
    assert env["KUBETUNE_GPU_MEMORY"]["value"] == "40960Mi"

    # the admin swaps the image: the Job is deleted (say, by the user) and re-created from the record
    edited = copy.deepcopy(STRICT)
    edited["template"]["image"] = "registry/trainer:2.0"
    kube.put_runtime(C.RUNTIME_KIND, "strict", edited, generation=4)
    kube.objects.pop(next(p for p, o in kube.objects.items() if o["kind"] == "Job"))
    _run(_reconciler(kube).reconcile(NS, "demo", ensure_all=True))
    (job,) = kube.find("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry/trainer:1.0"
    (obj,) = kube.find(C.KIND)
    assert obj["status"]["runtime"]["generation"] == 3


def test_a_job_started_before_runtimes_existed_keeps_running():
    """After `helm upgrade` from a chart without runtimes, a running Job has no record and its runtime may not
    exist yet: the operator leaves the Job alone instead of failing it."""
    from tests.unit.operator.builders import job_obj

    kube = FakeKube()
    kube.objects.clear()  # no runtime at all
    kube.put(ftj(status={"phase": "Running", "conditions": []}))
    kube.put(job_obj())

    class Lookup(_Lookup):
        def jobs(self, namespace, name):
            return kube.find("Job")

    rec = Reconciler(kube, OperatorSettings(), OperatorMetrics(), _Recorder(), Lookup(),
                     now=lambda: "2026-01-01T00:00:00Z")
    result = _run(rec.reconcile(NS, "demo", ensure_all=True))
    assert result.state == "ok", result
    (obj,) = kube.find(C.KIND)
    assert obj["status"].get("phase") != "Failed" and "runtime" not in obj["status"]
    assert len(kube.find("Job")) == 1


def test_admission_policy_checks_the_start_adapter_where_the_operator_does():
    """The ValidatingAdmissionPolicy refuses at apply what violations() refuses before pods: model.adapter is
    an input URI like model.source (allowedSourcePrefixes, or allowedClaims for pvc://); the real apiserver runs
    the policy in tests/e2e/test_runtime_escalation.py."""
    from kubetune_api.finetuneruntime.admission import rules

    for kind in (C.CLUSTER_RUNTIME_KIND, C.RUNTIME_KIND):
        (rule,) = [r for r in rules(kind) if "spec.model.adapter" in r["messageExpression"]]
        expr = rule["expression"]
        assert "!has(object.spec.model.adapter)" in expr
        assert "params.spec.storage.allowedSourcePrefixes.exists(p, object.spec.model.adapter.startsWith(p))" in expr
        assert "object.spec.model.adapter.startsWith('pvc://' + c + '/')" in expr


def test_a_burst_of_new_jobs_reads_their_runtime_once_and_a_miss_is_not_remembered():
    """kube.RecentGets: within its ttl the runtime is read once for many jobs; after it, again; a runtime that did
    not exist is looked up again at once (created a moment later, it is found)."""
    from kubetune_operator.kube import RecentGets

    async def scenario():
        kube = FakeKube()
        now = [100.0]
        recent = RecentGets(kube, ttl=5.0, clock=lambda: now[0])
        path = "/apis/kubetune.dev/v1alpha1/clusterfinetuneruntimes/burst"
        assert await recent.get(path) is None and await recent.get(path) is None
        assert sum(1 for m, p in kube.calls if p == path) == 2, "misses are asked again"
        kube.put_runtime("ClusterFineTuneRuntime", "burst", DEFAULT_RUNTIME_SPEC)
        for _ in range(50):
            assert (await recent.get(path))["metadata"]["name"] == "burst"
        assert sum(1 for m, p in kube.calls if p == path) == 3, "50 reads within the ttl: one GET"
        now[0] += 5.1
        await recent.get(path)
        assert sum(1 for m, p in kube.calls if p == path) == 4, "after the ttl: read again"

    asyncio.run(scenario())
