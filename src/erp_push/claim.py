"""The Nuntiq client: claim, get, acknowledge, integration result, attachments, delta streams.

Wire details (paths, field names, error codes) come from ``wire.py``; this module adds the
HTTP session, timeouts, retries and parsing into ``models.py`` objects. Every failure
leaves here as an ``errors.NuntiqError`` subclass carrying the HTTP status, the server's
``error`` code and message, and never the API key.

Retries: capped exponential backoff with jitter on 429 (honouring ``Retry-After``), 502,
503, 504, lost connections (refused, reset, timed out, closed without an answer) and
success answers that are not JSON at all (a proxy's hiccup more often than a bad invoice),
and only for calls the contract makes safe to repeat (``wire.Endpoint.retry_safe``; today
all of them, each for a reason given in ``wire.py``). Other 4xx are never retried; 500 is
not retried either (see ``errors.NuntiqServerError``).

Time: ``timeout`` bounds each request as a whole (connect, send, and every read up to the
last byte), so a server that trickles its answer cannot hold a request longer; see
``_DeadlineBackend``. Each call has a time budget for all its attempts and waits
(``RetryPolicy.max_elapsed``); the delta-stream bookkeeping a short one. Past the client's
``deadline`` (the run's), no invoice call starts or retries.

Size: a success answer is read only up to ``max_reply_bytes``, so a huge reply costs
bounded memory. Secrets: the key is cut out of everything a server sends back (reason
phrase, body, headers in httpx's and httpcore's debug logs) before it reaches any output.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Literal, TypeVar
from urllib.parse import urlsplit

import httpcore
import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from erp_push import __version__, errors, wire
from erp_push.models import (
    AcknowledgeResponse,
    ClaimResponse,
    DeltaStreamState,
    IntegrationResult,
    IntegrationResultResponse,
    InvoiceDetail,
    Lease,
)
from erp_push.text import redact

log = logging.getLogger("erp_push.nuntiq")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

CHUNK_SIZE = 64 * 1024
ERROR_BODY_MAX = 64 * 1024  # an error body is read only this far (it is a short JSON)
# The client's own defaults, for use on its own (tests, tooling); settings.Config takes
# the same values from wire, which it can import without loading httpx.
DEFAULT_TIMEOUT_SECONDS = wire.DEFAULT_TIMEOUT_SECONDS
DEFAULT_MAX_REPLY_BYTES = wire.DEFAULT_MAX_REPLY_BYTES
DEFAULT_MAX_CONNECTIONS = 10
DEFAULT_MAX_ATTACHMENT_BYTES = wire.DEFAULT_MAX_ATTACHMENT_BYTES
# The slowest an attachment download may be on average: its whole-download budget is the
# idle timeout plus its size at this rate (100 MB: about 6.5 minutes).
ATTACHMENT_MIN_RATE = 256 * 1024
# The loggers httpx and httpcore narrate requests on (at DEBUG, with reason phrases and
# response headers, which a hostile server can fill with whatever it was sent).
HTTP_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call that is safe to repeat is sent again.

    The n-th retry waits a random time drawn under ``min(max_delay, base_delay * 2**(n-1))``
    ("equal" jitter: at least half of it; "full": anywhere from zero), so that many clients
    hit by the same outage do not come back in lock step. A 429/503 ``Retry-After`` is a
    floor for that wait; when the server asks for more than ``max_retry_after`` seconds
    the call gives up instead of retrying early against the server's wish.

    A call ends within ``max_elapsed`` seconds of its start, whatever the server does: no
    retry starts whose wait would end later, and an attempt still running then is cut off
    (a timeout).
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0
    max_retry_after: float = 60.0
    jitter: Literal["equal", "full", "none"] = "equal"
    max_elapsed: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_delay, self.max_delay, self.max_retry_after) < 0:
            raise ValueError("delays must not be negative")
        if self.max_elapsed <= 0:
            raise ValueError("max_elapsed must be positive")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (1 = the second attempt)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** min(retry - 1, 60))
        if self.jitter == "full":
            return rng.uniform(0.0, ceiling)
        if self.jitter == "equal":
            return ceiling / 2 + rng.uniform(0.0, ceiling / 2)
        return ceiling

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float | None:
        """The wait before retry ``retry``, or None when the server asks for too long."""
        wait = self.backoff(retry, rng)
        if retry_after is None:
            return wait
        if retry_after > self.max_retry_after:
            return None
        return max(wait, retry_after)


DEFAULT_RETRY = RetryPolicy()

# The delta stream only records runs: a run must not wait minutes for it (with 429
# Retry-After: 60 everywhere, five patient attempts took four minutes). One retry after a
# short wait, all within ten seconds, and a server asking for more is not waited for.
BOOKKEEPING_RETRY = RetryPolicy(
    max_attempts=2, base_delay=0.5, max_delay=2.0, max_retry_after=3.0, max_elapsed=10.0
)


class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not: carries what to report.

    ``garbled``: the answer was a success but not JSON; ``error`` is then the protocol
    error it becomes if every later attempt is garbled too.
    """

    def __init__(
        self,
        error: errors.NuntiqError,
        reason: str,
        retry_after: float | None,
        *,
        garbled: bool = False,
    ) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason
        self.retry_after = retry_after
        self.garbled = garbled


