"""credentials.py (where the API server is, how to authenticate) and KubeApi (kube.py) over a real HTTP server on
127.0.0.1: JSON in and out, metav1.Status errors with their causes, a login again after a 401, no answer ->
ApiUnreachable. The e2e tests run the operator with the local cluster's kubeconfig (a token, a CA file)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
import pytest

from kubetune_operator import credentials
from kubetune_operator.credentials import CredentialsError, from_kubeconfig, in_cluster
from kubetune_operator.kube import ApiError, KubeApi
from kubetune_operator.outage import ApiHealth, ApiUnreachable


# ------------------------------------------------------------------------------------------------ in-cluster
def _service_account(tmp_path, token="sa-token-1"):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(token + "\n")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (sa / "namespace").write_text("kubetune-system")
    return sa


def test_in_cluster_uses_the_service_address_the_kubelet_gives_and_the_service_account(tmp_path):
    sa = _service_account(tmp_path)
    info = in_cluster(str(sa), {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert info.server == "https://10.96.0.1:443"
    assert info.token == "sa-token-1" and info.ca_path == str(sa / "ca.crt")
    assert info.default_namespace == "kubetune-system"
    assert info.as_http_headers() == {"Authorization": "Bearer sa-token-1"}
    v6 = in_cluster(str(sa), {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert v6.server == "https://[fd00::1]:443"


def test_in_cluster_is_none_outside_a_pod(tmp_path):
    sa = _service_account(tmp_path)
    assert in_cluster(str(sa), {}) is None  # no service address
    assert in_cluster(str(tmp_path / "absent"), {"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"}) is None


def test_in_cluster_reads_a_rotated_token_at_each_login(tmp_path):
    sa = _service_account(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert in_cluster(str(sa), env).token == "sa-token-1"
    (sa / "token").write_text("sa-token-2")
    assert in_cluster(str(sa), env).token == "sa-token-2"


# ------------------------------------------------------------------------------------------------ kubeconfig
def _kubeconfig(path, current="dev", user=None, cluster=None, extra_users=()):
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://127.0.0.1:6443",
                                                          "certificate-authority": "pki/ca.crt"}}],
        "users": [{"name": "u", "user": user if user is not None else {"token": "t0"}}, *extra_users],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def test_kubeconfig_paths_are_relative_to_the_file_that_names_them(tmp_path):
    cfg = _kubeconfig(tmp_path / "kc" / "config",
                      user={"client-certificate": "pki/admin.crt", "client-key": "/abs/admin.key"})
    info = from_kubeconfig(str(cfg))
    assert info.server == "https://127.0.0.1:6443"
    assert info.ca_path == str(tmp_path / "kc" / "pki" / "ca.crt")
    assert info.certificate_path == str(tmp_path / "kc" / "pki" / "admin.crt")
    assert info.private_key_path == "/abs/admin.key"
    assert info.default_namespace == "team-a" and info.token is None


def test_kubeconfig_token_file_is_read(tmp_path):
    (tmp_path / "tok").write_text("from-file\n")
    info = from_kubeconfig(str(_kubeconfig(tmp_path / "config", user={"tokenFile": "tok"})))
    assert info.token == "from-file"
    assert info.as_http_headers() == {"Authorization": "Bearer from-file"}


def test_kubeconfig_list_first_value_wins_and_missing_files_are_skipped(tmp_path):
    first = _kubeconfig(tmp_path / "a", user={"token": "first"})
    second = _kubeconfig(tmp_path / "b", current="other", user={"token": "second"})
    info = from_kubeconfig(":".join([str(tmp_path / "missing"), str(first), str(second)]))
    assert info.token == "first"


def test_kubeconfig_plugins_are_refused_with_the_user_named(tmp_path):
    cfg = _kubeconfig(tmp_path / "config", user={"exec": {"command": "aws", "args": ["eks", "get-token"]}})
    with pytest.raises(CredentialsError, match="user 'u' authenticates with 'exec'.*token, tokenFile"):
        from_kubeconfig(str(cfg))


def test_kubeconfig_without_current_context_or_with_unknown_entries(tmp_path):
    with pytest.raises(CredentialsError, match="no current-context"):
        from_kubeconfig(str(_kubeconfig(tmp_path / "a", current="")))
    with pytest.raises(CredentialsError, match="unknown entry"):
        from_kubeconfig(str(_kubeconfig(tmp_path / "b", current="nope")))


def test_load_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CredentialsError, match=r"no Kubernetes credentials.*\$KUBECONFIG"):
        credentials.load()
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config")))
    assert credentials.load().token == "t0"


# ------------------------------------------------------------------------------------------------ KubeApi
class _Server:
    """A real HTTP server: /ok echoes the request; /invalid answers 422 with a metav1.Status; /plain answers 500
    in plain text; every path answers 401 to a token other than `valid`."""

    def __init__(self):
        self.valid = "t2"
        self.seen: list[tuple[str, str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                outer.seen.append((self.command, self.path, auth, body))
                if auth != f"Bearer {outer.valid}":
                    return self._send(401, {"kind": "Status", "reason": "Unauthorized", "message": "no"})
                if self.path.startswith("/invalid"):
                    return self._send(422, {"kind": "Status", "reason": "Invalid", "message": "bad field",
                                            "details": {"causes": [{"field": "spec.x", "message": "no"}]}})
                if self.path.startswith("/plain"):
                    return self._send(500, b"oops, not json")
                if self.path.startswith("/slow"):
                    time.sleep(float(self.path.rsplit("/", 1)[1]))
                if self.path == "/readyz":
                    return self._send(200, b"ok")
                return self._send(200, {"method": self.command, "path": self.path,
                                        "type": self.headers.get("Content-Type"),
                                        "body": json.loads(body) if body else None})

            def _send(self, code, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def _login(server, tokens):
    calls = []

    def login():
        calls.append(1)
        return kopf.ConnectionInfo(server=server.url, token=tokens[min(len(calls), len(tokens)) - 1])
    return login, calls


def test_json_in_and_out_and_errors_with_their_causes(server):
    login, calls = _login(server, ["t2"])

    async def go():
        api = KubeApi(login)
        try:
            got = await api.merge_patch("/apis/x/v1/namespaces/a/things/b", {"spec": {"n": 1}})
            assert got == {"method": "PATCH", "path": "/apis/x/v1/namespaces/a/things/b",
                           "type": "application/merge-patch+json", "body": {"spec": {"n": 1}}}
            listed = await api.request("GET", "/ok", query={"labelSelector": "a=b,c"})
            assert listed["path"] == "/ok?labelSelector=a%3Db%2Cc"
            with pytest.raises(ApiError) as invalid:
                await api.request("POST", "/invalid", {"a": 1})
            assert invalid.value.status == 422 and invalid.value.invalid and invalid.value.reason == "Invalid"
            assert invalid.value.causes == [{"field": "spec.x", "message": "no"}]
            with pytest.raises(ApiError) as plain:
                await api.get("/plain")
            assert plain.value.status == 500 and "oops, not json" in str(plain.value)
            assert await api.ready() is True
        finally:
            await api.close()
    asyncio.run(go())
    assert len(calls) == 1, "one login for all calls"


def test_a_401_logs_in_again_once_and_repeats_the_request(server):
    login, calls = _login(server, ["t1", "t2"])  # the first token was rotated away

    async def go():
        api = KubeApi(login)
        try:
            assert (await api.request("POST", "/ok", {"k": "v"}))["body"] == {"k": "v"}
            assert (await api.get("/ok/again"))["path"] == "/ok/again"
        finally:
            await api.close()
    asyncio.run(go())
    assert len(calls) == 2
    assert [(m, p, a) for m, p, a, _ in server.seen] == [
        ("POST", "/ok", "Bearer t1"), ("POST", "/ok", "Bearer t2"), ("GET", "/ok/again", "Bearer t2")]
    assert server.seen[1][3] == b'{"k":"v"}', "the repeated request carries the body again"


def test_a_401_that_persists_is_an_api_error(server):
    login, calls = _login(server, ["wrong"])

    async def go():
        api = KubeApi(login)
        try:
            with pytest.raises(ApiError) as err:
                await api.get("/ok")
            assert err.value.status == 401
        finally:
            await api.close()
    asyncio.run(go())
    assert len(calls) == 2, "one login again, not a loop"


def test_no_answer_is_api_unreachable_and_reported_to_health():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    health = ApiHealth()
    api = KubeApi(lambda: kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"), timeout=2, health=health)

    async def go():
        try:
            with pytest.raises(ApiUnreachable):
                await api.get("/api/v1/namespaces/x/pods/y")
            assert health.down
            assert await api.ready() is False
        finally:
            await api.close()
    asyncio.run(go())


def test_a_session_per_event_loop(server):
    """Unit tests and tools call it from several asyncio.run()s: each loop gets its own connections."""
    login, calls = _login(server, ["t2"])
    api = KubeApi(login)

    async def once():
        try:
            return await api.get("/ok")
        finally:
            await api.close()
    for _ in range(2):
        assert asyncio.run(once())["method"] == "GET"
    assert len(calls) == 2


def test_waiting_for_a_free_connection_is_not_a_timeout(server):
    """One connection, three calls of 0.3 s each, a 0.5 s timeout: the third waits 0.6 s for the connection and
    still succeeds (the timeout bounds connecting and reading, as the thread pool did); a call whose answer takes
    longer than the timeout is ApiUnreachable."""
    login, _ = _login(server, ["t2"])
    health = ApiHealth()

    async def go():
        api = KubeApi(login, timeout=0.5, concurrency=1, health=health)
        try:
            started = time.monotonic()
            got = await asyncio.gather(*(api.get(f"/slow/{i}/0.3") for i in range(3)))
            assert [g["path"] for g in got] == [f"/slow/{i}/0.3" for i in range(3)]
            assert time.monotonic() - started >= 0.85, "served one at a time"
            assert not health.down
            with pytest.raises(ApiUnreachable):
                await api.get("/slow/x/1.5")
            assert health.down
        finally:
            await api.close()
    asyncio.run(go())


def test_many_401s_at_once_log_in_again_once_and_none_fails(server):
    """An expired token: five calls in flight get a 401 together; the first replaces the connection, the others
    retry on it (closing it under them would fail them), and the old one is closed later."""
    login, calls = _login(server, ["t1", "t2", "t3"])

    async def go():
        api = KubeApi(login)
        try:
            got = await asyncio.gather(*(api.get(f"/slow/{i}/0.2") for i in range(5)))
            assert [g["path"] for g in got] == [f"/slow/{i}/0.2" for i in range(5)]
            assert len(api._retired) == 1, "the replaced connection waits to be closed"
        finally:
            await api.close()
        assert not api._retired
    asyncio.run(go())
    assert len(calls) == 2, "one login again for all five"


def test_readiness_probe_does_not_queue_behind_calls(server):
    login, _ = _login(server, ["t2"])

    async def go():
        api = KubeApi(login, concurrency=1)
        try:
            slow = asyncio.ensure_future(api.get("/slow/x/1.5"))
            await asyncio.sleep(0.2)  # the one call connection is taken
            started = time.monotonic()
            assert await api.ready() is True
            assert time.monotonic() - started < 1.0
            await slow
        finally:
            await api.close()
    asyncio.run(go())


def test_kubeconfig_data_over_files_and_token_file_over_token(tmp_path):
    """client-go's precedence: certificate-authority-data over certificate-authority, tokenFile over token."""
    (tmp_path / "tok").write_text("from-file")
    cfg = _kubeconfig(tmp_path / "config",
                      cluster={"server": "https://h:6443", "certificate-authority": "ca.crt",
                               "certificate-authority-data": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="},
                      user={"token": "inline", "tokenFile": "tok", "client-certificate": "c.crt",
                            "client-certificate-data": "Y2VydA==", "client-key": "c.key", "client-key-data": "a2V5"})
    info = from_kubeconfig(str(cfg))
    assert info.token == "from-file"
    assert info.ca_path is None and info.ca_data.startswith("LS0t")
    assert info.certificate_path is None and info.private_key_path is None
