"""Render the JobSet (jobset.x-k8s.io/v1alpha2) that runs a multi-node FineTuneJob (`spec.resources.nodes > 1`).
Pure, like render.py (which renders everything else and calls `render_jobset` for multi-node jobs); single-node
jobs stay plain batch/v1 Jobs, so a cluster without JobSet runs them.

Why a JobSet and not an Indexed Job + headless Service: a gang of N torchrun nodes is useless with one member
gone. The Job controller replaces only the failed pod, while the survivors sit in a collective until the 2 h
timeout and then fail too, each failure counted against backoffLimit. JobSet restarts the whole gang instead
and owns the gang's DNS identity:

- one replicatedJob `node` (replicas 1): one child Job `<name>-node-0`, Indexed, completions = parallelism =
  nodes, backoffLimit 0 (any failed pod fails the child Job; the Job controller stops the other pods at once);
- network.enableDNSHostnames with subdomain `<name>-workers`: pod i is `<name>-node-0-<i>.<name>-workers`, so
  rank 0's address (MASTER_ADDR, render.rendezvous_host) is known before any pod exists;
- failurePolicy: maxRestarts = spec.retryLimit, restartStrategy BlockingRecreate (the next gang starts only
  after every pod of the last one is gone: a pod still uploading its SIGTERM checkpoint is not raced), and
  rules on the child Job's failure, which its podFailurePolicy (POD_FAILURE_RULES) classifies:
    FailJob rule 0, the trainer's permanent exit codes (bad config/data, NaN loss, forgetting) -> FailJobSet;
    FailJob rule 1 (pod condition DisruptionTarget: preempted, evicted, drained) and rule 2 (exit 143: SIGTERM
    after a checkpoint, e.g. a deleted pod) -> RestartJobSetAndIgnoreMaxRestarts;
    anything else (a crash, OOM) -> the default RestartJobSet, counted against maxRestarts.
  The JobSet controller tells the rules apart by the child Job's Failed condition: reason PodFailurePolicy and
  the Job controller's message "... matching FailJob rule at index N".
  The restarted gang resumes from the run's latest checkpoint (the trainer always does, same run id).
- spec.suspend mirrors the FineTuneJob's (reconciler.desired_suspend decides it).

Names: the JobSet is `<name>` (FineTuneJob names are at most 50 characters and nodes at most 1024, so pod
hostnames `<name>-node-0-<i>` stay within the 63 characters of a DNS label).
"""

from __future__ import annotations

from typing import Any, Optional

from kubetune_api import constants as C
from kubetune_api.finetunejob import FineTuneJob

API_VERSION = "jobset.x-k8s.io/v1alpha2"
KIND = "JobSet"
PLURAL = "jobsets"
GROUP = "jobset.x-k8s.io"
REPLICATED_JOB = "node"
# Labels the JobSet controller puts on its Jobs and pods.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"

# Reasons the JobSet controller gives its Failed condition (sigs.k8s.io/jobset pkg/constants).
REASON_MAX_RESTARTS = "ReachedMaxRestarts"
REASON_FAIL_ACTION = "FailJobSetFailurePolicyAction"

# podFailurePolicy rule indexes of the child Job: the JobSet's failurePolicy rules match on them.
RULE_PERMANENT, RULE_DISRUPTION, RULE_SIGTERM = 0, 1, 2


def jobset_name(name: str) -> str:
    return name


def subdomain(name: str) -> str:
    """The headless Service JobSet creates for the gang's DNS names (the name the Indexed Job used too)."""
    return f"{name}-workers"


def pod_hostname(name: str, index: int) -> str:
    return f"{jobset_name(name)}-{REPLICATED_JOB}-0-{index}"


def child_job_name(name: str) -> str:
    return f"{jobset_name(name)}-{REPLICATED_JOB}-0"


def pod_failure_policy(container: str) -> dict:
    """The child Job's podFailurePolicy: every failure that must not simply count as a crash is FailJob, so the
    JobSet's failurePolicy (which sees only Job failures) can tell them apart by rule index."""
    return {"rules": [
        {"action": "FailJob",  # RULE_PERMANENT
         "onExitCodes": {"containerName": container, "operator": "In", "values": sorted(C.ExitCode.PERMANENT)}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},  # RULE_DISRUPTION
        {"action": "FailJob",  # RULE_SIGTERM
         "onExitCodes": {"containerName": container, "operator": "In", "values": [C.ExitCode.PREEMPTED]}},
    ]}


def _rule_pattern(*indexes: int) -> str:
    alternatives = "|".join(str(i) for i in indexes)
    return f"matching FailJob rule at index ({alternatives})$"


def failure_policy(retry_limit: int) -> dict:
    return {
        "maxRestarts": retry_limit,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "PermanentError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [_rule_pattern(RULE_PERMANENT)]},
            {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [_rule_pattern(RULE_DISRUPTION, RULE_SIGTERM)]},
        ],
    }


def render_jobset(job: FineTuneJob, labels: dict, pod_template: dict, suspend: bool, container: str) -> dict:
    """The JobSet for a multi-node job, without metadata: render.py adds it (name, labels, owner reference,
    template hash) and renders `labels` and `pod_template` the same way as for single-node Jobs."""
    spec = job.spec
    nodes = spec.resources.nodes
    name = job.metadata.name
    template = {**pod_template, "spec": {**pod_template["spec"]}}
    # JobSet sets hostname and subdomain itself (enableDNSHostnames); a subdomain in the template would clash.
    template["spec"].pop("subdomain", None)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        # Any failed pod fails the child Job at once, and the JobSet restarts the gang (failurePolicy).
        "backoffLimit": 0,
        "podFailurePolicy": pod_failure_policy(container),
        "template": template,
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    js_spec: dict[str, Any] = {
        "suspend": suspend,
        "network": {"enableDNSHostnames": True, "subdomain": subdomain(name), "publishNotReadyAddresses": True},
        "failurePolicy": failure_policy(spec.retry_limit),
        "replicatedJobs": [{
            "name": REPLICATED_JOB,
            "replicas": 1,
            # The child Job carries kubetune's labels too (kubectl get jobs -l kubetune.dev/job-name=...).
            "template": {"metadata": {"labels": dict(labels)}, "spec": job_spec},
        }],
    }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {}, "spec": js_spec}


# ------------------------------------------------------------------------------------------------ reading back
def is_jobset(obj: Optional[dict]) -> bool:
    return bool(obj) and (obj.get("kind") == KIND or str(obj.get("apiVersion", "")).startswith(GROUP + "/"))
