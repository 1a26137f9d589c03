"""API-server outages are quiet (outage.py): the log records kopf and our own handlers produce while the
server does not answer are dropped, one warning goes out when it stops answering and one when it is back; other
errors still get through. The e2e test stops a real kube-apiserver (test_restarts.py)."""

from __future__ import annotations

import asyncio
import io
import logging
import socket

import aiohttp
import pytest

from kubetune_operator.kube import ApiError
from kubetune_operator.outage import ENDLESS_BACKOFF, ApiHealth, ApiUnreachable, OutageFilter, unreachable


@pytest.fixture
def captured():
    """A filtered handler on the loggers the records come from (in the operator it is kopf's root handler)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    health = ApiHealth(clock=iter(range(0, 1000, 7)).__next__)
    handler.addFilter(OutageFilter(health))
    loggers = [logging.getLogger(n) for n in ("kopf", "kubetune_operator")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield health, stream
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 6443, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connect call failed"))


def test_one_warning_each_way_and_no_traceback(captured):
    health, stream = captured
    kopf_watch = logging.getLogger("kopf._cogs.clients.watching")
    for n in range(1, 6):
        kopf_watch.error(f"Request attempt #{n} failed; will retry: GET https://127.0.0.1:6443/api/v1/pods?watch=true"
                         f" -> {_connector_error()!r}")
    try:
        raise ApiUnreachable("GET /apis/...: the API server did not answer") from _connector_error()
    except ApiUnreachable:
        logging.getLogger("kopf.objects").exception("Handler 'reconcile' failed with an exception. "
                                                                "Will retry.")
    kopf_watch.error("Request attempt #10 failed; will retry: GET https://127.0.0.1:6443/apis/x?watch=true -> "
                     "APITooManyRequestsError('storage is (re)initializing', {'code': 429}, status=429)")
    kopf_watch.error("Request attempt #11 failed; will retry: GET /x -> APIServerError('the request has been made "
                     "before all known HTTP paths have been installed, please try again', status=503)")
    logging.getLogger("kubetune_operator.progress").warning(
        "could not record progress of %s/%s: %s", "ns", "job", ApiUnreachable("no answer"))
    health.ok()
    health.ok()
    text = stream.getvalue()
    assert "Traceback" not in text and "Request attempt" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 2, text
    assert "unreachable" in lines[0] and "answers again (unreachable for 7 s)" in lines[1]
    assert health.outages == 1 and not health.down


def test_other_errors_still_get_through(captured):
    health, stream = captured
    try:
        raise ApiError(422, "Invalid", "spec.foo: bad")
    except ApiError:
        logging.getLogger("kopf.objects").exception("Handler 'reconcile' failed with an exception.")
    logging.getLogger("kopf._cogs.clients.api").error(
        "Request attempt #1/9 failed; will retry: GET /x -> APIForbiddenError('forbidden', status=403)")
    text = stream.getvalue()
    assert "Traceback" in text and "spec.foo: bad" in text and "APIForbiddenError" in text
    assert not health.down


def test_unreachable_looks_through_the_cause_chain():
    assert unreachable(ConnectionRefusedError())
    assert unreachable(_connector_error())
    try:
        try:
            raise aiohttp.ServerDisconnectedError()
        except Exception as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert unreachable(outer)
    assert not unreachable(ValueError("bad json"))
    assert not unreachable(ApiError(503, "ServiceUnavailable", "etcd"))


def test_kopf_backoffs_never_run_out_and_restart_per_request():
    first = list(zip(range(8), ENDLESS_BACKOFF))
    second = list(zip(range(8), ENDLESS_BACKOFF))
    assert first == second and [b for _, b in first] == [1, 1, 2, 3, 5, 5, 5, 5]
    assert not hasattr(ENDLESS_BACKOFF, "__len__"), "kopf counts attempts only for sized backoffs"


def test_a_relapse_while_the_server_settles_is_the_same_outage(caplog):
    """A server that just came back may refuse a few requests (429 'initializing'): no second pair of warnings
    within SETTLE_SECONDS; a later outage is a new one again."""
    now = [0.0]
    health = ApiHealth(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="kubetune_operator.outage"):
        health.lost("refused")
        now[0] = 25.0
        health.ok()
        now[0] = 26.0
        health.lost("APITooManyRequestsError")
        now[0] = 27.0
        health.ok()
        assert [r.getMessage().split(" (")[0].split(";")[0] for r in caplog.records] == [
            "the Kubernetes API server is unreachable", "the Kubernetes API server answers again"]
        assert health.outages == 1 and not health.down
        now[0] = 25.0 + ApiHealth.SETTLE_SECONDS + 1
        health.lost("refused")
        assert health.outages == 2 and len(caplog.records) == 3


def test_a_refused_server_certificate_is_not_an_outage_but_a_dropped_answer_is():
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 6443, True, True, None, None, None)
    import ssl

    cert = aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError("unknown authority"))
    assert not unreachable(cert), "a wrong CA does not pass by waiting: it must be logged"
    assert unreachable(ApiUnreachable("GET /x: no answer"))
    assert unreachable(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert unreachable(aiohttp.ClientConnectorSSLError(key, ssl.SSLEOFError("EOF in the handshake")))
