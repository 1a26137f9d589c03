"""The FineTuneRuntime (namespaced) and ClusterFineTuneRuntime (cluster-scoped) resources: one spec, two scopes;
the ValidatingAdmissionPolicy that checks FineTuneJobs against them. Import from here.

    from kubetune_api.finetuneruntime import FineTuneRuntimeSpec, parse_runtime
"""

from .spec import (
    OVERRIDE_FIELDS, GPUSpec, FineTuneRuntimeSpec, NamespaceSelector, Override, RuntimeCredentials, RuntimePolicy,
    RuntimeResources, RuntimeStatus, RuntimeStorage, RuntimeTemplate,
)


def parse_runtime(spec: dict) -> FineTuneRuntimeSpec:
    """A runtime's spec (dict from the API) as the typed model."""
    return FineTuneRuntimeSpec.model_validate(spec)


__all__ = [
    "OVERRIDE_FIELDS", "GPUSpec", "FineTuneRuntimeSpec", "NamespaceSelector", "Override", "RuntimeCredentials",
    "RuntimePolicy", "RuntimeResources", "RuntimeStatus", "RuntimeStorage", "RuntimeTemplate", "parse_runtime",
]