# --- a bound on each request as a whole -----------------------------------------------
#
# httpx's timeouts bound each socket operation, so a server sending a byte every few
# seconds keeps a request alive forever. httpcore, under httpx, does every socket
# operation of a request through a "network backend" on the thread that sends the
# request; ours caps the timeout of each one to what is left until that request's
# deadline. No read then waits past the deadline, so nothing needs waking: the request
# fails with a timeout on time, and httpcore closes the connection.


class _RequestDeadline(threading.local):
    """The deadline (a ``time.monotonic`` value) of the request this thread is sending."""

    at: float | None = None


_REQUEST_DEADLINE = _RequestDeadline()


@contextmanager
def _deadline(at: float) -> Iterator[None]:
    previous = _REQUEST_DEADLINE.at
    _REQUEST_DEADLINE.at = at
    try:
        yield
    finally:
        _REQUEST_DEADLINE.at = previous


def _capped(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    """``timeout`` shortened to what is left of the current request's time."""
    at = _REQUEST_DEADLINE.at
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the request ran out of time")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _capped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _bounded_http_transport(
    base_url: str, limits: httpx.Limits, tls: ssl.SSLContext | None
) -> httpx.HTTPTransport:
    """httpx's own transport (with the proxy the environment names, as httpx would pick
    it), its sockets behind ``_DeadlineBackend``. ``tls`` is shared by every connection
    (loading the CA bundle once, not once per connection); None for plain http."""
    http_transport = httpx.HTTPTransport(
        limits=limits, proxy=_environment_proxy(base_url), verify=tls or False
    )
    # httpx passes no network backend through to httpcore; its pool is where httpcore
    # keeps one. If a later httpx moves it, this fails loudly rather than run unbounded.
    pool = http_transport._pool
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return http_transport


