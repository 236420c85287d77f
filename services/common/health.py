"""Liveness and readiness on a small HTTP port, for the services that speak only ZeroMQ (tokenizer, scheduler, worker).

`GET /live` answers 200 while the service makes progress, `GET /ready` 200
once it serves; otherwise 503 with `{"error": reason}`.  The server runs on a
daemon thread, so it answers while the service's own thread is busy; it only
reports what that thread last recorded in the `Health` object:

* a loop (scheduler, tokenizer socket thread) calls `turn()` on every pass:
  no turn for `stall_timeout` seconds is a stalled loop;
* a worker calls `turn()` when a step starts and `rest()` when it ends
  (waiting for the next step is not a stall): a step running longer than
  `stall_timeout` is a rank stuck in a forward pass or a collective.

Kubernetes restarts a container whose liveness fails; readiness only decides
whether the pod counts as available (rollouts, disruption budgets).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


class Health:
    """What the probes report: written by the service's thread, read by the HTTP thread."""

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self._not_ready: str | None = "starting"
        self._since: float | None = None  # monotonic time of the last turn; None while resting

    def ready(self) -> None:
        self._not_ready = None

    def not_ready(self, reason: str) -> None:
        self._not_ready = reason

    def turn(self) -> None:
        self._since = time.monotonic()

    def rest(self) -> None:
        self._since = None

    def live_problem(self) -> str | None:
        """Why the service is not live (None: it is)."""
        since = self._since
        if since is not None and self.stall_timeout > 0 and time.monotonic() - since > self.stall_timeout:
            return f"no progress for {time.monotonic() - since:.0f} s (limit {self.stall_timeout:.0f} s)"
        return None

    def ready_problem(self) -> str | None:
        """Why the service is not ready (None: it is); a service that is not live is not ready either."""
        return self.live_problem() or self._not_ready


class _Handler(BaseHTTPRequestHandler):
    health: Health

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        checks = {"/live": self.health.live_problem, "/ready": self.health.ready_problem}
        check = checks.get(self.path.split("?", 1)[0])
        if check is None:
            self._answer(404, {"error": f"unknown path {self.path}; use /live or /ready"})
            return
        problem = check()
        if problem:
            self._answer(503, {"error": problem})
        else:
            self._answer(200, {"status": "ok"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # probes every few seconds: keep them out of the log
        log.debug("health %s", format % args)


def serve_health(health: Health, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    """Answer /live and /ready for `health` on `host:port` from a daemon thread; port 0 serves nothing."""
    if not port:
        return None
    handler = type("HealthHandler", (_Handler,), {"health": health})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    log.info("health checks on http://%s:%d/live and /ready", host, port)
    return server
