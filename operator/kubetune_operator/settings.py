"""The operator's own configuration, read once from the environment (the Helm chart sets these variables; see
helm/kubetune/templates/_helpers.tpl `kubetune.operatorEnv`). Command-line flags of `python -m kubetune_operator`
override the matching variables.

| variable | default | meaning |
|---|---|---|
| KUBETUNE_TRAINER_IMAGE | ghcr.io/kubetune/trainer:0.1.0 | trainer image of the built-in runtime used by tools and unit tests (jobs use their runtime's) |
| KUBETUNE_TRAINER_IMAGE_PULL_POLICY | IfNotPresent | imagePullPolicy of the trainer container |
| KUBETUNE_TRAINER_RESOURCES | {"requests": {"cpu": "1", "memory": "4Gi"}} | JSON {requests, limits} for trainer pods besides GPUs; spec.resources.cpu/memory override |
| KUBETUNE_S3_ENDPOINT | (none: AWS) | S3 endpoint for jobs whose runtime sets no storage.endpoint |
| KUBETUNE_S3_REGION | (none) | AWS_REGION for jobs whose runtime sets no storage.region |
| KUBETUNE_DEFAULT_CREDENTIALS_SECRET | kubetune-s3-credentials | Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) for jobs whose runtime names no storage.credentials; referenced as optional |
| KUBETUNE_WATCH_NAMESPACES | (all) | comma-separated namespaces |
| KUBETUNE_METRICS_HOST / KUBETUNE_METRICS_PORT | 0.0.0.0 / 8080 | the operator's /metrics endpoint |
| KUBETUNE_HEALTH_PORT | (off) | serve kopf's liveness endpoint on http://0.0.0.0:PORT/healthz |
| KUBETUNE_PEERING_NAME | (none) | run with kopf peering under this name (several replicas, one active) |
| KUBETUNE_PEERING_PRIORITY | (random) | this replica's peering priority |
| KUBETUNE_PROGRESS_INTERVAL_SECONDS | 15 | how often Running jobs' /progress is scraped |
| KUBETUNE_PROGRESS_TIMEOUT_SECONDS | 2 | timeout of one scrape |
| KUBETUNE_PROGRESS_MAX_CONCURRENCY | 32 | scrapes in flight at once, over all jobs |
| KUBETUNE_PROGRESS_MAX_SCRAPES_PER_SECOND | 50 | scrapes started per second, over all jobs: with more Running jobs than this times the interval, each job is scraped less often (3,000 jobs: every 60 s), oldest-scraped first, so the operator's work per second does not grow with the number of jobs |
| KUBETUNE_PROGRESS_WARNING_INTERVAL_SECONDS | 600 | at most one "progress unreachable" event per job per this many seconds |
| KUBETUNE_RESYNC_INTERVAL_SECONDS | 300 | the longest an unfinished job goes without a reconcile: the progress loop re-reconciles those whose last one is older (safety net for missed watch events and failed writes), spread over time rather than all jobs at once |
| KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS | 300 | trainer pods' terminationGracePeriodSeconds (time to checkpoint on SIGTERM) |
| KUBETUNE_PODS_BLOCKED_TIMEOUT_SECONDS | 0 (never) | fail a job (reason PodsBlocked) whose pods Kubernetes has refused to create (quota, missing PriorityClass/ServiceAccount) for this long |
| KUBETUNE_TRAINER_METRICS_PORT | 9400 | port the trainer serves /metrics and /progress on |
| KUBETUNE_GC_THRESHOLD | 10000 | net allocations of tracked objects between the garbage collector's youngest-generation runs (Python's default: 700; the older generations then run every 20 instead of 10 younger ones); 0 keeps Python's defaults and does not freeze the startup objects (`__main__.tune_gc`) |
| KUBETUNE_API_CONCURRENCY | 32 | Kubernetes API calls of the operator in flight at once (HTTP connections; kopf's watches are apart); FineTuneJob reconciles running at once are 4x this (workqueue.py) |
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubetune_api.constants import DEFAULT_METRICS_PORT

ENV_PREFIX = "KUBETUNE_"

# field name -> environment variable
ENV_VARS: dict[str, str] = {
    "trainer_image": "KUBETUNE_TRAINER_IMAGE",
    "image_pull_policy": "KUBETUNE_TRAINER_IMAGE_PULL_POLICY",
    "trainer_resources": "KUBETUNE_TRAINER_RESOURCES",
    "s3_endpoint": "KUBETUNE_S3_ENDPOINT",
    "s3_region": "KUBETUNE_S3_REGION",
    "default_credentials_secret": "KUBETUNE_DEFAULT_CREDENTIALS_SECRET",
    "watch_namespaces": "KUBETUNE_WATCH_NAMESPACES",
    "metrics_host": "KUBETUNE_METRICS_HOST",
    "metrics_port": "KUBETUNE_METRICS_PORT",
    "health_port": "KUBETUNE_HEALTH_PORT",
    "peering_name": "KUBETUNE_PEERING_NAME",
    "peering_priority": "KUBETUNE_PEERING_PRIORITY",
    "progress_interval_seconds": "KUBETUNE_PROGRESS_INTERVAL_SECONDS",
    "progress_timeout_seconds": "KUBETUNE_PROGRESS_TIMEOUT_SECONDS",
    "progress_max_concurrency": "KUBETUNE_PROGRESS_MAX_CONCURRENCY",
    "progress_max_scrapes_per_second": "KUBETUNE_PROGRESS_MAX_SCRAPES_PER_SECOND",
    "progress_warning_interval_seconds": "KUBETUNE_PROGRESS_WARNING_INTERVAL_SECONDS",
    "resync_interval_seconds": "KUBETUNE_RESYNC_INTERVAL_SECONDS",
    "pods_blocked_timeout_seconds": "KUBETUNE_PODS_BLOCKED_TIMEOUT_SECONDS",
    "trainer_termination_grace_seconds": "KUBETUNE_TRAINER_TERMINATION_GRACE_SECONDS",
    "trainer_metrics_port": "KUBETUNE_TRAINER_METRICS_PORT",
    "api_concurrency": "KUBETUNE_API_CONCURRENCY",
    "gc_threshold": "KUBETUNE_GC_THRESHOLD",
}


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # No default memory limit: a limit too small for the model OOM-kills the trainer, and only the person
    # who knows the model can size it (spec.resources.memory sets request = limit).
    trainer_resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "4Gi"}})
    s3_endpoint: Optional[str] = None
    s3_region: Optional[str] = None
    default_credentials_secret: Optional[str] = "kubetune-s3-credentials"
    watch_namespaces: tuple[str, ...] = ()
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(8080, ge=0, le=65535)
    health_port: Optional[int] = Field(None, ge=1, le=65535)
    peering_name: Optional[str] = None
    peering_priority: Optional[int] = None
    progress_interval_seconds: float = Field(15.0, gt=0)
    progress_timeout_seconds: float = Field(2.0, gt=0)
    progress_max_concurrency: int = Field(32, ge=1)
    progress_max_scrapes_per_second: float = Field(50.0, gt=0)
    progress_warning_interval_seconds: float = Field(600.0, ge=0)
    resync_interval_seconds: float = Field(300.0, gt=0)
    pods_blocked_timeout_seconds: float = Field(0.0, ge=0)
    trainer_termination_grace_seconds: int = Field(300, ge=0)
    trainer_metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=1, le=65535)
    api_concurrency: int = Field(32, ge=1, le=256)
    gc_threshold: int = Field(10000, ge=0)

    @field_validator("trainer_resources")
    @classmethod
    def _only_requests_and_limits(cls, v: dict) -> dict:
        unknown = set(v) - {"requests", "limits"}
        if unknown:
            raise ValueError(f"only 'requests' and 'limits' are allowed, got {sorted(unknown)}")
        return {k: {rk: str(rv) for rk, rv in (vals or {}).items()} for k, vals in v.items()}

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, v: Any) -> Any:
        if isinstance(v, str):
            return tuple(ns.strip() for ns in v.split(",") if ns.strip())
        return v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "OperatorSettings":
        """Read the KUBETUNE_* variables (empty ones count as unset); keyword overrides (CLI flags) win.
        A bad value raises ValueError naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            if field == "trainer_resources":
                try:
                    values[field] = json.loads(raw)
                except ValueError as exc:
                    raise ValueError(f"{var}: not JSON ({exc})") from None
            else:
                values[field] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors(include_url=False):
                field = str(err["loc"][0]) if err.get("loc") else "?"
                problems.append(f"{ENV_VARS.get(field, field)}: {err['msg']}")
            raise ValueError("; ".join(problems)) from None
