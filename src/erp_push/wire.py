"""The Nuntiq wire mapping: every detail of ``nuntiq-contract.md`` in one place.

Nuntiq documents the *semantics* of the claim flow but not the HTTP method, path and body
of claim, get-invoice, acknowledge and integration-result. Where the documentation is
silent the contract makes a choice; each such line below is marked ``[ours]``, each
documented one ``[doc]``. When Nuntiq's real reference turns up, this is the one file to
change: ``claim.py`` only knows the names defined here.

Nothing here does I/O. Functions build request paths and bodies (validating the limits the
contract states, so that a bad request fails before it is sent), and classify responses
into the exception tree of ``errors.py``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

from erp_push import errors
from erp_push.models import IntegrationResult
from erp_push.text import shorten

# --- transport and auth ---------------------------------------------------------------

AUTH_HEADER = "X-API-Key"  # [ours, shaped after the documented Partner API]
RETRY_AFTER_HEADER = "Retry-After"  # [ours] seconds (an HTTP-date is accepted too)
LOOPBACK_NAMES = frozenset({"localhost"})  # [ours] with 127.0.0.0/8 and ::1
# The Nuntiq client's defaults (claim.py), kept here so that settings can take them
# without importing the HTTP library: `erp-push status` loads settings and never httpx.
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_MAX_REPLY_BYTES = 20_000_000
DEFAULT_MAX_ATTACHMENT_BYTES = 100_000_000


def base_url_problem(base_url: str) -> str | None:
    """Why ``base_url`` cannot be used, or None when it is fine.

    [ours] HTTPS is required; plain ``http://`` only for loopback hosts (the sandbox), so
    the API key never crosses a network in clear text. A URL with a user name or password
    in it is refused too: the key belongs in its own secret, and URLs end up in messages.
    So is a ``?query`` or ``#fragment``: request paths are appended to the base URL, so
    neither could work, and a query string is where keys end up.
    """
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
    except ValueError:
        return "the Nuntiq base URL is not a valid URL"
    if parts.scheme not in ("https", "http") or not host:
        return "the Nuntiq base URL must look like https://host/api"
    if parts.username is not None or parts.password is not None:
        return "the Nuntiq base URL must not contain a user name or password"
    if parts.query or parts.fragment:
        return "the Nuntiq base URL must not have a ?query or #fragment"
    if parts.scheme == "http" and not is_loopback(host):
        return (
            f"the Nuntiq base URL must use https:// (plain http:// is allowed only for "
            f"loopback hosts such as localhost, 127.0.0.1 or ::1, not {host!r})"
        )
    return None


def is_loopback(host: str) -> bool:
    if host.casefold() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- endpoints ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One call of the contract.

    ``name`` appears in log lines and error messages. ``retry_safe`` says whether the call
    may be sent again after a 429/502/503/504 or a lost response: true only when repeating
    it cannot do anything the first attempt would not have done. ``bookkeeping`` marks the
    run's own records (delta streams): no invoice depends on them, so the client gives
    them a short time budget, and still sends them after the run's deadline so that the
    run's end is recorded.
    """

    name: str
    method: str
    path: str  # template; placeholders are filled by ``path_for`` (URL-quoted)
    retry_safe: bool
    bookkeeping: bool = False


# Every call the client makes is safe to repeat, each for its own reason.

# [ours: path] Safe because every claim carries an idempotency key [doc: the same key
# within the TTL returns the same leases]; the client generates one when none is given.
CLAIM = Endpoint("claim", "POST", "/v1/invoices/claim", retry_safe=True)

# [ours: path] A read.
GET_INVOICE = Endpoint("get_invoice", "GET", "/v1/invoices/{invoice_token}", retry_safe=True)

# [ours: path] [doc: idempotent, `idempotent: true` when already at 93 under the lease]
ACKNOWLEDGE = Endpoint(
    "acknowledge", "POST", "/v1/invoices/{invoice_token}/acknowledge", retry_safe=True
)

# [ours: path] [doc: success again on 100 is idempotent; ours: the same failure on 97
# too]. A retry repeats the very same body, so it is always "the same result again".
INTEGRATION_RESULT = Endpoint(
    "integration_result",
    "POST",
    "/v1/invoices/{invoice_token}/integration-result",
    retry_safe=True,
)

# [doc] A read (streamed).
ATTACHMENT = Endpoint("attachment", "GET", "/v1/attachment/{attachment_token}", retry_safe=True)

# [doc] A read.
DELTA_GET = Endpoint(
    "delta_get",
    "GET",
    "/v1/delta/streams/{connector}/{stream}",
    retry_safe=True,
    bookkeeping=True,
)

