"""The progress loop: scrape rank 0 of Running jobs, keep the last values when a pod cannot be reached (one
warning per job per interval), honour peering, delete expired jobs."""

from __future__ import annotations

import asyncio
import datetime as dt

from prometheus_client import CollectorRegistry

from kubetune_api.constants import ConditionType as CT
from kubetune_api.constants import Phase, Reason
from kubetune_operator import progress as P
from kubetune_operator.kube import EventRecorder
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.peering import PeeringGate, peers_allow
from kubetune_operator.reconciler import Reconciler, ftj_path
from kubetune_operator.settings import OperatorSettings
from tests.unit.operator.builders import NS, UID, FakeKube, FakeLookup, ftj, pod

STARTED_LONG_AGO = "2020-01-01T00:00:00Z"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class OpenGate:
    def __init__(self, active: bool = True):
        self.is_active = active

    async def active(self) -> bool:
        return self.is_active


def setup(fetch, *, gate=None, settings=None, clock=None):
    kube = FakeKube()
    lookup = FakeLookup(kube)
    settings = settings or OperatorSettings(progress_interval_seconds=0.01, progress_warning_interval_seconds=600)
    rec = Reconciler(kube, settings, OperatorMetrics(CollectorRegistry()), EventRecorder(kube, instance="t"), lookup)
    views: list[P.JobView] = []
    loop = P.ProgressLoop(settings, rec, gate or OpenGate(), jobs=lambda: list(views), pods=lookup.pods,
                          fetch=fetch, clock=clock or Clock())
    return kube, lookup, rec, loop, views


async def running_job(kube, lookup, rec, views, **pod_kwargs):
    kube.put(ftj())
    await rec.reconcile(NS, "demo", ensure_all=True)
    job_uid = kube.find("Job")[0]["metadata"]["uid"]
    lookup.pod_list = [pod(job_uid=job_uid, ip="10.1.2.3", **pod_kwargs)]
    await rec.reconcile(NS, "demo")
    body = kube.objects[ftj_path(NS, "demo")]
    assert body["status"]["phase"] == Phase.RUNNING
    views[:] = [P.job_view(body)]


def test_scrape_writes_progress_from_rank0():
    urls = []

    async def fetch(url):
        urls.append(url)
        return {"state": "running", "progress": {"step": 12, "totalSteps": 60, "loss": 1.98765,
                                                 "perplexity": 9.87654, "etaSeconds": 120}, "newerField": 1}

    async def scenario():
        kube, lookup, rec, loop, views = setup(fetch)
        await running_job(kube, lookup, rec, views, started=STARTED_LONG_AGO)
        await loop.tick()
        assert urls == ["http://10.1.2.3:9400/progress"]
        progress = kube.objects[ftj_path(NS, "demo")]["status"]["progress"]
        assert progress == {"step": 12, "totalSteps": 60, "loss": 1.988, "perplexity": 9.877, "etaSeconds": 120,
                            "summary": "12/60 (20%)"}
    asyncio.run(scenario())


def test_unreachable_pod_keeps_values_and_warns_once_per_interval():
    calls = {"n": 0}

    async def fetch(url):
        calls["n"] += 1
        if calls["n"] == 1:
            return {"progress": {"step": 5, "totalSteps": 50}}
        raise asyncio.TimeoutError()

    async def scenario():
        clock = Clock()
        kube, lookup, rec, loop, views = setup(fetch, clock=clock)
        loop.warnings.clock = clock
        await running_job(kube, lookup, rec, views, started=STARTED_LONG_AGO)
        await loop.tick()
        for _ in range(3):
            await loop.tick()
        status = kube.objects[ftj_path(NS, "demo")]["status"]
        assert status["progress"]["step"] == 5, "last values kept"
        warnings = [e for e in kube.events if e["reason"] == P.PROGRESS_UNAVAILABLE]
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
        assert "10.1.2.3:9400" in warnings[0]["message"]
        clock.t += 601
        await loop.tick()
        assert len([e for e in kube.events if e["reason"] == P.PROGRESS_UNAVAILABLE]) == 2
    asyncio.run(scenario())


