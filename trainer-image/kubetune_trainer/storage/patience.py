"""Waiting out object-storage outages: which failures are transient, and how long a run keeps retrying them.

One policy for every object-storage call of a run (model and data fetch, checkpoint upload and pruning,
artifact publishing, runs.json): a call that fails transiently (connection refused or reset, timeouts, HTTP 5xx,
throttling) is tried again with exponential backoff and jitter until its endpoint has been failing for the
patience budget (spec.output.storagePatienceSeconds, default kubetune_api.constants.DEFAULT_STORAGE_PATIENCE_S);
then StorageUnavailableError (exit 75, reason StorageUnavailable) names the endpoint and the call. Permanent
failures (403 and bad credentials, 404, NoSuchBucket, TLS certificate errors) are raised at once: waiting
cannot fix them, and storage/errors.py turns them into named ConfigErrors.

The budget is wall-clock per endpoint, shared by every call and thread: an outage starts at the first transient
failure and ends at the next success of any call to that endpoint. A run that makes 200 calls during a
one-minute outage waits one minute (not 200 budgets), and the background checkpoint uploader and the main
thread give up together. botocore's own retries (s3.py: a few attempts within one call) absorb sub-second
blips; this module covers outages longer than a call.

    from kubetune_trainer.storage import patience
    patience.configure(job.spec.output.storage_patience_seconds)   # the runner, once per run (None: default)
    patience.call(lambda: client.put_object(...), endpoint="http://s3:9000", what="writing s3://b/k")
    with patience.once():                                           # best-effort work (pruning): no waiting
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import threading
import time
from typing import Callable, Iterator, Optional, TypeVar

from kubetune_api.constants import DEFAULT_STORAGE_PATIENCE_S

from ..errors import StorageUnavailableError
from .errors import error_code, scrub

log = logging.getLogger("kubetune_trainer.storage")

T = TypeVar("T")

# S3 error codes a later attempt can succeed on (AWS's retry guidance plus what Ceph/SeaweedFS answer under load).
TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "EC2ThrottledException", "TransactionInProgressException",
    "InternalError", "InternalServerError", "ServiceUnavailable", "ServiceUnavailableException",
    "PriorRequestNotComplete", "OperationAborted", "429", "500", "502", "503", "504",
})
BACKOFF_BASE_S = 1.0   # first wait (before jitter); doubles per attempt of one call
BACKOFF_CAP_S = 30.0   # no wait longer than this: a store that comes back is noticed within ~30 s
REPORT_EVERY_S = 60.0  # while an outage lasts, one warning per endpoint this often (not one per retry)


def is_transient(exc: BaseException) -> bool:
    """True for failures a later attempt can get past: connection refused/reset/closed, connect and read
    timeouts, a truncated response, HTTP 5xx and 429, throttling codes. False for everything else (403,
    404, NoSuchBucket, InvalidAccessKeyId, TLS errors, missing credentials, our own errors)."""
    from botocore import exceptions as bx

    seen = 0
    while exc is not None and seen < 5:  # boto3 wraps: S3UploadFailedError(ClientError), RetriesExceededError
        seen += 1
        if isinstance(exc, bx.SSLError):  # a certificate problem stays one
            return False
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)):
            return True  # EndpointConnectionError, ConnectTimeout, ReadTimeout, ConnectionClosed, streaming errors
        if isinstance(exc, bx.ClientError):
            code = error_code(exc)
            status = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429))
        if isinstance(exc, (ConnectionError, TimeoutError)):  # socket-level errors that escaped botocore's wrapping
            return True
        mod = type(exc).__module__ or ""
        if mod.startswith(("boto3", "s3transfer")):
            inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
            if inner is None:
                return error_code(exc) in TRANSIENT_CODES  # the wrapped ClientError survives only as text
            exc = inner
            continue
        return False
    return False


# Per-context settings (contextvars, so storage code that fans out to a thread pool passes them on with
# `in_pool`): one attempt only (best-effort work), and "give up, this is no longer wanted".
_ONCE: contextvars.ContextVar[bool] = contextvars.ContextVar("kubetune_storage_once", default=False)
_CANCELLED: contextvars.ContextVar[Optional[Callable[[], bool]]] = contextvars.ContextVar(
    "kubetune_storage_cancelled", default=None)


def in_pool(fn: Callable[..., T]) -> Callable[..., T]:
    """fn bound to the caller's context, for ThreadPoolExecutor.map: once() and cancellable() then reach the
    pool's threads (each call runs in its own copy: one Context cannot be entered by two threads at once)."""
    ctx = contextvars.copy_context()

    def bound(*args, **kwargs):
        return ctx.copy().run(fn, *args, **kwargs)

    return bound


class Cancelled(Exception):
    """The caller gave up waiting (a superseded checkpoint upload, a run that ended another way)."""


