"""The Nuntiq client: claim, get, acknowledge, integration result, attachments, delta streams.

Wire details (paths, field names, error codes) come from ``wire.py``; this module adds the
HTTP session, timeouts, retries and parsing into ``models.py`` objects. Every failure
leaves here as an ``errors.NuntiqError`` subclass carrying the HTTP status, the server's
``error`` code and message, and never the API key.

Retries: capped exponential backoff with jitter on 429 (honouring ``Retry-After``), 502,
503, 504 and lost connections (refused, reset, timed out, closed without an answer), and
only for calls the contract makes safe to repeat (``wire.Endpoint.retry_safe``; today all
of them, each for a reason given in ``wire.py``). Other 4xx are never retried; 500 is not
retried either (see ``errors.NuntiqServerError``).
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal, TypeVar

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

log = logging.getLogger("erp_push.nuntiq")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

CHUNK_SIZE = 64 * 1024
ERROR_BODY_MAX = 64 * 1024  # an error body is read only this far (it is a short JSON)
REDACTED = "***"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call that is safe to repeat is sent again.

    The n-th retry waits a random time drawn under ``min(max_delay, base_delay * 2**(n-1))``
    ("equal" jitter: at least half of it; "full": anywhere from zero), so that many clients
    hit by the same outage do not come back in lock step. A 429/503 ``Retry-After`` is a
    floor for that wait; when the server asks for more than ``max_retry_after`` seconds
    the call gives up instead of retrying early against the server's wish.
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0
    max_retry_after: float = 60.0
    jitter: Literal["equal", "full", "none"] = "equal"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_delay, self.max_delay, self.max_retry_after) < 0:
            raise ValueError("delays must not be negative")

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


class _ApiKeyAuth(httpx.Auth):
    """Adds the API key header to each request as it is sent.

    The key stays a ``SecretStr`` until that moment, so it is in neither the client's
    default headers nor any repr.
    """

    def __init__(self, api_key: SecretStr) -> None:
        self._api_key = api_key

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers[wire.AUTH_HEADER] = self._api_key.get_secret_value()
        yield request

    def __repr__(self) -> str:
        return "_ApiKeyAuth(api_key=SecretStr('**********'))"


class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not: carries what to report."""

    def __init__(self, error: errors.NuntiqError, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason
        self.retry_after = retry_after


class NuntiqClient:
    """A connection pool to one Nuntiq tenant, safe to share between threads (httpx's
    client is; the pipeline's workers share one). Close it (or use ``with``) when done.

    Every Nuntiq failure is raised as an ``errors.NuntiqError`` subclass (only
    ``download_attachment`` also lets the destination's own ``OSError`` through).
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Raises ``errors.SettingsError`` for a base URL that is not https (or loopback
        http) or an empty key. ``timeout`` bounds each phase (connect, read, write, pool)
        of every request; ``sleep`` is how retries wait (tests pass a recorder)."""
        problems = []
        if problem := wire.base_url_problem(base_url):
            problems.append(problem)
        if not api_key.get_secret_value().strip():
            problems.append("the Nuntiq API key is empty")
        if problems:
            raise errors.SettingsError(problems)
        self._api_key = api_key
        self._retry = retry
        self._sleep = sleep
        self._rng = random.Random()
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            auth=_ApiKeyAuth(api_key),
            timeout=httpx.Timeout(timeout),
            # A redirect would carry X-API-Key to wherever it points; Nuntiq documents none.
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": f"erp-push/{__version__}"},
            transport=transport,
            # Every request goes to base_url, and plain http is only allowed on loopback
            # (wire.base_url_problem): such a client never speaks TLS, so it skips loading
            # the CA bundle (a third of an idle run's own time).
            verify=not self.base_url.startswith("http://"),
        )

    def __repr__(self) -> str:
        return f"NuntiqClient(base_url={self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NuntiqClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        """The invoice with its email, in any status. A read: retried, safe to repeat."""
        path = wire.path_for(wire.GET_INVOICE, invoice_token=invoice_token)
        return _parse(wire.GET_INVOICE, InvoiceDetail, self._call_json(wire.GET_INVOICE, path))

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
        return _parse(wire.INTEGRATION_RESULT, IntegrationResultResponse, data)

    # --- attachments ------------------------------------------------------------------

    def download_attachment(self, attachment_token: str, dest: BinaryIO) -> int:
        """Stream the attachment into ``dest`` in chunks; returns the bytes written.

        A read: retried. When the connection breaks mid-body, ``dest`` is rewound to
        where it started (when seekable) and the download starts over; an unseekable
        ``dest`` that already received data makes the failure final instead.
        """
        endpoint = wire.ATTACHMENT
        path = wire.path_for(endpoint, attachment_token=attachment_token)
        start = _position(dest)

        def attempt() -> int:
            written = 0
            try:
                with self._http.stream(endpoint.method, path) as response:
                    if not response.is_success:
                        raise self._http_failure(endpoint, response, _read_capped(response))
                    for chunk in response.iter_bytes(CHUNK_SIZE):
                        dest.write(chunk)
                        written += len(chunk)
            except httpx.TransportError as exc:
                failure = self._transport_failure(endpoint, exc)
                if isinstance(failure, _Retryable) and written and not _rewind(dest, start):
                    raise failure.error from None  # cannot undo a partial write: no retry
                raise failure from None  # httpx's own text may quote what it refused
            return written

        return self._with_retries(endpoint, attempt)

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

        def attempt() -> bytes:
            try:
                response = self._http.request(endpoint.method, path, json=body)
            except httpx.TransportError as exc:
                # Not chained: httpx's exception text may quote a header it refused (the
                # key) and tracebacks print causes; our message has the kind and details.
                raise self._transport_failure(endpoint, exc) from None
            if not response.is_success:
                raise self._http_failure(endpoint, response, response.content)
            return response.content

        content = self._with_retries(endpoint, attempt)
        try:
            return json.loads(content)
        except ValueError:
            raise errors.NuntiqProtocolError(
                f"Nuntiq {endpoint.name}: the answer is not JSON"
            ) from None

    def _with_retries(self, endpoint: wire.Endpoint, attempt: Callable[[], T]) -> T:
        policy = self._retry
        for number in range(1, policy.max_attempts + 1):
            try:
                return attempt()
            except errors.NuntiqError as final:
                final.attempts = number  # a final answer, possibly after earlier retries
                raise
            except _Retryable as failure:
                error = failure.error
                error.attempts = number
                if not endpoint.retry_safe:
                    raise error from failure.__cause__
                if number == policy.max_attempts:
                    raise _gave_up(error, f"gave up after {number} attempts") from failure.__cause__
                delay = policy.delay(number, failure.retry_after, self._rng)
                if delay is None:
                    raise _gave_up(
                        error,
                        f"the server asks to retry after {failure.retry_after:.0f}s, longer "
                        f"than the {policy.max_retry_after:.0f}s erp-push waits; "
                        f"{number} attempt(s) made",
                    ) from failure.__cause__
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
        """The error for a non-2xx answer; wrapped in ``_Retryable`` when worth retrying."""
        error = wire.http_error(
            endpoint,
            response.status_code,
            self._redact_bytes(body),
            reason=response.reason_phrase,
        )
        if response.status_code not in wire.RETRYABLE_STATUSES:
            return error
        retry_after = wire.retry_after_seconds(response.headers.get(wire.RETRY_AFTER_HEADER))
        reason = wire.describe_status(response.status_code, error.code, response.reason_phrase)
        return _Retryable(error, reason, retry_after)

    def _transport_failure(
        self, endpoint: wire.Endpoint, exc: httpx.TransportError
    ) -> _Retryable | errors.NuntiqError:
        """The error for a request that got no (complete) answer; wrapped in ``_Retryable``
        for lost connections and timeouts."""
        kind = type(exc).__name__
        retryable = _is_retryable_transport(exc)
        # A failure on our side (e.g. httpx refusing a header) quotes what it refused,
        # which may be the key in an escaped form: only the kind is kept then.
        detail = self._redact(str(exc)) if retryable else ""
        host = self._http.base_url.host
        text = f"Nuntiq {endpoint.name}: no answer from {host} ({kind}"
        text += f": {detail})" if detail else ")"
        error = errors.NuntiqUnavailable(text)
        if not retryable:
            return error  # e.g. a protocol error on our side: repeating cannot help
        return _Retryable(error, kind, None)

    def _redact(self, text: str) -> str:
        # Defence in depth: a server or library echoing the key must not spread it, as is
        # or in the escaped form of a repr.
        key = self._api_key.get_secret_value()
        for form in {key, repr(key)[1:-1], repr(key.encode())[2:-1]}:
            if form:
                text = text.replace(form, REDACTED)
        return text

    def _redact_bytes(self, data: bytes) -> bytes:
        return data.replace(self._api_key.get_secret_value().encode(), REDACTED.encode())


# --- helpers ------------------------------------------------------------------------------


def _is_retryable_transport(exc: httpx.TransportError) -> bool:
    """Lost or refused connections and timeouts; not our own protocol or proxy mistakes."""
    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def _gave_up(error: errors.NuntiqError, why: str) -> errors.NuntiqError:
    """The same error, same class and fields, with why retrying stopped in its message."""
    final = type(error)(
        f"{error.message} ({why})", status=error.status, code=error.code, hint=error.hint
    )
    final.attempts = error.attempts
    return final


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
