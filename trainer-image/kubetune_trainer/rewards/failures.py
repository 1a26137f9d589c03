"""What happens when a reward function fails at training time: that step's scores from it are dropped, not the job.

A reward function that raises (a built-in on an odd row, a custom function whose sandbox call still fails after
its retries) returns `None` for every completion of that call. TRL turns None into NaN and masks it: the
weighted sum skips the function (nansum), its logged mean skips the call (nanmean), and a completion no
function could score gets advantage 0. NaN-masking rather than a score of 0 because 0 is a real reward: it
would tell the policy that whatever it just generated was bad, and drag `rewards/<name>/mean` down for a bug.

Each failure logs a warning and counts in `kubetune_reward_errors_total{reward=...}` (listeners registered with
`add_listener`, e.g. the trainer's metrics). A reward that fails MAX_CONSECUTIVE_FAILURES calls in a row is
broken rather than unlucky: the job then fails with an error naming the reward (`DataError` for a built-in,
which fails on the data it reads; `ConfigError` for custom code).
"""

from __future__ import annotations

import logging
from typing import Callable

from ..errors import ConfigError, DataError, TrainerError

log = logging.getLogger("kubetune.rewards")

MAX_CONSECUTIVE_FAILURES = 5
_listeners: list[Callable[..., None]] = []


def add_listener(fn: Callable[..., None]) -> Callable[[], None]:
    """Call fn(reward_name) on every failed reward call, and fn(reward_name, 0) once when a reward is set up (so
    a counter can export 0 for a reward that never failed: "no errors" is data, not a missing series). Returns
    a function that removes the listener again."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn) if fn in _listeners else None


class FailureTracker:
    """Consecutive failures of one reward function."""

    def __init__(self, name: str, field: str, *, builtin: bool, limit: int | None = None):
        self.name = name
        self.field = field
        self.builtin = builtin
        self.limit = MAX_CONSECUTIVE_FAILURES if limit is None else limit
        self.consecutive = 0
        self.total = 0
        self._notify(0)

    def _notify(self, *count: int) -> None:
        for fn in list(_listeners):
            try:
                fn(self.name, *count)
            except Exception:  # noqa: BLE001 - metrics must not cost the run
                log.debug("reward error listener failed", exc_info=True)

    def succeeded(self) -> None:
        self.consecutive = 0

    def failed(self, n: int, problem: str) -> list[None]:
        """Record a failed call over n completions: warn, count, and raise once the limit is passed."""
        self.consecutive += 1
        self.total += 1
        self._notify()
        log.warning("reward %s failed (%d in a row, %d in all); its scores for these %d completions are dropped: %s",
                    self.name, self.consecutive, self.total, n, problem)
        if self.consecutive >= self.limit:
            cls: type[TrainerError] = DataError if self.builtin else ConfigError
            raise cls(f"reward {self.name} failed {self.consecutive} calls in a row (last: {problem})"[:1500],
                      field=self.field)
        return [None] * n
