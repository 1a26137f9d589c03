"""FineTuneJob status from what the cluster shows: pure functions, no API calls.

Conditions are shaped like metav1.Condition (type, status, reason, message, lastTransitionTime,
observedGeneration); `lastTransitionTime` moves only when `status` changes. The phase is derived from the
conditions (never stored on its own): Failed > Succeeded > Suspended > Running > Pending. Succeeded and Failed
are final: once one is True, later observations do not change the conditions (the pods of a finished job may
be garbage-collected, which must not turn it into "JobMissing").

`derive_status(ftj, job, pods)` maps the workload's spec/status/conditions and its pods to the status the
operator owns. The workload is the batch/v1 Job, or for multi-node jobs the JobSet (render_jobset.py), read
the same way: its Completed/Failed conditions, spec.suspend, status.restarts (whole-gang restarts), and the
pods of its current attempt (labelled with the JobSet's uid). The trainer's final TrainerReport comes from the termination message of the pod that ended
the run (kubelet keeps it in the pod status after exit), so final progress, artifacts, the forgetting result
and a failure's explanation reach the FineTuneJob without reading logs.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from typing import Any, Iterable, Optional

from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import ExitCode, Phase, Reason
from kubetune_api.finetunejob import Progress
from kubetune_api.report import TrainerReport

from . import render_jobset as JS
from .queueing import QueueState
from .render import COMPLETION_INDEX_LABEL, CONTAINER_NAME, RUN_ID_LABEL, child_names, retries_used_by

# The status fields this operator writes (everything else under .status is left alone).
OWNED_FIELDS = ("observedGeneration", "phase", "conditions", "startTime", "completionTime", "workload",
                "restartCount", "restarts", "progress", "forgetting", "artifacts", "message",
                "gpuSeconds", "gpuUsage")
WARNING_REASONS = {Reason.INVALID_SPEC, Reason.TRAINER_ERROR, Reason.BACKOFF_LIMIT, Reason.DEADLINE,
                   Reason.POD_FAILED, Reason.RESTARTING, Reason.JOB_MISSING, Reason.FORGETTING,
                   Reason.CHILD_CONFLICT, Reason.INVALID_POD_TEMPLATE, Reason.INVALID_CONFIG, Reason.PODS_BLOCKED,
                   Reason.TRUST_REMOTE_CODE, Reason.RUNTIME_NOT_FOUND, Reason.RUNTIME_VIOLATION,
                   Reason.STORAGE_UNAVAILABLE, Reason.KUEUE_NOT_INSTALLED, Reason.JOBSET_NOT_INSTALLED}
MESSAGE_MAX = 2048


# ------------------------------------------------------------------------------------------------ time
def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def seconds_between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    a, b = parse_time(start), parse_time(end)
    return (b - a).total_seconds() if a and b else None


# ------------------------------------------------------------------------------------------------ conditions
def get_condition(conditions: Iterable[dict] | None, ctype: str) -> Optional[dict]:
    for c in conditions or []:
        if c.get("type") == ctype:
            return c
    return None


def condition_true(conditions: Iterable[dict] | None, ctype: str) -> bool:
    c = get_condition(conditions, ctype)
    return bool(c and c.get("status") == "True")


def set_condition(conditions: list[dict] | None, ctype: str, status: bool | str, reason: str, message: str,
                  generation: Optional[int], now: str) -> list[dict]:
    """Return a new list with condition `ctype` set (replaced by type, order kept, new ones appended).
    lastTransitionTime changes only when the status changes."""
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    message = _short(message or "", MESSAGE_MAX)
    out: list[dict] = []
    found = False
    for c in conditions or []:
        if c.get("type") != ctype:
            out.append(dict(c))
            continue
        found = True
        new = {"type": ctype, "status": status_str, "reason": reason, "message": message,
               "lastTransitionTime": c.get("lastTransitionTime") if c.get("status") == status_str and
               c.get("lastTransitionTime") else now}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {"type": ctype, "status": status_str, "reason": reason, "message": message, "lastTransitionTime": now}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    return out


def derive_phase(conditions: Iterable[dict] | None) -> str:
    conditions = list(conditions or [])
    if condition_true(conditions, CT.FAILED):
        return Phase.FAILED
    if condition_true(conditions, CT.SUCCEEDED):
        return Phase.SUCCEEDED
    if condition_true(conditions, CT.SUSPENDED):
        return Phase.SUSPENDED
    admitted = get_condition(conditions, CT.ADMITTED)
    if admitted is not None and admitted.get("status") == "False":
        return Phase.QUEUED
    if condition_true(conditions, CT.RUNNING):
        return Phase.RUNNING
    return Phase.PENDING


def is_terminal(status: dict | None) -> bool:
    conditions = (status or {}).get("conditions")
    return condition_true(conditions, CT.FAILED) or condition_true(conditions, CT.SUCCEEDED)


def condition_changes(old: Iterable[dict] | None, new: Iterable[dict] | None) -> list[tuple[str, dict]]:
    """(event type, condition) for each condition whose status or reason changed: what deserves an event.
    A condition that appears as False is news only when it explains a wait (queued, blocked, a conflict), not
    the plain start of every new job (Running=False/PodsPending next to JobCreated: its pods were just asked
    for; the JobCreated event says so, and one event less per job is one API write less). Pods waiting again
    later (Running True -> False, e.g. after a restart) are news. Running turning False because the job
    finished or was suspended is told by that condition's own event."""
    out = []
    old = list(old or [])
    new = list(new or [])
    told = {(c.get("reason"), c.get("message")) for c in new if c["type"] != CT.RUNNING and c.get("status") == "True"}
    for c in new:
        if c["type"] == CT.RUNNING and c.get("status") == "False" and (c.get("reason"), c.get("message")) in told:
            continue
        before = get_condition(old, c["type"])
        if before and before.get("status") == c.get("status") and before.get("reason") == c.get("reason"):
            continue
        if before is None and c.get("status") == "False" and (
                c["type"] not in (CT.RUNNING, CT.CREATED, CT.ADMITTED) or c.get("reason") == Reason.PENDING):
            continue
        warning = (c.get("reason") in WARNING_REASONS and c.get("status") == "True") or \
            c.get("reason") in (Reason.RESTARTING, Reason.JOB_MISSING, Reason.CHILD_CONFLICT, Reason.PODS_BLOCKED,
                                Reason.CHILD_FORBIDDEN, Reason.PREEMPTED, Reason.EVICTED, Reason.KUEUE_NOT_INSTALLED)
        if c["type"] == CT.FORGETTING_EXCEEDED:
            warning = c.get("status") == "True"
        out.append(("Warning" if warning else "Normal", c))
    return out


