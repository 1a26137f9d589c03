"""Monitoring of a training run (reporting only; stop decisions are in kubetune_trainer.control): RunMonitor
(monitor.py) and its parts: the Prometheus exporter, the /metrics + /progress server, metrics.jsonl, the ETA
estimate, the TrainerCallback feeding them, reference perplexity, curve plots and the `kubetune follow` /
`kubetune plot` commands. See docs/observability.md.

Names resolve lazily: `from kubetune_trainer.monitoring import RunMonitor` imports prometheus_client only;
torch and transformers load when a callback, guard or perplexity is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunMonitor": ".monitor",
    "reference_perplexity": ".perplexity",
    "plot_curves": ".plot",
    "read_metrics": ".plot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
