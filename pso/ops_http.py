"""The small HTTP server beside a worker loop (actor, learner): health, Prometheus metrics, JSON.

    GET /healthz   200 while the worker loop has reported progress within `stall_s`, else 503
                   (a hung collective or device call shows here, so an orchestrator restarts it)
    GET /metrics   the worker's Prometheus registry
    GET <route>    JSON from a callable (the learner's /v1/scaling)

It runs in a daemon thread with the standard library's HTTP server: the worker stays one
process with one job, and probes keep answering while the loop is busy on the device.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("pso.ops")


class OpsServer:
    def __init__(
        self,
        name: str,
        port: int,
        registry: CollectorRegistry,
        stall_s: float,
        routes: dict[str, Callable[[], dict]] | None = None,
        host: str = "0.0.0.0",
    ):
        self.name, self.registry, self.stall_s = name, registry, stall_s
        self.routes = dict(routes or {})
        self._last_beat = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the standard library's name)
                status, body, ctype = server.answer(self.path.split("?", 1)[0])
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds would flood the worker's log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"{name}-ops-http", daemon=True)
        self._thread.start()
        log.info("%s: /healthz, /metrics%s on :%d", name, "".join(f", {r}" for r in self.routes), self.port)

    def beat(self) -> None:
        """The worker loop made progress (or is waiting as it should)."""
        self._last_beat = time.monotonic()

    def answer(self, path: str) -> tuple[int, bytes, str]:
        if path == "/healthz":
            idle = time.monotonic() - self._last_beat
            ok = idle <= self.stall_s
            body = {"status": "ok" if ok else "stalled", "worker": self.name, "seconds_since_progress": round(idle, 1)}
            return (200 if ok else 503), _json(body), "application/json"
        if path == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path in self.routes:
            try:
                return 200, _json(self.routes[path]()), "application/json"
            except Exception as e:  # a probe or scraper gets an answer, the worker a log line
                log.exception("%s: %s failed", self.name, path)
                return 500, _json({"error": "internal", "message": f"{type(e).__name__}: {e}"}), "application/json"
        known = ", ".join(["/healthz", "/metrics", *self.routes])
        return 404, _json({"error": "not_found", "message": f"no route {path}; try {known}"}), "application/json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode()
