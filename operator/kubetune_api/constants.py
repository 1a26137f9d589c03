"""Names shared by the operator, the trainer and the CRD: group/version, condition types and reasons,
exit codes, labels. Import-light on purpose (the operator and the trainer both import it)."""

from __future__ import annotations

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]
CRD_NAME = f"{PLURAL}.{GROUP}"
# The admin-owned runtimes (kubetune_api.finetuneruntime): same schema, cluster-scoped and namespaced.
CLUSTER_RUNTIME_KIND = "ClusterFineTuneRuntime"
CLUSTER_RUNTIME_PLURAL = "clusterfinetuneruntimes"
RUNTIME_KIND = "FineTuneRuntime"
RUNTIME_PLURAL = "finetuneruntimes"
DEFAULT_RUNTIME_NAME = "default"
PIPELINE_KIND = "FineTunePipeline"
PIPELINE_PLURAL = "finetunepipelines"
PIPELINE_SINGULAR = "finetunepipeline"
PIPELINE_SHORT_NAMES = ["ftp"]


class ConditionType:
    """metav1.Condition types a FineTuneJob carries. `kubectl wait --for=condition=Succeeded ftj/x` works."""

    CREATED = "Created"  # the child workload (Job, Service, ConfigMap) exists
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # Informational: the forgetting check exceeded its threshold (with action: warn the job still succeeds).
    FORGETTING_EXCEEDED = "ForgettingThresholdExceeded"
    # Informational: spec.model.trustRemoteCode is true, so the trainer runs Python code from the model's repo.
    TRUSTS_REMOTE_CODE = "TrustsRemoteCode"
    # Queued jobs only (spec.queueName): whether Kueue admitted the trainer workload (False: waiting, preempted).
    ADMITTED = "Admitted"


class Reason:
    """CamelCase reasons, as metav1.Condition requires (`^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`)."""

    JOB_CREATED = "JobCreated"
    INVALID_SPEC = "InvalidSpec"
    PENDING = "PodsPending"
    RUNNING = "PodsRunning"
    SUSPENDED = "JobSuspended"
    RESUMED = "JobResumed"
    SUCCEEDED = "TrainingSucceeded"
    TRAINER_ERROR = "TrainerError"  # the trainer exited with a permanent exit code
    BACKOFF_LIMIT = "BackoffLimitExceeded"
    DEADLINE = "DeadlineExceeded"
    POD_FAILED = "PodFailed"
    RESTARTING = "Restarting"
    JOB_MISSING = "JobMissing"
    CHILD_CONFLICT = "ChildNameConflict"  # a Job/Service/ConfigMap with the child's name exists and is not ours
    # The API server refused a rendered child (400/422/413): permanent, the message names the spec field.
    INVALID_POD_TEMPLATE = "InvalidPodTemplate"  # the Job or Service
    INVALID_CONFIG = "ConfigTooLarge"  # the ConfigMap holding the resolved spec
    # The Job exists but Kubernetes will not create its pods (ResourceQuota, PriorityClass, ServiceAccount, ...).
    PODS_BLOCKED = "PodsBlocked"
    CHILD_FORBIDDEN = "ChildCreationForbidden"  # 403 creating a child: quota on object counts, missing RBAC
    TRUST_REMOTE_CODE = "TrustRemoteCode"  # spec.model.trustRemoteCode: true runs code from the model repo
    FORGETTING = "ForgettingThresholdExceeded"
    # The trainer exited 75: the object store stayed unreachable for the whole patience budget; the message
    # names the endpoint and the call that failed last.
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    POD_REPLACED = "PodReplaced"  # an ignored pod end (preempted, deleted): the next pod started without backoff
    WITHIN_THRESHOLD = "WithinThreshold"
    # The job's runtime (spec.runtimeRef) is missing, not granted to the namespace, or forbids what the spec asks.
    RUNTIME_NOT_FOUND = "RuntimeNotFound"
    RUNTIME_VIOLATION = "RuntimePolicyViolation"
    # Kueue (condition Admitted and, while not admitted, Running=False)
    WAITING_FOR_ADMISSION = "WaitingForAdmission"
    ADMITTED = "Admitted"
    PREEMPTED = "Preempted"  # Kueue evicted the running job for a higher-priority one; requeued
    EVICTED = "Evicted"  # Kueue evicted it for another reason (its message says which); requeued
    WORKLOAD_INACTIVE = "WorkloadInactive"
    KUEUE_NOT_INSTALLED = "KueueNotInstalled"
    # spec.resources.nodes > 1 runs as a JobSet, and the cluster does not serve jobsets.jobset.x-k8s.io.
    JOBSET_NOT_INSTALLED = "JobSetNotInstalled"


class Phase:
    """The one-word summary derived from the conditions (never stored independently of them)."""

    PENDING = "Pending"
    QUEUED = "Queued"  # waiting for Kueue to admit it (spec.queueName), also after a preemption
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    ALL = [PENDING, QUEUED, SUSPENDED, RUNNING, SUCCEEDED, FAILED]
    TERMINAL = {SUCCEEDED, FAILED}


class ExitCode:
    """The trainer's exit codes. The operator's Job carries a podFailurePolicy that fails the Job at once on
    the permanent ones (retrying a bad config or a diverged run only burns GPU hours)."""

    OK = 0
    RETRIABLE = 1  # anything unexpected: the Job's backoffLimit decides
    DATA_ERROR = 65  # EX_DATAERR: dataset empty/malformed, missing column
    CONFIG_ERROR = 78  # EX_CONFIG: spec cannot work (model not found, wrong format for stage, ...)
    DIVERGED = 79  # loss became NaN/inf
    FORGETTING = 80  # forgetting threshold exceeded with action: fail
    # EX_TEMPFAIL: the object store stayed unreachable for the whole patience budget (spec.output.
    # storagePatienceSeconds). The trainer already waited in-process, so a restarted pod would only wait again:
    # the Job fails at once with reason StorageUnavailable instead of burning retryLimit on an outage.
    STORAGE_UNAVAILABLE = 75
    PREEMPTED = 143  # 128 + SIGTERM: checkpoint written, a restart resumes

    # Exit codes on which the Job fails at once (podFailurePolicy FailJob): restarting the pod cannot help.
    # Ascending: the Job API refuses onExitCodes values that are not ordered.
    PERMANENT = (DATA_ERROR, STORAGE_UNAVAILABLE, CONFIG_ERROR, DIVERGED, FORGETTING)


class Label:
    """Labels on every child object; `job-name` lets a user `kubectl get pods -l kubetune.dev/job-name=x`."""

    JOB_NAME = f"{GROUP}/job-name"
    STAGE = f"{GROUP}/stage"
    ADAPTER = f"{GROUP}/adapter"
    COMPONENT = "app.kubernetes.io/component"
    MANAGED_BY = "app.kubernetes.io/managed-by"
    PART_OF = "app.kubernetes.io/part-of"
    MANAGED_BY_VALUE = "kubetune-operator"


# Where the operator mounts the resolved job config inside the trainer container.
CONFIG_MOUNT_DIR = "/etc/kubetune"
CONFIG_FILE_NAME = "job.yaml"
TERMINATION_LOG = "/dev/termination-log"
DEFAULT_METRICS_PORT = 9400
DEFAULT_RENDEZVOUS_PORT = 29500
# How long the trainer waits out an unreachable object store before exiting 75 (spec.output.storagePatienceSeconds).
DEFAULT_STORAGE_PATIENCE_S = 600
