"""Kueue admission of a FineTuneJob's trainer workload: which labels the child Job (or JobSet) gets, who owns its
`spec.suspend`, and what Kueue's Workload says about it. Pure functions, no API calls: both renderers (the
batch/v1 Job and the JobSet of multi-node jobs) call `workload_labels()` and `initial_suspend()`, and the
reconciler calls `suspend_patch()` and `workload_active_patch()` to align a live child.

The contract with Kueue (v0.17, integrations batch/job and jobset.x-k8s.io/jobset):
- A queued FineTuneJob names a LocalQueue with `spec.queueName` or its own label `kueue.x-k8s.io/queue-name`
  (the field wins). Its child is created suspended, labelled `kueue.x-k8s.io/queue-name` (and
  `kueue.x-k8s.io/priority-class` for `spec.workloadPriorityClassName`); Kueue creates a Workload for it and
  admits it by setting `suspend: false`, evicts (preempts) it by setting `suspend: true`.
- Kueue owns the child's `suspend` from then on: the operator never writes it, in either direction. Kueue
  re-starts an admitted Job that someone else suspends, so the FineTuneJob's own `spec.suspend: true` is
  delivered as Kueue's documented stop switch instead: the Workload's `spec.active: false` (Kueue evicts the
  Job, its pods checkpoint on SIGTERM, and the quota is released); `spec.suspend: false` sets it back to
  true, only on a Workload this operator deactivated (marked with DEACTIVATED_ANNOTATION), so a Workload
  Kueue itself deactivated (e.g. requeueing limit) stays as Kueue left it.
- Without a queue, the child's `suspend` follows `spec.suspend`, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kubetune_api import constants as C
from kubetune_api.finetunejob import FineTuneJob

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue labels each Workload with its Job's uid
WORKLOAD_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSIONS = ("v1beta2", "v1beta1")  # v1beta2 is stored since Kueue 0.15; older releases serve v1beta1
# On a Workload the operator deactivated for spec.suspend: true (it reactivates only those).
DEACTIVATED_ANNOTATION = f"{C.GROUP}/deactivated-for-suspend"


def queue_name(job: FineTuneJob) -> Optional[str]:
    """The LocalQueue the job waits in: spec.queueName, else the FineTuneJob's kueue.x-k8s.io/queue-name label."""
    return job.spec.queue_name or (job.metadata.labels or {}).get(QUEUE_LABEL) or None


def priority_class(job: FineTuneJob) -> Optional[str]:
    return job.spec.workload_priority_class_name or (job.metadata.labels or {}).get(PRIORITY_LABEL) or None


def problems(job: FineTuneJob) -> list[str]:
    """What cannot work: a WorkloadPriorityClass means nothing to Kueue without a queue."""
    if job.spec.workload_priority_class_name and not queue_name(job):
        return ["spec.workloadPriorityClassName: needs a Kueue queue; set spec.queueName to a LocalQueue of this "
                "namespace (or remove workloadPriorityClassName)"]
    return []


def workload_labels(job: FineTuneJob) -> dict[str, str]:
    """Labels for the child Job/JobSet's metadata: what Kueue's webhook and job reconciler read."""
    queue = queue_name(job)
    if not queue:
        return {}
    labels = {QUEUE_LABEL: queue}
    prio = priority_class(job)
    if prio:
        labels[PRIORITY_LABEL] = prio
    return labels


def initial_suspend(job: FineTuneJob) -> bool:
    """`spec.suspend` of a new child: always true with a queue (Kueue admits it by unsuspending; its webhook
    would suspend it anyway), else the FineTuneJob's own."""
    return True if queue_name(job) else bool(job.spec.suspend)


def suspend_patch(job: FineTuneJob, live_suspend: Optional[bool]) -> Optional[bool]:
    """The `spec.suspend` to write to a live child, or None to leave it alone. With a queue: always None
    (Kueue decides; see the module docstring for how spec.suspend reaches it)."""
    if queue_name(job):
        return None
    want = bool(job.spec.suspend)
    return want if bool(live_suspend) != want else None


