"""The dashboard's HTTP server (standard library only): the page, its static assets, /api/state, /api/events
(server-sent events), /metrics.

It only reads snapshots (never the aggregator's live objects), listens on loopback unless told otherwise, and
asks for a token (`FLORA_DASHBOARD_TOKEN`; HTTP basic auth with any user name, or a bearer token) when one is
set. Everything it serves is built from what devices said, so the page renders every value as text.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from flora.edge.errors import FloraError

log = logging.getLogger("flora.dashboard")

TOKEN_ENV = "FLORA_DASHBOARD_TOKEN"
STATIC = Path(__file__).resolve().parent / "static"
#: The files the page is made of (nothing else under static/ is served).
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "chart.umd.min.js": "text/javascript"}
MAX_EVENT_CLIENTS = 32
KEEPALIVE_S = 15.0
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


class DashboardError(FloraError, ValueError):
    """The dashboard cannot serve (a bad --http address, a port in use)."""


class Snapshots:
    """The latest snapshot and its version: the aggregator publishes, HTTP threads read and wait for changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = 0
        self._snapshot: Dict[str, Any] = {}

    def publish(self, snapshot: Dict[str, Any]) -> None:
        with self._cond:
            self._snapshot = snapshot
            self._version += 1
            self._cond.notify_all()

    def latest(self) -> Tuple[int, Dict[str, Any]]:
        with self._cond:
            return self._version, self._snapshot

    def wait(self, seen: int, timeout: float) -> Tuple[int, Dict[str, Any]]:
        """The latest snapshot once it is newer than version `seen`, or after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen, timeout)
            return self._version, self._snapshot


class PolledSnapshots(Snapshots):
    """Snapshots rebuilt by `build()` at most every `interval_s` (a state dir that another process writes)."""

    def __init__(self, build: Callable[[], Dict[str, Any]], interval_s: float = 1.0) -> None:
        super().__init__()
        self._build = build
        self._interval_s = interval_s
        self._next = 0.0
        self._refresh_lock = threading.Lock()

    def _refresh(self) -> None:
        with self._refresh_lock:
            if time.monotonic() < self._next:
                return
            self._next = time.monotonic() + self._interval_s
            snap = self._build()
            _, old = super().latest()
            if {k: v for k, v in snap.items() if k != "generated_at"} != \
                    {k: v for k, v in old.items() if k != "generated_at"}:
                self.publish(snap)

    def latest(self) -> Tuple[int, Dict[str, Any]]:
        self._refresh()
        return super().latest()

    def wait(self, seen: int, timeout: float) -> Tuple[int, Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            version, snap = self.latest()
            if version != seen or time.monotonic() >= deadline:
                return version, snap
            time.sleep(min(self._interval_s, max(deadline - time.monotonic(), 0.0)))


def parse_address(text: str) -> Tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or a bare `PORT` (loopback) -> (host, port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise DashboardError(f"--http {text!r}: expected HOST:PORT or PORT") from None
    if not 0 <= number <= 65535:
        raise DashboardError(f"--http {text!r}: port {number} is out of range")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: DashboardHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._authorised():
            self._send(HTTPStatus.UNAUTHORIZED, b"authorisation required\n", "text/plain",
                       {"WWW-Authenticate": 'Basic realm="flora-aggregator"'})
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self._page(), "text/html")
        elif path.startswith("/static/") and path[len("/static/"):] in ASSETS:
            name = path[len("/static/"):]
            self._send_file(name, ASSETS[name])
        elif path == "/api/state":
            _, snap = self.server.snapshots.latest()
            self._send(HTTPStatus.OK, json.dumps(snap, allow_nan=False).encode(), "application/json")
        elif path == "/api/events":
            self._events()
        elif path == "/metrics" and self.server.metrics is not None:
            body, content_type = self.server.metrics()
            self._send(HTTPStatus.OK, body, content_type)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer":
            secret = value.strip()
        elif scheme.lower() == "basic":
            try:
                secret = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(secret.encode(), token.encode())

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8" if content_type.startswith("text/")
                         or content_type == "application/json" else content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _page(self) -> bytes:
        """index.html with the current snapshot inside (a JSON data block the page renders before it loads: no
        blank first paint); `<` is escaped so no value can close the block."""
        _, snap = self.server.snapshots.latest()
        data = json.dumps(snap, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e")
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return page.replace("<!--SNAPSHOT-->", data).encode()

    def _send_file(self, name: str, content_type: str) -> None:
        self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), content_type)

    def _events(self) -> None:
        """Server-sent events: the snapshot whenever it changes, a comment every KEEPALIVE_S otherwise."""
        if not self.server.event_slots.acquire(blocking=False):
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many event streams\n", "text/plain")
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.close_connection = True
            seen = -1
            while not self.server.stopping.is_set():
                version, snap = self.server.snapshots.wait(seen, KEEPALIVE_S)
                if version != seen:
                    seen = version
                    chunk = b"event: snapshot\ndata: " + json.dumps(snap, allow_nan=False).encode() + b"\n\n"
                else:
                    chunk = b": keepalive\n\n"
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            self.server.event_slots.release()


class DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], snapshots: Snapshots, token: Optional[str],
                 metrics: Optional[Callable[[], Tuple[bytes, str]]]) -> None:
        self.snapshots = snapshots
        self.token = token
        self.metrics = metrics
        self.stopping = threading.Event()
        self.event_slots = threading.BoundedSemaphore(MAX_EVENT_CLIENTS)
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class Dashboard:
    """Serve `snapshots` (and /metrics from `metrics()`) on `address` in a background thread."""

    def __init__(self, address: str, snapshots: Snapshots, metrics: Optional[Callable[[], Tuple[bytes, str]]] = None,
                 token: Optional[str] = None) -> None:
        host, port = parse_address(address)
        if not is_loopback(host) and not token:
            log.warning("the dashboard listens on %s without a token: anyone who can reach it sees the federation "
                        "(set %s)", host, TOKEN_ENV)
        try:
            self.httpd = DashboardHTTPServer((host, port), snapshots, token, metrics)
        except OSError as exc:
            raise DashboardError(f"cannot serve the dashboard on {address}: {exc}") from exc
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="flora-dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"

    def start(self) -> Dashboard:
        self.thread.start()
        log.info("dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def state_dir_dashboard(state_dir: Path, address: str, token: Optional[str] = None) -> Dashboard:
    """The read-only dashboard of a state dir (a running federation's, or a copy): rebuilt at most once a second."""
    from .metrics import metrics_endpoint
    from .snapshot import from_state_dir

    snapshots = PolledSnapshots(lambda: from_state_dir(Path(state_dir), time.time()))
    return Dashboard(address, snapshots, metrics_endpoint(snapshots.latest), token)
