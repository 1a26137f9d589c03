"""metrics.jsonl: one JSON object per event of the run (train/eval logs, checkpoints, reference perplexity,
early stop, NaN, finish), line-buffered so it is readable while the run goes on. Strict JSON: non-finite
floats are written as the strings "nan"/"inf"/"-inf". `plot.read_metrics` reads it back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def json_value(v: Any) -> Any:
    """Strict JSON for metrics.jsonl: non-finite floats become the strings "nan"/"inf"/"-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def write(self, record: dict) -> None:
        """Append one event (None values dropped, a "time" field first); the file is created on first write."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # line-buffered: readable while running
        record = {"time": round(time.time(), 3), **{k: json_value(v) for k, v in record.items() if v is not None}}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def prepend(self, lines: list[str]) -> None:
        """Put earlier lines (a resumed run's metrics so far, attempts.py) in front of what this log holds."""
        self.close()
        own = self.path.read_text() if self.path.exists() else ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line.rstrip("\n") + "\n" for line in lines) + own)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