def _environment_proxy(base_url: str) -> str | None:
    """The proxy httpx itself would take for this URL (HTTPS_PROXY / HTTP_PROXY /
    ALL_PROXY, or the system's), unless NO_PROXY exempts its host: our HTTP transport replaces
    the one httpx would have built, and must not lose that."""
    parts = urlsplit(base_url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class _KeyRedactor(logging.Filter):
    """Cuts the API key out of httpx's and httpcore's log lines (reason phrases and
    response headers are the server's text, which may echo the key)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class NuntiqClient:
    """A connection pool to one Nuntiq tenant, safe to share between threads (each
    request borrows a connection of its own; the pipeline's workers share one client).
    Close it (or use ``with``) when done.

    Every Nuntiq failure is raised as an ``errors.NuntiqError`` subclass (only
    ``download_attachment`` also lets the destination's own ``OSError`` through).
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy | None = None,
        bookkeeping_retry: RetryPolicy = BOOKKEEPING_RETRY,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        deadline: float | None = None,
        http_transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Raises ``errors.SettingsError`` for a base URL that is not https (or loopback
        http) or an empty key.

        ``timeout`` bounds each request as a whole, from connect to its last byte.
        ``retry`` paces the invoice calls (default: ``DEFAULT_RETRY`` with a time budget
        of at least twice ``timeout``), ``bookkeeping_retry`` the delta-stream calls.
        ``max_connections`` sizes the connection pool (one per thread sending at once).
        ``max_reply_bytes`` is the largest success answer read (an invoice is the largest).
        ``deadline`` (a ``time.monotonic`` value, also settable later as ``.deadline``):
        after it no invoice call starts and none is retried (``NuntiqDeadlineReached``);
        bookkeeping calls still go, within their own short budget. ``http_transport``
        replaces httpx's transport (then only httpx's per-operation timeouts apply);
        ``sleep`` is how retries wait (tests pass a recorder).
        """
        problems = []
        if problem := wire.base_url_problem(base_url):
            problems.append(problem)
        if not api_key.get_secret_value().strip():
            problems.append("the Nuntiq API key is empty")
        if problems:
            raise errors.SettingsError(problems)
        if max_connections < 1 or max_reply_bytes < 1 or timeout <= 0:
            raise ValueError("max_connections, max_reply_bytes and timeout must be positive")
        self._api_key = api_key
        self._timeout = timeout
        self._retry = retry or RetryPolicy(max_elapsed=max(DEFAULT_RETRY.max_elapsed, 2 * timeout))
        self._bookkeeping_retry = bookkeeping_retry
        self._max_reply_bytes = max_reply_bytes
        self.deadline = deadline
        self._sleep = sleep
        self._rng = random.Random()
        self.base_url = base_url.rstrip("/")
        self._host = urlsplit(self.base_url).hostname or self.base_url
        # Every request carries these; the key is added as each request is built, so it
        # stays a SecretStr everywhere else (no default headers, no repr holds it).
        self._headers = (
            ("Accept", "application/json"),
            ("User-Agent", f"erp-push/{__version__}"),
        )
        # One httpx transport (one keep-alive connection) per lane, lent to one request at
        # a time. Requests go straight to the transport: httpx's Client layer (URL merging,
        # cookies, auth and redirect flows, event hooks) was half of a request's CPU, and
        # Nuntiq needs none of it (no cookies; a redirect is an error, never followed, as
        # it would carry the key wherever it points). httpx's own pool re-examined every
        # pooled connection for every request, hence one transport per connection.
        self._max_transports = max_connections
        self._http_transport = http_transport
        self._tls: ssl.SSLContext | None = None
        self._spare: queue.SimpleQueue[httpx.BaseTransport] = queue.SimpleQueue()
        self._transports: list[httpx.BaseTransport] = []
        self._transports_lock = threading.Lock()
        self._spare.put(self._new_transport())
        self._log_filter = _KeyRedactor(self._redact)
        for name in HTTP_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)

    def __repr__(self) -> str:
        return f"NuntiqClient(base_url={self.base_url!r})"

    def _new_transport(self) -> httpx.BaseTransport:
        transport = self._http_transport or _bounded_http_transport(
            self.base_url,
            httpx.Limits(max_connections=1, max_keepalive_connections=1),
            self._tls_context(),
        )
        self._transports.append(transport)
        return transport

    def _tls_context(self) -> ssl.SSLContext | None:
        """One TLS context (httpx's own defaults) for all of this client's connections.

        Plain http is only allowed on loopback (wire.base_url_problem): such a client
        never speaks TLS and skips loading the CA bundle, a third of an idle run's time.
        """
        if self.base_url.startswith("http://"):
            return None
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        return self._tls

    @contextmanager
    def _lend(self) -> Iterator[httpx.BaseTransport]:
        """A transport (one connection) for one request; at most max_connections at once."""
        try:
            transport = self._spare.get_nowait()
        except queue.Empty:
            with self._transports_lock:
                fresh = len(self._transports) < self._max_transports
                made = self._new_transport() if fresh else None
            # every connection busy and no room for another: wait for one to come back
            transport = made if made is not None else self._spare.get()
        try:
            yield transport
        finally:
            self._spare.put(transport)

    def close(self) -> None:
        with self._transports_lock:
            for transport in dict.fromkeys(self._transports):  # a given one is shared
                transport.close()
        for name in HTTP_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)

    def __enter__(self) -> NuntiqClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the claim flow ---------------------------------------------------------------

    def claim(
        self,
        *,
        limit: int,
        lease_ttl_seconds: int = wire.DEFAULT_LEASE_TTL_SECONDS,
        idempotency_key: str | None = None,
        ext_references: Mapping[int, str] | None = None,
    ) -> list[Lease]:
        """Lease up to ``limit`` claimable invoices (90/91 → 92); [] when none are left.

        Retried on 429/502/503/504 and lost connections, always with the same idempotency
        key (one uuid4 per call when none is given), so a retry after a lost response gets
        the leases the first attempt took instead of leasing more. Calling ``claim`` again
        with the same key within the TTL is equally safe; without one it leases new
        invoices. Limits are checked before sending (``errors.NuntiqRequestInvalid``).
        """
        body = wire.claim_body(
            limit=limit,
            lease_ttl_seconds=lease_ttl_seconds,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            ext_references=ext_references,
        )
        data = self._call_json(wire.CLAIM, wire.path_for(wire.CLAIM), body)
        leases = _parse(wire.CLAIM, ClaimResponse, {"leases": _envelope(wire.CLAIM, data)})
        return leases.leases

    def get_invoice(self, invoice_token: str) -> InvoiceDetail:
        """The invoice with its email, in any status. A read: retried, safe to repeat.

        An answer about another invoice raises ``errors.NuntiqReplyMismatch`` (transient:
        the invoice waits for a later run); one larger than ``max_reply_bytes``
        ``errors.NuntiqReplyTooLarge``; one that does not fit the contract, or is not JSON
        on two attempts, ``errors.NuntiqProtocolError``.
        """
        path = wire.path_for(wire.GET_INVOICE, invoice_token=invoice_token)
        data = self._call_json(wire.GET_INVOICE, path)
        detail = _parse(wire.GET_INVOICE, InvoiceDetail, data)
        self._check_about(wire.GET_INVOICE, invoice_token, detail.invoice.invoice_token)
        return detail

    def acknowledge(self, invoice_token: str, lease_token: str) -> AcknowledgeResponse:
        """Mark the invoice received (92 → 93) under ``lease_token``.

        Idempotent (a repeat under the same lease answers ``idempotent: true``), so it is
        retried and safe to call again. Raises ``LeaseExpired`` when the lease lapsed or
        another lease holds the invoice, ``InvalidTransition`` outside 92/93.
        """
        path = wire.path_for(wire.ACKNOWLEDGE, invoice_token=invoice_token)
        data = self._call_json(wire.ACKNOWLEDGE, path, wire.acknowledge_body(lease_token))
        return _parse(wire.ACKNOWLEDGE, AcknowledgeResponse, data)

    def report_result(
        self, invoice_token: str, lease_token: str, result: IntegrationResult
    ) -> IntegrationResultResponse:
        """Report the final outcome (92/93 → 100 on success, → 97 on failure).

        Reporting the same result again is idempotent (``status_changed: false``), so it
        is retried and safe to call again; the opposite result afterwards raises
        ``InvalidTransition``, a lapsed lease ``LeaseExpired``. A too-long failure message
        is truncated to the contract's 500 characters; other limits raise
        ``errors.NuntiqRequestInvalid`` before sending.
        """
        path = wire.path_for(wire.INTEGRATION_RESULT, invoice_token=invoice_token)
        body = wire.integration_result_body(lease_token, result)
        data = self._call_json(wire.INTEGRATION_RESULT, path, body)
        answer = _parse(wire.INTEGRATION_RESULT, IntegrationResultResponse, data)
        # An answer about another invoice cannot confirm ours: report it again later.
        self._check_about(wire.INTEGRATION_RESULT, invoice_token, answer.invoice_token)
        return answer

    def _check_about(self, endpoint: wire.Endpoint, asked: str, answered: str) -> None:
        if answered != asked:
            other = self._redact(wire.truncate_text(answered, 80))
            raise errors.NuntiqReplyMismatch(
                f"Nuntiq {endpoint.name}: asked about invoice {asked}, the answer is about "
                f"{other!r}; not used"
            )

    # --- attachments ------------------------------------------------------------------

    def attachment_budget(self, max_bytes: int | None) -> float:
        """The default time for a whole download of at most ``max_bytes``: the idle
        timeout plus that size at ATTACHMENT_MIN_RATE."""
        return self._timeout + (max_bytes or DEFAULT_MAX_ATTACHMENT_BYTES) / ATTACHMENT_MIN_RATE

    def download_attachment(
        self,
        attachment_token: str,
        dest: BinaryIO,
        *,
        max_bytes: int | None = None,
        budget: float | None = None,
    ) -> int:
        """Stream the attachment into ``dest`` in chunks; returns the bytes written.

        Never held whole in memory. Its time is not the whole-request ``timeout`` meant
        for small JSON answers: every read must bring data within ``timeout`` (an idle
        bound), and the whole download, retries included, must end within ``budget``
        seconds (default: ``attachment_budget(max_bytes)``). More than
        ``max_bytes`` (announced or counted) raises ``errors.AttachmentTooLarge`` at once,
        without reading further.

        A read: retried. When the connection breaks mid-body, ``dest`` is rewound to
        where it started (when seekable) and the download starts over; an unseekable
        ``dest`` that already received data makes the failure final instead.
        """
        endpoint = wire.ATTACHMENT
        path = wire.path_for(endpoint, attachment_token=attachment_token)
        start = _position(dest)
        if budget is None:
            budget = self.attachment_budget(max_bytes)

        def attempt(deadline: float) -> int:
            written = 0
            try:
                with self._exchange(endpoint, path, None, deadline, idle=self._timeout) as response:
                    announced = response.headers.get("Content-Length", "")
                    if max_bytes is not None and announced.isdigit() and int(announced) > max_bytes:
                        raise _attachment_too_large(attachment_token, max_bytes, int(announced))
                    for chunk in response.iter_bytes(CHUNK_SIZE):
                        written += len(chunk)
                        if max_bytes is not None and written > max_bytes:
                            raise _attachment_too_large(attachment_token, max_bytes, None)
                        dest.write(chunk)
            except _Retryable as failure:
                if written and not _rewind(dest, start):
                    raise failure.error from None  # cannot undo a partial write: no retry
                raise
            return written

        return self._with_retries(endpoint, attempt, attempt_budget=budget)

    # --- delta streams (run bookkeeping) ----------------------------------------------

    def delta_get(self, connector: str, stream: str) -> DeltaStreamState:
        """The stream's current state (a synthetic ``idle`` one if never used). A read."""
        return self._delta(wire.DELTA_GET, connector, stream, None)

    def delta_begin(
        self, connector: str, stream: str, cursor_type: str = "timestamp_utc"
    ) -> DeltaStreamState:
        """Start a run; returns the committed cursor (the lower bound). Retried: a repeat
        only moves ``started_at_utc``."""
        return self._delta(wire.DELTA_BEGIN, connector, stream, wire.delta_begin_body(cursor_type))

    def delta_complete(
        self,
        connector: str,
        stream: str,
        *,
        new_cursor_value: str,
        records_processed: int,
        metadata: Mapping[str, Any],
    ) -> DeltaStreamState:
        """Commit the run's cursor. Retried: for ``timestamp_utc`` an equal cursor counts as
        an advance, so a repeat is a no-op. A backwards cursor raises
        ``NuntiqValidationError`` (422 CURSOR_REGRESSION), never retried."""
        body = wire.delta_complete_body(new_cursor_value, records_processed, metadata)
        return self._delta(wire.DELTA_COMPLETE, connector, stream, body)

    def delta_fail(self, connector: str, stream: str, error_summary: str) -> DeltaStreamState:
        """Record a failed run; the cursor stays. Retried: a repeat writes the same."""
        return self._delta(wire.DELTA_FAIL, connector, stream, wire.delta_fail_body(error_summary))

    def _delta(
        self,
        endpoint: wire.Endpoint,
        connector: str,
        stream: str,
        body: dict[str, Any] | None,
    ) -> DeltaStreamState:
        path = wire.path_for(endpoint, connector=connector, stream=stream)
        return _parse(endpoint, DeltaStreamState, self._call_json(endpoint, path, body))

    # --- one call, with retries -------------------------------------------------------

    def _call_json(
        self, endpoint: wire.Endpoint, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        """Send the request (retrying per policy) and return the decoded JSON answer."""

        def attempt(deadline: float) -> Any:
            with self._exchange(endpoint, path, body, deadline) as response:
                content = self._read_reply(endpoint, response)
            try:
                return json.loads(content)
            except ValueError:
                error = errors.NuntiqProtocolError(
                    f"Nuntiq {endpoint.name}: the answer is not JSON"
                )
                raise _Retryable(error, "the answer is not JSON", None, garbled=True) from None

        return self._with_retries(endpoint, attempt)

    @contextmanager
    def _exchange(
        self,
        endpoint: wire.Endpoint,
        path: str,
        body: dict[str, Any] | None,
        deadline: float,
        *,
        idle: float | None = None,
    ) -> Iterator[httpx.Response]:
        """One attempt, over by ``deadline``: the response (streamed) when it is a
        success; otherwise its error, wrapped in ``_Retryable`` when worth retrying.
        ``idle`` also bounds each socket operation (a download: data must keep coming)."""
        limit = max(deadline - time.monotonic(), 0.001)
        each = limit if idle is None else min(idle, limit)
        headers = [*self._headers, (wire.AUTH_HEADER, self._api_key.get_secret_value())]
        content = None
        if body is not None:
            # As httpx encodes json=: compact UTF-8, and no NaN (not JSON).
            content = json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
            headers.append(("Content-Type", "application/json"))
        try:
            request = httpx.Request(
                endpoint.method,
                self.base_url + path,
                headers=headers,
                content=content,
                extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), each)},
            )
            with _deadline(deadline), self._lend() as transport:
                response = transport.handle_request(request)
                try:
                    if not response.is_success:
                        raise self._http_failure(endpoint, response, _read_capped(response))
                    yield response
                finally:
                    response.close()
        except httpx.TransportError as exc:
            # Not chained: httpx's exception text may quote a header it refused (the
            # key) and tracebacks print causes; our message has the kind and details.
            raise self._no_answer(endpoint, exc, limit) from None

    def _read_reply(self, endpoint: wire.Endpoint, response: httpx.Response) -> bytes:
        """The whole body, unless it is larger than ``max_reply_bytes``: then reading
        stops (and the connection is dropped), so memory stays bounded."""
        cap = self._max_reply_bytes
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > cap:
            raise self._too_large(endpoint, f"announced as {int(announced):,} bytes")
        data = bytearray()
        for chunk in response.iter_bytes(CHUNK_SIZE):
            data += chunk
            if len(data) > cap:
                raise self._too_large(endpoint, f"more than {cap:,} bytes")
        return bytes(data)

    def _too_large(self, endpoint: wire.Endpoint, size: str) -> errors.NuntiqReplyTooLarge:
        return errors.NuntiqReplyTooLarge(
            f"Nuntiq {endpoint.name}: the answer is too large ({size}; at most "
            f"{self._max_reply_bytes:,} are read)"
        )

    def _with_retries(
        self,
        endpoint: wire.Endpoint,
        attempt: Callable[[float], T],
        *,
        attempt_budget: float | None = None,
    ) -> T:
        """Run ``attempt(deadline)`` until it returns, fails for good, or time runs out.

        Each attempt has ``timeout`` seconds; a download has ``attempt_budget`` instead,
        for all its attempts together (its own time, not the policy's)."""
        if endpoint.bookkeeping:
            # The run's own records: still sent after the run's deadline (so that its
            # end is recorded), but never for long.
            policy, run_deadline = self._bookkeeping_retry, None
        else:
            policy, run_deadline = self._retry, self.deadline
        started = time.monotonic()
        if run_deadline is not None and started >= run_deadline:
            refused = errors.NuntiqDeadlineReached(
                f"Nuntiq {endpoint.name}: not sent, the run's time limit is reached"
            )
            refused.attempts = 0
            raise refused
        each = self._timeout if attempt_budget is None else attempt_budget
        call_end = started + (policy.max_elapsed if attempt_budget is None else attempt_budget)
        garbled = 0
        for number in range(1, policy.max_attempts + 1):
            try:
                return attempt(min(time.monotonic() + each, call_end))
            except errors.NuntiqError as final:
                final.attempts = number  # a final answer, possibly after earlier retries
                raise
            except _Retryable as failure:
                error = failure.error
                error.attempts = number
                garbled += failure.garbled
                if not endpoint.retry_safe:
                    raise error from failure.__cause__
                if number == policy.max_attempts:
                    why = f"gave up after {number} attempts"
                    raise _gave_up(error, why, garbled) from failure.__cause__
                delay = policy.delay(number, failure.retry_after, self._rng)
                if delay is None:
                    why = (
                        f"the server asks to retry after {failure.retry_after:.0f}s, longer "
                        f"than the {policy.max_retry_after:.0f}s erp-push waits; "
                        f"{number} attempt(s) made"
                    )
                    raise _gave_up(error, why, garbled) from failure.__cause__
                # Waiting only to give up afterwards helps nobody: stop now instead.
                resume = time.monotonic() + delay
                if run_deadline is not None and resume >= run_deadline:
                    raise _deadline_reached(error, number) from failure.__cause__
                if resume >= call_end:
                    why = (
                        f"its {policy.max_elapsed:.0f}s time budget would be spent before a "
                        f"retry; {number} attempt(s) made"
                    )
                    raise _gave_up(error, why, garbled) from failure.__cause__
                log.warning(
                    "Nuntiq %s: attempt %d/%d failed (%s); retrying in %.2fs",
                    endpoint.name,
                    number,
                    policy.max_attempts,
                    failure.reason,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # --- turning failures into errors -------------------------------------------------

    def _http_failure(
        self, endpoint: wire.Endpoint, response: httpx.Response, body: bytes
    ) -> _Retryable | errors.NuntiqError:
        """The error for a non-2xx answer; wrapped in ``_Retryable`` when worth retrying.
        The server's text (reason phrase, code, message) arrives with the key cut out."""
        reason = self._redact(response.reason_phrase)
        error = self._scrubbed(wire.http_error(endpoint, response.status_code, body, reason=reason))
        if response.status_code not in wire.RETRYABLE_STATUSES:
            return error
        retry_after = wire.retry_after_seconds(response.headers.get(wire.RETRY_AFTER_HEADER))
        described = wire.describe_status(response.status_code, error.code, reason)
        return _Retryable(error, described, retry_after)

    def _no_answer(
        self, endpoint: wire.Endpoint, exc: httpx.TransportError, limit: float
    ) -> _Retryable | errors.NuntiqError:
        """The error for a request that got no (complete) answer; wrapped in ``_Retryable``
        for lost connections and timeouts."""
        kind = type(exc).__name__
        retryable = _is_retryable_no_answer(exc)
        # A failure on our side (e.g. httpx refusing a header) quotes what it refused,
        # which may be the key in an escaped form: only the kind is kept then.
        detail = self._redact(str(exc)) if retryable else ""
        host = self._host
        if isinstance(exc, httpx.TimeoutException):
            text = f"Nuntiq {endpoint.name}: no complete answer from {host} within {limit:.1f}s"
        else:
            text = f"Nuntiq {endpoint.name}: no answer from {host}"
        text += f" ({kind}: {detail})" if detail else f" ({kind})"
        error = errors.NuntiqUnavailable(text)
        if not retryable:
            return error  # e.g. a protocol error on our side: repeating cannot help
        return _Retryable(error, kind, None)

    def _redact(self, text: str) -> str:
        # Defence in depth: a server or library echoing the key must not spread it, as is
        # or in the escaped form of a repr or a URL.
        return redact(text, (self._api_key.get_secret_value(),))

    def _scrubbed(self, error: errors.NuntiqError) -> errors.NuntiqError:
        """``error`` with the key cut out of its message and code (both the server's text)."""
        message = self._redact(error.message)
        code = None if error.code is None else self._redact(error.code)
        if (message, code) == (error.message, error.code):
            return error
        return type(error)(message, status=error.status, code=code)


# --- helpers ------------------------------------------------------------------------------


def _is_retryable_no_answer(exc: httpx.TransportError) -> bool:
    """Lost or refused connections and timeouts; not our own protocol or proxy mistakes."""
    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def _gave_up(error: errors.NuntiqError, why: str, garbled: int = 0) -> errors.NuntiqError:
    """The same error, same class and fields, with why retrying stopped in its message.

    A success answer that was not JSON only once (``garbled`` < 2) is not held against
    the invoice: it stays transient, so the invoice waits for a later run.
    """
    kind: type[errors.NuntiqError] = type(error)
    if isinstance(error, errors.NuntiqProtocolError) and garbled < 2:
        kind = errors.NuntiqTransientError
    final = kind(f"{error.message} ({why})", status=error.status, code=error.code, hint=error.hint)
    final.attempts = error.attempts
    return final


def _attachment_too_large(token: str, cap: int, announced: int | None) -> errors.AttachmentTooLarge:
    size = (
        f"announced as {announced:,} bytes" if announced is not None else f"more than {cap:,} bytes"
    )
    return errors.AttachmentTooLarge(
        f"attachment {token} is too large ({size}; at most {cap:,} are downloaded)"
    )


def _deadline_reached(error: errors.NuntiqError, attempts: int) -> errors.NuntiqDeadlineReached:
    reached = errors.NuntiqDeadlineReached(
        f"{error.message} (not retried: the run's time limit comes first; "
        f"{attempts} attempt(s) made)",
        status=error.status,
        code=error.code,
    )
    reached.attempts = attempts
    return reached


def _envelope(endpoint: wire.Endpoint, data: Any) -> Any:
    if not isinstance(data, dict) or wire.LEASES_KEY not in data:
        raise errors.NuntiqProtocolError(
            f"Nuntiq {endpoint.name}: the answer has no {wire.LEASES_KEY!r} list"
        )
    return data[wire.LEASES_KEY]


def _parse(endpoint: wire.Endpoint, model: type[M], data: Any) -> M:
    """``data`` as ``model``; a mismatch is a protocol error naming fields, not values."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)[:5]
        )
        raise errors.NuntiqProtocolError(
            f"Nuntiq {endpoint.name}: the answer does not match the contract ({problems})"
        ) from None


def _read_capped(response: httpx.Response) -> bytes:
    """At most ``ERROR_BODY_MAX`` bytes of a streamed (error) body."""
    data = b""
    for chunk in response.iter_bytes(CHUNK_SIZE):
        data += chunk
        if len(data) >= ERROR_BODY_MAX:
            break
    return data[:ERROR_BODY_MAX]


def _position(dest: IO[bytes]) -> int | None:
    try:
        return dest.tell() if dest.seekable() else None
    except (OSError, ValueError):
        return None


def _rewind(dest: IO[bytes], start: int | None) -> bool:
    """Undo a partial download; False when ``dest`` cannot go back."""
    if start is None:
        return False
    dest.seek(start)
    dest.truncate()
    return True