def workload_active_patch(job: FineTuneJob, workload: Optional[dict]) -> Optional[dict]:
    """The merge patch for the Kueue Workload that carries spec.suspend to Kueue, or None when nothing to do."""
    if workload is None or not queue_name(job):
        return None
    active = (workload.get("spec") or {}).get("active", True) is not False
    ours = DEACTIVATED_ANNOTATION in ((workload.get("metadata") or {}).get("annotations") or {})
    if job.spec.suspend and active:
        return {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: "true"}}, "spec": {"active": False}}
    if not job.spec.suspend and not active and ours:
        return {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: None}}, "spec": {"active": True}}
    if not job.spec.suspend and active and ours:
        return {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: None}}}
    return None


def workload_path(namespace: str, version: str = WORKLOAD_VERSIONS[0]) -> str:
    return f"/apis/{WORKLOAD_GROUP}/{version}/namespaces/{namespace}/workloads"


# ------------------------------------------------------------------------------------------------ status
@dataclass(frozen=True)
class QueueState:
    """What the FineTuneJob's status says about Kueue. `state`: waiting | admitted | evicted | inactive."""

    state: str
    reason: str
    message: str


def _condition(workload: dict, ctype: str) -> Optional[dict]:
    for c in (workload.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def _true(c: Optional[dict]) -> bool:
    return bool(c and c.get("status") == "True")


def queue_state(queue: str, workload: Optional[dict], child_suspended: bool,
                kueue_missing: bool = False) -> QueueState:
    """Interpret the child's suspend state and its Workload's conditions (Kueue's own words in the messages).

    - admitted: the child runs (not suspended) or the Workload is Admitted;
    - evicted: the Workload's Evicted condition is True (Preempted, Deactivated, ...): Kueue stopped a running
      job; it is requeued and resumes from its latest checkpoint when admitted again;
    - inactive: the Workload is deactivated (spec.active false);
    - waiting: not admitted yet (the QuotaReserved/Pending message says why, e.g. insufficient quota)."""
    where = f"LocalQueue {queue}"
    if kueue_missing:
        return QueueState("waiting", "KueueNotInstalled",
                          f"spec.queueName: {queue} is set but this cluster does not serve "
                          "workloads.kueue.x-k8s.io, so nothing admits the trainer Job: install Kueue or remove "
                          "spec.queueName (and the kueue.x-k8s.io/queue-name label)")
    admission = ((workload or {}).get("status") or {}).get("admission") or {}
    cq = admission.get("clusterQueue")
    if workload is not None:
        evicted = _condition(workload, "Evicted")
        deactivated_then_resumed = (evicted or {}).get("reason") == "Deactivated" and \
            (workload.get("spec") or {}).get("active") is not False
        if _true(evicted) and child_suspended and not deactivated_then_resumed:
            reason = evicted.get("reason") or "Evicted"
            text = "preempted" if reason == "Preempted" else f"evicted ({reason})"
            return QueueState("evicted", "Preempted" if reason == "Preempted" else "Evicted",
                              f"{text} by Kueue: {evicted.get('message', '').strip()}; requeued in {where}, "
                              "training resumes from the latest checkpoint when admitted again")
        if (workload.get("spec") or {}).get("active") is False:
            return QueueState("inactive", "WorkloadInactive",
                              f"the Kueue Workload {workload['metadata'].get('name')} is deactivated: Kueue does not "
                              "admit it until it is active again")
        if _true(_condition(workload, "Admitted")) or (not child_suspended and cq):
            return QueueState("admitted", "Admitted", f"admitted by Kueue: ClusterQueue {cq} ({where})")
        requeued = _condition(workload, "Requeued")
        pending = _condition(workload, "QuotaReserved")
        detail = (pending or {}).get("message") if pending and pending.get("status") == "False" else ""
        prefix = "requeued after eviction; " if requeued and requeued.get("status") == "True" and \
            requeued.get("reason") not in (None, "", "Pending") else ""
        return QueueState("waiting", "WaitingForAdmission",
                          f"{prefix}waiting in {where} for Kueue to admit it" + (f": {detail}" if detail else ""))
    if not child_suspended:
        return QueueState("admitted", "Admitted", f"admitted by Kueue ({where})")
    return QueueState("waiting", "WaitingForAdmission", f"waiting in {where} for Kueue to admit it")
