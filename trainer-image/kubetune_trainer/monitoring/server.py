"""The trainer's HTTP endpoint: GET /metrics (Prometheus exposition of a registry), /progress (the run's
TrainerReport as JSON, which the operator polls) and /healthz, on a daemon thread.

    server = ProgressServer(host, port, registry, progress=lambda: report, on_scrape=exporter.note_scrape)
    server.start(); server.url; server.stop()
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client.exposition import choose_encoder

log = logging.getLogger("kubetune.monitoring")


class ProgressServer:
    def __init__(self, host: str, port: int, registry, *, progress: Callable[[], dict],
                 on_scrape: Callable[[], None] = lambda: None):
        self.host, self.port, self.registry = host, port, registry
        self._progress, self._on_scrape = progress, on_scrape
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Bind host:port (port 0: ephemeral; `self.port` is the bound one) and serve on a daemon thread."""
        handler = _make_handler(self)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_MetricsServer", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self._server = server_cls((self.host, self.port), handler)
        except OSError as exc:
            # Metrics must not cost the run: serve on an ephemeral port (loudly) rather than fail training.
            log.warning("metrics: cannot bind %s:%s (%s); serving on an ephemeral port instead", self.host,
                        self.port, exc)
            self._server = server_cls((self.host, 0), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubetune-metrics", daemon=True)
        self._thread.start()
        log.info("metrics: serving http://%s:%d/metrics and /progress", self.host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _make_handler(server: ProgressServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "kubetune-trainer"

        def do_GET(self):  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(server.registry)
                server._on_scrape()
            elif path == "/progress":
                body, content_type = json.dumps(server._progress()).encode(), "application/json"
            elif path == "/healthz":
                body, content_type = b"ok\n", "text/plain; charset=utf-8"
            else:
                self.send_error(404, "try /metrics, /progress or /healthz")
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 - scrapes every few seconds would flood the pod log
            pass

    return Handler
