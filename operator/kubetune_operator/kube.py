"""A small JSON client for the few API calls the operator makes itself (kopf does the watching), and an event
recorder.

Why not the typed kubernetes client: its methods convert to and from generated models, which drop fields the
client version does not know (new Job status fields) and refuse plain dicts, and importing it costs the
operator ~10 MB of memory (docs/scale.md). This client sends and returns the API's JSON as dicts over aiohttp
(which kopf's watches use too), with the connection and credentials of credentials.py; after a 401 it logs in
again once (a rotated service-account token) and repeats the request. Calls run on the operator's event loop;
at most `concurrency` HTTP connections are open, and further calls wait for one (a burst of hundreds of new
FineTuneJobs, each several calls, is served `concurrency` at a time).

Events are posted here rather than with `kopf.event()` because the progress loop runs outside kopf's handler
context, where kopf's event queue is not available; one recorder keeps all of the operator's events alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Optional
from urllib.parse import urlencode

import aiohttp
import yarl

from kubetune_api import constants as C

from .outage import ApiHealth, ApiUnreachable, unreachable

log = logging.getLogger(__name__)

EVENT_MESSAGE_MAX = 1024
COMPONENT = "kubetune-operator"


class ApiError(Exception):
    """A non-2xx answer. `causes` are the metav1.Status details' causes ({field, reason, message}), which name
    the offending field of the object sent (e.g. `spec.template.spec.tolerations[0].operator`)."""

    def __init__(self, status: int, reason: str = "", message: str = "", causes: list[dict] | None = None):
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = list(causes or [])

    @property
    def invalid(self) -> bool:
        """The object itself was refused (400 BadRequest, 413 too large, 422 Invalid): sending it again can
        never succeed, so the caller must not retry."""
        return self.status in (400, 413, 422)

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


# ------------------------------------------------------------------------------------------------ paths
def collection_path(api_version: str, plural: str, namespace: str) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}"


PLURALS = {("v1", "ConfigMap"): "configmaps", ("v1", "Service"): "services", ("v1", "Pod"): "pods",
           ("batch/v1", "Job"): "jobs", ("v1", "Event"): "events", ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobsets"}


def object_path(obj: dict) -> str:
    """Path of a namespaced object from its apiVersion/kind/metadata."""
    plurals = {**PLURALS, (C.API_VERSION, C.KIND): C.PLURAL, (C.API_VERSION, C.PIPELINE_KIND): C.PIPELINE_PLURAL}
    plural = plurals[(obj["apiVersion"], obj["kind"])]
    meta = obj["metadata"]
    return f"{collection_path(obj['apiVersion'], plural, meta['namespace'])}/{meta['name']}"


# ------------------------------------------------------------------------------------------------ client
class _Connection:
    """One login: the server, the headers that carry its credentials, and two aiohttp sessions: `calls` (at most
    `concurrency` connections) and `probes` (one connection for GET /readyz, so that the health watch never
    queues behind a burst of calls)."""

    __slots__ = ("server", "headers", "calls", "probes", "loop")

    def __init__(self, info: Any, concurrency: int, loop: asyncio.AbstractEventLoop):
        self.server = str(info.server).rstrip("/")
        self.headers = {"Accept": "application/json", "User-Agent": COMPONENT, **info.as_http_headers()}
        ssl = info.as_ssl_context() if self.server.startswith("https:") else None
        # limit: one call per connection at a time, as many connections as `concurrency`; the rest wait here
        self.calls = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, ssl=ssl))
        self.probes = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, ssl=ssl))
        self.loop = loop

    async def close(self) -> None:
        await self.calls.close()
        await self.probes.close()

    async def send(self, session: aiohttp.ClientSession, method: str, url_path: str, data: Optional[bytes],
                   content_type: str, timeout: float) -> tuple[int, bytes]:
        """One request over `session` (`calls` or `probes`): the answer's status and body."""
        headers = self.headers if data is None else {**self.headers, "Content-Type": content_type}
        # `timeout` bounds connecting and each read, not the wait for a free connection: a burst of reconciles
        # queues for the `concurrency` connections (as calls queued for threads before), and a total timeout
        # would count that wait and call a busy but answering server unreachable
        # encoded=True: the path and query are sent as built here (urlencode), not parsed and quoted again
        async with session.request(method, yarl.URL(self.server + url_path, encoded=True), data=data,
                                   headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=timeout,
                                                                 sock_read=timeout)) as resp:
            return resp.status, await resp.read()


