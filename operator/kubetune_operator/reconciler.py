"""One reconcile loop per FineTuneJob: make the children exist, keep the Job's `suspend` in line with the spec,
and write the status derived from the Job and its pods. Every trigger ends here: kopf's create/resume/update
handlers, watch events of the child Jobs and pods, and the periodic resync. Level-based: each run reads the
FineTuneJob fresh and works out everything from what exists, so a missed or repeated event does no harm.

Runs for one FineTuneJob are serialised by a per-job lock and coalesced (events arriving while a run is in
progress cause one more run, not one each). The Job and pods come from kopf indices (no list calls); the
FineTuneJob itself comes from kopf's watch (`observe`, fed by the FineTuneJob event handler) or from our own
status write's answer, whichever is newer, so a child event costs no GET. What aligning the live Job needs of
the rendered one (its template hash, the fields a live Job may change) is kept per FineTuneJob until its metadata,
spec, runtime or retry count change; the validated model is kept for the jobs seen last (every child event needs
both).
A multi-node job's workload is a JobSet (render_jobset.py), read by name (GET) on each run: it is not
indexed, so an operator on a cluster without JobSet needs no watch on it. "The Job" below means the workload of
either kind.

Idempotent children: deterministic names; create, and on 409 read the existing object back. Ours (controller
owner reference with this FineTuneJob's uid): use it. Labelled ours but without an owner (e.g. a manifest
restored from a backup): adopt it. Owned by an older FineTuneJob of the same name (being garbage-collected):
wait. Anything else: a name conflict, reported on the FineTuneJob, retried until the object is gone.

Bad inputs end in a condition, never in a retry loop: a child the API server refuses (400/413/422) fails the
FineTuneJob (InvalidPodTemplate, ConfigTooLarge) with the API server's causes mapped back to spec fields
(render.spec_field_of), and a refused workload takes the ConfigMap made for it along, so nothing is left; a
403 (quota on object counts, RBAC) is Created=False and retried. Pods the Job controller cannot create (quota,
missing PriorityClass/ServiceAccount) show only as FailedCreate events on the Job: they become
Running=False/PodsBlocked. Spec edits reach the live Job in one step (_align_job); status.observedGeneration is
the generation the live Job reflects.

Flat restarts: when a pod ended in a way the Job's podFailurePolicy ignores (preempted, deleted: exit 143) and
nothing of the Job runs any more, the Job controller would still wait out its exponential pod-failure backoff
before the next pod; the reconciler replaces the Job at once instead (_replace_job), handing the new Job what is
left of spec.retryLimit (docs/restarts.md).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

from kubetune_api import constants as C
from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import Phase, Reason
from kubetune_api.finetunejob import FineTuneJob
from kubetune_api.finetuneruntime import FineTuneRuntimeSpec
from kubetune_api.report import TrainerReport

from . import runtimes
from . import queueing
from . import status as S
from .kube import ApiError, EventRecorder, KubeApi, RecentGets, collection_path, object_path
from .metrics import OperatorMetrics
from . import render_jobset as JS
from .render import (GENERATION_ANNOTATION, TEMPLATE_HASH_ANNOTATION, child_names, is_multi_node,
                     mutable_fields, render_children, render_config_map, render_job, retries_used_by,
                     spec_field_of, template_hash, workload_name)
from .settings import OperatorSettings
from .validation import describe_problems, validate

log = logging.getLogger(__name__)


class ChildConflict(Exception):
    """A child cannot be created yet: its name is taken by an object this FineTuneJob does not own, or the API
    server forbids it for now (a ResourceQuota on object counts, missing RBAC). Reported as Created=False with
    `reason`; retried after `delay` seconds (something outside the spec has to change)."""

    def __init__(self, message: str, delay: float, reason: str = Reason.CHILD_CONFLICT):
        super().__init__(message)
        self.delay = delay
        self.reason = reason


class ChildRejected(Exception):
    """The API server refused a rendered child (400/413/422): the spec can never produce a valid object, so
    this ends the FineTuneJob (Failed) instead of being retried. `field` is the FineTuneJob field at fault."""

    def __init__(self, reason: str, field: str, message: str):
        super().__init__(message if message.startswith(f"{field}: ") else f"{field}: {message}")
        self.reason = reason
        self.field = field
        self.message = message


CONFIG_MAP_MAX_BYTES = 1024 * 1024  # what the API server stores in one ConfigMap
RUNTIME_READ_TTL_SECONDS = 5.0  # a burst of new jobs reads their runtime once (kube.RecentGets)


def rejection(job: FineTuneJob, child: dict, exc: ApiError) -> ChildRejected:
    """Translate the API server's refusal of `child` into the FineTuneJob's own words: each cause's field
    mapped back to the spec field that produced it (render.spec_field_of), its message kept."""
    kind, name = child["kind"], child["metadata"]["name"]
    if kind == "ConfigMap":
        size = sum(len(v.encode()) for v in (child.get("data") or {}).values())
        return ChildRejected(Reason.INVALID_CONFIG, "spec",
                             f"the resolved spec is {size} bytes, more than a ConfigMap holds "
                             f"({CONFIG_MAP_MAX_BYTES} bytes): shrink the largest values (reward params, "
                             f"affinity, pod annotations); the API server said: {_short(exc.message, 300)}")
    parts: list[tuple[str, str]] = []
    for cause in exc.causes:
        where = spec_field_of(job, child, cause["field"]) if cause.get("field") else ""
        parts.append((where, (cause.get("message") or cause.get("reason") or "").strip()))
    if not any(f for f, _ in parts):
        # no field named (an admission policy of the cluster): the whole spec is the only honest answer
        parts = [("spec", exc.message)]
    first = parts[0][0]
    text = "; ".join(f"{f}: {m}" for f, m in parts)
    return ChildRejected(Reason.INVALID_POD_TEMPLATE, first,
                         f"{text} (the API server refused the {kind} {name} rendered from this spec)")


def jobset_not_installed(job: FineTuneJob, exc: ApiError) -> ChildRejected:
    """404 on creating the JobSet of a multi-node job: the cluster does not serve the JobSet API. Permanent for
    this FineTuneJob (no retry loop): the message says what to install, or how to run without it."""
    return ChildRejected(
        Reason.JOBSET_NOT_INSTALLED, "spec.resources.nodes",
        f"spec.resources.nodes: {job.spec.resources.nodes} nodes run as a JobSet ({JS.API_VERSION}), which this "
        "cluster does not serve: install JobSet v0.10 or later (https://jobset.sigs.k8s.io) and re-create this "
        f"FineTuneJob, or set spec.resources.nodes: 1 (the API server said: {_short(exc.message, 200)})")


def workload_path(job: FineTuneJob) -> str:
    """Where the FineTuneJob's workload lives: its JobSet (multi-node) or its batch/v1 Job."""
    ns, name = job.metadata.namespace, workload_name(job)
    if is_multi_node(job.spec):
        return f"{collection_path(JS.API_VERSION, JS.PLURAL, ns)}/{name}"
    return f"{collection_path('batch/v1', 'jobs', ns)}/{name}"