def test_no_warning_while_the_trainer_starts_up():
    async def fetch(url):
        raise ConnectionRefusedError()

    async def scenario():
        clock = Clock(dt.datetime(2026, 1, 1, 0, 10, 30, tzinfo=dt.timezone.utc).timestamp())
        kube, lookup, rec, loop, views = setup(fetch, clock=clock)
        await running_job(kube, lookup, rec, views, started="2026-01-01T00:10:00Z")
        await loop.tick()
        assert not [e for e in kube.events if e["reason"] == P.PROGRESS_UNAVAILABLE]
    asyncio.run(scenario())


def test_scrapes_are_bounded_by_the_concurrency_limit():
    in_flight = {"now": 0, "max": 0}

    async def fetch(url):
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(0.01)
        in_flight["now"] -= 1
        return {"progress": {"step": 1}}

    async def scenario():
        settings = OperatorSettings(progress_max_concurrency=3)
        kube, lookup, rec, loop, views = setup(fetch, settings=settings)
        views[:] = [P.JobView(NS, f"j{i}", f"u{i}", Phase.RUNNING, None, None, False) for i in range(12)]
        loop.pods = lambda ns, name: [pod(name=name, ip=f"10.0.0.{name[1:]}")]
        await loop.tick()
        assert in_flight["max"] == 3
    asyncio.run(scenario())


def test_scrapes_per_tick_are_capped_oldest_scraped_first():
    """Past progress_max_scrapes_per_second x interval Running jobs, a tick scrapes only that many, the ones
    scraped longest ago first: every job is still scraped, each less often, and the operator's work per tick
    stops growing with N (at 3,000 jobs every job scraped every 15 s grew each job's share of the operator's CPU
    with how long it ran, docs/scale.md). Under the cap every Running job is scraped every tick."""
    scraped: list[str] = []

    async def fetch(url):
        scraped.append(url.split("//")[1].split(":")[0])
        raise ConnectionRefusedError()

    async def scenario():
        settings = OperatorSettings(progress_interval_seconds=1, progress_max_scrapes_per_second=4)
        kube, lookup, rec, loop, views = setup(fetch, settings=settings)
        views[:] = [P.JobView(NS, f"j{i}", f"u{i}", Phase.RUNNING, None, None, False) for i in range(10)]
        loop.pods = lambda ns, name: [pod(name=name, ip=f"10.0.0.{name[1:]}")]
        rounds = []
        for _ in range(5):
            scraped.clear()
            await loop.tick()
            rounds.append(sorted(scraped, key=lambda ip: int(ip.rsplit(".", 1)[1])))
        assert all(len(r) == 4 for r in rounds), rounds
        ips = [f"10.0.0.{i}" for i in range(10)]
        at = [[ips[i] for i in r] for r in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 8, 9], [2, 3, 4, 5], [0, 1, 6, 7])]
        assert rounds == at, "never-scraped jobs first, then the ones scraped longest ago"
        assert {ip for r in rounds[:3] for ip in r} == set(ips), "every job within ceil(10 / 4) ticks"
        assert rec.metrics.registry.get_sample_value(
            "kubetune_operator_progress_scrapes_total", {"result": "failed"}) == 20
        assert rec.metrics.registry.get_sample_value(
            "kubetune_operator_progress_scrapes_total", {"result": "ok"}) == 0

        views[:] = views[:3]  # back under the cap: everyone, every tick, and nothing remembered
        scraped.clear()
        await loop.tick()
        assert sorted(scraped) == ips[:3] and loop._scraped == {}
    asyncio.run(scenario())