class KubeApi:
    """async request() returning parsed JSON; ApiError for non-2xx answers, ApiUnreachable for no answer.

        api = KubeApi.from_environment(concurrency=32)   # credentials.load(): in-cluster or kubeconfig
        pod = await api.get("/api/v1/namespaces/team-a/pods/p")
        await api.close()

    `login` returns a kopf.ConnectionInfo (server, headers, TLS); the connection is made on first use in the
    running event loop (and made again if a later call runs in another loop, as unit tests do)."""

    def __init__(self, login: Callable[[], Any], timeout: float = 30.0, health: Optional[ApiHealth] = None,
                 concurrency: int = 32):
        self._login = login
        self.timeout = timeout
        # told about every call: no answer -> ApiUnreachable (and one warning), an answer -> back (outage.py)
        self.health = health
        self.concurrency = concurrency
        self._conn: Optional[_Connection] = None
        self._retired: set[_Connection] = set()  # replaced after a 401; closed once their calls had time to end

    @classmethod
    def from_environment(cls, concurrency: int = 32) -> "KubeApi":
        from .credentials import load

        load()  # fail now, at startup, with the loader's message, rather than at the first call
        return cls(load, concurrency=concurrency)

    def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.loop is not loop or conn.calls.closed:
            conn = self._conn = _Connection(self._login(), self.concurrency, loop)
        return conn

    def _relogin(self, used: _Connection) -> None:
        """After a 401 on `used`. When a token expires many calls get a 401 at once: only the first of them
        replaces the connection (no await between the check and the change), the others retry on the new one.
        The old one is closed later, not under the calls still on it."""
        if self._conn is not used:
            return
        self._conn = None
        self._retired.add(used)

        def close_later() -> None:
            if used in self._retired:
                self._retired.discard(used)
                task = asyncio.ensure_future(used.close())
                task.add_done_callback(lambda t: t.exception())  # nothing to report: it is gone either way

        used.loop.call_later(2 * self.timeout + 5, close_later)

    async def close(self) -> None:
        """Close the connections (the operator's cleanup handler)."""
        loop = asyncio.get_running_loop()
        for conn in [self._conn, *self._retired]:
            if conn is not None and conn.loop is loop:
                await conn.close()
        self._conn = None
        self._retired.clear()

    async def request(self, method: str, path: str, body: Any = None, query: Optional[dict] = None,
                      content_type: str = "application/json") -> Optional[dict]:
        url_path = path + (("?" + urlencode(query)) if query else "")
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            for again in (False, True):
                conn = self._connect()
                status, raw = await conn.send(conn.calls, method, url_path, data, content_type, self.timeout)
                if status != 401 or again:
                    break
                self._relogin(conn)  # a rotated token (projected service-account tokens expire): log in again, once
        except Exception as exc:
            if not unreachable(exc):
                raise
            if self.health is not None:
                self.health.lost(type(exc).__name__)
            raise ApiUnreachable(f"{method} {path}: the API server did not answer ({type(exc).__name__})") from exc
        if status in (429, 503) and (b"initializing" in raw or b"HTTP paths have been installed" in raw):
            # the server is starting: as good as no answer (outage.py)
            if self.health is not None:
                self.health.lost("starting")
            raise ApiUnreachable(f"{method} {path}: the API server is starting ({status})")
        if not 200 <= status < 300:
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                raise ApiError(status, answer.get("reason", ""), answer.get("message", ""),
                               (answer.get("details") or {}).get("causes"))
            raise ApiError(status, "", raw[:200].decode(errors="replace"))
        return json.loads(raw) if raw else None

    async def ready(self) -> bool:
        """GET /readyz answered 200: the API server is up and serves everything (outage.py's health watch)."""
        try:
            conn = self._connect()
            status, _ = await conn.send(conn.probes, "GET", "/readyz", None, "", 5)
        except Exception:  # noqa: BLE001 - no answer: not ready
            return False
        return status == 200

    # conveniences -------------------------------------------------------------------------------------
    async def get(self, path: str) -> Optional[dict]:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def create(self, obj: dict) -> dict:
        """POST the object; the created object."""
        path = object_path(obj).rsplit("/", 1)[0]
        return await self.request("POST", path, obj)

    async def list(self, path: str, **query: str) -> list[dict]:
        """The items of a collection (one page; callers narrow with fieldSelector/labelSelector)."""
        return list(((await self.request("GET", path, query=query or None)) or {}).get("items") or [])

    async def merge_patch(self, path: str, patch: dict) -> Optional[dict]:
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def delete(self, path: str, propagation: str = "Background", uid: Optional[str] = None) -> bool:
        """True when deleted (or being deleted), False when it did not exist (or, with `uid`, when the object
        of that name is another one: the uid precondition failed)."""
        body: dict = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", path, body)
            return True
        except ApiError as exc:
            if exc.not_found or (uid and exc.conflict):
                return False
            raise