def _path_of(workload: dict) -> str:
    return object_path({"apiVersion": "batch/v1", "kind": "Job", **workload})


def forbidden(child: dict, exc: ApiError) -> ChildConflict:
    """403 on creating a child: a ResourceQuota on object counts (count/jobs.batch) or missing RBAC. Not the
    spec's fault and not permanent: shown on the FineTuneJob and retried, without a traceback."""
    return ChildConflict(f"the API server forbids creating the {child['kind']} {child['metadata']['name']}: "
                         f"{_short(exc.message, 600)}", delay=30, reason=Reason.CHILD_FORBIDDEN)


def applied_generation(job: dict, ftj: dict) -> Optional[int]:
    """status.observedGeneration: the FineTuneJob generation the live Job reflects. A Job being deleted to be
    re-created reflects nothing new yet (the previous value stays); a finished Job has nothing left to apply."""
    gen = (ftj.get("metadata") or {}).get("generation")
    previous = (ftj.get("status") or {}).get("observedGeneration")
    meta = job.get("metadata") or {}
    if S.job_finished(job):
        return gen
    if meta.get("deletionTimestamp"):
        return previous if previous is not None else gen
    try:
        return int((meta.get("annotations") or {})[GENERATION_ANNOTATION])
    except (KeyError, ValueError):
        return gen  # a Job from an operator version without the annotation


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ChildLookup(Protocol):
    def jobs(self, namespace: str, name: str) -> list[dict]: ...
    def pods(self, namespace: str, name: str) -> list[dict]: ...


# ------------------------------------------------------------------------------------------------ snapshots
_META_KEYS = ("name", "namespace", "uid", "labels", "annotations", "creationTimestamp", "deletionTimestamp",
              "ownerReferences", "generation")


def _meta(body: Any) -> dict:
    meta = body.get("metadata") or {}
    return {k: copy.deepcopy(meta[k]) for k in _META_KEYS if k in meta}


def snapshot_job(body: Any) -> dict:
    """What the index keeps of a Job (kopf's body is a live view; the index needs a frozen copy)."""
    spec = body.get("spec") or {}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(body),
            "spec": {k: copy.deepcopy(spec[k]) for k in ("suspend", "completions", "parallelism", "backoffLimit",
                                                         "activeDeadlineSeconds") if k in spec},
            "status": copy.deepcopy(dict(body.get("status") or {}))}


def snapshot_pod(body: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(body),
            "status": copy.deepcopy(dict(body.get("status") or {}))}


def controller_uid(obj: dict) -> Optional[str]:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def ftj_path(namespace: str, name: str) -> str:
    return f"{collection_path(C.API_VERSION, C.PLURAL, namespace)}/{name}"


def _rv(obj: Optional[dict]) -> Optional[int]:
    return _int_or_none(((obj or {}).get("metadata") or {}).get("resourceVersion"))


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def newer(candidate: dict, head: Optional[tuple]) -> bool:
    """Whether `candidate` may replace the FineTuneJob held, known by its `head` (uid, resourceVersion): a watch
    event can arrive after our own status write's answer and must not roll it back. resourceVersions are etcd
    revisions (integers) on every API server in use; an unparsable one is taken as newer, as if the cache did
    not exist."""
    if head is None:
        return True
    new, old = _rv(candidate), _int_or_none(head[1])
    if new is None or old is None:
        return True
    if (candidate.get("metadata") or {}).get("uid") != head[0]:
        return True  # deleted and created again under the same name
    return new >= old


_VOLATILE_META = ("resourceVersion", "managedFields")


def _slim(obj: dict) -> dict:
    """The object without metadata.managedFields: never read, and often its biggest part (kept per job)."""
    meta = obj.get("metadata") or {}
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def freeze(obj: dict) -> bytes:
    """A JSON-able object as compact bytes, for what the operator keeps per FineTuneJob, Job and pod. One
    allocation instead of hundreds of small dicts and strings per object: at N=1,000 jobs those long-lived small
    objects, interleaved with each watch event's short-lived ones, pinned most of the allocator's pools (RSS
    ~2.5x the live data, docs/scale.md). Compressed (zlib's fastest level: ~15 us to freeze a FineTuneJob, ~8 us
    more per thaw) because it is kept for every job: Kubernetes JSON shrinks to about 45 %, ~4 KB less per job.
    `thaw` gives a fresh copy each time, so holders need no deep copy."""
    return zlib.compress(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), 1)


def thaw(data: bytes) -> Any:
    return json.loads(zlib.decompress(data))


class BoundedCache:
    """A least-recently-used dict of at most `size` entries: per-job results worth reusing while a job is busy
    (its burst of events at creation), not worth holding for every one of thousands of idle jobs."""

    def __init__(self, size: int):
        self.size = size
        self._data: "OrderedDict[Any, Any]" = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, key: Any) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


# Validation (~0.12 ms) is cheap next to a reconcile (~5-7 ms of the operator's CPU per job event): the parsed
# models are kept only for the jobs seen last. What status reconciles need of the rendered Job is kept for every
# job instead (`_KeyState.target`, a few hundred bytes): re-rendering it for each job that had fallen out of an LRU
# made the operator's CPU per job grow with the number of jobs (docs/scale.md).
MODEL_CACHE_SIZE = 256


