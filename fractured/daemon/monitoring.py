"""The monitoring endpoint over HTTP: /metrics for Prometheus, /healthz for probes.

A small threaded http.server in a daemon thread: a scrape is a few counters and two
GROUP BY queries, nothing that needs a web framework. The port is bound when the node
is built, so one already in use stops `serve` with an error naming [metrics] before
the DICOM listener opens, as any other configuration mistake does.
"""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from fractured import log
from fractured.config import ConfigError, MetricsSettings
from fractured.daemon.health import HealthChecks
from fractured.daemon.metrics import NodeMetrics

_log = log.get("fractured.monitoring")


class MonitoringServer(ThreadingHTTPServer):
    """Serves `metrics` and `health`; bound at construction, serving after start()."""

    daemon_threads = True  # a slow scraper never holds up the node's exit

    def __init__(self, settings: MetricsSettings, metrics: NodeMetrics,
                 health: HealthChecks) -> None:
        self.metrics, self.health = metrics, health
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((settings.host, settings.port), _Handler)
        except OSError as exc:
            key = "port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "host"
            raise ConfigError(f"[metrics].{key}: cannot listen on {settings.host}:"
                              f"{settings.port} ({exc.strerror or exc}); choose another "
                              "[metrics].port, or set [metrics].enabled = false") from None
        self._thread = threading.Thread(target=self.serve_forever, name="monitoring",
                                        daemon=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's FQDN, which can wait on DNS
        # for seconds; the handler never uses it.
        socketserver.TCPServer.server_bind(self)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()
        _log.info("metrics.listening", host=self.server_address[0], port=self.port)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: MonitoringServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.server.metrics.registry))
        elif path == "/healthz":
            report = self.server.health.check()
            self._reply(200 if report.healthy else 503, "application/json",
                        json.dumps(report.as_json()).encode())
        else:
            self._reply(404, "text/plain; charset=utf-8",
                        b"not found: this node serves /metrics and /healthz\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # http.server writes every request to stderr; a scrape every 15 s is not news.
        _log.debug("metrics.request", client=self.client_address[0], line=format % args)