# [doc] Overwrites the run-state fields and never refuses a running stream, so a repeat
# only moves started_at_utc a little later.
DELTA_BEGIN = Endpoint(
    "delta_begin",
    "POST",
    "/v1/delta/streams/{connector}/{stream}/begin",
    retry_safe=True,
    bookkeeping=True,
)

# [doc] Advances the cursor only if monotonic; for `timestamp_utc` (the only cursor type
# erp-push uses) an equal value counts as >= previous, so repeating the same body is a
# no-op advance. (With `opaque_token` a repeat could be refused as CURSOR_REGRESSION; that
# 422 is not retried and surfaces as an error.)
DELTA_COMPLETE = Endpoint(
    "delta_complete",
    "POST",
    "/v1/delta/streams/{connector}/{stream}/complete",
    retry_safe=True,
    bookkeeping=True,
)

# [doc] Sets `failed` + error_summary, cursor unchanged: a repeat writes the same.
DELTA_FAIL = Endpoint(
    "delta_fail",
    "POST",
    "/v1/delta/streams/{connector}/{stream}/fail",
    retry_safe=True,
    bookkeeping=True,
)


def path_for(endpoint: Endpoint, **params: str) -> str:
    """The request path, every parameter URL-quoted so a token can never add a segment."""
    return endpoint.path.format(**{k: quote(v, safe="") for k, v in params.items()})


# --- limits (checked before sending) --------------------------------------------------

CLAIM_STATE = "PendingIntegration"  # [doc] the only state accepted today
CLAIM_LIMIT = (1, 50)  # [doc]
LEASE_TTL_SECONDS = (60, 1800)  # [doc]
DEFAULT_LEASE_TTL_SECONDS = 300  # [doc]
IDEMPOTENCY_KEY_MAX = 255  # [doc]
EXT_REFERENCE_SLOTS = range(1, 6)  # [doc] ext_reference_1 .. ext_reference_5
EXTERNAL_SLOTS = 3  # [ours] external_id_1..3 and external_message_1..3
EXTERNAL_TEXT_MAX = 255  # [ours] for external ids and messages
FAILURE_CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # [ours] matched in full
FAILURE_MESSAGE_MAX = 500  # [ours; the seed truncates to 500]


