"""The reconcile queue: keys deduplicated while queued or running, a fixed number of workers, retries after a
failure or when asked, the earliest retry wins, none on a standby replica."""

from __future__ import annotations

import asyncio

from kubetune_operator.workqueue import WorkQueue


class Recorder:
    def __init__(self, answers=None, hold: float = 0.0):
        self.calls: list[tuple[str, str, bool]] = []
        self.answers = dict(answers or {})
        self.hold = hold
        self.running = self.max_running = 0

    async def __call__(self, namespace, name, check_blocked):
        self.calls.append((namespace, name, check_blocked))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.hold)
            answer = self.answers.get(name, [None])
            value = answer.pop(0) if len(answer) > 1 else answer[0]
            if isinstance(value, BaseException):
                raise value
            return value
        finally:
            self.running -= 1


class Gate:
    def __init__(self, active=True):
        self.is_active = active

    async def active(self):
        return self.is_active


def test_keys_are_deduplicated_and_workers_bounded():
    async def scenario():
        rec = Recorder(hold=0.02)
        q = WorkQueue(rec, workers=3)
        q.start()
        for i in range(10):
            for _ in range(5):  # five watch events of the same object before any run
                q.add("ns", f"j{i}", check_blocked=False)
        assert len(q) == 10
        await q.join()
        assert sorted(c[1] for c in rec.calls) == [f"j{i}" for i in range(10)], "one run per key"
        assert rec.max_running == 3
        await q.close()
    asyncio.run(scenario())


def test_a_key_added_while_running_runs_once_more_with_the_flags_merged():
    async def scenario():
        rec = Recorder(hold=0.05)
        q = WorkQueue(rec, workers=2)
        q.start()
        q.add("ns", "a", check_blocked=False)
        await asyncio.sleep(0.01)  # running now
        q.add("ns", "a", check_blocked=False)
        q.add("ns", "a", check_blocked=True)
        await q.join()
        assert rec.calls == [("ns", "a", False), ("ns", "a", True)]
        await q.close()
    asyncio.run(scenario())


def test_failures_are_reported_and_retried_and_asked_delays_honoured():
    async def scenario():
        errors = []
        rec = Recorder(answers={"boom": [RuntimeError("x"), None], "wait": [0.05, None]})
        q = WorkQueue(rec, workers=2, on_error=errors.append, retry_delay=0.05)
        q.start()
        q.add("ns", "boom")
        q.add("ns", "wait")
        await asyncio.sleep(0.3)
        assert [c[1] for c in rec.calls].count("boom") == 2 and [c[1] for c in rec.calls].count("wait") == 2
        assert [type(e) for e in errors] == [RuntimeError]
        assert q.pending_retries() == []
        await q.close()
    asyncio.run(scenario())


def test_the_earliest_retry_wins_forget_cancels_and_a_standby_replica_retries_nothing():
    async def scenario():
        rec = Recorder()
        q = WorkQueue(rec, workers=1, gate=Gate())
        q.start()
        q.later("ns", "a", 0.05)
        q.later("ns", "a", 10)  # later than the pending one: ignored
        q.later("ns", "b", 0.05)
        q.forget("ns", "b")  # deleted meanwhile
        await asyncio.sleep(0.2)
        assert rec.calls == [("ns", "a", True)]
        await q.close()

        rec = Recorder()
        standby = WorkQueue(rec, workers=1, gate=Gate(active=False))
        standby.start()
        standby.later("ns", "c", 0.01)
        await asyncio.sleep(0.1)
        assert rec.calls == []
        standby.later("ns", "d", 10)
        await standby.close()
        assert standby.pending_retries() == []
    asyncio.run(scenario())


def test_urgent_keys_run_first_and_a_promoted_key_runs_once():
    """New jobs (children not made yet) go ahead of status reconciles queued before them."""
    async def scenario():
        rec = Recorder()
        q = WorkQueue(rec, workers=1)
        q.add("ns", "status-1")
        q.add("ns", "status-2")
        q.add("ns", "promoted")
        q.add("ns", "new", urgent=True)
        q.add("ns", "promoted", urgent=True)  # its spec changed while it waited
        q.add("ns", "new")  # a later plain event does not demote it
        q.start()
        await q.join()
        assert [c[1] for c in rec.calls] == ["new", "promoted", "status-1", "status-2"]
        await q.close()
    asyncio.run(scenario())