def st_key(ftj: dict) -> tuple[str, str]:
    meta = ftj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def spec_key(ftj: dict) -> bytes:
    """A digest of what validation and rendering read: metadata (less what changes on every write) and spec.
    A digest, not the JSON: it is kept per job (up to three of them, `_KeyState`), ~1.5 KB each as text."""
    meta = {k: v for k, v in (ftj.get("metadata") or {}).items() if k not in _VOLATILE_META}
    text = json.dumps([meta, ftj.get("spec")], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def align_target(desired: dict) -> dict:
    """What _align_job needs of a rendered Job/JobSet to bring a live one in line: the digest of its immutable
    template, the values of the fields a live one may change, and the generation it reflects."""
    annotations = (desired.get("metadata") or {}).get("annotations") or {}
    mutable = mutable_fields(desired)
    return {"hash": annotations.get(TEMPLATE_HASH_ANNOTATION) or template_hash(desired["spec"], mutable),
            "mutable": {key: desired["spec"].get(key) for key in mutable},
            "generation": annotations.get(GENERATION_ANNOTATION)}


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Result:
    state: str  # gone | terminal | invalid | rejected | conflict | waiting | ok
    message: str = ""
    delay: float = 0.0


# Kept for every FineTuneJob the operator has seen, so as small as it can be: slots, digests instead of spec
# texts, and the FineTuneJob and its status as frozen bytes (live dicts of the status alone were ~7 KB per job
# at N=1,000, docs/scale.md).
@dataclass(slots=True)
class _KeyState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: bool = False
    ensure_all: bool = False
    # spec_key of the last run that checked every child: a FineTuneJob first seen (created, or found when the
    # operator starts) or whose metadata/spec changed gets its ConfigMap and Service checked too
    ensured: Optional[bytes] = None
    ensuring: Optional[bytes] = None
    observed: Optional[bytes] = None  # spec_key of the newest body the watch delivered (`unsettled`)
    result: Optional[Result] = None
    uid: Optional[str] = None
    frozen_status: Optional[bytes] = None  # the status last seen or written (freeze); `status` thaws it
    terminal: bool = False  # whether that status is terminal (checked on every event: no thawing for it)
    frozen: Optional[bytes] = None  # the FineTuneJob last seen (freeze(_slim(body))); `body` thaws it
    head: Optional[tuple] = None  # its (uid, resourceVersion), for `newer` without thawing
    watched: bool = False  # kopf's watch feeds `body` (observe): reconciles read it instead of GETting it
    expected_deletion: Optional[str] = None  # uid of a Job this operator deleted to re-create it
    blocked: tuple = (None, None)  # last _pods_refused answer, reused by runs that do not list events
    check_blocked: bool = False
    # status.runtime resolved by this reconcile and not written yet: it rides along with the reconcile's status
    # write (a write of its own would cost a PATCH and a watch event per new job)
    unrecorded_runtime: Optional[dict] = None
    # (digest of what the Job was rendered from, freeze(AlignTarget)): what _align_job compares a live Job with
    target: Optional[tuple[bytes, bytes]] = None
    reconciled_at: float = float("-inf")  # Reconciler.monotonic() when the last run started (resync: idle_seconds)

    @property
    def status(self) -> Optional[dict]:
        """A fresh copy of the status last seen or written (None: nothing held)."""
        return None if self.frozen_status is None else thaw(self.frozen_status)

    @status.setter
    def status(self, value: Optional[dict]) -> None:
        self.frozen_status = None if value is None else freeze(value)
        self.terminal = value is not None and S.is_terminal(value)

    @property
    def body(self) -> Optional[dict]:
        """A fresh copy of the FineTuneJob last seen (None: nothing held)."""
        return None if self.frozen is None else thaw(self.frozen)

    @body.setter
    def body(self, value: Optional[dict]) -> None:
        if value is None:
            self.frozen = self.head = None
            return
        meta = value.get("metadata") or {}
        self.frozen = freeze(_slim(value))
        self.head = (meta.get("uid"), meta.get("resourceVersion"))


class Reconciler:
    def __init__(self, api: KubeApi, settings: OperatorSettings, metrics: OperatorMetrics,
                 recorder: EventRecorder, lookup: ChildLookup, now: Callable[[], str] = S.now_rfc3339):
        self.api = api
        self.settings = settings
        self.metrics = metrics
        self.recorder = recorder
        self.lookup = lookup
        self.now = now
        self.monotonic = time.monotonic
        self._states: dict[tuple[str, str], _KeyState] = {}
        self._models = BoundedCache(MODEL_CACHE_SIZE)  # key -> (spec_key, model, problems)
        self._recent = RecentGets(api, ttl=RUNTIME_READ_TTL_SECONDS)
        self._events_denied = False  # RBAC without `list` on events: warned once
        # namespace -> FailedCreate events of its Jobs by the Job's uid, while a progress tick shares them
        self._failed_creates: dict[str, dict[str, list[dict]]] = {}
        self._workloads_denied = False  # RBAC without `list` on Kueue workloads: warned once
        self._workload_version: Optional[str] = None  # the Workload API version the cluster serves

    def _state(self, namespace: str, name: str) -> _KeyState:
        return self._states.setdefault((namespace, name), _KeyState())

    def forget(self, namespace: str, name: str) -> None:
        st = self._states.get((namespace, name))
        self._models.pop((namespace, name))
        if st is not None:  # a job re-created under this name must not inherit "terminal" (st.status)
            st.body, st.status, st.watched = None, None, False
        if st is not None and not st.lock.locked():
            self._states.pop((namespace, name), None)

    def observe(self, body: dict) -> bool:
        """The FineTuneJob as kopf's watch delivered it (a plain dict, not kopf's live view): later reconciles of
        this job read it instead of GETting it. Kept only when newer than what is held (see `newer`).
        Returns whether it says anything the reconciler does not know: False for the watch event of the
        reconciler's own status write (same uid and resourceVersion as that write's answer, already held), which
        would otherwise cost a reconcile that finds nothing to do, about three per new job."""
        meta = body.get("metadata") or {}
        st = self._state(*st_key(body))
        held_uid, held_rv = st.head or (None, None)
        known = st.watched and held_rv is not None and \
            held_rv == meta.get("resourceVersion") and held_uid == meta.get("uid")
        if st.uid is not None and meta.get("uid") != st.uid:
            st.status = None  # a new FineTuneJob under a finished one's name: not "terminal" (forget may have
            # found the old one's reconcile running and left its state)
        if newer(body, st.head):
            st.body = body  # frozen: a copy by construction
            st.observed = spec_key(body)
        st.watched = True
        return not known

    def unsettled(self, namespace: str, name: str) -> bool:
        """Whether the job's children are not yet made for its newest spec (a new job, a spec change, a job the
        operator has not reconciled since it started): the reconcile queue runs those first."""
        st = self._states.get((namespace, name))
        return st is None or st.ensured is None or st.ensured != st.observed

    def _validated(self, st: _KeyState, ftj: dict) -> tuple[Optional[FineTuneJob], list[str]]:
        """validate(ftj), kept while metadata and spec stay the same (status is not validated: the operator
        writes it, and it changes on most runs). `st.ensuring` is this run's spec_key(ftj)."""
        key, held = st.ensuring, self._models.get(st_key(ftj))
        if held is None or held[0] != key:
            model, problems = validate({k: v for k, v in ftj.items() if k != "status"})
            held = (key, model, problems)
            self._models.put(st_key(ftj), held)
        return held[1], held[2]

    def _target(self, st: _KeyState, ftj: dict, job_model: FineTuneJob, runtime: FineTuneRuntimeSpec,
                retries_used: int) -> dict:
        """align_target(render_job(...)) for this spec, runtime and retry count, kept per job until one of them
        changes (`st.ensuring`: this run's spec_key). Only a digest of those inputs is kept, not the inputs."""
        digest = self._target_digest(st, runtime, retries_used)
        if st.target is None or st.target[0] != digest:
            self._keep_target(st, digest, render_job(job_model, ftj, self.settings, runtime, retries_used))
        return thaw(st.target[1])

    @staticmethod
    def _target_digest(st: _KeyState, runtime: FineTuneRuntimeSpec, retries_used: int) -> bytes:
        return hashlib.blake2b((st.ensuring or b"") + f"\0{runtime.model_dump_json()}\0{retries_used}".encode(),
                               digest_size=16).digest()

    @staticmethod
    def _keep_target(st: _KeyState, digest: bytes, workload: dict) -> None:
        """Keep what _align_job needs of `workload`, rendered from the inputs `digest` stands for."""
        st.target = (digest, freeze(align_target(workload)))

    # -------------------------------------------------------------------------------------------- entry
    def idle_seconds(self, namespace: str, name: str) -> float:
        """Seconds since the job's last reconcile started (inf: never, in this process)."""
        st = self._states.get((namespace, name))
        return float("inf") if st is None else self.monotonic() - st.reconciled_at

    async def reconcile(self, namespace: str, name: str, *, ensure_all: bool = False,
                        check_blocked: bool = True, trigger: str = "event") -> Result:
        """Bring one FineTuneJob in line. `ensure_all` also checks the ConfigMap and Service; without it they are
        checked when the job is first seen or its metadata/spec changed (`_KeyState.ensured`), otherwise child
        events only need the Job and the status. `check_blocked=False`
        (child events: the Job and pods changed, so Kubernetes is creating pods) skips listing the Job's
        FailedCreate events and keeps the last answer; the progress loop checks Pending jobs every tick. `trigger`
        (event, waiting, resync: metrics.RECONCILE_TRIGGERS) labels the run in kubetune_operator_reconciles_total."""
        st = self._state(namespace, name)
        st.requested = True
        st.ensure_all = st.ensure_all or ensure_all
        st.check_blocked = st.check_blocked or check_blocked
        async with st.lock:
            if not st.requested and st.result is not None:
                return st.result  # a run that started after our request already covered it
            st.requested, ensure, st.ensure_all = False, st.ensure_all, False
            st.reconciled_at = self.monotonic()
            self.metrics.reconciled(trigger)
            check, st.check_blocked = st.check_blocked, False
            try:
                st.result = await self._reconcile_once(st, namespace, name, ensure, check)
                if st.result.state in ("ok", "terminal"):
                    st.ensured = st.ensuring
            except BaseException:
                st.requested = True  # let the next caller retry
                st.ensure_all = st.ensure_all or ensure
                st.check_blocked = st.check_blocked or check
                raise
            return st.result

    async def _reconcile_once(self, st: _KeyState, namespace: str, name: str, ensure_all: bool,
                              check_blocked: bool = True) -> Result:
        if not ensure_all and st.terminal:
            return Result("terminal")  # a finished job's pods come and go: nothing to do
        held = st.body if st.watched else None
        ftj = held if held is not None else await self.api.get(ftj_path(namespace, name))
        if ftj is None or (ftj.get("metadata") or {}).get("deletionTimestamp"):
            st.status = st.body = None
            return Result("gone")
        uid = ftj["metadata"].get("uid")
        if st.uid != uid:
            # a re-created FineTuneJob of this name: nothing of the old object's state carries over
            st.uid, st.expected_deletion, st.unrecorded_runtime = uid, None, None
        if ftj is not held:
            st.body = ftj
        old_status = ftj.get("status") or {}
        st.status = old_status

        if S.is_terminal(old_status):
            new = S.derive_status(ftj, None, [], now=self.now())
            await self._write(st, ftj, new)
            return Result("terminal")

        st.ensuring = spec_key(ftj)
        ensure_all = ensure_all or st.ensuring != st.ensured
        job_model, problems = self._validated(st, ftj)
        if problems:
            message = describe_problems(problems)
            await self._write(st, ftj, S.invalid_spec_status(ftj, message, now=self.now()))
            return Result("invalid", message=message)

        if is_multi_node(job_model.spec):
            jobs = []  # a JobSet: no index (it is read by name below); the batch Jobs in the index are its children
        else:
            jobs = [j for j in self.lookup.jobs(namespace, name) if controller_uid(j) in (uid, None)]
        job = next((j for j in jobs if not j["metadata"].get("deletionTimestamp")), jobs[0] if jobs else None)
        pods = [p for p in self.lookup.pods(namespace, name)]
        if job is None and S.condition_true(old_status.get("conditions"), CT.CREATED):
            # the index may lag behind a Job created a moment ago: ask the API before calling it missing (a job
            # never Created has no Job to find; should one exist all the same, creating it answers 409 and
            # _ensure reads it back)
            live = await self.api.get(workload_path(job_model))
            if live is not None and controller_uid(live) == uid:
                job = live
        runtime, refusal = await self._runtime(st, ftj, job_model, job_exists=job is not None)
        if refusal is not None:
            reason, message = refusal
            await self._write(st, ftj, S.invalid_spec_status(ftj, message, now=self.now(), reason=reason))
            return Result("invalid", message=message)
        job_model = runtimes.apply_defaults(job_model, runtime)
        try:
            if job is None and queueing.queue_name(job_model) and job_model.spec.suspend:
                # Kueue would admit (start) a new Job before the operator could deactivate its Workload: a queued
                # job suspended before it ever ran gets its Job only when unsuspended.
                await self._ensure_children(st, ftj, job_model, runtime, create_job=False)
                await self._write(st, ftj, S.held_status(ftj, queueing.queue_name(job_model), pods, now=self.now()))
                return Result("ok")
            if job is None:
                ours = st.expected_deletion is not None
                alive = [p for p in pods if not S.pod_is_finished(p)]
                if S.condition_true(old_status.get("conditions"), CT.CREATED) and alive and not ours:
                    # the old Job's pods are still stopping (and checkpointing): start new ones after them
                    new = S.derive_status(ftj, None, pods, now=self.now())
                    await self._write(st, ftj, new)
                    return Result("waiting", message=new.get("message", ""))
                existed = S.condition_true(old_status.get("conditions"), CT.CREATED)
                job, created = await self._ensure_children(st, ftj, job_model, runtime, create_job=True,
                                                           existed=existed)
                check_blocked = check_blocked and not created  # the Job controller has not even seen it yet
                if created and existed:
                    if ours:
                        await self.recorder.event(ftj, "Normal", Reason.JOB_CREATED,
                                                  f"re-created Job {job['metadata']['name']} with the spec changed "
                                                  "while suspended")
                    else:
                        await self.recorder.event(ftj, "Warning", Reason.JOB_MISSING,
                                                  f"the trainer Job {job['metadata']['name']} was deleted; re-created "
                                                  "it (training resumes from the latest checkpoint)")
                st.expected_deletion = None
            else:
                if ensure_all:
                    await self._ensure_children(st, ftj, job_model, runtime, create_job=False)
                job = await self._align_job(st, ftj, job_model, job, runtime)
                why = S.waits_for_backoff(job, pods, self.now())
                if why is not None and not (await self._pods_refused(job, pods, job_model))[0]:
                    job = await self._replace_job(ftj, job_model, job, why, runtime)
        except ChildRejected as exc:
            log.info("%s/%s cannot run: %s", namespace, name, exc)
            await self._write(st, ftj, S.invalid_spec_status(ftj, str(exc), now=self.now(), reason=exc.reason))
            return Result("rejected", message=str(exc))
        except ChildConflict as exc:
            gen = ftj["metadata"].get("generation")
            conds = S.set_condition(old_status.get("conditions"), CT.CREATED, False, exc.reason,
                                    str(exc), gen, self.now())
            await self._write(st, ftj, {**S.base_status(old_status), "conditions": conds, "observedGeneration": gen,
                                        "phase": S.derive_phase(conds), "message": str(exc)})
            return Result("conflict", message=str(exc), delay=exc.delay)

        queue = await self._queue_state(job_model, job)
        if check_blocked or not self._missing_pods(job, pods, job_model):
            st.blocked = await self._pods_refused(job, pods, job_model)
        blocked, since = st.blocked
        new = S.derive_status(ftj, job, pods, now=self.now(), blocked=blocked, queue=queue)
        new["observedGeneration"] = applied_generation(job, ftj)
        timeout = self.settings.pods_blocked_timeout_seconds
        waited = S.seconds_between(since, self.now()) if blocked else None
        if timeout and waited is not None and waited >= timeout:
            message = f"{S.blocked_message(blocked)} (for {int(waited)} s; the operator gives up after {int(timeout)} s)"
            new = S.invalid_spec_status(ftj, message, now=self.now(), reason=Reason.PODS_BLOCKED)
            await self._write(st, ftj, new)
            # the Job would otherwise start pods whenever the quota frees up, for a job reported Failed
            await self.api.delete(_path_of(job))
            return Result("terminal")
        await self._write(st, ftj, new)
        return Result("ok")

    def lacks_pods(self, namespace: str, name: str) -> bool:
        """Whether a Job of this FineTuneJob (as the watches last showed it) has fewer pods than it should run, so
        the Job controller may be failing to create them (quota, missing ServiceAccount...): only the Job's events
        say so, and the progress loop looks at them every tick. True when no Job is known yet. A Job whose pods
        exist but wait (for a node, for an image) is not lacking: the pods' own events bring those changes, and
        re-checking it every tick made the operator's work per tick grow with the number of waiting jobs (at
        1,000 jobs queued behind a busy scheduler, thousands of event LISTs)."""
        jobs = [j for j in self.lookup.jobs(namespace, name)
                if not (j.get("metadata") or {}).get("deletionTimestamp") and not S.job_finished(j)]
        if not jobs:
            return True
        pods = [p for p in self.lookup.pods(namespace, name) if not S.pod_is_finished(p)
                and not (p.get("metadata") or {}).get("deletionTimestamp")]
        for job in jobs:
            spec = job.get("spec") or {}
            if not spec.get("suspend") and len(S.pods_of_job(pods, job)) < int(spec.get("parallelism") or 1):
                return True
        return False

    @staticmethod
    def _missing_pods(job: dict, pods: list[dict], job_model: FineTuneJob) -> bool:
        """The Job should have pods it lacks (so the Job controller may be failing to create them)."""
        meta, spec = job.get("metadata") or {}, job.get("spec") or {}
        if not meta.get("uid") or meta.get("deletionTimestamp") or spec.get("suspend") or S.job_finished(job):
            return False
        live = [p for p in S.pods_of_job(pods, job) if not S.pod_is_finished(p)
                and not (p.get("metadata") or {}).get("deletionTimestamp")]
        return len(live) < job_model.spec.resources.nodes

    async def _pods_refused(self, job: dict, pods: list[dict], job_model: FineTuneJob) -> tuple[Optional[str], Optional[str]]:
        """(message, first seen) of the Job controller's latest FailedCreate event while the Job lacks pods:
        ResourceQuota, a missing PriorityClass or ServiceAccount, a LimitRange... Those live only in the Job's
        events; the Job's status does not change. (None, None) when pods are not missing or nothing refused them."""
        meta = job.get("metadata") or {}
        if not self._missing_pods(job, pods, job_model):
            return None, None
        if JS.is_jobset(job):
            # The JobSet's child Job creates the pods, and the refusals are its events (it carries our labels,
            # so the Job index has it: owned by the JobSet, not by the FineTuneJob).
            child = next((j for j in self.lookup.jobs(meta["namespace"], job_model.metadata.name)
                          if controller_uid(j) == meta["uid"] and not j["metadata"].get("deletionTimestamp")), None)
            if child is None or not (child.get("metadata") or {}).get("uid"):
                return None, None
            meta, job = child["metadata"], child
        shared = self._failed_creates.get(meta["namespace"])
        if shared is not None:
            events = shared.get(meta["uid"], [])
        else:
            try:
                events = await self.api.list(f"/api/v1/namespaces/{meta['namespace']}/events",
                                             fieldSelector=f"involvedObject.uid={meta['uid']},reason=FailedCreate")
            except ApiError as exc:
                if exc.status != 403:
                    raise
                self._warn_events_denied(exc)
                return None, None
        started = (job.get("status") or {}).get("startTime") or ""  # reset by the Job controller on resume

        def last(e: dict) -> str:
            return e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or ""

        recent = sorted((e for e in events if last(e) >= started), key=last)
        if not recent:
            return None, None
        first = min((e.get("firstTimestamp") or e.get("eventTime") or last(e)) for e in recent)
        return recent[-1].get("message") or "pod creation failed", first

    def _warn_events_denied(self, exc: ApiError) -> None:
        """A 403 on listing events: warned once, pods Kubernetes refuses are then reported as pending."""
        if not self._events_denied:
            self._events_denied = True
            log.warning("cannot list events (%s): pods that Kubernetes refuses to create are reported as "
                        "pending only; grant `list` on events", exc.message)

    async def share_failed_creates(self, namespaces: Iterable[str]) -> None:
        """One LIST of the Jobs' FailedCreate events per namespace, used by every job of it that checks for pods
        Kubernetes refuses to create until `unshare_failed_creates`. The progress tick checks each Pending job
        whose Job lacks pods; one LIST per job made the API server scan all the namespace's events once per job,
        so 1,000 jobs waiting for the Job controller cost it O(N^2) (docs/scale.md). Where the LIST fails, each
        job lists its own."""
        for ns in sorted(set(namespaces)):
            try:
                events = await self.api.list(f"/api/v1/namespaces/{ns}/events",
                                             fieldSelector="involvedObject.kind=Job,reason=FailedCreate")
            except Exception as exc:  # noqa: BLE001 - unreachable API server, 5xx: each job lists its own (or fails)
                if isinstance(exc, ApiError) and exc.status == 403:
                    self._warn_events_denied(exc)
                else:
                    log.warning("could not list FailedCreate events in %s: %s", ns, exc)
                self._failed_creates.pop(ns, None)
                continue
            by_uid: dict[str, list[dict]] = {}
            for e in events:
                by_uid.setdefault((e.get("involvedObject") or {}).get("uid") or "", []).append(e)
            self._failed_creates[ns] = by_uid

    def refusal_may_change(self, namespace: str, name: str) -> bool:
        """Whether reconciling this waiting job (lacks_pods) during a tick could find anything its last reconcile
        did not: its Jobs have FailedCreate events in the tick's shared listing, it is reported blocked (to clear,
        or to time out: pods_blocked_timeout_seconds), or there is no shared listing or no Job to look up. Jobs
        whose pods the Job controller simply has not created yet are skipped: at 3,000 jobs created at once, a
        reconcile of each of them every tick until its pod appeared was a cost per job that grew with N
        (docs/scale.md); the pod's watch event reconciles it when it comes."""
        shared = self._failed_creates.get(namespace)
        st = self._states.get((namespace, name))
        if shared is None or st is None or st.blocked[0] is not None:
            return True
        uids = [(j.get("metadata") or {}).get("uid") for j in self.lookup.jobs(namespace, name)]
        return not uids or any(uid in shared for uid in uids)

    def unshare_failed_creates(self) -> None:
        self._failed_creates.clear()

    # -------------------------------------------------------------------------------------------- runtime
    async def _runtime(self, st: _KeyState, ftj: dict, job_model: FineTuneJob, *, job_exists: bool
                       ) -> tuple[FineTuneRuntimeSpec, Optional[tuple[str, str]]]:
        """(the runtime to render from, None) or (_, (reason, message)) when the job must fail before any pod.

        The first reconcile resolves spec.runtimeRef and records the runtime in status.runtime; later ones read
        that record, so an edited runtime never changes this job. Whenever a Job is about to be created (first
        start, or a re-created one), the spec is checked against the recorded runtime. A Job that already runs
        without a record (started by an operator version before runtimes) keeps running: its runtime is
        recorded when it resolves, and nothing is refused for it."""
        recorded = runtimes.from_snapshot(ftj.get("status"))
        if recorded is None:
            resolved, problem = await runtimes.resolve(self.api, ftj, get=self._recent.get)
            if resolved is None:
                if job_exists:
                    log.warning("%s/%s runs without a resolvable runtime (%s); keeping it running",
                                ftj["metadata"]["namespace"], ftj["metadata"]["name"], problem)
                    return runtimes.settings_runtime(self.settings), None
                reason = Reason.RUNTIME_VIOLATION if "not granted" in (problem or "") else Reason.RUNTIME_NOT_FOUND
                return resolved, (reason, problem or "spec.runtimeRef: cannot be resolved")
            # recorded with this reconcile's status write (_write), which follows before any other reconcile of
            # the job (per-job lock); should that write fail, the next reconcile resolves it again (the Job, if
            # created meanwhile, keeps running: job_exists)
            st.unrecorded_runtime = resolved.snapshot()
            ftj["status"] = {**(ftj.get("status") or {}), "runtime": st.unrecorded_runtime}
            st.status = ftj["status"]
            recorded = resolved
        if not job_exists:
            problems = runtimes.violations(job_model, recorded.spec, recorded.name)
            if problems:
                return recorded.spec, (Reason.RUNTIME_VIOLATION, describe_problems(problems))
        return recorded.spec, None

    # -------------------------------------------------------------------------------------------- children
    async def _ensure_children(self, st: _KeyState, ftj: dict, job_model: FineTuneJob,
                               runtime: FineTuneRuntimeSpec, *, create_job: bool, existed: bool = True
                               ) -> tuple[dict, bool]:
        uid = ftj["metadata"]["uid"]
        # The ConfigMap is brought up to date only together with a new Job: a running trainer keeps the
        # config it started with. It comes first so a new pod never starts without its config.
        config_map, cm_created = await self._ensure(render_config_map(job_model, ftj, self.settings), uid,
                                                    update_data=create_job, job_model=job_model)
        if create_job and existed:  # a job never Created has no leftovers (and a new job costs no GETs)
            ns, name = job_model.metadata.namespace, job_model.metadata.name
            # The workload of the other kind, left from before a suspended job was resized across nodes: 1
            # (a Job) and nodes > 1 (a JobSet). Operator versions before JobSet also rendered a headless Service
            # for multi-node jobs; JobSet now creates its own of that name (its subdomain), which is not ours.
            if is_multi_node(job_model.spec):
                stale = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": child_names(name).job}}
            else:
                stale = {"apiVersion": JS.API_VERSION, "kind": JS.KIND, "metadata": {"name": JS.jobset_name(name)}}
            legacy = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": child_names(name).service}}
            for obj in (stale, legacy):
                obj["metadata"]["namespace"] = ns
                await self._delete_if_ours(obj, uid)
        if not create_job:
            return {}, False
        workload = render_job(job_model, ftj, self.settings, runtime)
        # the next reconcile aligns the Job with what it should be for these inputs: no need to render it again
        self._keep_target(st, self._target_digest(st, runtime, 0), workload)
        try:
            return await self._ensure(workload, uid, job_model=job_model)
        except ChildRejected:
            # A workload the API server refuses (a label, toleration or quantity core/v1 does not accept, an
            # admission policy, no JobSet API) ends the job: the ConfigMap made for it in this same reconcile
            # goes again, so a refused spec leaves nothing behind. (Cheaper than a server-side dry run of every
            # new Job, which costs the API server and every Job admission webhook, e.g. Kueue's, a second full
            # admission of each new job.)
            if cm_created:
                await self._delete_quietly(config_map)
            raise

    async def _delete_quietly(self, obj: dict) -> None:
        """Best effort: a leftover is owned by the FineTuneJob and goes with it."""
        try:
            await self.api.delete(object_path(obj), uid=(obj.get("metadata") or {}).get("uid"))
        except ApiError as exc:
            log.warning("could not delete %s %s/%s: %s", obj.get("kind"), obj["metadata"].get("namespace"),
                        obj["metadata"].get("name"), exc)

    async def _ensure(self, obj: dict, owner_uid: str, update_data: bool = False,
                      job_model: Optional[FineTuneJob] = None) -> tuple[dict, bool]:
        """(object, created). See the module docstring for what an existing object means."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            return await self.api.create(obj), True
        except ApiError as exc:
            if exc.not_found and JS.is_jobset(obj) and job_model is not None:
                raise jobset_not_installed(job_model, exc) from None
            if exc.invalid and job_model is not None:
                raise rejection(job_model, obj, exc) from None
            if exc.status == 403:
                raise forbidden(obj, exc) from None
            if not exc.conflict:
                raise
        existing = await self.api.get(object_path(obj))
        if existing is None:
            raise ChildConflict(f"{kind} {name} was deleted while being created; retrying", delay=1)
        owner = controller_uid(existing)
        labels = (existing.get("metadata") or {}).get("labels") or {}
        if owner is None and labels.get(C.Label.JOB_NAME) == obj["metadata"]["labels"][C.Label.JOB_NAME] and \
                labels.get(C.Label.MANAGED_BY) == C.Label.MANAGED_BY_VALUE:
            log.info("adopting %s %s/%s", kind, obj["metadata"]["namespace"], name)
            refs = [r for r in (existing["metadata"].get("ownerReferences") or []) if not r.get("controller")]
            existing = await self.api.merge_patch(object_path(obj), {"metadata": {
                "ownerReferences": refs + obj["metadata"]["ownerReferences"]}}) or existing
            owner = owner_uid
        if owner == owner_uid:
            if update_data and "data" in obj and existing.get("data") != obj["data"]:
                try:
                    existing = await self.api.merge_patch(object_path(obj), {"data": obj["data"]}) or existing
                except ApiError as exc:
                    if exc.invalid and job_model is not None:
                        raise rejection(job_model, obj, exc) from None
                    raise
            return existing, False
        if owner is not None:
            raise ChildConflict(f"{kind} {name} still belongs to an earlier FineTuneJob of this name (uid {owner}), "
                                "which is being deleted; waiting for the garbage collector", delay=5)
        raise ChildConflict(f"a {kind} named {name} already exists and is not managed by kubetune; delete or rename "
                            "it (the operator retries)", delay=30)

    async def _delete_if_ours(self, obj: dict, owner_uid: str) -> None:
        existing = await self.api.get(object_path(obj))  # None also where the JobSet API is not served
        if existing is not None and controller_uid(existing) == owner_uid:
            # Foreground: a workload's pods are gone before it is, so they never overlap the new one's
            await self.api.delete(object_path(obj), propagation="Foreground")

    async def _align_job(self, st: _KeyState, ftj: dict, job_model: FineTuneJob, job: dict,
                         runtime: FineTuneRuntimeSpec) -> dict:
        """Bring the live Job in line with the spec, in one step per reconcile:

        - a suspended Job whose pod template no longer matches is deleted and re-created, never resumed first:
          one update that changes `resources` and sets `suspend: false` together (what Kueue does on
          admission) must start pods from the NEW template (a Job's template is immutable);
        - otherwise `suspend` and the fields batch/v1 lets change on a live Job (backoffLimit = retryLimit,
          activeDeadlineSeconds) are patched in one merge patch, together with the generation annotation that
          status.observedGeneration reports.
        A running Job whose template differs (only an older CRD without the resources rule allows it) keeps
        running; observedGeneration stays at the generation the Job reflects."""
        if job["metadata"].get("deletionTimestamp") or S.job_finished(job):
            return job
        target = self._target(st, ftj, job_model, runtime, retries_used_by(job))
        path = _path_of(job)
        live_spec = job.get("spec") or {}
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        wanted = target["hash"]
        same_template = annotations.get(TEMPLATE_HASH_ANNOTATION) == wanted
        if not same_template and live_spec.get("suspend"):
            log.info("re-creating suspended Job %s: the spec changed", path)
            st.expected_deletion = job["metadata"].get("uid")
            # Foreground: the Job disappears only after its pods, so new pods never overlap old ones
            await self.api.delete(path, propagation="Foreground")
            job = copy.deepcopy(job)
            job["metadata"]["deletionTimestamp"] = self.now()
            return job
        patch: dict = {}
        want = queueing.suspend_patch(job_model, live_spec.get("suspend"))  # None with a queue: Kueue's call
        if want is not None:
            log.info("%s Job %s", "suspending" if want else "resuming", path)
            patch["suspend"] = want
        for key, value in target["mutable"].items():
            if live_spec.get(key) != value:
                patch[key] = value  # None removes it
        meta_patch = {}
        gen = target["generation"]
        if same_template and gen and annotations.get(GENERATION_ANNOTATION) != gen:
            meta_patch = {"annotations": {GENERATION_ANNOTATION: gen}}
        if not patch and not meta_patch:
            return job
        body: dict = {}
        if patch:
            body["spec"] = patch
        if meta_patch:
            body["metadata"] = meta_patch
        try:
            patched = await self.api.merge_patch(path, body)
        except ApiError as exc:
            if not exc.invalid:
                raise
            # the field paths of the API server's answer are mapped back through the rendered Job (rare: render again)
            desired = render_job(job_model, ftj, self.settings, runtime, retries_used_by(job))
            raise rejection(job_model, desired, exc) from None
        job = copy.deepcopy(job)
        job.setdefault("spec", {}).update({k: v for k, v in patch.items() if v is not None})
        for k, v in patch.items():
            if v is None:
                job["spec"].pop(k, None)
        if meta_patch:
            job["metadata"].setdefault("annotations", {}).update(meta_patch["annotations"])
        if patched:
            job["status"] = patched.get("status") or job.get("status") or {}
        return job

    async def _replace_job(self, ftj: dict, job_model: FineTuneJob, job: dict, why: str,
                           runtime: FineTuneRuntimeSpec) -> dict:
        """Delete a Job whose only pods ended in ways its podFailurePolicy ignores and create its successor at
        once (S.waits_for_backoff says why). The successor's backoffLimit is what is left of spec.retryLimit
        after the failures the Job controller counted (render.RETRIES_USED_ANNOTATION)."""
        meta = job["metadata"]
        used = retries_used_by(job) + int((job.get("status") or {}).get("failed") or 0)
        path = object_path({**job, "apiVersion": "batch/v1", "kind": "Job"})
        # the uid precondition: never delete a successor that another reconcile created meanwhile
        await self.api.delete(path, uid=meta["uid"])
        for _ in range(100):  # a Job has no finalizers: it is gone within a moment (its pods go with the GC)
            live = await self.api.get(path)
            if live is None or live["metadata"].get("uid") != meta["uid"]:
                break
            await asyncio.sleep(0.1)
        else:
            raise ChildConflict(f"Job {meta['name']} is still being deleted to replace it", delay=1)
        children = render_children(job_model, ftj, self.settings, runtime, retries_used=used)
        new, created = await self._ensure(children.job, ftj["metadata"]["uid"], job_model=job_model)
        if created:
            left = children.job["spec"]["backoffLimit"]
            log.info("replaced Job %s: %s; its successor starts now (%d of retryLimit left)", path, why, left)
            await self.recorder.event(ftj, "Normal", Reason.POD_REPLACED,
                                      f"{why}: started its replacement at once (not counted against retryLimit; "
                                      f"{left} retries left)")
        return new

    # -------------------------------------------------------------------------------------------- Kueue
    async def _queue_state(self, job_model: FineTuneJob, job: dict) -> Optional[queueing.QueueState]:
        """What Kueue says about a queued job's child (None without a queue), after handing spec.suspend to
        Kueue as its Workload's spec.active (queueing.workload_active_patch)."""
        queue = queueing.queue_name(job_model)
        meta = job.get("metadata") or {}
        if not queue or not meta.get("uid") or meta.get("deletionTimestamp"):
            return None
        suspended = bool((job.get("spec") or {}).get("suspend"))
        workload, missing = await self._workload(meta["namespace"], meta["uid"])
        patch = queueing.workload_active_patch(job_model, workload)
        if patch and workload is not None:
            wl_meta = workload["metadata"]
            path = f"{queueing.workload_path(meta['namespace'], self._workload_version or 'v1beta2')}/{wl_meta['name']}"
            log.info("%s Kueue Workload %s/%s for spec.suspend", "deactivating" if job_model.spec.suspend
                     else "reactivating", meta["namespace"], wl_meta["name"])
            try:
                workload = await self.api.merge_patch(path, patch) or workload
            except ApiError as exc:
                if exc.status not in (403, 404, 409):
                    raise
                log.warning("cannot patch Kueue Workload %s: %s", path, exc.message)
        return queueing.queue_state(queue, workload, suspended, kueue_missing=missing)

    async def _workload(self, namespace: str, job_uid: str) -> tuple[Optional[dict], bool]:
        """(Kueue Workload of the child with this uid or None, Kueue not installed)."""
        versions = [self._workload_version] if self._workload_version else list(queueing.WORKLOAD_VERSIONS)
        for version in versions:
            try:
                items = await self.api.list(queueing.workload_path(namespace, version),
                                            labelSelector=f"{queueing.JOB_UID_LABEL}={job_uid}")
            except ApiError as exc:
                if exc.status == 404:
                    continue
                if exc.status == 403:
                    if not self._workloads_denied:
                        self._workloads_denied = True
                        log.warning("cannot list Kueue workloads (%s): queued jobs show Queued/Admitted from the "
                                    "Job's suspend only; grant get/list/patch on workloads.kueue.x-k8s.io",
                                    exc.message)
                    return None, False
                raise
            self._workload_version = version
            live = [w for w in items if not (w.get("metadata") or {}).get("deletionTimestamp")]
            return (live[0] if live else None), False
        return None, True

    # -------------------------------------------------------------------------------------------- status
    async def _write(self, st: _KeyState, ftj: dict, new: dict) -> None:
        old = ftj.get("status") or {}
        patch = S.owned_changes(old, new)
        if st.unrecorded_runtime is not None:
            patch["runtime"] = st.unrecorded_runtime
        if not patch:
            return
        meta = ftj["metadata"]
        resp = await self.api.merge_patch(ftj_path(meta["namespace"], meta["name"]) + "/status", {"status": patch})
        st.unrecorded_runtime = None
        st.status = (resp or {}).get("status") or {**old, **{k: v for k, v in patch.items() if v is not None}}
        self._hold(st, resp)
        for type_, cond in S.condition_changes(old.get("conditions"), new.get("conditions")):
            await self.recorder.event(ftj, type_, cond["reason"], cond.get("message", ""))
        old_phase, new_phase = old.get("phase"), new.get("phase")
        if new_phase and new_phase != old_phase:
            self.metrics.transition(old_phase, new_phase)
            if new_phase in Phase.TERMINAL:
                seconds = S.seconds_between(new.get("startTime") or meta.get("creationTimestamp"),
                                            new.get("completionTime"))
                self.metrics.finished(str((ftj.get("spec") or {}).get("stage", "")),
                                      "succeeded" if new_phase == Phase.SUCCEEDED else "failed", seconds)

    async def record_progress(self, namespace: str, name: str, uid: str, report: TrainerReport) -> bool:
        """Write a scraped TrainerReport's progress (and partial forgetting result) while the job runs.
        Returns whether the status changed."""
        st = self._state(namespace, name)
        async with st.lock:
            if st.uid != uid or st.frozen_status is None:
                ftj = await self.api.get(ftj_path(namespace, name))
                if ftj is None or ftj["metadata"].get("uid") != uid:
                    return False
                st.uid, st.body, st.status = uid, ftj, ftj.get("status") or {}
            status = st.status
            if status.get("phase") != Phase.RUNNING:
                return False  # finished meanwhile: the termination message has the final word
            patch: dict = {}
            progress = S.progress_dict(report.progress)
            old_progress = status.get("progress") or {}
            if progress and {**old_progress, **progress} != old_progress:
                patch["progress"] = progress
            forgetting = S.forgetting_dict(report.forgetting)
            if forgetting and forgetting != status.get("forgetting"):
                patch["forgetting"] = forgetting
            if not patch:
                return False
            resp = await self.api.merge_patch(ftj_path(namespace, name) + "/status", {"status": patch})
            st.status = (resp or {}).get("status") or {**status, **patch}
            self._hold(st, resp)
            return True

    @staticmethod
    def _hold(st: _KeyState, resp: Optional[dict]) -> None:
        """Our status write's answer is the whole object, newer than any watch event before it."""
        if not st.watched:
            return
        if resp and resp.get("metadata"):
            if newer(resp, st.head):
                st.body = resp
        else:
            st.body = None  # no answer to trust: the next run GETs the FineTuneJob

    async def delete_expired(self, namespace: str, name: str, uid: str) -> bool:
        """ttlSecondsAfterFinished: delete the finished FineTuneJob (its children go with it; artifacts stay)."""
        ftj = await self.api.get(ftj_path(namespace, name))
        if ftj is None or ftj["metadata"].get("uid") != uid or not S.is_terminal(ftj.get("status")):
            return False
        log.info("deleting %s/%s: ttlSecondsAfterFinished has passed", namespace, name)
        return await self.api.delete(ftj_path(namespace, name))