def test_resync_reconciles_only_jobs_idle_for_the_interval():
    """The safety net reconciles each unfinished job at least every resync_interval_seconds, counted from its
    own last reconcile: a job its watch events keep reconciling is left alone, and the resync of thousands of
    jobs is spread over time instead of all of them in one tick (kubetune_operator_reconciles_total{trigger})."""
    async def fetch(url):
        raise ConnectionRefusedError()

    def count(rec, trigger):
        return rec.metrics.registry.get_sample_value("kubetune_operator_reconciles_total", {"trigger": trigger})

    async def scenario():
        settings = OperatorSettings(progress_interval_seconds=0.01, resync_interval_seconds=300)
        kube, lookup, rec, loop, views = setup(fetch, settings=settings)
        clock = {"t": 1000.0}
        rec.monotonic = lambda: clock["t"]
        await running_job(kube, lookup, rec, views, started=STARTED_LONG_AGO)
        kube.put(ftj("other", uid="uid-other"))
        await rec.reconcile(NS, "other", ensure_all=True)
        views.append(P.job_view(kube.objects[ftj_path(NS, "other")]))
        assert rec.lacks_pods(NS, "other") and not rec.lacks_pods(NS, "demo"), "other: waiting every tick"
        events = count(rec, "event")
        assert events >= 3 and count(rec, "resync") == 0
        clock["t"] += 299
        await loop.tick()
        assert count(rec, "resync") == 0, "both reconciled less than 300 s ago"
        assert rec.idle_seconds(NS, "demo") == 299
        clock["t"] += 1
        await rec.reconcile(NS, "demo")  # a watch event of demo
        clock["t"] += 1
        await loop.tick()
        assert count(rec, "resync") == 1 and rec.idle_seconds(NS, "other") == 0, "other: idle for 301 s"
        assert rec.idle_seconds(NS, "demo") == 1
        clock["t"] += 249
        await loop.tick()
        assert count(rec, "resync") == 1, "demo's last reconcile is 250 s old, other's 249 s"
        clock["t"] += 50
        await loop.tick()
        assert count(rec, "resync") == 2 and rec.idle_seconds(NS, "demo") == 0
        assert count(rec, "event") == events + 1
        assert count(rec, "waiting") == 0, "other lacks pods, but no FailedCreate event names its Job"
        assert rec.idle_seconds(NS, "nobody") == float("inf")
    asyncio.run(scenario())


def test_rank0_pod_selection():
    assert P.rank0_pod([pod(index=1), pod(index=0, phase="Pending")]) is None
    newest = pod(index=0, created="2026-01-01T00:30:00Z", ip="10.9.9.9")
    chosen = P.rank0_pod([pod(index=0, phase="Failed"), pod(index=1), pod(index=0, created="2026-01-01T00:20:00Z"),
                          newest])
    assert chosen["status"]["podIP"] == "10.9.9.9"


def test_paused_replica_does_nothing():
    async def fetch(url):
        raise AssertionError("a standby replica must not scrape")

    async def scenario():
        kube, lookup, rec, loop, views = setup(fetch, gate=OpenGate(False))
        await running_job(kube, lookup, rec, views)
        rec.metrics.observe_job(kube.objects[ftj_path(NS, "demo")])
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop))
        await asyncio.sleep(0.05)
        stop.set()
        await task
        assert rec.metrics.registry.get_sample_value(
            "kubetune_job_phase", {"namespace": NS, "finetunejob": "demo", "phase": "Running"}) is None, \
            "a standby replica exports no stale per-job series"
    asyncio.run(scenario())


def test_ttl_after_finished():
    async def fetch(url):
        return {}

    async def scenario():
        clock = Clock()
        kube, lookup, rec, loop, views = setup(fetch, clock=clock)
        done = dt.datetime.fromtimestamp(clock.t - 100, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = kube.put(ftj(ttlSecondsAfterFinished=300, status={
            "phase": Phase.FAILED, "completionTime": done,
            "conditions": [{"type": "Failed", "status": "True", "reason": "X", "message": "",
                            "lastTransitionTime": done}]}))
        views[:] = [P.job_view(body)]
        await loop.tick()
        assert ftj_path(NS, "demo") in kube.objects, "not due yet"
        clock.t += 201
        await loop.tick()
        assert ftj_path(NS, "demo") not in kube.objects
    asyncio.run(scenario())


def test_job_view_and_ttl_due():
    v = P.job_view(ftj(ttlSecondsAfterFinished=0))
    assert (v.namespace, v.name, v.uid, v.terminal, v.ttl_seconds) == (NS, "demo", UID, False, 0)
    assert not P.ttl_due(v, 2e9)


def test_warning_throttle():
    clock = Clock(0)
    w = P.WarningThrottle(60, clock)
    assert w.allow("a") and not w.allow("a") and w.allow("b")
    clock.t = 61
    assert w.allow("a")


# ------------------------------------------------------------------------------------------------ peering
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)


