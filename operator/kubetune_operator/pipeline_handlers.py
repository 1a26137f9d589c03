"""kopf handlers for FineTunePipelines: thin; the work is in pipeline.py. Registered by importing this module
(handlers.py does), so `python -m kubetune_operator` and `kopf run -m kubetune_operator.handlers` both serve
pipelines.

What triggers what:
- a FineTunePipeline is created, found at startup, or changes (spec, annotations: approval, retry nonce) ->
  reconcile; its own status writes come back as events and end in a no-op (nothing to change).
- a FineTuneJob labelled kubetune.dev/pipeline changes (phase, artifacts) or is deleted -> reconcile its pipeline.
- waiting (a previous run's FineTuneJob still being deleted, a name conflict) -> kopf.TemporaryError, retried.
- an invalid pipeline -> Failed/InvalidSpec, no retry until the spec changes.
- deletion: no finalizer; the garbage collector deletes the stages' FineTuneJobs through their owner references.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune_api import constants as C
from kubetune_api.finetunepipeline import PIPELINE_LABEL

from .kube import EventRecorder, KubeApi
from .pipeline import PipelineReconciler, Result

log = logging.getLogger(__name__)

FTP = (C.GROUP, C.VERSION, C.PIPELINE_PLURAL)
FTJ = (C.GROUP, C.VERSION, C.PLURAL)


def _reconciler(memo: kopf.Memo) -> PipelineReconciler:
    if memo.get("pipelines") is None:
        api = memo.get("api") or KubeApi.from_environment()
        memo.pipelines = PipelineReconciler(api, EventRecorder(api, instance=memo.get("identity")),
                                            metrics=memo.get("metrics"))
    return memo.pipelines


def raise_for(result: Result) -> None:
    if result.state == "waiting":
        raise kopf.TemporaryError(result.message, delay=result.delay)


@kopf.on.resume(*FTP)
@kopf.on.create(*FTP)
@kopf.on.update(*FTP)
async def pipeline_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Create, resume, any change (spec, annotations): reconcile; waiting states are retried by kopf."""
    raise_for(await _reconciler(memo).reconcile(namespace, name))


@kopf.on.event(*FTP)
async def pipeline_event(event: kopf.RawEvent, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _reconciler(memo).forget(namespace, name)


@kopf.on.event(*FTJ, labels={PIPELINE_LABEL: kopf.PRESENT})
async def stage_job_event(labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A stage's FineTuneJob changed (or was deleted): its pipeline decides what happens next."""
    await _reconciler(memo).reconcile(namespace, labels[PIPELINE_LABEL])
