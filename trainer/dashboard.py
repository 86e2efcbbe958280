"""The dashboard: a read-only web page of one run, served over HTTP from its run folder.

The trainer serves it while it runs (`logging.dashboard`, `--dashboard HOST:PORT`; Swarm.start),
and `swarmrl dashboard runs/NAME` serves a folder later, finished or still running elsewhere.
The page (dashboard_static/: index.html, dashboard.js and the vendored uPlot) polls two JSON
endpoints: `/api/status` (the run's state and its workers: from the live server while the
trainer serves it, else from workers.json) and `/api/metrics?from=OFFSET` (the records of
metrics.jsonl after a byte offset, so each poll reads only what is new). Nothing is written
and only GET is answered. Bound to a non-loopback address it answers the API only to requests
carrying `?token=` (a random token, printed once in the URL; the static files hold no run data).
Worker names come from workers: the page sets them as text, never as markup, and the CSP
forbids inline script. The standard library's ThreadingHTTPServer runs in a daemon thread.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import secrets
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from swarmrl.base.logs import read_metrics
from swarmrl.trainer.ledger import LEDGER_FILE, read_ledger, run_state, worker_status

log = logging.getLogger("trainer")

STATIC = Path(__file__).parent / "dashboard_static"
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token is in the page's URL
    "Cache-Control": "no-store",
}
MAX_WORKER_ROWS = 200  # the most samples first; a Sybil swarm of thousands stays readable
Workers = Callable[[], dict[str, dict[str, Any]]]


class Dashboard:
    """Serves `folder`; `workers` gives the live worker table (else workers.json is read)."""

    def __init__(self, folder: Path, host: str, port: int, workers: Workers | None = None):
        self.folder, self.workers = folder, workers
        self.token = None if is_loopback(host) else secrets.token_urlsafe(18)
        server_class = _Server6 if ":" in host else _Server
        self.httpd = server_class((host, port), _Handler)
        self.httpd.dashboard = self
        self.host, self.port = host, self.httpd.server_address[1]
        try:
            self.settings = tomllib.loads((folder / "config.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):
            self.settings = {}

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> Dashboard:
        """Serve in a daemon thread."""
        serve = threading.Thread(  # it looks for `stop` every 0.1 s
            target=self.httpd.serve_forever, args=(0.1,), name="dashboard", daemon=True
        )
        serve.start()
        return self

    def serve(self) -> None:
        """Serve in this thread until interrupted (`swarmrl dashboard`)."""
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def allowed(self, token: str) -> bool:
        return self.token is None or hmac.compare_digest(token.encode(), self.token.encode())

    def status(self) -> dict[str, Any]:
        """The run's state and its workers, busiest first."""
        if self.workers is not None:
            table, state = self.workers(), "running"
        elif (self.folder / LEDGER_FILE).is_file():
            ledger = read_ledger(self.folder)
            table, state = ledger["workers"], run_state(self.folder, ledger)
        else:
            table, state = {}, "starting"
        total = sum(w["samples"] for w in table.values())
        finished = state != "running"
        rows = [
            {
                "name": name,
                "status": worker_status(name, w, finished),
                "accepted": w["samples"],
                "rejected": w["rejected"],
                "reasons": w["reasons"],
                "share": w["samples"] / total if total else 0.0,
                "samples_per_s": w["samples_per_s"],
                "last_seen": w["last_seen"],
                "quarantined": w["quarantined"],
            }
            for name, w in sorted(table.items(), key=lambda item: -item[1]["samples"])
        ]
        trainer = self.settings.get("trainer", {})
        return {
            "run": self.folder.name,
            "state": state,
            "now": time.time(),
            "max_steps": trainer.get("max_steps"),
            "max_minutes": trainer.get("max_minutes"),
            "workers": rows[:MAX_WORKER_ROWS],
            "more_workers": max(0, len(rows) - MAX_WORKER_ROWS),
        }

    def metrics(self, offset: int) -> dict[str, Any]:
        records, after = read_metrics(self.folder, offset)
        return {"records": [_finite(record) for record in records], "next": after}


def serve_run(folder: Path, address: tuple[str, int], workers: Workers) -> Dashboard | None:
    """The trainer's dashboard, started; None (logged) if it cannot listen there: a run does
    not fail for its dashboard."""
    try:
        dashboard = Dashboard(folder, *address, workers=workers).start()
    except OSError as error:
        log.error("dashboard: cannot listen on %s:%d (%s); running without it", *address, error)
        return None
    log.info("dashboard: %s", dashboard.url)
    return dashboard


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf (a step without scored samples) as null: JSON has no NaN."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that went away mid-answer is routine; anything else is worth a trace."""
        benign = isinstance(sys.exc_info()[1], ConnectionError)
        level = logging.DEBUG if benign else logging.WARNING
        log.log(level, "dashboard: request from %s failed", client_address[0], exc_info=not benign)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        dashboard = self.server.dashboard
        if url.path in PAGES:
            name, kind = PAGES[url.path]
            self._send(200, (STATIC / name).read_bytes(), kind)
            return
        if url.path == "/favicon.ico":  # browsers ask; there is none
            self._send(204, b"", "text/plain")
            return
        if not url.path.startswith("/api/"):
            self._send(404, b"not found", "text/plain")
            return
        if not dashboard.allowed(query.get("token", [""])[0]):
            self._send(403, b"this dashboard needs the token in the URL it printed", "text/plain")
            return
        if url.path == "/api/status":
            body = dashboard.status()
        elif url.path == "/api/metrics":
            offset = query.get("from", ["0"])[0]
            if not offset.isdigit():
                self._send(400, b"from: a byte offset", "text/plain")
                return
            body = dashboard.metrics(int(offset))
        else:
            self._send(404, b"not found", "text/plain")
            return
        self._send(200, json.dumps(body, allow_nan=False).encode(), "application/json")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: %s " + format, self.address_string(), *args)
