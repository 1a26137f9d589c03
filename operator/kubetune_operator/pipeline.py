"""FineTunePipeline reconciliation: one FineTuneJob per stage, created in order, each only after the previous
stage succeeded and passed its gate; the pipeline's status derived from its children. Level-based like the
FineTuneJob reconciler: every trigger (the pipeline changed, one of its FineTuneJobs changed) re-reads the
pipeline and its children and works everything out again, so a missed or repeated event does no harm.

- Children: `<pipeline>-<stage>` (plan.child_name), controller-owned by the pipeline's uid (deleting the pipeline
  deletes them; a re-created pipeline of the same name waits until the old one's children are gone, then
  starts its own runs: run identity is the FineTuneJob's uid). A FineTuneJob of that name not owned by this
  pipeline is a name conflict, reported and retried, never adopted.
- Hand-over: stage i+1's model comes from stage i's status.artifacts (plan.handed_over / plan.next_model):
  model.source is the merged model (merge) or the full weights (weights); with continue, model.source stays
  the base stage i trained on and model.adapter is stage i's adapter.
- Gates (kubetune_api.finetunepipeline.gates, the code the local runner uses) are judged on the child's
  status.progress / status.forgetting with the pipeline's *current* thresholds until the next stage exists: a
  failed gate fails the pipeline (GateFailed, naming metric, value and threshold) and editing the threshold
  lets it continue. Manual approval: the annotation gates.kubetune.dev/<stage>: approved.
- spec.suspend is passed to the running stage's FineTuneJob; no stage starts while suspended.
- spec.retryFrom (+ annotation kubetune.dev/retry-nonce to repeat one): the FineTuneJobs of that stage and
  later are deleted and re-created from the current spec; earlier stages keep their runs. Acted on once per
  (stage, nonce); status.handledRetry records it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import ValidationError

from kubetune_api import constants as C
from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import Phase
from kubetune_api.finetunejob.status import Artifacts
from kubetune_api.finetunepipeline import (PIPELINE_LABEL, STAGE_NAME_LABEL, FineTunePipeline, child_name,
                                           evaluate_gate, handed_over, is_approved, next_model, parse_pipeline,
                                           stage_job_spec, validate_pipeline)
from kubetune_api.finetunepipeline.gates import approval_hint

from . import status as S
from .kube import ApiError, EventRecorder, KubeApi

log = logging.getLogger(__name__)

RETRY_NONCE_ANNOTATION = f"{C.GROUP}/retry-nonce"
WAIT_DELAY = 5.0


class PipelineReason:
    INVALID_SPEC = "InvalidSpec"
    STAGE_CREATED = "StageCreated"
    STAGE_RUNNING = "StageRunning"
    STAGE_FAILED = "StageFailed"
    GATE_FAILED = "GateFailed"
    AWAITING_APPROVAL = "AwaitingApproval"
    SUSPENDED = "PipelineSuspended"
    SUCCEEDED = "PipelineSucceeded"
    CHILD_CONFLICT = "ChildNameConflict"
    WAITING = "WaitingForPreviousRun"
    RETRYING = "RetryingFromStage"


def pipeline_path(namespace: str, name: str) -> str:
    return f"/apis/{C.API_VERSION}/namespaces/{namespace}/{C.PIPELINE_PLURAL}/{name}"


def ftj_path(namespace: str, name: str) -> str:
    return f"/apis/{C.API_VERSION}/namespaces/{namespace}/{C.PLURAL}/{name}"


def _owner_uid(obj: dict) -> Optional[str]:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == C.PIPELINE_KIND:
            return ref.get("uid")
    return None


def render_stage_job(pipeline: FineTunePipeline, body: dict, i: int, model_source: str,
                     model_adapter: Optional[str] = None) -> dict:
    """Stage i's FineTuneJob manifest (pure): the plan's spec, the pipeline's suspend, labels, owner."""
    stage = pipeline.spec.stages[i]
    spec = stage_job_spec(pipeline.spec, i, model_source, model_adapter).model_dump(
        by_alias=True, exclude_none=True, mode="json")
    spec["suspend"] = bool(pipeline.spec.suspend)
    meta = body["metadata"]
    return {
        "apiVersion": C.API_VERSION, "kind": C.KIND,
        "metadata": {
            "name": child_name(meta["name"], stage.name), "namespace": meta["namespace"],
            "labels": {PIPELINE_LABEL: meta["name"], STAGE_NAME_LABEL: stage.name,
                       C.Label.PART_OF: "kubetune", C.Label.MANAGED_BY: C.Label.MANAGED_BY_VALUE},
            "ownerReferences": [{"apiVersion": C.API_VERSION, "kind": C.PIPELINE_KIND, "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": spec,
    }


@dataclass
class Result:
    state: str  # done | waiting | invalid
    message: str = ""
    delay: float = WAIT_DELAY


def _stage_entry(name: str, job_name: str, child: Optional[dict], model_source: Optional[str],
                 model_adapter: Optional[str] = None) -> dict:
    entry: dict[str, Any] = {"name": name, "job": job_name}
    if child is None:
        return entry
    st = child.get("status") or {}
    entry["jobUid"] = child["metadata"].get("uid")
    entry["modelSource"] = model_source
    if model_adapter:
        entry["modelAdapter"] = model_adapter
    for key in ("phase", "progress", "forgetting", "artifacts", "message"):
        if st.get(key) is not None:
            entry[key] = st[key]
    if (st.get("progress") or {}).get("metric"):
        entry["metric"] = st["progress"]["metric"]
    return entry


class PipelineReconciler:
    """Reconciles FineTunePipelines; one lock per pipeline serialises the triggers (its own events and its
    FineTuneJobs' events arrive on different kopf workers)."""

    def __init__(self, api: KubeApi, recorder: Optional[EventRecorder] = None, metrics: Any = None):
        self.api = api
        self.recorder = recorder
        self.metrics = metrics
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        if self.metrics is not None:
            self.metrics.forget_pipeline(namespace, name)

    async def reconcile(self, namespace: str, name: str) -> Result:
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            body = await self.api.get(pipeline_path(namespace, name))
            if body is None or body["metadata"].get("deletionTimestamp"):
                return Result("done")
            new, result = await self._reconcile(body)
            await self._write(body, new)
            if self.metrics is not None:
                self.metrics.observe_pipeline(namespace, name, new)
            return result

    # -------------------------------------------------------------------------------------------- the walk
    async def _reconcile(self, body: dict) -> tuple[dict, Result]:
        meta = body["metadata"]
        ns, name, gen = meta["namespace"], meta["name"], meta.get("generation")
        old = body.get("status") or {}
        new: dict[str, Any] = {"observedGeneration": gen, "conditions": list(old.get("conditions") or []),
                               "handledRetry": old.get("handledRetry")}
        now = S.now_rfc3339()

        def conclude(phase: str, reason: str, message: str) -> None:
            conds = new["conditions"]
            conds = S.set_condition(conds, CT.FAILED, phase == Phase.FAILED, reason if phase == Phase.FAILED
                                    else PipelineReason.STAGE_RUNNING, message if phase == Phase.FAILED else "",
                                    gen, now)
            conds = S.set_condition(conds, CT.SUCCEEDED, phase == Phase.SUCCEEDED, reason if phase ==
                                    Phase.SUCCEEDED else PipelineReason.STAGE_RUNNING,
                                    message if phase == Phase.SUCCEEDED else "", gen, now)
            conds = S.set_condition(conds, CT.SUSPENDED, phase == Phase.SUSPENDED, PipelineReason.SUSPENDED if
                                    phase == Phase.SUSPENDED else PipelineReason.STAGE_RUNNING,
                                    message if phase == Phase.SUSPENDED else "", gen, now)
            conds = S.set_condition(conds, CT.RUNNING, phase == Phase.RUNNING, reason, message, gen, now)
            new["conditions"] = conds
            new["phase"] = phase
            new["message"] = message

        try:
            pipeline = parse_pipeline(body)
            problems = validate_pipeline(pipeline.spec, name)
        except ValidationError as exc:
            err = exc.errors()[0]
            problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"]
        if problems:
            conclude(Phase.FAILED, PipelineReason.INVALID_SPEC, "; ".join(problems)[:2000])
            return new, Result("invalid", new["message"])
        spec = pipeline.spec
        n = len(spec.stages)
        names = [s.name for s in spec.stages]
        children: list[Optional[dict]] = []
        for s in spec.stages:
            children.append(await self.api.get(ftj_path(ns, child_name(name, s.name))))

        # a retry replaces the FineTuneJobs of that stage and later (once per stage + nonce)
        if spec.retry_from:
            key = f"{spec.retry_from}/{(meta.get('annotations') or {}).get(RETRY_NONCE_ANNOTATION, '')}"
            if key != old.get("handledRetry"):
                start = names.index(spec.retry_from)
                for i in range(start, n):
                    child = children[i]
                    if child is not None and _owner_uid(child) == meta["uid"]:
                        await self.api.delete(ftj_path(ns, child["metadata"]["name"]))
                        children[i] = None
                new["handledRetry"] = key
                msg = f"retrying from stage {spec.retry_from}: its FineTuneJob and later ones are re-created"
                await self._event(body, "Normal", PipelineReason.RETRYING, msg)
                old_stages = {s.get("name"): s for s in old.get("stages") or []}
                new["stages"] = [old_stages.get(s, {"name": s}) if i < start else {"name": s, "job": child_name(
                    name, s)} for i, s in enumerate(names)]
                new["progress"] = f"{start + 1}/{n}"
                new["currentStage"] = spec.retry_from
                conclude(Phase.RUNNING, PipelineReason.RETRYING, msg)
                return new, Result("waiting", msg, 1.0)

        model_source, model_adapter = spec.model.source, None
        stages_status: list[dict] = []
        old_stages = {s.get("name"): s for s in old.get("stages") or []}
        result = Result("done")
        for i, stage in enumerate(spec.stages):
            job_name = child_name(name, stage.name)
            child = children[i]
            new["currentStage"], new["progress"] = stage.name, f"{i + 1}/{n}"
            if child is not None and (_owner_uid(child) != meta["uid"] or child["metadata"].get("deletionTimestamp")):
                stages_status.append({"name": stage.name, "job": job_name})
                earlier_run = _owner_uid(child) is not None and \
                    (child["metadata"].get("labels") or {}).get(PIPELINE_LABEL) == name
                if child["metadata"].get("deletionTimestamp") or earlier_run:
                    # an earlier pipeline of this name, or a retry's deletion: that run ends before ours starts
                    msg = f"stage {stage.name}: waiting for the previous FineTuneJob {job_name} to be deleted"
                    conclude(Phase.SUSPENDED if spec.suspend else Phase.RUNNING, PipelineReason.WAITING, msg)
                    result = Result("waiting", msg)
                else:
                    msg = (f"stage {stage.name}: a FineTuneJob named {job_name} exists and does not belong to this "
                           "pipeline; delete or rename it (or rename the pipeline or the stage)")
                    conclude(Phase.PENDING, PipelineReason.CHILD_CONFLICT, msg)
                    result = Result("waiting", msg, 30.0)
                break
            if child is None:
                stages_status.append({"name": stage.name, "job": job_name})
                if spec.suspend:
                    conclude(Phase.SUSPENDED, PipelineReason.SUSPENDED,
                             f"suspended before stage {stage.name} started")
                    break
                manifest = render_stage_job(pipeline, body, i, model_source, model_adapter)
                try:
                    created = await self.api.create(manifest)
                except ApiError as exc:
                    if exc.conflict:
                        result = Result("waiting", f"{job_name} exists: re-reading", 1.0)
                        conclude(Phase.RUNNING, PipelineReason.WAITING, result.message)
                        break
                    if exc.invalid:
                        msg = f"spec.stages[{i}].job: the API server refused stage {stage.name}'s FineTuneJob: {exc.message}"
                        conclude(Phase.FAILED, PipelineReason.INVALID_SPEC, msg[:2000])
                        result = Result("invalid", msg)
                        break
                    raise
                stages_status[-1] = _stage_entry(stage.name, job_name, created, model_source, model_adapter)
                msg = f"stage {stage.name} ({i + 1}/{n}) started: FineTuneJob {job_name} on {model_source}" + (
                    f" from adapter {model_adapter}" if model_adapter else "")
                await self._event(body, "Normal", PipelineReason.STAGE_CREATED, msg)
                conclude(Phase.RUNNING, PipelineReason.STAGE_CREATED, msg)
                break
            entry = _stage_entry(stage.name, job_name, child, model_source, model_adapter)
            stages_status.append(entry)
            cstatus = child.get("status") or {}
            phase = cstatus.get("phase")
            if phase not in Phase.TERMINAL and bool((child.get("spec") or {}).get("suspend")) != bool(spec.suspend):
                await self.api.merge_patch(ftj_path(ns, job_name), {"spec": {"suspend": bool(spec.suspend)}})
            if phase == Phase.FAILED:
                msg = (f"stage {stage.name} failed: {cstatus.get('message') or 'see FineTuneJob ' + job_name}; "
                       f"fix spec.stages[{i}].job and set spec.retryFrom: {stage.name}")
                conclude(Phase.FAILED, PipelineReason.STAGE_FAILED, msg)
                break
            if phase != Phase.SUCCEEDED:
                if spec.suspend:
                    conclude(Phase.SUSPENDED, PipelineReason.SUSPENDED, f"suspended in stage {stage.name}")
                else:
                    conclude(Phase.RUNNING, PipelineReason.STAGE_RUNNING,
                             f"stage {stage.name} ({i + 1}/{n}): FineTuneJob {job_name} is {phase or 'Pending'}")
                break
            # succeeded: the gate decides whether the pipeline moves on
            next_exists = i + 1 < n and children[i + 1] is not None
            previous_gate = (old_stages.get(stage.name) or {}).get("gate")
            if next_exists and previous_gate and previous_gate.get("state") == "Passed":
                entry["gate"] = previous_gate  # judged when the next stage started; later edits do not undo that
            else:
                verdict = evaluate_gate(stage.gate, cstatus.get("progress"), cstatus.get("forgetting"),
                                        approved=is_approved(meta.get("annotations"), stage.name))
                entry["gate"] = verdict.to_k8s()
                if next_exists and verdict.state != "Passed":
                    entry["gate"] = {"state": "Passed", "message": "passed when the next stage started"}
                elif verdict.state == "Failed":
                    msg = (f"stage {stage.name} {verdict.message}; edit spec.stages[{i}].gate to continue, or fix "
                           f"the stage and set spec.retryFrom: {stage.name}")
                    conclude(Phase.FAILED, PipelineReason.GATE_FAILED, msg)
                    break
                elif verdict.state == "AwaitingApproval":
                    msg = f"stage {stage.name}: {verdict.message}: {approval_hint(name, stage.name, ns)}"
                    conclude(Phase.PENDING, PipelineReason.AWAITING_APPROVAL, msg)
                    break
            if i + 1 == n:
                conclude(Phase.SUCCEEDED, PipelineReason.SUCCEEDED,
                         f"all {n} stages succeeded and passed their gates; final adapter: "
                         f"{(cstatus.get('artifacts') or {}).get('adapterUri')} on {model_source}")
                break
            uri = handed_over(spec, i, Artifacts.model_validate(cstatus.get("artifacts") or {}))
            if not uri:
                msg = f"stage {stage.name} succeeded; waiting for its artifacts to name the model to hand over"
                conclude(Phase.RUNNING, PipelineReason.WAITING, msg)
                result = Result("waiting", msg)
                break
            model_source, model_adapter = next_model(spec, i, model_source, uri)
        # stages not reached yet
        stages_status += [{"name": s.name, "job": child_name(name, s.name)} for s in spec.stages[len(stages_status):]]
        new["stages"] = stages_status
        current = next((s for s in stages_status if s["name"] == new.get("currentStage")), {})
        new["metric"] = current.get("metric")
        return new, result

    # -------------------------------------------------------------------------------------------- status
    async def _write(self, body: dict, new: dict) -> None:
        old = body.get("status") or {}
        patch = {k: v for k, v in new.items() if old.get(k) != v}
        for k in old:
            if k not in new:
                patch[k] = None
        if not patch:
            return
        meta = body["metadata"]
        await self.api.merge_patch(pipeline_path(meta["namespace"], meta["name"]) + "/status", {"status": patch})
        for type_, cond in S.condition_changes(old.get("conditions"), new.get("conditions")):
            if cond.get("reason") in (PipelineReason.GATE_FAILED, PipelineReason.STAGE_FAILED,
                                      PipelineReason.INVALID_SPEC, PipelineReason.CHILD_CONFLICT):
                type_ = "Warning"
            await self._event(body, type_, cond["reason"], cond.get("message", ""))

    async def _event(self, body: dict, type_: str, reason: str, message: str) -> None:
        if self.recorder is not None and message:
            await self.recorder.event(body, type_, reason, message)
