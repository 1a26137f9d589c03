"""API-server outages, quietly: one warning when the API server stops answering, one when it answers again, and
no tracebacks in between. Everything else keeps working as before: kopf's watchers retry (endlessly, with
ENDLESS_BACKOFF) and re-list when the server is back, reconciles that failed are retried (handlers.Retries), and the
progress loop's resync catches up on whatever changed meanwhile.

    health = ApiHealth()
    install_log_filter(health)                    # after kopf configured logging (the startup handler)
    settings.networking.error_backoffs = ENDLESS_BACKOFF
    task = asyncio.create_task(health.watch(api))  # notices the return although no call is being made

Where the noise came from (measured with the kube-apiserver stopped for 27 s, issue 15): kopf's API client logs
every failed attempt of every watch at ERROR ("Request attempt #3/9 failed; will retry: ... ClientConnectorError")
and, after its nine attempts (54 s), gives up with a traceback; a handler whose API call failed is logged by kopf
with the whole traceback.
The filter drops exactly those records while they are about an unreachable server (connection refused or reset,
timeouts, 502/503/504 while the server starts), and turns the first one into the single warning.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)


class ApiUnreachable(Exception):
    """The API server did not answer (connection refused or reset, timeout): not an answer about the request.
    Raised by KubeApi; the caller retries later (handlers.Retries for reconciles, the progress loop its next tick)."""


class EndlessBackoff:
    """kopf's settings.networking.error_backoffs: kopf gives up on a request after its backoffs run out (the
    default: 9 attempts in 54 s, then a traceback and a dead watcher). These never run out, and each request
    starts them afresh (an iterable, not an iterator)."""

    def __init__(self, first: tuple[float, ...] = (1, 1, 2, 3), then: float = 5.0):
        self.first, self.then = first, then

    def __iter__(self) -> Iterator[float]:
        yield from self.first
        while True:
            yield self.then


ENDLESS_BACKOFF = EndlessBackoff()

# Exceptions that mean "no answer from the server" (class names, so that this module needs no aiohttp imported:
# kopf and KubeApi use aiohttp; the rest are the standard library's).
_UNREACHABLE_TYPES = {
    "ApiUnreachable", "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
    "ClientConnectionResetError", "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError",
    "ClientPayloadError",
    "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "TimeoutError",
    "RemoteDisconnected",
}
# ... except a server certificate the client refuses (aiohttp's subclass of ClientConnectorError): a wrong CA does
# not pass by waiting, so it is raised and logged as it is. (Other TLS errors, such as an EOF in the handshake of a
# server that is stopping, stay outages.)
_TLS_TYPES = {"ClientConnectorCertificateError"}
# kopf's retry records carry the exception only as repr() in the message.
_RETRY_RECORD = re.compile(r"^Request attempt #\d+(/\d+)? failed; (will retry|escalating): ")
# ... and while it starts: 503 "the request has been made before all known HTTP paths have been installed",
# 429 "storage is (re)initializing".
_UNREACHABLE_TEXT = re.compile("|".join(sorted(_UNREACHABLE_TYPES)) + r"|status=50[234]\b|\(re\)initializing")


def unreachable(exc: Optional[BaseException]) -> bool:
    """exc, or an exception it was raised from, says the API server did not answer."""
    seen = 0
    while exc is not None and seen < 10:
        if any(t.__name__ in _TLS_TYPES for t in type(exc).__mro__):
            return False  # an answer of sorts: a certificate the client refuses is no outage, and says so
        if any(t.__name__ in _UNREACHABLE_TYPES for t in type(exc).__mro__):
            return True
        status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
        if type(exc).__name__ == "APIServerError" and status in (502, 503, 504):
            return True  # kopf: the server is starting ("... before all known HTTP paths have been installed")
        if type(exc).__name__ == "APITooManyRequestsError" and "initializing" in str(exc):
            return True  # kopf: "storage is (re)initializing" right after the server started
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class ApiHealth:
    """Whether the API server answers, as the operator last saw it; logs each change once."""

    # A server that has just come back may still refuse some requests (429 "initializing", 503) for a few
    # seconds after /readyz says ready: a relapse within this window is the same outage, not a new one to log.
    SETTLE_SECONDS = 30.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.down_since: Optional[float] = None
        self.outages = 0
        self.back_at: Optional[float] = None
        self._relapse = False

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def lost(self, detail: str = "") -> None:
        if self.down_since is None:
            self.down_since = self.clock()
            if self.back_at is not None and self.down_since - self.back_at < self.SETTLE_SECONDS:
                self._relapse = True  # still settling after the last outage: stay quiet
                log.debug("the Kubernetes API server refused a request while settling (%s)", detail[:200])
                return
            self.outages += 1
            log.warning("the Kubernetes API server is unreachable%s; the operator retries quietly and catches up "
                        "when it answers again", f" ({detail[:200]})" if detail else "")

    def ok(self) -> None:
        if self.down_since is not None:
            seconds = self.clock() - self.down_since
            self.down_since = None
            if self._relapse:
                self._relapse = False
                return
            self.back_at = self.clock()
            log.warning("the Kubernetes API server answers again (unreachable for %.0f s); status catches up now",
                        seconds)

    async def watch(self, api: Any, interval: float = 1.0, stopped: Optional[asyncio.Event] = None) -> None:
        """While the server is down, ask it every `interval` s whether it is ready (GET /readyz): only then is it
        back. A server that is starting answers some requests and refuses others (503, 429) for a while; calling
        it back at its first answer would make one outage look like several."""
        while stopped is None or not stopped.is_set():
            if self.down:
                try:
                    if await api.ready():
                        self.ok()
                except Exception:  # noqa: BLE001 - still down: ask again
                    pass
            await asyncio.sleep(interval)


class OutageFilter(logging.Filter):
    """Drops log records about an unreachable API server (see the module docstring), telling `health`."""

    def __init__(self, health: ApiHealth):
        super().__init__("kubetune-outage")
        self.health = health

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == log.name:
            return True  # our own two warnings
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and isinstance(record.args, tuple):  # log.warning("... failed: %s", exc)
            exc = next((a for a in record.args if isinstance(a, BaseException)), None)
        if exc is not None and unreachable(exc):
            self.health.lost(f"{type(exc).__name__}")
            return False
        if record.name.startswith("kopf"):
            msg = record.getMessage()
            if _RETRY_RECORD.match(msg) and _UNREACHABLE_TEXT.search(msg):
                self.health.lost(msg.split(" -> ", 1)[-1].split("(", 1)[0])
                return False
            if "failed temporarily" in msg and ApiUnreachable.__name__ in msg:
                return False
        return True


def install_log_filter(health: ApiHealth, logger: Optional[logging.Logger] = None) -> OutageFilter:
    """Put the filter on every handler of `logger` (default: the root logger, where kopf's handlers are)."""
    target = logger or logging.getLogger()
    flt = OutageFilter(health)
    for handler in target.handlers:
        if not any(isinstance(f, OutageFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