def peer(priority: int, seconds_ago: int = 5, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()}


def test_peering_rule_matches_kopf():
    me = "pod-a"
    assert peers_allow({me: peer(10)}, me, 10, NOW)
    assert peers_allow({me: peer(10), "pod-b": peer(5)}, me, 10, NOW), "lower priority peers pause, not us"
    assert not peers_allow({me: peer(10), "pod-b": peer(20)}, me, 10, NOW), "a higher priority peer is active"
    assert not peers_allow({me: peer(10), "pod-b": peer(10)}, me, 10, NOW), "kopf pauses everybody on a tie"
    assert peers_allow({me: peer(10), "pod-b": peer(20, seconds_ago=120)}, me, 10, NOW), "dead peers do not count"


def test_gate_reads_the_peering_object():
    class Api:
        def __init__(self, obj):
            self.obj, self.paths = obj, []

        async def get(self, path):
            self.paths.append(path)
            return self.obj

    async def scenario():
        live = {"status": {"me": {"priority": 5, "lifetime": 60, "lastseen": dt.datetime.now(dt.timezone.utc).isoformat()},
                           "other": {"priority": 9, "lifetime": 60,
                                     "lastseen": dt.datetime.now(dt.timezone.utc).isoformat()}}}
        api = Api(live)
        gate = PeeringGate(api, standalone=False, name="kubetune", identity="me", priority=5)
        assert await gate.active() is False
        assert api.paths == ["/apis/kopf.dev/v1/clusterkopfpeerings/kubetune"]
        gate = PeeringGate(Api(live), standalone=False, name="kubetune", identity="me", priority=10,
                           namespaces=["a", "b"])
        assert await gate.active() is True
        assert gate.api.paths == ["/apis/kopf.dev/v1/namespaces/a/kopfpeerings/kubetune",
                                  "/apis/kopf.dev/v1/namespaces/b/kopfpeerings/kubetune"]
        assert await PeeringGate(Api(None), standalone=False, name="k", identity="me", priority=1).active() is False
        assert await PeeringGate(Api(None), standalone=False, name="default", identity="me", priority=1,
                                 mandatory=False).active() is True
        assert await PeeringGate(None, standalone=True, name="k", identity="me", priority=1).active() is True
    asyncio.run(scenario())


def test_tick_looks_for_refused_pods_only_while_a_job_lacks_them():
    """A Pending job whose Job has no pod may have pods Kubernetes refuses (only the Job's events say so): the
    tick reconciles it and lists those events. Once the pod exists and waits for a node, the pod's own watch
    events carry every change: the tick leaves it alone (at 1,000 jobs queued behind a busy scheduler, a LIST
    per waiting job per tick made the operator's work grow with N)."""
    async def fetch(url):
        raise AssertionError("nothing runs: nothing to scrape")

    def event_lists(kube) -> int:
        return sum(1 for method, path in kube.calls if method == "GET" and path.endswith("/events"))

    async def scenario():
        kube, lookup, rec, loop, views = setup(fetch)
        kube.put(ftj())
        await rec.reconcile(NS, "demo", ensure_all=True)
        body = kube.objects[ftj_path(NS, "demo")]
        assert body["status"]["phase"] == Phase.PENDING
        views[:] = [P.job_view(body)]
        assert rec.lacks_pods(NS, "demo")
        before = event_lists(kube)
        await loop.tick()
        assert event_lists(kube) == before + 1, kube.calls[-5:]

        (job,) = kube.find("Job")
        lookup.pod_list = [pod(job_uid=job["metadata"]["uid"], phase="Pending")]  # created, waiting for a node
        await rec.reconcile(NS, "demo")  # the pod's watch event
        views[:] = [P.job_view(kube.objects[ftj_path(NS, "demo")])]
        assert views[0].phase == Phase.PENDING and not rec.lacks_pods(NS, "demo")
        calls = len(kube.calls)
        await loop.tick()
        assert kube.calls[calls:] == [], "a job whose pod exists is not re-checked every tick"

        lookup.pod_list = []  # the pod went away (evicted before the Job replaced it): look again
        assert rec.lacks_pods(NS, "demo")
        job["spec"]["suspend"] = True  # ... unless the Job is suspended (queued): no pods are due
        kube.put(job)
        assert not rec.lacks_pods(NS, "demo")
    asyncio.run(scenario())


