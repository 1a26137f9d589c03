"""The FineTuneJob resource's status: what the operator observed (conditions, phase, child workload) and
what the trainer reported (progress, forgetting check, artifact URIs). `report.py` reuses these shapes."""

from __future__ import annotations

from typing import Optional

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from ..common import Condition, Model
from ..constants import Phase


class Progress(Model):
    step: Optional[int] = Field(None, description="Optimizer steps done.")
    total_steps: Optional[int] = Field(None, description="Optimizer steps planned.")
    summary: Optional[str] = Field(None, description="step/total (percent), shown in `kubectl get`.")
    epoch: Optional[float] = Field(None, description="Epochs done (fractional).")
    loss: Optional[float] = Field(None, description="Latest train loss.")
    eval_loss: Optional[float] = Field(None, description="Latest eval loss.")
    perplexity: Optional[float] = Field(
        None, description="Latest eval perplexity, token-weighted: exp(total NLL / tokens). Stages cpt and sft only "
        "(other stages' losses are not language-model losses).")
    reward_accuracy: Optional[float] = Field(
        None, description="dpo/orpo: fraction of eval pairs whose chosen answer gets the higher implicit reward; "
        "reward: pairwise accuracy of the reward model on eval pairs (training batches until an evaluation ran).")
    reward_margin: Optional[float] = Field(
        None, description="dpo/orpo/kto: mean chosen-minus-rejected implicit reward; reward: mean score margin "
        "(eval, else training batches).")
    mean_reward: Optional[float] = Field(None, description="grpo/rloo/ppo: mean reward of the latest rollouts.")
    kl: Optional[float] = Field(None, description="grpo/rloo/ppo: KL divergence of the policy from the reference.")
    metric: Optional[str] = Field(
        None, description="The stage's headline figure, shown in `kubectl get` (METRIC): ppl for cpt/sft, acc and "
        "margin for dpo/orpo/reward, margin for kto, reward and kl for grpo/rloo/ppo.")
    learning_rate: Optional[float] = Field(None, description="Latest learning rate.")
    tokens_per_second: Optional[float] = Field(None, description="Training throughput.")
    eta_seconds: Optional[int] = Field(None, description="Estimated seconds to completion.")
    last_progress_time: Optional[str] = Field(None, description="When the step count last increased.")


class Forgetting(Model):
    reference_perplexity_before: Optional[float] = Field(None, description="Reference-set perplexity before training.")
    reference_perplexity_after: Optional[float] = Field(None, description="Reference-set perplexity after training.")
    relative_change: Optional[float] = Field(None, description="after/before - 1.")
    threshold: Optional[float] = Field(None, description="The configured threshold.")
    exceeded: Optional[bool] = Field(None, description="relativeChange > threshold.")


class Artifacts(Model):
    output_uri: Optional[str] = Field(None, description="This run's output prefix (<output.uri>/<ns>/<name>/runs/<run-id>/).")
    run_id: Optional[str] = Field(None, description="This run's id (the FineTuneJob's uid).")
    index_uri: Optional[str] = Field(None, description="The job's runs.json: every finished run and the latest.")
    adapter_uri: Optional[str] = Field(None, description="The trained adapter (PEFT format) or full model.")
    merged_model_uri: Optional[str] = Field(None, description="The merged model, when requested.")
    manifest_uri: Optional[str] = Field(None, description="manifest.json (digests, config, metrics, versions).")
    latest_checkpoint: Optional[str] = Field(None, description="The latest complete checkpoint.")


class Workload(Model):
    kind: Optional[str] = Field(None, description="Kind of the child workload: Job, or JobSet for multi-node jobs.")
    name: Optional[str] = Field(None, description="Name of the child Job or JobSet.")
    service: Optional[str] = Field(None, description="Headless Service of a multi-node gang's DNS names (the JobSet's "
                                   "subdomain).")
    config_map: Optional[str] = Field(None, description="ConfigMap holding the resolved trainer config.")