class RecentGets:
    """GETs answered from a short-lived memory: a burst of new FineTuneJobs naming the same runtime reads it
    once, not once per job. At most `ttl` seconds stale, like an informer cache: a runtime an admin edits applies
    to jobs created from `ttl` seconds later (a job records the runtime it was resolved against, status.runtime).
    Misses are not remembered. Answers are shared: callers must not modify them."""

    def __init__(self, api: "KubeApi", ttl: float = 5.0, clock=None):
        self.api, self.ttl = api, ttl
        self._clock = clock or time.monotonic
        self._memory: dict[str, tuple[float, dict]] = {}

    async def get(self, path: str) -> Optional[dict]:
        now = self._clock()
        hit = self._memory.get(path)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        obj = await self.api.get(path)
        if obj is None:  # a miss is not remembered: an object created a moment later is found at once
            self._memory.pop(path, None)
            return None
        self._memory[path] = (self._clock(), obj)
        if len(self._memory) > 256:  # runtimes are few: drop what is expired
            self._memory = {k: v for k, v in self._memory.items() if now - v[0] < self.ttl}
        return obj


# ------------------------------------------------------------------------------------------------ events
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_body(obj: dict, type_: str, reason: str, message: str, instance: str) -> dict:
    meta = obj.get("metadata") or {}
    if len(message) > EVENT_MESSAGE_MAX:
        message = message[: EVENT_MESSAGE_MAX - 3] + "..."
    now = _now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'kubetune')}.", "namespace": meta.get("namespace")},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "type": type_,
        "reason": reason,
        "message": message,
        "source": {"component": COMPONENT},  # the "From" column of `kubectl describe`
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
        "action": reason,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": now,
        "count": 1,
    }


class EventRecorder:
    """Posts core/v1 Events about FineTuneJobs. Best effort: a failed post is logged, never raised (an event
    must not fail a reconcile)."""

    def __init__(self, api: KubeApi, instance: str | None = None):
        self.api = api
        self.instance = instance or os.environ.get("POD_ID") or socket.gethostname()

    async def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        body = event_body(obj, type_, reason, message, self.instance)
        ns = body["metadata"]["namespace"]
        try:
            await self.api.request("POST", f"/api/v1/namespaces/{ns}/events", body)
        except Exception as exc:  # noqa: BLE001 - events are best effort
            log.warning("could not post event %s for %s/%s: %s", reason, ns, body["involvedObject"]["name"], exc)