def text_length(text: str) -> int:
    """Length as a JavaScript server would count it (UTF-16 code units).

    [ours] Nuntiq's path style suggests a Node server, where an emoji counts 2. Counting
    that way is never shorter than counting code points, so a value we accept is accepted
    by either kind of server.
    """
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def truncate_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` units (see ``text_length``), ending in "…" if cut."""
    return shorten(text, limit, measure=text_length)


def _invalid(message: str) -> errors.NuntiqRequestInvalid:
    error = errors.NuntiqRequestInvalid(message, code="VALIDATION_ERROR")
    error.attempts = 0
    return error


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    # bool is an int in Python; True as a limit is certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_text(name: str, value: str | None, limit: int) -> None:
    if value is not None and text_length(value) > limit:
        raise _invalid(f"{name} is {text_length(value)} characters long; at most {limit} allowed")


# --- request bodies -------------------------------------------------------------------


def claim_body(
    *,
    limit: int,
    lease_ttl_seconds: int,
    idempotency_key: str,
    ext_references: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Body of the claim call. [ours: field names follow the documented parameters]"""
    _check_range("limit", limit, CLAIM_LIMIT)
    _check_range("lease_ttl_seconds", lease_ttl_seconds, LEASE_TTL_SECONDS)
    if not idempotency_key:
        raise _invalid("idempotency_key must not be empty")
    _check_text("idempotency_key", idempotency_key, IDEMPOTENCY_KEY_MAX)
    body: dict[str, Any] = {
        "state": CLAIM_STATE,
        "limit": limit,
        "lease_ttl_seconds": lease_ttl_seconds,
        "idempotency_key": idempotency_key,
    }
    for slot, value in (ext_references or {}).items():
        if slot not in EXT_REFERENCE_SLOTS:
            raise _invalid(f"ext_reference slot must be 1 to 5, got {slot!r}")
        body[f"ext_reference_{slot}"] = value
    return body


def acknowledge_body(lease_token: str) -> dict[str, Any]:
    return {"lease_token": lease_token}  # [ours]


def integration_result_body(lease_token: str, result: IntegrationResult) -> dict[str, Any]:
    """Body of the integration-result call, validated against the contract's limits.

    An over-long ``failure_message`` is truncated (with "…") rather than refused: a failure
    must always be reportable. Over-long external ids and messages are refused, because a
    cut identifier would point the ERP user at something that does not exist.
    """
    body: dict[str, Any] = {"lease_token": lease_token, "success": result.success}  # [ours]
    for n, (ext_id, message) in enumerate(
        zip(result.external_ids, result.external_messages, strict=True), start=1
    ):
        _check_text(f"external_id_{n}", ext_id, EXTERNAL_TEXT_MAX)
        _check_text(f"external_message_{n}", message, EXTERNAL_TEXT_MAX)
        if ext_id is not None:
            body[f"external_id_{n}"] = ext_id  # [doc: external_id_1; ours: 2 and 3]
        if message is not None:
            body[f"external_message_{n}"] = message  # [seed: external_message_1; ours: rest]
    if result.failure_code is not None:
        if not FAILURE_CODE_RE.fullmatch(result.failure_code):
            raise _invalid(
                f"failure_code {shorten(result.failure_code, 80)!r} "
                f"must match ^{FAILURE_CODE_RE.pattern}$"
            )
        body["failure_code"] = result.failure_code
    elif not result.success:
        raise _invalid("failure_code is required when success is false")
    if result.failure_message is not None:
        body["failure_message"] = truncate_text(result.failure_message, FAILURE_MESSAGE_MAX)
    return body


def delta_begin_body(cursor_type: str) -> dict[str, Any]:
    return {"cursor_type": cursor_type}  # [doc]


def delta_complete_body(
    new_cursor_value: str, records_processed: int, metadata: Mapping[str, Any]
) -> dict[str, Any]:
    return {  # [doc]
        "new_cursor_value": new_cursor_value,
        "records_processed": records_processed,
        "metadata": dict(metadata),
    }


def delta_fail_body(error_summary: str) -> dict[str, Any]:
    return {"error_summary": error_summary}  # [doc]


# --- responses ------------------------------------------------------------------------

LEASES_KEY = "leases"  # [ours] claim response envelope: {"leases": [...]}
ERROR_CODE_KEY = "error"  # [ours, shaped after the Partner API] {"error": CODE, "message": text}
ERROR_MESSAGE_KEY = "message"
SERVER_MESSAGE_MAX = 300  # keep one error on one readable line

# [doc: REST-pull guidance; 429 ours] Answers that may go away by themselves. 500 is NOT
# here: the contract retries only these, and a 500 may be a deterministic server bug for
# this very request. It becomes NuntiqServerError (transient for the run, not retried).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def error_details(body: bytes) -> tuple[str | None, str | None]:
    """``(code, message)`` from an error body; (None, None) when it has another shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get(ERROR_CODE_KEY)
    message = data.get(ERROR_MESSAGE_KEY)
    return (
        code if isinstance(code, str) else None,
        truncate_text(message, SERVER_MESSAGE_MAX) if isinstance(message, str) else None,
    )


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """The delay a ``Retry-After`` header asks for, in seconds; None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# (status, code) -> exception class, most specific first. [ours: the codes; doc: statuses]
_CONFLICTS: dict[str, type[errors.NuntiqConflict]] = {
    "LEASE_EXPIRED": errors.LeaseExpired,
    "INVALID_TRANSITION": errors.InvalidTransition,
}


def error_class(status: int, code: str | None) -> type[errors.NuntiqError]:
    """Which exception an HTTP error status (and the body's ``error`` code) becomes."""
    if status in (401, 403):
        return errors.NuntiqAuthError
    if status == 404:
        return errors.NuntiqNotFound
    if status in (400, 422):
        return errors.NuntiqValidationError
    if status == 409:
        return _CONFLICTS.get(code or "", errors.NuntiqConflict)
    if status in RETRYABLE_STATUSES:
        return errors.NuntiqTransientError
    if status >= 500:
        return errors.NuntiqServerError
    # 3xx (redirects are not followed: the API key must not travel to another host) and
    # any other 4xx: nothing a retry would fix.
    return errors.NuntiqFatalError


def http_error(
    endpoint: Endpoint, status: int, body: bytes, *, reason: str = ""
) -> errors.NuntiqError:
    """The exception for a non-2xx answer, carrying status, code and the server's message."""
    code, message = error_details(body)
    summary = describe_status(status, code, reason)
    text = f"Nuntiq {endpoint.name}: {summary}"
    if message:
        text += f": {message}"
    return error_class(status, code)(text, status=status, code=code)


def describe_status(status: int, code: str | None, reason: str = "") -> str:
    """E.g. ``HTTP 503 SERVICE_UNAVAILABLE`` (the body's code, else the reason phrase)."""
    label = code or reason
    return f"HTTP {status} {label}".rstrip()
