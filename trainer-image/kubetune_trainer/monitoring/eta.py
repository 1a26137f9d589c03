"""The ETA estimate: remaining steps times the step rate measured over the last few log events, so evaluation
and checkpoint pauses are part of the rate (they will recur) and a slow warm-up is forgotten."""

from __future__ import annotations

from collections import deque
from typing import Optional

WINDOW = 10  # log events the step rate is measured over


class EtaEstimator:
    def __init__(self, window: int = WINDOW):
        self._points: deque[tuple[float, int]] = deque(maxlen=window)

    def reset(self, now: float, step: int) -> None:
        self._points.clear()
        self._points.append((now, step))

    def add(self, now: float, step: int) -> None:
        self._points.append((now, step))

    def eta(self, total: Optional[int], step: int, last_progress: float) -> Optional[int]:
        """Seconds to `total` steps; `step`/`last_progress` count steps made since the last log event."""
        if not total or not self._points:
            return None
        t0, s0 = self._points[0]
        t1, s1 = self._points[-1]
        if step > s1:
            t1, s1 = last_progress, step
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0, int(round((total - s1) * (t1 - t0) / (s1 - s0))))