def test_tick_lists_refused_pods_once_per_namespace_for_all_waiting_jobs():
    """Three jobs whose Jobs lack pods: one LIST of the namespace's FailedCreate events serves all three in that
    tick (a LIST per job made the API server scan every event of the namespace once per job: O(N^2) at 1,000
    waiting jobs), and only the job the events name is PodsBlocked. The shared answer lasts for that tick only."""
    from tests.unit.operator.test_bad_inputs import QUOTA, failed_create
    from tests.unit.operator.test_reconciler import conds

    async def fetch(url):
        raise AssertionError("nothing runs: nothing to scrape")

    def event_lists(kube) -> list[str]:
        return [path for method, path in kube.calls if method == "GET" and path.endswith("/events")]

    def waiting_runs(rec) -> float:
        return rec.metrics.registry.get_sample_value("kubetune_operator_reconciles_total", {"trigger": "waiting"})

    async def scenario():
        kube, lookup, rec, loop, views = setup(fetch)
        names = ["a", "b", "c"]
        for name in names:
            kube.put(ftj(name, uid=f"uid-{name}"))
            await rec.reconcile(NS, name, ensure_all=True)
        jobs = {j["metadata"]["labels"]["kubetune.dev/job-name"]: j for j in kube.find("Job")}
        kube.core_events.append(failed_create(jobs["b"], QUOTA))
        views[:] = [P.job_view(kube.objects[ftj_path(NS, n)]) for n in names]
        assert all(rec.lacks_pods(NS, n) for n in names)
        before = len(event_lists(kube))
        await loop.tick()
        assert event_lists(kube)[before:] == [f"/api/v1/namespaces/{NS}/events"], "one LIST for the namespace"
        reasons = {n: conds(kube, n)[CT.RUNNING]["reason"] for n in names}
        assert reasons == {"a": Reason.PENDING, "b": Reason.PODS_BLOCKED, "c": Reason.PENDING}
        assert waiting_runs(rec) == 1, "a and c: nothing names their Jobs, so a reconcile would find nothing new"
        refusals = list(kube.core_events)
        kube.core_events.clear()  # the quota freed up, the Job controller's next try will work: b is looked at
        await loop.tick()         # again because it is reported blocked, and is Pending again
        assert waiting_runs(rec) == 2 and conds(kube, "b")[CT.RUNNING]["reason"] == Reason.PENDING
        await loop.tick()
        assert waiting_runs(rec) == 2, "nothing blocked, nothing named: no reconcile"
        kube.core_events.extend(refusals)
        # after the tick, a job's own check lists its own events again (fresh, not the tick's answer)
        kube.core_events.append(failed_create(jobs["c"], QUOTA))
        before = len(event_lists(kube))
        await rec.reconcile(NS, "c")
        assert len(event_lists(kube)) == before + 1
        assert conds(kube, "c")[CT.RUNNING]["reason"] == Reason.PODS_BLOCKED
    asyncio.run(scenario())