# ------------------------------------------------------------------------------------------------ numbers
def round_sig(x: Any, digits: int = 4) -> Any:
    """Round floats to `digits` significant digits (status is for people; 0.123456789 is noise)."""
    if isinstance(x, bool) or not isinstance(x, float):
        return x
    if x == 0 or not math.isfinite(x):
        return x if math.isfinite(x) else None
    return float(f"{x:.{digits}g}")


def progress_summary(step: Optional[int], total: Optional[int]) -> Optional[str]:
    if step is None:
        return None
    if not total:
        return str(step)
    return f"{step}/{total} ({int(100 * step / total)}%)"


def progress_dict(progress: Progress | dict | None) -> Optional[dict]:
    """status.progress from a TrainerReport's progress: floats rounded, summary computed."""
    if progress is None:
        return None
    data = progress.to_k8s() if isinstance(progress, Progress) else dict(progress)
    data = {k: round_sig(v) for k, v in data.items()}
    data = {k: v for k, v in data.items() if v is not None}
    summary = progress_summary(data.get("step"), data.get("totalSteps"))
    if summary:
        data["summary"] = summary
    else:
        data.pop("summary", None)
    return data or None


def forgetting_dict(forgetting) -> Optional[dict]:
    if forgetting is None:
        return None
    data = {k: round_sig(v) for k, v in forgetting.to_k8s().items()}
    return {k: v for k, v in data.items() if v is not None} or None


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ pods
def completion_index(pod: dict) -> Optional[int]:
    meta = pod.get("metadata") or {}
    value = (meta.get("labels") or {}).get(COMPLETION_INDEX_LABEL) or \
        (meta.get("annotations") or {}).get(COMPLETION_INDEX_LABEL)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def trainer_status(pod: dict) -> dict:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            return cs
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def terminated(pod: dict) -> Optional[dict]:
    cs = trainer_status(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def pod_report(pod: dict) -> Optional[TrainerReport]:
    term = terminated(pod)
    return TrainerReport.parse(term.get("message")) if term else None


def pod_is_running(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not (pod.get("metadata") or {}).get(
        "deletionTimestamp")


def pod_is_finished(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _created(pod: dict) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def pods_of_job(pods: Iterable[dict], job: dict | None) -> list[dict]:
    """The pods the given Job created (by owner reference), or the JobSet (by its uid label: they are owned by
    its child Job), oldest first."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    jobset = JS.is_jobset(job)
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        if uid is None or any(o.get("uid") == uid for o in owners) or \
                (jobset and (meta.get("labels") or {}).get(JS.JOBSET_UID_LABEL) == uid):
            out.append(pod)
    return sorted(out, key=_created)


def crash_summary(pod: dict) -> str:
    """One line about how a pod ended: the trainer's report, or the exit code and the last log line."""
    term = terminated(pod) or {}
    code = term.get("exitCode")
    report = TrainerReport.parse(term.get("message"))
    if report and report.message:
        text = f"{report.reason}: {report.message}" if report.reason else report.message
        if report.field and report.field not in text:
            text += f" (field {report.field})"
        return text
    lines = [ln.strip() for ln in (term.get("message") or "").splitlines() if ln.strip()]
    detail = lines[-1] if lines else (term.get("reason") or (pod.get("status") or {}).get("reason") or "")
    head = f"exit code {code}" if code is not None else "pod failed"
    return _short(f"{head}: {detail}" if detail else head, 1024)


def waiting_detail(pods: list[dict]) -> str:
    """Why pods are not running yet: unschedulable, image pull, missing Secret, ..."""
    for pod in pods:
        st = pod.get("status") or {}
        if st.get("phase") not in (None, "Pending"):
            continue
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"{pod['metadata']['name']}: {c.get('reason', 'Unschedulable')}: {c.get('message', '')}".strip()
        cs = trainer_status(pod)
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return f"{pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message', '')}".strip().rstrip(":")
    return ""


# ------------------------------------------------------------------------------------------------ restarts
RESTART_CAUSES = ("preempted", "killed", "crashed", "storage")
# When one pod is seen twice, the better-informed cause wins (a deleted pod may show DisruptionTarget or its
# exit code only later): preempted > storage > crashed > killed.
_CAUSE_RANK = {"killed": 0, "crashed": 1, "storage": 2, "preempted": 3}
# The trainer's exit code and report reason when the object store stayed unreachable for the whole patience
# budget (trainer storage/patience.py).
STORAGE_EXIT_CODE = ExitCode.STORAGE_UNAVAILABLE
STORAGE_REASON = Reason.STORAGE_UNAVAILABLE
SIGKILL_EXIT_CODE = 137


def disrupted(pod: dict) -> bool:
    """The pod carries DisruptionTarget=True: preempted, evicted, drained, node shutdown or lost."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def ignored_end(pod: dict) -> bool:
    """The pod's end is one the Job's podFailurePolicy ignores (render.pod_failure_policy): a disruption or a
    SIGTERM end (exit 143, checkpoint saved)."""
    return disrupted(pod) or (terminated(pod) or {}).get("exitCode") == ExitCode.PREEMPTED


def end_cause(pod: dict, job_suspended: bool = False) -> Optional[str]:
    """Why a trainer pod ended (one of RESTART_CAUSES), or None while it has not ended (or it succeeded)."""
    phase = (pod.get("status") or {}).get("phase")
    deleting = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    if phase == "Succeeded" or (phase != "Failed" and not deleting):
        return None
    if disrupted(pod) or (deleting and job_suspended):
        return "preempted"
    term = terminated(pod) or {}
    code = term.get("exitCode")
    report = TrainerReport.parse(term.get("message")) if term.get("message") else None
    if code == STORAGE_EXIT_CODE or (report is not None and report.reason == STORAGE_REASON):
        return "storage"
    if code == ExitCode.PREEMPTED or (deleting and code in (None, SIGKILL_EXIT_CODE)):
        return "killed"
    return "crashed"


def count_restarts(old: Optional[dict], pods: list[dict], job: Optional[dict]) -> dict:
    """status.restarts from the previous value and the pods of every Job of this FineTuneJob: each pod that
    ended is counted once by uid (status.restarts.pods remembers the counted pods that still exist, so neither
    an operator restart nor a pod seen twice counts it again; a pod that vanished stays counted)."""
    old = old or {}
    counts = {c: int(old.get(c) or 0) for c in RESTART_CAUSES}
    seen = dict(old.get("pods") or {})
    suspended = bool(((job or {}).get("spec") or {}).get("suspend"))
    for pod in pods:
        uid = (pod.get("metadata") or {}).get("uid")
        cause = end_cause(pod, suspended)
        if not uid or cause is None:
            continue
        before = seen.get(uid)
        if before == cause or (before in _CAUSE_RANK and _CAUSE_RANK[before] >= _CAUSE_RANK[cause]):
            continue
        if before in counts:
            counts[before] = max(0, counts[before] - 1)
        counts[cause] += 1
        seen[uid] = cause
    present = {(p.get("metadata") or {}).get("uid") for p in pods}
    if pods:  # an empty list may be an index not filled yet: forget nothing then
        seen = {uid: cause for uid, cause in seen.items() if uid in present}
    used = retries_used_by(job) + int(((job or {}).get("status") or {}).get("failed") or 0) if job else 0
    out: dict[str, Any] = {**counts, "retriesUsed": max(int(old.get("retriesUsed") or 0), used)}
    if seen:
        out["pods"] = dict(sorted(seen.items()))
    return out


def uncount(restarts: dict, pod: Optional[dict]) -> dict:
    """restarts without `pod`: the pod that ended the run is not a restart."""
    uid = ((pod or {}).get("metadata") or {}).get("uid")
    cause = (restarts.get("pods") or {}).get(uid)
    if cause is None:
        return restarts
    out = {**restarts, cause: max(0, int(restarts.get(cause) or 0) - 1),
           "pods": {k: v for k, v in restarts["pods"].items() if k != uid}}
    if not out["pods"]:
        del out["pods"]
    return out


def restart_total(restarts: Optional[dict]) -> int:
    return sum(int((restarts or {}).get(c) or 0) for c in RESTART_CAUSES)


def restarts_summary(restarts: Optional[dict]) -> str:
    """"2 preempted, 1 crashed" (causes with a count only)."""
    return ", ".join(f"{n} {c}" for c in RESTART_CAUSES if (n := int((restarts or {}).get(c) or 0)))


def _finished_at(pod: dict) -> str:
    return (terminated(pod) or {}).get("finishedAt") or _created(pod)


def pods_of_run(pods: Iterable[dict], run_id: Optional[str], job: Optional[dict]) -> list[dict]:
    """The pods of every Job this FineTuneJob had (RUN_ID_LABEL), and those of the current Job (pods from an
    operator version without the label)."""
    mine = {(p.get("metadata") or {}).get("uid") for p in pods_of_job(pods, job)} if job else set()
    return [p for p in pods if (run_id and ((p.get("metadata") or {}).get("labels") or {}).get(RUN_ID_LABEL) == run_id)
            or (p.get("metadata") or {}).get("uid") in mine]


# How long a Job may exist without pods before the reconciler concludes that its pods were deleted (the Job
# controller creates the first pods of a new Job within a moment).
PODLESS_JOB_SECONDS = 5.0


def waits_for_backoff(job: Optional[dict], pods: Iterable[dict], now: Optional[str] = None) -> Optional[str]:
    """Why the Job sits out a pod-failure backoff it should not: its pods ended in ways its podFailurePolicy
    ignores and nothing of it runs any more. None otherwise (also while the Job controller has not settled).

    The Job controller does not count such pods against backoffLimit, but it still delays their replacement by
    its exponential pod-failure backoff (10 s, 20 s, 40 s ... up to 10 min; ignored failures count too:
    kubernetes/kubernetes#130881), so a job preempted or deleted six times waited minutes for its sixth pod.
    The reconciler replaces such a Job at once instead. Two shapes: every pod of the Job failed and the newest
    one's end is ignored (ignored_end); or the Job has no pods at all a while after its creation: they were
    deleted (a crashed pod stays; the node agent or kubelet removes only pods that were deleted)."""
    if not job or (job.get("metadata") or {}).get("deletionTimestamp") or job_finished(job) or \
            (job.get("spec") or {}).get("suspend") or JS.is_jobset(job):
        return None  # a JobSet restarts its gang itself (render_jobset.py), at once
    st = job.get("status") or {}
    uncounted = st.get("uncountedTerminatedPods") or {}
    if st.get("active") or st.get("terminating") or st.get("ready") or uncounted.get("failed") or \
            uncounted.get("succeeded"):
        return None
    mine = pods_of_job(pods, job)
    if not mine:
        age = seconds_between((job.get("metadata") or {}).get("creationTimestamp"), now or now_rfc3339())
        if age is None or age < PODLESS_JOB_SECONDS or not st.get("startTime"):
            return None
        return "its pod was deleted"
    if any((p.get("status") or {}).get("phase") != "Failed" for p in mine):
        return None
    newest = max(mine, key=_finished_at)
    if not ignored_end(newest):
        return None
    return f"pod {newest['metadata']['name']} was {end_cause(newest) or 'stopped'} ({crash_summary(newest)})"


# ------------------------------------------------------------------------------------------------ cost
RUNNING_RESOLUTION_SECONDS = 60
CLOSED_PODS_KEPT = 64  # uids of ended pods remembered (a pod is counted once even if it lingers in the cache)


def pod_run_interval(pod: dict) -> tuple[Optional[str], Optional[str]]:
    """(start, end) of the trainer container in this pod: start from the running/terminated state (the pod's
    startTime when the container never reported one), end when terminated (None while it runs or never ran)."""
    cs = trainer_status(pod)
    state = cs.get("state") or {}
    term = state.get("terminated")
    start = (state.get("running") or {}).get("startedAt") or (term or {}).get("startedAt")
    if term:
        return start or (pod.get("status") or {}).get("startTime"), term.get("finishedAt") or None
    if state.get("running"):
        return start or (pod.get("status") or {}).get("startTime"), None
    return None, None  # waiting: not started, nothing held yet (scheduling and image pulls are not charged)


def gpu_usage(old: Optional[dict], pods: Iterable[dict], gpus_per_pod: int, now: str) -> tuple[dict, int]:
    """(status.gpuUsage, status.gpuSeconds): GPUs x run time of every trainer pod the operator has seen.

    Level-based and restart-safe: ended pods are added to `closedSeconds` once (their uids are remembered in
    `closedPods`); running pods are kept in `openPods` with their start and counted up to `now` (in whole
    minutes; exact once they end). A pod that
    vanished while open (deleted on preemption or suspend before the operator saw its end) is closed at `now`,
    the moment the operator noticed: its end is not known, it held its GPUs at least until it was last seen
    and at most until now. Time without pods (queued, suspended) is never counted."""
    old = old or {}
    closed = float(old.get("closedSeconds") or 0)
    closed_pods = list(old.get("closedPods") or [])
    open_pods = {p["uid"]: dict(p) for p in old.get("openPods") or [] if p.get("uid")}
    seen = set()
    for pod in pods:
        uid = (pod.get("metadata") or {}).get("uid")
        if not uid:
            continue
        seen.add(uid)
        if uid in closed_pods:
            continue
        start, end = pod_run_interval(pod)
        if start is None:
            continue
        gpus = int(open_pods.get(uid, {}).get("gpus", gpus_per_pod))
        if end is not None:
            closed += max(0.0, seconds_between(start, end) or 0.0) * gpus
            closed_pods.append(uid)
            open_pods.pop(uid, None)
        elif uid not in open_pods:
            open_pods[uid] = {"uid": uid, "start": start, "gpus": gpus}
    for uid, p in list(open_pods.items()):
        if uid not in seen:
            closed += max(0.0, seconds_between(p["start"], now) or 0.0) * int(p["gpus"])
            closed_pods.append(uid)
            del open_pods[uid]
    # Running pods count in whole minutes: reconciles within a minute write nothing new (no status churn).
    running = sum(RUNNING_RESOLUTION_SECONDS * (max(0.0, seconds_between(p["start"], now) or 0.0)
                                                // RUNNING_RESOLUTION_SECONDS) * int(p["gpus"])
                  for p in open_pods.values())
    # Both lists always present (maybe empty): the status is merge-patched, where a missing key keeps the old value
    usage: dict = {"closedSeconds": round(closed, 3), "closedPods": closed_pods[-CLOSED_PODS_KEPT:],
                   "openPods": sorted(open_pods.values(), key=lambda p: (p["start"], p["uid"]))}
    return usage, int(round(closed + running))


def _account(out: dict, old: dict, pods: list[dict], spec: dict, now: str) -> None:
    gpus = int((spec.get("resources") or {}).get("gpus", 1) or 0)
    usage, seconds = gpu_usage(old.get("gpuUsage"), pods, gpus, now)
    if not old.get("gpuUsage") and not usage["openPods"] and not usage["closedPods"]:
        return  # no pod has started (or none exists): no status write just to say "0" (one per new job)
    out["gpuUsage"] = usage
    out["gpuSeconds"] = max(seconds, int(old.get("gpuSeconds") or 0))  # never goes down (a counter)


# ------------------------------------------------------------------------------------------------ Job
def job_condition(job: dict, *types: str) -> Optional[dict]:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in types and c.get("status") == "True":
            return c
    return None


def job_succeeded(job: dict) -> Optional[dict]:
    return job_condition(job, "Complete", "SuccessCriteriaMet", "Completed")  # Completed: a JobSet


def job_failed(job: dict) -> Optional[dict]:
    # FailureTarget comes first (the Job is doomed, pods are being terminated), Failed when they are gone.
    return job_condition(job, "Failed") or job_condition(job, "FailureTarget")


def job_finished(job: dict | None) -> bool:
    return bool(job and (job_succeeded(job) or job_failed(job)))


def _failed_pod(pods: list[dict]) -> Optional[dict]:
    """The pod that ended the run: one that exited with a permanent code, else the latest failed one."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" or
              (terminated(p) or {}).get("exitCode") not in (None, 0)]
    for p in reversed(failed):
        if (terminated(p) or {}).get("exitCode") in ExitCode.PERMANENT:
            return p
    return failed[-1] if failed else None


def _final_report(pods: list[dict], succeeded: bool) -> Optional[TrainerReport]:
    """The trainer's last word: rank 0's latest report on success, the failing pod's on failure."""
    if succeeded:
        candidates = [p for p in pods if completion_index(p) in (0, None) and
                      (p.get("status") or {}).get("phase") == "Succeeded"]
    else:
        fp = _failed_pod(pods)
        candidates = [fp] if fp else []
    for pod in reversed(candidates):
        report = pod_report(pod)
        if report is not None:
            return report
    # rank 0 may have failed while another rank reported; fall back to any report, newest first
    for pod in reversed(pods):
        report = pod_report(pod)
        if report is not None:
            return report
    return None


def _earliest_start(pods: list[dict]) -> Optional[str]:
    times = []
    for pod in pods:
        cs = trainer_status(pod)
        state = cs.get("state") or {}
        t = (state.get("running") or {}).get("startedAt") or (state.get("terminated") or {}).get("startedAt")
        t = t or (pod.get("status") or {}).get("startTime")
        if t:
            times.append(t)
    return min(times) if times else None


def _failure(job: dict, pods: list[dict], spec: dict) -> tuple[str, str]:
    cond = job_failed(job) or {}
    fp = _failed_pod(pods)
    detail = crash_summary(fp) if fp else ""
    job_reason = cond.get("reason")
    code = (terminated(fp) or {}).get("exitCode") if fp else None
    if code == ExitCode.STORAGE_UNAVAILABLE:
        # Its own reason: not a bad spec, and not a crash that a retry could fix (the trainer already waited
        # out the patience budget); the trainer's message names the endpoint and the failing call.
        return Reason.STORAGE_UNAVAILABLE, detail or "the object store stayed unreachable for the patience budget"
    if JS.is_jobset(job):
        # the JobSet's own words: its failurePolicy failed it on a permanent exit code, or ran out of restarts
        job_reason = {JS.REASON_FAIL_ACTION: "PodFailurePolicy",
                      JS.REASON_MAX_RESTARTS: "BackoffLimitExceeded"}.get(job_reason, job_reason)
    if job_reason == "PodFailurePolicy" or code in ExitCode.PERMANENT:
        return Reason.TRAINER_ERROR, detail or cond.get("message") or "the trainer exited with a permanent error"
    if job_reason == "BackoffLimitExceeded":
        limit = spec.get("retryLimit", 3)
        msg = f"retryLimit {limit} exhausted"
        return Reason.BACKOFF_LIMIT, f"{msg}; last failure: {detail}" if detail else msg
    if job_reason == "DeadlineExceeded":
        return Reason.DEADLINE, (f"ran longer than activeDeadlineSeconds "
                                 f"{spec.get('activeDeadlineSeconds', job.get('spec', {}).get('activeDeadlineSeconds'))}")
    return Reason.POD_FAILED, detail or cond.get("message") or f"the Job failed ({job_reason})"


# ------------------------------------------------------------------------------------------------ derive
def base_status(old: dict) -> dict:
    """A copy of the owned fields of a status."""
    return {k: copy.deepcopy(old[k]) for k in OWNED_FIELDS if k in old}


def _refresh_generation(conditions: list[dict], generation: Optional[int]) -> list[dict]:
    if generation is None:
        return conditions
    return [{**c, "observedGeneration": generation} for c in conditions]


def _apply_report(out: dict, report: Optional[TrainerReport]) -> None:
    if report is None:
        return
    progress = progress_dict(report.progress)
    if progress:
        out["progress"] = {**(out.get("progress") or {}), **progress}
    forgetting = forgetting_dict(report.forgetting)
    if forgetting:
        out["forgetting"] = forgetting
    if report.artifacts is not None:
        artifacts = report.artifacts.to_k8s()
        if artifacts:
            out["artifacts"] = artifacts


def _forgetting_condition(conds: list[dict], forgetting: Optional[dict], gen, now) -> list[dict]:
    if not forgetting or forgetting.get("exceeded") is None:
        return conds
    rel, thr = forgetting.get("relativeChange"), forgetting.get("threshold")
    before, after = forgetting.get("referencePerplexityBefore"), forgetting.get("referencePerplexityAfter")
    detail = f"reference perplexity {before} -> {after}"
    if rel is not None:
        detail += f" ({rel:+.1%}"
        detail += f", threshold {thr:.0%})" if thr is not None else ")"
    if forgetting["exceeded"]:
        return set_condition(conds, CT.FORGETTING_EXCEEDED, True, Reason.FORGETTING,
                             f"catastrophic forgetting: {detail}", gen, now)
    return set_condition(conds, CT.FORGETTING_EXCEEDED, False, Reason.WITHIN_THRESHOLD, detail, gen, now)


def blocked_field(message: str) -> str:
    """The spec field behind a pod-creation refusal (the Job controller's FailedCreate event message)."""
    text = message.lower()
    if "priorityclass" in text:
        return "spec.resources.priorityClassName"
    if "serviceaccount" in text or "service account" in text:
        return "spec.runtimeRef"  # the runtime names the ServiceAccount
    if "quota" in text or "limitrange" in text or "maximum" in text or "minimum" in text:
        return "spec.resources"
    return "spec.resources"


def blocked_message(event_message: str) -> str:
    return (f"{blocked_field(event_message)}: Kubernetes does not create the trainer pods: "
            f"{_short(event_message.strip(), 1024)}")


def _remote_code_condition(conds: list[dict], spec: dict, gen, now) -> list[dict]:
    """spec.model.trustRemoteCode runs Python from the model's repository inside the trainer pod: a reviewer
    must be able to see that on the object (`kubectl describe`, a Warning event), not only in the spec."""
    model = spec.get("model") or {}
    if model.get("trustRemoteCode"):
        return set_condition(conds, CT.TRUSTS_REMOTE_CODE, True, Reason.TRUST_REMOTE_CODE,
                             f"spec.model.trustRemoteCode is true: the trainer runs Python code from the "
                             f"repository of {model.get('source', 'the model')}", gen, now)
    if get_condition(conds, CT.TRUSTS_REMOTE_CODE):
        return [c for c in conds if c.get("type") != CT.TRUSTS_REMOTE_CODE]
    return conds


def derive_status(ftj: dict, job: Optional[dict], pods: Iterable[dict], now: Optional[str] = None,
                  blocked: Optional[str] = None, queue: Optional[QueueState] = None) -> dict:
    """The operator-owned status fields of `ftj`, given its child Job (None if absent) and the Job's pods.
    `blocked`: the Job controller's latest FailedCreate event message while pods are missing (ResourceQuota,
    missing PriorityClass or ServiceAccount, ...). Idempotent: feeding the result back (as ftj.status) with the
    same inputs gives the same result. `queue`: what Kueue says about a queued job's child (queueing.queue_state),
    None without a queue. `pods`: every trainer pod of the FineTuneJob (those of earlier Jobs too: they are
    charged in gpuSeconds)."""
    now = now or now_rfc3339()
    meta = ftj.get("metadata") or {}
    spec = ftj.get("spec") or {}
    old = ftj.get("status") or {}
    gen = meta.get("generation")
    out = base_status(old)
    conds: list[dict] = copy.deepcopy(old.get("conditions") or [])
    out["observedGeneration"] = gen

    if is_terminal(old):
        out["conditions"] = _refresh_generation(conds, gen)
        out["phase"] = derive_phase(conds)
        return out

    conds = _remote_code_condition(conds, spec, gen, now)
    pods = list(pods)
    _account(out, old, pods, spec, now)
    names = child_names(meta.get("name", ""))
    nodes = int((spec.get("resources") or {}).get("nodes", 1) or 1)

    if job is None:
        if condition_true(conds, CT.CREATED):
            msg = f"the trainer Job {names.job} no longer exists; the operator re-creates it (training resumes " \
                  "from the latest checkpoint)"
            conds = set_condition(conds, CT.CREATED, False, Reason.JOB_MISSING, msg, gen, now)
            if get_condition(conds, CT.RUNNING):
                conds = set_condition(conds, CT.RUNNING, False, Reason.JOB_MISSING, msg, gen, now)
            out["message"] = msg
        out["conditions"] = conds
        out["phase"] = derive_phase(conds)
        return out

    all_pods = list(pods)
    pods = pods_of_job(all_pods, job)
    job_meta = job.get("metadata") or {}
    jobset = JS.is_jobset(job)
    conds = set_condition(conds, CT.CREATED, True, Reason.JOB_CREATED,
                          f"{JS.KIND if jobset else 'Job'} {job_meta.get('name', names.job)} created", gen, now)
    workload = {"kind": JS.KIND if jobset else "Job", "name": job_meta.get("name", names.job),
                "configMap": names.config_map}
    if nodes > 1:
        workload["service"] = names.service
    out["workload"] = workload
    ledger = count_restarts(old.get("restarts"), pods_of_run(all_pods, meta.get("uid"), job), job)
    js_status = (job.get("status") or {}) if jobset else {}
    if jobset:
        # JobSet's own count of restarts that used up maxRestarts (= retryLimit): disruptions and SIGTERM ends don't
        ledger["retriesUsed"] = max(int(ledger.get("retriesUsed") or 0),
                                    int(js_status.get("restartsCountTowardsMax") or 0))

    succeeded, failed = job_succeeded(job), job_failed(job)
    if failed:
        ledger = uncount(ledger, _failed_pod(pods))
    restarts = restart_total(ledger)
    if jobset:  # whole-gang restarts (status.restarts counts the pods that ended, by cause)
        restarts = max(int(old.get("restartCount") or 0), int(js_status.get("restarts") or 0))
    if restarts or old.get("restarts") or any(ledger.get(k) for k in ("retriesUsed", "pods")):
        out["restarts"] = ledger
        out["restartCount"] = restarts
    if succeeded or failed:
        report = _final_report(pods, bool(succeeded))
        _apply_report(out, report)
        out["startTime"] = old.get("startTime") or _earliest_start(pods) or \
            (job.get("status") or {}).get("startTime") or now
        if succeeded:
            msg = "training finished"
            adapter = (out.get("artifacts") or {}).get("adapterUri")
            if adapter:
                msg += f"; adapter at {adapter}"
            conds = set_condition(conds, CT.SUCCEEDED, True, Reason.SUCCEEDED, msg, gen, now)
            conds = set_condition(conds, CT.RUNNING, False, Reason.SUCCEEDED, msg, gen, now)
            out["completionTime"] = (job.get("status") or {}).get("completionTime") or \
                succeeded.get("lastTransitionTime") or now
        else:
            reason, msg = _failure(job, pods, spec)
            conds = set_condition(conds, CT.FAILED, True, reason, msg, gen, now)
            conds = set_condition(conds, CT.RUNNING, False, reason, msg, gen, now)
            out["completionTime"] = failed.get("lastTransitionTime") or now
        if condition_true(conds, CT.SUSPENDED):
            conds = set_condition(conds, CT.SUSPENDED, False, Reason.RESUMED, "the job finished", gen, now)
        out["message"] = msg
        conds = _forgetting_condition(conds, out.get("forgetting"), gen, now)
    elif queue is not None and (job.get("spec") or {}).get("suspend") and not spec.get("suspend"):
        # Kueue holds the Job: not admitted yet, or evicted (preempted) and requeued; or admitted a moment ago
        # and about to unsuspend it
        admitted = queue.state == "admitted"
        conds = set_condition(conds, CT.ADMITTED, admitted, queue.reason, queue.message, gen, now)
        conds = set_condition(conds, CT.RUNNING, False, Reason.PENDING if admitted else queue.reason,
                              queue.message, gen, now)
        if condition_true(conds, CT.SUSPENDED):
            conds = set_condition(conds, CT.SUSPENDED, False, Reason.RESUMED,
                                  "resumed: queued for Kueue admission", gen, now)
        out["message"] = queue.message
    elif (job.get("spec") or {}).get("suspend"):
        msg = "suspended: the trainer pods are deleted (they checkpoint on SIGTERM); unsuspend to resume"
        if queue is not None:
            msg = "suspended: the Kueue Workload is deactivated and the trainer pods are deleted (they " \
                  "checkpoint on SIGTERM); unsuspend to queue it again"
        conds = set_condition(conds, CT.SUSPENDED, True, Reason.SUSPENDED, msg, gen, now)
        conds = set_condition(conds, CT.RUNNING, False, Reason.SUSPENDED, msg, gen, now)
        out["message"] = msg
    else:
        if queue is not None and queue.state == "admitted":
            conds = set_condition(conds, CT.ADMITTED, True, queue.reason, queue.message, gen, now)
        if get_condition(conds, CT.SUSPENDED) and condition_true(conds, CT.SUSPENDED):
            conds = set_condition(conds, CT.SUSPENDED, False, Reason.RESUMED,
                                  "resumed: training continues from the latest checkpoint", gen, now)
        live = [p for p in pods if not pod_is_finished(p) and not (p.get("metadata") or {}).get("deletionTimestamp")]
        running = [p for p in live if pod_is_running(p)]
        n_running = len(running) or (0 if pods else int((job.get("status") or {}).get("ready") or 0))
        # a pod that finished successfully still counts until the Job controller marks the Job Complete
        done = {completion_index(p) for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"}
        if (n_running or done) and n_running + len(done) >= nodes:
            msg = f"{n_running}/{nodes} trainer pod(s) running" if n_running else \
                "all trainer pods finished; waiting for the Job to complete"
            if restarts:
                summary = restarts_summary(ledger)  # empty for a JobSet whose pods were all deleted
                msg += f" after {restarts} restart(s)" + (f" ({summary})" if summary else "")
            conds = set_condition(conds, CT.RUNNING, True, Reason.RUNNING, msg, gen, now)
            out["startTime"] = old.get("startTime") or _earliest_start(running or pods) or now
        else:
            failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
            if failed_pods:
                limit = spec.get("retryLimit", 3)
                last = failed_pods[-1]
                used = f"{ledger.get('retriesUsed', 0)} of retryLimit {limit} used"
                if jobset:
                    msg = f"{last['metadata']['name']} failed ({crash_summary(last)}); the JobSet restarts the " \
                          f"whole gang from the latest checkpoint ({used}; preemption and SIGTERM do not count)"
                elif ignored_end(last):
                    msg = f"{last['metadata']['name']} was {end_cause(last) or 'stopped'} " \
                          f"({crash_summary(last)}); starting a replacement (not counted against retryLimit: {used})"
                else:
                    msg = f"{last['metadata']['name']} failed ({crash_summary(last)}); retrying ({used})"
                conds = set_condition(conds, CT.RUNNING, False, Reason.RESTARTING, msg, gen, now)
            elif blocked and len(live) < nodes:
                msg = blocked_message(blocked)
                conds = set_condition(conds, CT.RUNNING, False, Reason.PODS_BLOCKED, msg, gen, now)
            else:
                msg = f"{n_running}/{nodes} trainer pod(s) running"
                detail = waiting_detail(live)
                if detail:
                    msg += f"; {detail}"
                conds = set_condition(conds, CT.RUNNING, False, Reason.PENDING, msg, gen, now)
        out["message"] = msg

    out["conditions"] = _refresh_generation(conds, gen)
    out["phase"] = derive_phase(conds)
    return out


def held_status(ftj: dict, queue: str, pods: list[dict], now: Optional[str] = None) -> dict:
    """Status of a queued FineTuneJob suspended before its Job exists (or after the pods of one that was deleted
    are gone): no Job, so Kueue has nothing to admit until spec.suspend is false."""
    now = now or now_rfc3339()
    old = ftj.get("status") or {}
    gen = (ftj.get("metadata") or {}).get("generation")
    out = base_status(old)
    msg = f"suspended before Kueue admission: the trainer Job is created (and queued in LocalQueue {queue}) " \
          "when spec.suspend is false"
    conds = set_condition(old.get("conditions"), CT.SUSPENDED, True, Reason.SUSPENDED, msg, gen, now)
    if get_condition(conds, CT.RUNNING):
        conds = set_condition(conds, CT.RUNNING, False, Reason.SUSPENDED, msg, gen, now)
    _account(out, old, pods, ftj.get("spec") or {}, now)
    out.update({"observedGeneration": gen, "conditions": conds, "phase": derive_phase(conds), "message": msg})
    return out


def invalid_spec_status(ftj: dict, message: str, now: Optional[str] = None, reason: str = Reason.INVALID_SPEC) -> dict:
    """Status of a FineTuneJob whose spec cannot run (nothing is created for it): Failed with `reason`
    (InvalidSpec; InvalidPodTemplate or ConfigTooLarge when the API server refused a rendered child)."""
    now = now or now_rfc3339()
    old = ftj.get("status") or {}
    gen = (ftj.get("metadata") or {}).get("generation")
    out = base_status(old)
    conds = set_condition(old.get("conditions"), CT.FAILED, True, reason, message, gen, now)
    out.update({"observedGeneration": gen, "conditions": conds, "phase": derive_phase(conds),
                "completionTime": old.get("completionTime") or now, "message": _short(message, MESSAGE_MAX)})
    return out


def owned_changes(old_status: dict | None, new_status: dict) -> dict:
    """The merge patch that turns old into new for the owned fields ({} when nothing changed)."""
    old_status = old_status or {}
    patch = {}
    for key in OWNED_FIELDS:
        if key in new_status and new_status[key] != old_status.get(key):
            patch[key] = new_status[key]
        elif key not in new_status and key in old_status and key in ("message",):
            patch[key] = None
    return patch
