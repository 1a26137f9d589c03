"""The reconcile queue: which FineTuneJobs to reconcile next, deduplicated, served by a fixed number of workers,
with delayed retries (what controller-runtime's workqueue does for Go controllers).

    queue = WorkQueue(reconcile, workers=32, gate=gate, on_error=count)   # reconcile(ns, name, check_blocked)
    queue.start()
    queue.add("team-a", "llama-sft", check_blocked=False)   # from a watch event: returns at once
    queue.add("team-a", "new-job", urgent=True)              # its children do not exist yet: ahead of the rest
    queue.later("team-a", "llama-sft", 5.0)                  # look again in 5 s (the earliest pending time wins)
    await queue.close()

Why: kopf runs an object's handlers once per watch event, one event after the other, and keeps every event
that arrives meanwhile (the whole parsed object) in that object's backlog. With 1,000 new FineTuneJobs and
their Jobs and pods, the handlers that awaited a reconcile held thousands of parsed events and API answers at
once: 3.6 M live Python objects at the peak against 0.7 M once the burst was over, and the process's RSS is the
allocator's high-water mark of that peak (docs/scale.md). Watch handlers now only record what they saw and
`add` the key: the backlog is a set of keys, a key queued while queued or running runs once more at most, and
at most `workers` reconciles (each with the object, its rendered children and API answers) exist at once.

Two lanes: `urgent` keys (a job whose children are not created or not up to date with its spec) run before the
others (status following the pods). In one FIFO a burst of new jobs waited behind the status reconciles of the
jobs created just before them, and their pods reached the scheduler later (docs/scale.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional, Protocol

log = logging.getLogger(__name__)

Key = tuple[str, str]


class Gate(Protocol):
    async def active(self) -> bool: ...


class WorkQueue:
    def __init__(self, reconcile: Callable[[str, str, bool], Awaitable[Optional[float]]], workers: int,
                 gate: Optional[Gate] = None, on_error: Optional[Callable[[BaseException], None]] = None,
                 retry_delay: float = 5.0):
        """`reconcile(namespace, name, check_blocked)` returns None when done, or seconds after which to look
        again; an exception is passed to `on_error` and retried after `retry_delay`."""
        self._reconcile = reconcile
        self._workers = workers
        self._gate = gate
        self._on_error = on_error
        self.retry_delay = retry_delay
        # (lane, sequence, key): lane 0 is urgent. A key promoted to lane 0 leaves a stale lane-1 entry behind,
        # skipped when it comes up (its key is no longer queued in that lane).
        self._ready: asyncio.PriorityQueue[tuple[int, int, Key]] = asyncio.PriorityQueue()
        self._seq = 0
        self._queued: dict[Key, list] = {}  # key -> [check_blocked (OR of every add since queued), lane]
        self._running: set[Key] = set()
        self._again: dict[Key, list] = {}  # added while running: queued again when that run ends
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []
        self._firing: set[asyncio.Task] = set()

    # ---------------------------------------------------------------------------------------------- producers
    def add(self, namespace: str, name: str, check_blocked: bool = True, urgent: bool = False) -> None:
        key, lane = (namespace, name), 0 if urgent else 1
        if key in self._running:
            held = self._again.setdefault(key, [False, 1])
            held[0], held[1] = held[0] or check_blocked, min(held[1], lane)
        elif key in self._queued:
            held = self._queued[key]
            held[0] = held[0] or check_blocked
            if lane < held[1]:
                held[1] = lane
                self._put(lane, key)
        else:
            self._queued[key] = [check_blocked, lane]
            self._put(lane, key)

    def _put(self, lane: int, key: Key) -> None:
        self._seq += 1
        self._ready.put_nowait((lane, self._seq, key))

    def later(self, namespace: str, name: str, delay: float) -> None:
        key = (namespace, name)
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= loop.time() + delay:
                return
            timer.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: no retry for it (a queued run finds it gone and does nothing)."""
        timer = self._timers.pop((namespace, name), None)
        if timer is not None:
            timer.cancel()

    def pending_retries(self) -> list[Key]:
        return list(self._timers)

    def __len__(self) -> int:
        """Keys waiting to run (not counting the running ones)."""
        return len(self._queued) + len(self._again)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        if self._gate is None:
            self.add(*key)
            return
        task = asyncio.create_task(self._add_if_active(key), name=f"kubetune retry {key[0]}/{key[1]}")
        self._firing.add(task)
        task.add_done_callback(self._firing.discard)

    async def _add_if_active(self, key: Key) -> None:
        """Retries only on the active replica (peering); watch events reach only it anyway (kopf pauses the
        others), so only timers need the check, which costs API calls with peering."""
        try:
            if await self._gate.active():
                self.add(*key)
        except Exception as exc:  # noqa: BLE001
            if self._on_error is not None:
                self._on_error(exc)
            self.later(*key, self.retry_delay)

    # ---------------------------------------------------------------------------------------------- workers
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"kubetune reconcile worker {i}")
                       for i in range(self._workers)]

    async def join(self) -> None:
        """Until nothing is queued or running (tests)."""
        while self._queued or self._running or self._again:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in [*self._tasks, *self._firing]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._firing, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            lane, _, key = await self._ready.get()
            held = self._queued.get(key)
            if held is None or held[1] != lane:
                continue  # stale: the key ran from the other lane already, or was promoted
            del self._queued[key]
            self._running.add(key)
            try:
                await self._run_one(key, held[0])
            finally:
                self._running.discard(key)
                if key in self._again:
                    check_blocked, again_lane = self._again.pop(key)
                    self.add(*key, check_blocked=check_blocked, urgent=again_lane == 0)

    async def _run_one(self, key: Key, check_blocked: bool) -> None:
        try:
            delay = await self._reconcile(key[0], key[1], check_blocked)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the worker
            if self._on_error is not None:
                self._on_error(exc)
            self.later(*key, self.retry_delay)
            return
        if delay is not None:
            self.later(*key, delay)