class RuntimeSnapshot(Model):
    """The runtime as the operator resolved it when the job was first reconciled. Pods are always rendered from
    this copy: an admin editing the runtime later changes new jobs, never this one. Kept in status because
    users who may edit FineTuneJobs (and ConfigMaps) cannot write status."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)
    kind: str = Field(..., description="ClusterFineTuneRuntime or FineTuneRuntime.")
    name: str = Field(..., description="The runtime's name.")
    uid: Optional[str] = Field(None, description="The runtime's uid when it was resolved.")
    generation: Optional[int] = Field(None, description="The runtime's metadata.generation when it was resolved.")
    digest: Optional[str] = Field(None, description="sha256 of the resolved runtime spec (first 16 hex digits).")
    spec: Optional[dict] = Field(
        None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
        description="The resolved runtime spec this job's pods are rendered from.")


class Restarts(Model):
    """Every trainer pod that ended before the run did, by cause (status.restartCount is their sum). Counted by
    pod uid, so deleted pods (which a Job's `failed` count may never see) count once, across operator restarts."""

    preempted: Optional[int] = Field(
        None, description="Pods taken away by the cluster: a DisruptionTarget condition (preemption, eviction, "
        "node drain or shutdown) or the job was suspended (Kueue preemption). Not counted against retryLimit.")
    killed: Optional[int] = Field(
        None, description="Pods deleted or stopped by SIGTERM (exit 143 after saving a checkpoint; 137 when the "
        "grace period ran out). Exit 143 is not counted against retryLimit.")
    crashed: Optional[int] = Field(None, description="Pods whose trainer failed with a retriable error.")
    storage: Optional[int] = Field(None, description="Pods that ended because the object store stayed unreachable.")
    retries_used: Optional[int] = Field(
        None, description="Failures counted against spec.retryLimit, over every Job of this run (the Job "
        "controller's own count).")
    pods: Optional[dict[str, str]] = Field(
        None, description="uid -> cause of the counted pods that still exist (so that each is counted once).")


class GpuPod(Model):
    uid: str = Field(..., description="The pod's uid.")
    start: str = Field(..., json_schema_extra={"format": "date-time"}, description="When its trainer started.")
    gpus: int = Field(..., description="GPUs the pod holds.")


class GpuUsage(Model):
    """The ledger behind gpuSeconds, kept in the status so an operator restart neither loses nor repeats a pod."""

    closed_seconds: float = Field(0, description="GPU-seconds of trainer pods that have ended.")
    closed_pods: Optional[list[str]] = Field(None, description="uids of the latest ended pods already counted.")
    open_pods: Optional[list[GpuPod]] = Field(None, description="Trainer pods running (counted up to now).")


class FineTuneJobStatus(Model):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    observed_generation: Optional[int] = Field(None, description="The .metadata.generation last reconciled.")
    phase: Optional[str] = Field(None, json_schema_extra={"enum": Phase.ALL}, description="Pending, Queued (waiting for Kueue), Suspended, Running, Succeeded or Failed (derived from conditions).")
    conditions: Optional[list[Condition]] = Field(
        None, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Latest observations (metav1.Condition).",
    )
    start_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"}, description="When the trainer first started running.")
    completion_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"}, description="When the job finished.")
    workload: Optional[Workload] = Field(None, description="Child objects.")
    restart_count: Optional[int] = Field(
        None, description="Trainer pods that ended before the run did (crashes, preemptions, deletions): the sum of "
        "status.restarts.")
    restarts: Optional[Restarts] = Field(None, description="status.restartCount by cause.")
    progress: Optional[Progress] = Field(None, description="Training progress, updated while running.")
    forgetting: Optional[Forgetting] = Field(None, description="Result of the forgetting check.")
    artifacts: Optional[Artifacts] = Field(None, description="Where the results are.")
    message: Optional[str] = Field(None, description="Last notable event, human-readable.")
    runtime: Optional[RuntimeSnapshot] = Field(None, description="The runtime this job runs under, as resolved.")
    gpu_seconds: Optional[int] = Field(
        None, description="What the job cost so far: GPUs x seconds each trainer pod ran (container start to end), "
        "summed over every attempt (retries, preemptions, resumes). Time queued or suspended (no pod) is free.")
    gpu_usage: Optional[GpuUsage] = Field(None, description="The accounting behind gpuSeconds.")
