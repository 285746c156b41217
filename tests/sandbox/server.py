"""HTTP layer of the Nuntiq sandbox: routing, auth, fault injection, request counting.

Stdlib only (``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive, every response
with a Content-Length) so the sandbox needs nothing beyond the project's own deps. The
state machine lives in ``store.py``; this module only turns requests into store calls and
store results (or ``ApiError``) into responses.

Base path is ``/api``: endpoints are ``/api/v1/...``, test controls ``/api/_sandbox/...``.
Faults and request counts are per server process (in memory); invoices, leases, delta
streams and the clock are in the database.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from tests.sandbox.store import ApiError, AttachmentFile, Store, validation_error

BASE_PATH = "/api"
CHUNK = 64 * 1024
FAULT_ENDPOINTS = ("claim", "get", "acknowledge", "integration_result", "attachment", "delta")
# "garbled": the request is served, but its answer is replaced by a 200 that is not JSON
# (a proxy's error page). "swap" (get only): the answer is another invoice's.
# "truncate" (attachment only): the answer's headers promise the whole file, then the
# connection drops after ``after_bytes`` of it. "stall" (attachment only): after
# ``after_bytes`` the body pauses for ``latency_ms``, then goes on.
FAULT_KINDS = ("status", "latency", "reset", "garbled", "swap", "truncate", "stall")
GARBLED_BODY = b"<html><body>502 Bad Gateway (upstream hiccup)</body></html>"
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")

# The machine code an injected status fault carries in its error body.
FAULT_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]
    body: dict[str, Any]

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")


@dataclass
class FaultRule:
    endpoint: str
    kind: str
    status: int = 503
    retry_after: int | None = None
    latency_ms: int = 0
    probability: float = 1.0
    count: int | None = None  # remaining hits; None = unlimited
    after_bytes: int = 0  # truncate, stall: how much of the body goes out first

    @classmethod
    def parse(cls, raw: Any) -> FaultRule:
        if not isinstance(raw, dict):
            raise validation_error("each fault rule must be an object")
        unknown = set(raw) - {
            "endpoint",
            "kind",
            "status",
            "retry_after",
            "latency_ms",
            "probability",
            "count",
            "after_bytes",
        }
        if unknown:
            raise validation_error(f"unknown fault rule field(s): {', '.join(sorted(unknown))}")
        endpoint, kind = raw.get("endpoint"), raw.get("kind")
        if endpoint not in (*FAULT_ENDPOINTS, "*"):
            raise validation_error(f"fault endpoint must be one of {FAULT_ENDPOINTS} or '*'")
        if kind not in FAULT_KINDS:
            raise validation_error(f"fault kind must be one of {FAULT_KINDS}")
        rule = cls(endpoint=endpoint, kind=kind)
        for name in ("status", "retry_after", "latency_ms", "count", "after_bytes"):
            value = raw.get(name)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise validation_error(f"fault {name} must be a non-negative integer")
                setattr(rule, name, value)
        if kind == "status" and not 400 <= rule.status <= 599:
            raise validation_error("fault status must be 400..599")
        if kind == "swap" and endpoint != "get":
            raise validation_error("a swap fault applies to the get endpoint only")
        if kind in ("truncate", "stall") and endpoint != "attachment":
            raise validation_error(f"a {kind} fault applies to the attachment endpoint only")
        probability = raw.get("probability", 1.0)
        if (
            not isinstance(probability, int | float)
            or isinstance(probability, bool)
            or not 0.0 <= probability <= 1.0
        ):
            raise validation_error("fault probability must be a number in 0..1")
        rule.probability = float(probability)
        return rule


@dataclass
class Faults:
    """The active fault rules. Thread-safe: ``count`` must limit hits exactly."""

    rules: list[FaultRule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rng: random.Random = field(default_factory=random.Random)

    def replace(self, rules: list[FaultRule]) -> None:
        with self.lock:
            self.rules = rules

    def hits(self, endpoint: str) -> list[FaultRule]:
        """The rules that fire for this request (consuming their counts), in order."""
        fired = []
        with self.lock:
            for rule in self.rules:
                if rule.endpoint not in ("*", endpoint):
                    continue
                if rule.count is not None and rule.count <= 0:
                    continue
                if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                fired.append(rule)
                if rule.kind != "latency":
                    break  # a status or reset ends the request; later rules never see it
        return fired


Handler = Callable[[Request], Any]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    endpoint: str  # fault/count name, or "sandbox" for the controls
    handler: Handler


class SandboxApp:
    """Everything a request needs: the store, faults, counters, keys and the route table."""

    def __init__(self, store: Store, api_key: str, readonly_api_key: str | None = None) -> None:
        self.store = store
        self.api_key = api_key
        self.readonly_api_key = readonly_api_key
        self.faults = Faults()
        self.counts: Counter[str] = Counter()
        self.counts_lock = threading.Lock()
        self.routes: list[Route] = []
        seg = r"(?P<{}>[^/]+)"
        add = self._add
        add("POST", "/v1/invoices/claim", "claim", self.claim)
        add("GET", "/v1/invoices/" + seg.format("token"), "get", self.get_invoice)
        add(
            "POST",
            "/v1/invoices/" + seg.format("token") + "/acknowledge",
            "acknowledge",
            self.acknowledge,
        )
        add(
            "POST",
            "/v1/invoices/" + seg.format("token") + "/integration-result",
            "integration_result",
            self.integration_result,
        )
        add("GET", "/v1/attachment/" + seg.format("token"), "attachment", self.attachment)
        stream = "/v1/delta/streams/" + seg.format("connector") + "/" + seg.format("stream")
        add("GET", stream, "delta", self.delta_get)
        add("POST", stream + "/begin", "delta", self.delta_begin)
        add("POST", stream + "/complete", "delta", self.delta_complete)
        add("POST", stream + "/fail", "delta", self.delta_fail)
        add("POST", "/_sandbox/seed", "sandbox", self.c_seed)
        add("GET", "/_sandbox/invoices", "sandbox", self.c_invoices)
        add(
            "POST",
            "/_sandbox/invoices/" + seg.format("token") + "/status",
            "sandbox",
            self.c_set_status,
        )
        add("POST", "/_sandbox/clock", "sandbox", self.c_clock)
        add("GET", "/_sandbox/clock", "sandbox", self.c_clock_get)
        add("POST", "/_sandbox/faults", "sandbox", self.c_faults)
        add("POST", "/_sandbox/reset", "sandbox", self.c_reset)
        add(
            "DELETE",
            "/_sandbox/attachments/" + seg.format("token"),
            "sandbox",
            self.c_delete_attachment,
        )
        add("GET", "/_sandbox/requests", "sandbox", self.c_requests)

    def _add(self, method: str, path: str, endpoint: str, handler: Handler) -> None:
        self.routes.append(Route(method, re.compile("^" + path + "$"), endpoint, handler))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        if path.startswith(BASE_PATH + "/"):
            path = path[len(BASE_PATH) :]
            path_known = False
            for route in self.routes:
                m = route.pattern.match(path)
                if m:
                    if route.method == method:
                        return route, m.groupdict()
                    path_known = True
            if path_known:
                raise ApiError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}")
        raise ApiError(404, "NOT_FOUND", f"no route {method} {path}")

    def count(self, endpoint: str) -> None:
        with self.counts_lock:
            self.counts[endpoint] += 1

    def check_auth(self, method: str, key: str | None) -> None:
        if key is not None and key == self.api_key:
            return
        if key is not None and self.readonly_api_key is not None and key == self.readonly_api_key:
            if method == "GET":
                return
            raise ApiError(403, "FORBIDDEN", "this API key may only read")
        raise ApiError(401, "UNAUTHORIZED", "missing or invalid X-API-Key")

    # --- endpoints ------------------------------------------------------------------

    def claim(self, r: Request) -> Any:
        return self.store.claim(r.body)

    def get_invoice(self, r: Request) -> Any:
        return self.store.get_invoice(r.params["token"], include_null=r.flag("includeNull"))

    def acknowledge(self, r: Request) -> Any:
        return self.store.acknowledge(r.params["token"], r.body)

    def integration_result(self, r: Request) -> Any:
        return self.store.integration_result(r.params["token"], r.body, debug=r.flag("debug"))

    def another_invoice(self, token: str) -> Any:
        """The get answer of some invoice other than ``token`` (the ``swap`` fault)."""
        for row in self.store.list_invoices():
            if row["invoice_token"] != token:
                return self.store.get_invoice(row["invoice_token"], include_null=False)
        raise ApiError(500, "INTERNAL_ERROR", "swap fault: there is no other invoice")

    def attachment(self, r: Request) -> Any:
        token = r.params["token"]
        if not UUID_RE.match(token):
            raise validation_error("attachment_token must be a UUID")
        return self.store.attachment(token)

    def delta_get(self, r: Request) -> Any:
        return self.store.delta_get(r.params["connector"], r.params["stream"])

    def delta_begin(self, r: Request) -> Any:
        return self.store.delta_begin(r.params["connector"], r.params["stream"], r.body)

    def delta_complete(self, r: Request) -> Any:
        return self.store.delta_complete(r.params["connector"], r.params["stream"], r.body)

    def delta_fail(self, r: Request) -> Any:
        return self.store.delta_fail(r.params["connector"], r.params["stream"], r.body)

    # --- controls -------------------------------------------------------------------

    def c_seed(self, r: Request) -> Any:
        count = r.body.get("count")
        seed = r.body.get("seed", 0)
        awkward = r.body.get("awkward", False)
        per_invoice = r.body.get("attachments_per_invoice", 0)
        size = r.body.get("attachment_bytes", 2048)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 100_000:
            raise validation_error("count must be an integer 0..100000")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise validation_error("seed must be an integer")
        if not isinstance(awkward, bool):
            raise validation_error("awkward must be a boolean")
        if (
            not isinstance(per_invoice, int)
            or isinstance(per_invoice, bool)
            or not 0 <= per_invoice <= 100
        ):
            raise validation_error("attachments_per_invoice must be an integer 0..100")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 2**40:
            raise validation_error("attachment_bytes must be a non-negative integer")
        tokens = self.store.seed(
            count,
            seed=seed,
            awkward=awkward,
            attachments_per_invoice=per_invoice,
            attachment_bytes=size,
        )
        return {"invoice_tokens": tokens}

    def c_delete_attachment(self, r: Request) -> Any:
        return self.store.delete_attachment(r.params["token"])

    def c_invoices(self, r: Request) -> Any:
        return {"invoices": self.store.list_invoices()}

    def c_set_status(self, r: Request) -> Any:
        status = r.body.get("status")
        if not isinstance(status, int) or isinstance(status, bool):
            raise validation_error("status must be an integer")
        return self.store.set_status(r.params["token"], status)

    def c_clock(self, r: Request) -> Any:
        seconds = r.body.get("advance_seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise validation_error("advance_seconds must be a number")
        return {"now": self.store.advance_clock(float(seconds))}

    def c_clock_get(self, r: Request) -> Any:
        return {"now": self.store.now()}

    def c_faults(self, r: Request) -> Any:
        raw = r.body.get("rules")
        if not isinstance(raw, list):
            raise validation_error("rules must be a list")
        self.faults.replace([FaultRule.parse(x) for x in raw])
        return {"rules": len(raw)}

    def c_reset(self, r: Request) -> Any:
        self.store.reset()
        self.faults.replace([])
        with self.counts_lock:
            self.counts.clear()
        return {}

    def c_requests(self, r: Request) -> Any:
        with self.counts_lock:
            return {"counts": {name: self.counts.get(name, 0) for name in FAULT_ENDPOINTS}}


class _Reset(Exception):
    """Raised to drop the connection without a response (the ``reset`` fault)."""


class _Truncated(Exception):
    """Raised to drop the connection in the middle of a body (the ``truncate`` fault)."""


# Limits of a request's header block (as http.client's).
MAX_HEADERS = 100
MAX_HEADER_LINE = 65536


class _RequestHeaders(dict[str, str]):
    """A request's headers by lower-cased name; of a repeated one the first, as
    http.server's headers answer ``get``."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class SandboxRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    server_version = "NuntiqSandbox/1.0"
    # A response larger than the write buffer goes out in several writes; without
    # TCP_NODELAY, Nagle + delayed ACK add ~40 ms to such a keep-alive request.
    disable_nagle_algorithm = True
    # Buffered: a response goes out in one send (handle_one_request flushes after every
    # request) instead of one for the headers and one for the body. An attachment larger
    # than the buffer still streams chunk by chunk.
    wbufsize = CHUNK
    server: _HTTPServer
    _date: tuple[int, str] = (0, "")  # the Date header of the current second

    def parse_request(self) -> bool:
        """The request line and headers of an HTTP/1.0 or 1.1 request (all a client of
        the contract speaks), as http.server's own would read them; any other request
        line goes to http.server's. It reads headers through the email package, a
        quarter of the sandbox's CPU per request; a plain loop does what we need."""
        raw: bytes = self.raw_requestline  # type: ignore[attr-defined]  # set by http.server
        words = str(raw, "iso-8859-1").rstrip("\r\n").split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            return super().parse_request()
        self.close_connection = True
        self.requestline = " ".join(words)
        self.command, path, self.request_version = words
        # As http.server (gh-87389): "//x" would read as a host to a client.
        self.path = "/" + path.lstrip("/") if path.startswith("//") else path
        headers = _RequestHeaders()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = str(line, "iso-8859-1").partition(":")
            if not colon:
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad header line")
                return False
            headers.setdefault(name.strip().lower(), value.strip())
        else:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers")
            return False
        self.headers = headers  # type: ignore[assignment]  # only .get() is used
        connection = headers.get("Connection", "").lower()
        keep_alive = self.request_version == "HTTP/1.1" or connection == "keep-alive"
        self.close_connection = connection == "close" or not keep_alive
        if headers.get("Expect", "").lower() == "100-continue" and (
            self.request_version == "HTTP/1.1"
        ):
            return self.handle_expect_100()
        return True

    def handle_expect_100(self) -> bool:
        answered = super().handle_expect_100()
        self.wfile.flush()  # the client waits for the 100 before it sends the body
        return answered

    def date_time_string(self, timestamp: float | None = None) -> str:
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        cached_second, text = SandboxRequestHandler._date
        if cached_second != second:  # formatted once a second, not once per response
            text = super().date_time_string(second)
            SandboxRequestHandler._date = (second, text)
        return text

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        app = self.server.app
        # Always drain the body first, so keep-alive stays in sync whatever we answer.
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send_json(
                411, {"error": "VALIDATION_ERROR", "message": "a Content-Length body is required"}
            )
            return
        raw = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        reply_fault = None
        try:
            route, params = app.match(method, url.path)
            if route.endpoint != "sandbox":
                app.count(route.endpoint)
                reply_fault = self._apply_faults(route.endpoint)
            app.check_auth(method, self.headers.get("X-API-Key"))
            body: dict[str, Any] = {}
            if method != "GET" and raw.strip():
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise validation_error("request body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise validation_error("request body must be a JSON object")
            result = route.handler(Request(method, url.path, query, params, body))
            if reply_fault is not None and reply_fault.kind == "swap":
                result = app.another_invoice(params["token"])
        except _Reset:
            self._drop_connection()
            return
        except ApiError as e:
            self._send_json(e.status, {"error": e.code, "message": e.message}, e.headers)
            return
        except Exception as e:  # a sandbox bug must still answer in the contract's shape
            self.log_error("internal error: %r", e)
            self._send_json(500, {"error": "INTERNAL_ERROR", "message": repr(e)})
            return
        if reply_fault is not None and reply_fault.kind == "garbled":
            self._send_garbled()
        elif isinstance(result, AttachmentFile):
            try:
                self._send_file(result, inline=self._flag(query, "inline"), fault=reply_fault)
            except _Truncated:
                self._drop_connection()
        else:
            self._send_json(200, result)

    @staticmethod
    def _flag(query: dict[str, str], name: str) -> bool:
        return query.get(name, "").lower() in ("1", "true", "yes")

    def _apply_faults(self, endpoint: str) -> FaultRule | None:
        """Delay, drop or refuse the request as the rules say; returns a fault that
        alters the answer instead ("garbled", "swap", "truncate", "stall"), if one fired."""
        for rule in self.server.app.faults.hits(endpoint):
            if rule.kind == "latency":
                time.sleep(rule.latency_ms / 1000)
            elif rule.kind == "reset":
                raise _Reset()
            elif rule.kind in ("garbled", "swap", "truncate", "stall"):
                return rule
            else:
                headers = {}
                if rule.retry_after is not None:
                    headers["Retry-After"] = str(rule.retry_after)
                raise ApiError(
                    rule.status,
                    FAULT_CODES.get(rule.status, "SANDBOX_FAULT"),
                    f"injected fault: HTTP {rule.status}",
                    headers,
                )
        return None

    def _drop_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_garbled(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(GARBLED_BODY)))
        self.end_headers()
        self.wfile.write(GARBLED_BODY)

    def _send_file(self, f: AttachmentFile, *, inline: bool, fault: FaultRule | None) -> None:
        disposition = "inline" if inline else "attachment"
        # filename= must stay ASCII, quote-safe and on one line (a CR LF in a name would
        # end the header); filename* carries the exact UTF-8 name, percent-encoded.
        ascii_name = "".join(c if " " <= c < "\x7f" and c != '"' else "_" for c in f.file_name)
        self.send_response(200)
        self.send_header("Content-Type", f.content_type)
        self.send_header("Content-Length", str(f.size))
        self.send_header(
            "Content-Disposition",
            f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(f.file_name)}",
        )
        self.end_headers()
        sent = 0
        for chunk in f.chunks(CHUNK):  # streamed, as the real endpoint does
            if fault is not None and sent + len(chunk) > fault.after_bytes:
                head = chunk[: max(fault.after_bytes - sent, 0)]
                self.wfile.write(head)
                sent += len(head)
                chunk = chunk[len(head) :]
                self.wfile.flush()
                if fault.kind == "truncate":
                    raise _Truncated()
                time.sleep(fault.latency_ms / 1000)  # stall, once
                fault = None
            self.wfile.write(chunk)
            sent += len(chunk)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.connections.discard(self.connection)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connecting at once (concurrency tests)

    def __init__(self, addr: tuple[str, int], app: SandboxApp, *, verbose: bool) -> None:
        self.app = app
        self.verbose = verbose
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, SandboxRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response (timeouts, resets) are normal here, not errors.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        if self.verbose:
            super().handle_error(request, client_address)

    def close_all_connections(self) -> None:
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class SandboxServer:
    """The sandbox on a background thread: ``with SandboxServer(db) as s: s.base_url``."""

    def __init__(
        self,
        db_path: str,
        api_key: str = "sandbox-key",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        readonly_api_key: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.db_path = str(db_path)
        self.api_key = api_key
        self.readonly_api_key = readonly_api_key
        self.host = host
        self.port = port
        self.verbose = verbose
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("sandbox server is not started")
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self._httpd.server_address[1]}{BASE_PATH}"

    def build(self) -> _HTTPServer:
        """Bind the socket (port 0 picks a free one) without serving yet."""
        app = SandboxApp(Store(self.db_path), self.api_key, self.readonly_api_key)
        self._httpd = _HTTPServer((self.host, self.port), app, verbose=self.verbose)
        return self._httpd

    def start(self) -> SandboxServer:
        httpd = self.build()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="nuntiq-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Foreground serving (the CLI); returns after ``stop()`` or KeyboardInterrupt."""
        httpd = self._httpd or self.build()
        try:
            httpd.serve_forever(poll_interval=0.2)
        finally:
            httpd.close_all_connections()
            httpd.server_close()
            httpd.app.store.close()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._thread is not None:
            httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        httpd.close_all_connections()
        httpd.server_close()
        httpd.app.store.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
