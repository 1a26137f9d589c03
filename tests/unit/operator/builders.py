"""Builders for FineTuneJobs, Jobs and pods as the API server returns them, and an in-memory API server
(FakeKube) with the semantics the reconciler relies on: 409 on create of an existing name, 404 on missing
objects, JSON merge patch, a /status subresource, events as a list."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from typing import Any, Optional

from kubetune_api import constants as C
from kubetune_api.finetunejob import parse_job
from kubetune_operator.kube import ApiError, object_path
from kubetune_operator.render import COMPLETION_INDEX_LABEL, child_names

NS = "ml"
UID = "11111111-2222-3333-4444-555555555555"
SECRET_VALUE = "s3cr3t-value-that-must-never-appear"
DEFAULT_RUNTIME_SPEC = {
    "template": {"image": "ghcr.io/kubetune/trainer:0.1.0"},
    "storage": {"credentials": {"secretName": "s3-creds"}},
    "policy": {"allowTrustRemoteCode": True, "allowCustomCode": True,
               "overrides": ["nodeSelector", "tolerations", "affinity", "priorityClassName"]},
}


def ftj(name: str = "demo", *, uid: str = UID, generation: int = 1, status: Optional[dict] = None,
        **spec: Any) -> dict:
    body = {
        "apiVersion": C.API_VERSION, "kind": C.KIND,
        "metadata": {"name": name, "namespace": NS, "uid": uid, "generation": generation,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "stage": "sft",
            "model": {"source": "s3://models/tiny"},
            "dataset": {"format": "chat", "train": [{"uri": "s3://data/chat.jsonl"}]},
            "output": {"uri": "s3://kubetune/runs"},
            "resources": {"gpus": 1},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = value
    if status is not None:
        body["status"] = status
    return body


def model(body: dict):
    return parse_job(body)


def job_obj(name: str = "demo", *, uid: str = "job-uid", owner: str = UID, suspend: bool = False,
            conditions: Optional[list] = None, nodes: int = 1, **status: Any) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": child_names(name).job, "namespace": NS, "uid": uid,
                     "labels": {C.Label.JOB_NAME: name},
                     "ownerReferences": [{"controller": True, "uid": owner, "kind": C.KIND, "name": name}]},
        "spec": {"suspend": suspend, "completions": nodes, "parallelism": nodes},
        "status": {**status, **({"conditions": conditions} if conditions else {})},
    }


def job_cond(type_: str, reason: str, message: str = "", t: str = "2026-01-01T01:00:00Z") -> dict:
    return {"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": t}


_pod_counter = itertools.count()


def pod(name: str = "demo", *, index: int = 0, phase: str = "Running", job_uid: str = "job-uid",
        exit_code: Optional[int] = None, message: Optional[str] = None, created: Optional[str] = None,
        ip: str = "10.0.0.5", started: str = "2026-01-01T00:10:00Z", waiting: Optional[dict] = None,
        conditions: Optional[list] = None, deleting: bool = False) -> dict:
    n = next(_pod_counter)
    state: dict = {}
    if phase == "Running":
        state = {"running": {"startedAt": started}}
    elif phase in ("Succeeded", "Failed"):
        term = {"exitCode": exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1),
                "reason": "Completed" if phase == "Succeeded" else "Error",
                "startedAt": started, "finishedAt": "2026-01-01T00:50:00Z"}
        if message is not None:
            term["message"] = message
        state = {"terminated": term}
    elif waiting:
        state = {"waiting": waiting}
    meta = {"name": f"{child_names(name).job}-{index}-{n:05d}", "namespace": NS, "uid": f"pod-{n}",
            "labels": {C.Label.JOB_NAME: name, COMPLETION_INDEX_LABEL: str(index)},
            "creationTimestamp": created or f"2026-01-01T00:{n % 60:02d}:00Z",
            "ownerReferences": [{"controller": True, "uid": job_uid, "kind": "Job"}]}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T02:00:00Z"
    status = {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state, "restartCount": 0}]}
    if phase != "Pending":
        status["podIP"] = ip
        status["startTime"] = started
    if conditions:
        status["conditions"] = conditions
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


# ------------------------------------------------------------------------------------------------ FakeKube
def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


class FakeKube:
    """An in-memory API server. `refuse(kind, error)` makes creating objects of that kind fail with `error`
    (an ApiError, as the real server answers a child core/v1 does not accept); `core_events` are the events
    other controllers posted (the Job controller's FailedCreate), listed by involvedObject.uid."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.refusals: dict[str, ApiError] = {}
        self.core_events: list[dict] = []
        self.events: list[dict] = []
        self.kueue_served = True  # whether workloads.kueue.x-k8s.io is served (Kueue installed)
        self.calls: list[tuple[str, str]] = []
        self._uids = itertools.count(1)
        self._rv = itertools.count(1)
        # what the chart and the e2e cluster install: the default runtime, permissive enough for every test
        self.put_runtime(C.CLUSTER_RUNTIME_KIND, C.DEFAULT_RUNTIME_NAME, DEFAULT_RUNTIME_SPEC)

    def put_runtime(self, kind: str, name: str, spec: dict, namespace: str = NS, generation: int = 1) -> dict:
        from kubetune_operator.runtimes import runtime_path

        obj = {"apiVersion": C.API_VERSION, "kind": kind,
               "metadata": {"name": name, "uid": f"rt-{name}", "generation": generation,
                            **({"namespace": namespace} if kind == C.RUNTIME_KIND else {})},
               "spec": copy.deepcopy(spec)}
        self.objects[runtime_path(kind, name, namespace)] = obj
        return obj

    def put_namespace(self, name: str, labels: dict) -> None:
        self.objects[f"/api/v1/namespaces/{name}"] = {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": name, "labels": labels}}

    def put(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("uid", f"uid-{next(self._uids)}")
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        if obj["kind"] == "Workload":  # not a kind the operator creates (object_path does not know it)
            meta = obj["metadata"]
            self.objects[f"/apis/{obj['apiVersion']}/namespaces/{meta['namespace']}/workloads/{meta['name']}"] = obj
        else:
            self.objects[object_path(obj)] = obj
        return obj

    def find(self, kind: str, name: Optional[str] = None) -> list[dict]:
        return [o for o in self.objects.values() if o["kind"] == kind and (name is None or
                                                                         o["metadata"]["name"] == name)]

    async def get(self, path: str) -> Optional[dict]:
        self.calls.append(("GET", path))
        await asyncio.sleep(0)  # a real call yields to other tasks
        obj = self.objects.get(path)
        return copy.deepcopy(obj) if obj else None

    def refuse(self, kind: str, error: ApiError) -> None:
        self.refusals[kind] = error

    async def create(self, obj: dict) -> dict:
        path = object_path(obj)
        self.calls.append(("POST", path))
        await asyncio.sleep(0)  # a real call yields to other tasks
        if path in self.objects:
            raise ApiError(409, "AlreadyExists", f"{path} already exists")
        if obj["kind"] in self.refusals:
            raise self.refusals[obj["kind"]]
        obj = copy.deepcopy(obj)
        obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:01Z"
        return copy.deepcopy(self.put(obj))

    async def merge_patch(self, path: str, patch: dict) -> Optional[dict]:
        self.calls.append(("PATCH", path))
        await asyncio.sleep(0)  # a real call yields to other tasks
        sub = None
        if path.endswith("/status"):
            path, sub = path[: -len("/status")], "status"
        if path not in self.objects:
            raise ApiError(404, "NotFound", path)
        obj = self.objects[path]
        if sub == "status":
            obj["status"] = merge(obj.get("status") or {}, patch.get("status") or {})
        else:
            patch = {k: v for k, v in patch.items() if k != "status"}
            self.objects[path] = obj = merge(obj, patch)
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    async def delete(self, path: str, propagation: str = "Background", uid: Optional[str] = None) -> bool:
        self.calls.append(("DELETE", path))
        await asyncio.sleep(0)  # a real call yields to other tasks
        if uid and (self.objects.get(path) or {}).get("metadata", {}).get("uid") not in (None, uid):
            return False  # the uid precondition failed (409 on a real server)
        return self.objects.pop(path, None) is not None

    async def list(self, path: str, **query: str) -> list[dict]:
        return list((await self.request("GET", path, query=query) or {}).get("items") or [])

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Optional[dict]:
        self.calls.append((method, path))
        if method == "POST" and path.endswith("/events"):
            self.events.append(copy.deepcopy(body))
            return body
        if method == "GET" and path.endswith("/events"):
            selector = dict(p.split("=", 1) for p in ((kw.get("query") or {}).get("fieldSelector") or "").split(",")
                            if p)
            items = [e for e in self.core_events
                     if all(str(_dig(e, k)) == v for k, v in selector.items())]
            return {"items": copy.deepcopy(items)}
        if method == "GET" and "/apis/kueue.x-k8s.io/" in path and path.endswith("/workloads"):
            if not self.kueue_served:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            selector = dict(p.split("=", 1) for p in ((kw.get("query") or {}).get("labelSelector") or "").split(",")
                            if p)
            items = [o for p, o in self.objects.items() if p.startswith(path + "/") and
                     all((o["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
            return {"items": copy.deepcopy(items)}
        raise NotImplementedError(f"{method} {path}")

    def dump(self) -> str:
        return json.dumps({"objects": self.objects, "events": self.events}, default=str)

    def mutations(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in ("POST", "PATCH", "DELETE") and not c[1].endswith("/events")]


def _dig(obj: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = (obj or {}).get(part) if isinstance(obj, dict) else None
    return obj


class FakeLookup:
    """Children as kopf's indices would show them: Jobs from the fake API server, pods set by the test."""

    def __init__(self, kube: FakeKube):
        self.kube = kube
        self.pod_list: list[dict] = []

    def jobs(self, namespace: str, name: str) -> list[dict]:
        return [copy.deepcopy(o) for o in self.kube.find("Job")
                if o["metadata"]["namespace"] == namespace and
                o["metadata"].get("labels", {}).get(C.Label.JOB_NAME) == name]

    def pods(self, namespace: str, name: str) -> list[dict]:
        return [copy.deepcopy(p) for p in self.pod_list
                if p["metadata"]["namespace"] == namespace and p["metadata"]["labels"].get(C.Label.JOB_NAME) == name]