class Patience:
    """The retry policy with its shared outage clock. `clock`, `sleep` and `rng` are injectable for tests."""

    def __init__(self, seconds: Optional[float] = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, rng: Callable[[], float] = random.random,
                 base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S):
        self.seconds = float(DEFAULT_STORAGE_PATIENCE_S if seconds is None else seconds)
        self._clock, self._sleep, self._rng = clock, sleep, rng
        self.base, self.cap = base, cap
        self._lock = threading.Lock()
        self._outage: dict[str, float] = {}     # endpoint -> when its current outage started
        self._reported: dict[str, float] = {}   # endpoint -> when we last logged about it
        self.retries = 0                         # transient failures retried (all endpoints, for reports/tests)

    def backoff(self, attempt: int) -> float:
        """Seconds before retry `attempt` (0-based) of one call: half fixed, half random ("equal jitter"), so
        retries of many calls spread out but every wait still grows: 0.5-1, 1-2, 2-4, ... capped at `cap`."""
        d = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return d / 2 + self._rng() * d / 2

    @contextlib.contextmanager
    def once(self) -> Iterator[None]:
        """Calls in this block get one attempt: best-effort work that is retried later anyway (pruning)."""
        token = _ONCE.set(True)
        try:
            yield
        finally:
            _ONCE.reset(token)

    @contextlib.contextmanager
    def cancellable(self, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Calls in this block stop retrying (Cancelled) once cancelled() is true: an upload stuck in an
        outage yields to a newer checkpoint."""
        token = _CANCELLED.set(cancelled)
        try:
            yield
        finally:
            _CANCELLED.reset(token)

    def outage_seconds(self, endpoint: str) -> float:
        """How long `endpoint` has been failing (0 when it is not)."""
        with self._lock:
            start = self._outage.get(endpoint)
        return 0.0 if start is None else self._clock() - start

    def in_outage(self) -> bool:
        """Some endpoint is failing right now (a call is waiting it out)."""
        return bool(self._outage)

    def call(self, fn: Callable[[], T], *, endpoint: str, what: str,
             cancelled: Optional[Callable[[], bool]] = None) -> T:
        """fn(), retried while it fails transiently and `endpoint` has failed for less than the budget.
        `what` says what the call does ("uploading s3://b/k"), for the messages. `cancelled()` true between
        attempts raises Cancelled."""
        attempt = 0
        cancelled = cancelled or _CANCELLED.get()
        while True:
            try:
                result = fn()
            except Exception as exc:
                if _ONCE.get() or not is_transient(exc):
                    raise
                waited = self._failed(endpoint, what, exc)
                remaining = self.seconds - waited
                if remaining <= 0:
                    raise StorageUnavailableError(self._give_up_message(endpoint, what, exc, waited)) from exc
                self.retries += 1
                # Never sleep past the deadline: the last attempt happens when the budget runs out.
                self._sleep(min(self.backoff(attempt), remaining))
                attempt += 1
                if cancelled is not None and cancelled():
                    raise Cancelled(what) from exc
                continue
            self._succeeded(endpoint)
            return result

    def _failed(self, endpoint: str, what: str, exc: BaseException) -> float:
        now = self._clock()
        with self._lock:
            start = self._outage.setdefault(endpoint, now)
            last = self._reported.get(endpoint)
            report = last is None or now - last >= REPORT_EVERY_S
            if report:
                self._reported[endpoint] = now
        if report:
            log.warning("object storage at %s failing for %.0f s (%s while %s); retrying for up to %.0f s "
                        "(spec.output.storagePatienceSeconds)", endpoint, now - start,
                        _describe(exc), what, self.seconds)
        return now - start

    def _succeeded(self, endpoint: str) -> None:
        if endpoint not in self._outage:  # the common case: no lock
            return
        with self._lock:
            start = self._outage.pop(endpoint, None)
            self._reported.pop(endpoint, None)
        if start is not None:
            log.warning("object storage at %s is back after %.0f s", endpoint, self._clock() - start)

    def _give_up_message(self, endpoint: str, what: str, exc: BaseException, waited: float) -> str:
        return (f"object storage at {endpoint} unreachable for {waited:.0f} s, the patience budget "
                f"(spec.output.storagePatienceSeconds: {self.seconds:.0f}); last call: {what}: {_describe(exc)}. "
                "No result was published (no manifest.json); spec.resumeFrom can continue from this run's latest "
                "complete checkpoint")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return scrub(f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__)


# ------------------------------------------------------------------------------------------ the run's policy
_policy = Patience()


def policy() -> Patience:
    return _policy


def configure(seconds: Optional[float] = None, **kwargs) -> Patience:
    """A fresh policy for this run (None: the default budget); forgets outages an earlier run saw."""
    global _policy
    _policy = Patience(seconds, **kwargs)
    return _policy


def call(fn: Callable[[], T], *, endpoint: str, what: str, cancelled: Optional[Callable[[], bool]] = None) -> T:
    return _policy.call(fn, endpoint=endpoint, what=what, cancelled=cancelled)


@contextlib.contextmanager
def once() -> Iterator[None]:
    with _policy.once():
        yield


@contextlib.contextmanager
def cancellable(cancelled: Callable[[], bool]) -> Iterator[None]:
    with _policy.cancellable(cancelled):
        yield
