"""NuntiqClient against the real sandbox server, over real HTTP on loopback.

Retries are driven by the sandbox's fault rules and counted with its request counters;
the client's ``sleep`` is a recorder, so retry delays are asserted without waiting.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from erp_push import errors, wire
from erp_push.claim import NuntiqClient, RetryPolicy
from erp_push.models import IntegrationResult
from tests import hostile_http
from tests.sandbox.control import SandboxControl
from tests.sandbox.server import SandboxServer

FAST = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05)
SECRET = "sk_SECRET_do_not_leak_1234"


class Sleeps(list[float]):
    """A ``sleep`` that records the delay instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(sandbox: Any, sleeps: Sleeps) -> Iterator[Callable[..., NuntiqClient]]:
    clients: list[NuntiqClient] = []

    def make(**kwargs: Any) -> NuntiqClient:
        kwargs.setdefault("retry", FAST)
        kwargs.setdefault("sleep", sleeps)
        key = kwargs.pop("api_key", sandbox.api_key)
        client = NuntiqClient(sandbox.base_url, SecretStr(key), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., NuntiqClient]) -> NuntiqClient:
    return make_client()


def counts(sandbox: Any) -> dict[str, int]:
    return {k: v for k, v in sandbox.control.request_counts().items() if v}


def fault(endpoint: str, kind: str = "status", **rule: Any) -> dict[str, Any]:
    return {"endpoint": endpoint, "kind": kind, **rule}


# --- the claim flow -------------------------------------------------------------------


def test_claim_get_acknowledge_report_success(sandbox: Any, client: NuntiqClient) -> None:
    tokens = sandbox.control.seed(3)

    leases = client.claim(limit=2, lease_ttl_seconds=120)

    assert [lease.invoice_token for lease in leases] == tokens[:2]  # oldest first
    assert sandbox.control.statuses() == {tokens[0]: 92, tokens[1]: 92, tokens[2]: 90}
    lease = leases[0]

    detail = client.get_invoice(lease.invoice_token)
    assert detail.invoice.invoice_token == lease.invoice_token
    assert detail.invoice.status == 92
    row = sandbox.control.invoice(lease.invoice_token)
    assert detail.invoice.field("invoiceNumber") == row["invoice_number"]
    assert detail.invoice.address("vendor") is not None

    ack = client.acknowledge(lease.invoice_token, lease.lease_token)
    assert (ack.new_status, ack.status_changed) == ("PendingResult", True)
    again = client.acknowledge(lease.invoice_token, lease.lease_token)
    assert (again.status_changed, again.idempotent) == (False, True)

    result = IntegrationResult.delivered("/outbox/INV-1.csv")
    done = client.report_result(lease.invoice_token, lease.lease_token, result)
    assert (done.new_status, done.status_changed) == ("Processed", True)
    repeat = client.report_result(lease.invoice_token, lease.lease_token, result)
    assert (repeat.new_status, repeat.status_changed) == ("Processed", False)

    row = sandbox.control.invoice(lease.invoice_token)
    assert (row["status"], row["external_id_1"]) == (100, "/outbox/INV-1.csv")
    assert row["external_message_1"] == "SFTP_DELIVERED"


def test_result_straight_from_92_without_acknowledge(sandbox: Any, client: NuntiqClient) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1)
    done = client.report_result(
        lease.invoice_token, lease.lease_token, IntegrationResult.delivered("/x.csv")
    )
    assert (done.previous_status, done.new_status) == ("PendingAcknowledgement", "Processed")


def test_claim_returns_empty_list_when_nothing_is_claimable(
    sandbox: Any, client: NuntiqClient
) -> None:
    assert client.claim(limit=50) == []
    sandbox.control.seed(2)
    assert len(client.claim(limit=50)) == 2
    assert client.claim(limit=50) == []


def test_claim_with_the_same_idempotency_key_returns_the_same_leases(
    sandbox: Any, client: NuntiqClient
) -> None:
    sandbox.control.seed(10)
    first = client.claim(limit=3, idempotency_key="run-42")
    second = client.claim(limit=3, idempotency_key="run-42")
    assert second == first
    assert sorted(sandbox.control.statuses().values()).count(92) == 3
    other = client.claim(limit=3)  # a fresh (generated) key leases new invoices
    assert {lease.invoice_token for lease in other}.isdisjoint(
        lease.invoice_token for lease in first
    )


def test_claim_filters_by_ext_reference_case_insensitively(
    sandbox: Any, client: NuntiqClient
) -> None:
    sandbox.control.seed(30)
    rows = sandbox.control.invoices()
    company = rows[-1]["ext_reference_1"]
    wanted = {r["invoice_token"] for r in rows if r["ext_reference_1"] == company}
    assert 0 < len(wanted) < len(rows)

    leases = client.claim(limit=50, ext_references={1: company.lower()})

    assert {lease.invoice_token for lease in leases} == wanted


def test_failure_is_reported_truncated_and_repeatable(sandbox: Any, client: NuntiqClient) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1)
    long_message = "é" * 400 + "🙂" * 200  # 800 UTF-16 units
    failed = IntegrationResult.failed("RENDER_MISSING_FIELD", long_message)

    done = client.report_result(lease.invoice_token, lease.lease_token, failed)
    assert (done.new_status, done.status_changed) == ("IntegrationFailed", True)
    repeat = client.report_result(lease.invoice_token, lease.lease_token, failed)
    assert repeat.status_changed is False

    row = sandbox.control.invoice(lease.invoice_token)
    assert (row["status"], row["failure_code"]) == (97, "RENDER_MISSING_FIELD")
    assert row["failure_message"].endswith("…")
    assert wire.text_length(row["failure_message"]) <= 500
    assert long_message.startswith(row["failure_message"][:-1])

    with pytest.raises(errors.InvalidTransition) as caught:
        client.report_result(
            lease.invoice_token, lease.lease_token, IntegrationResult.delivered("/x.csv")
        )
    assert (caught.value.status, caught.value.code) == (409, "INVALID_TRANSITION")


def test_success_then_failure_is_an_invalid_transition(sandbox: Any, client: NuntiqClient) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1)
    client.report_result(lease.invoice_token, lease.lease_token, IntegrationResult.delivered("/a"))
    with pytest.raises(errors.InvalidTransition):
        client.report_result(
            lease.invoice_token,
            lease.lease_token,
            IntegrationResult.failed("SFTP_UPLOAD_FAILED", "late"),
        )


def test_unknown_status_codes_are_read_without_complaint(
    sandbox: Any, client: NuntiqClient
) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_status(token, 96)
    assert client.get_invoice(token).invoice.status == 96
    with pytest.raises(errors.InvalidTransition):
        client.acknowledge(token, str(uuid.uuid4()))


# --- leases ---------------------------------------------------------------------------


def test_lapsed_lease_cannot_acknowledge_and_the_invoice_is_claimable_again(
    sandbox: Any, client: NuntiqClient
) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1, lease_ttl_seconds=60)
    sandbox.control.advance_clock(61)

    with pytest.raises(errors.LeaseExpired) as caught:
        client.acknowledge(lease.invoice_token, lease.lease_token)
    assert (caught.value.status, caught.value.code) == (409, "LEASE_EXPIRED")
    assert sandbox.control.invoice(lease.invoice_token)["status"] == 91

    (again,) = client.claim(limit=1)
    assert again.invoice_token == lease.invoice_token
    assert again.lease_token != lease.lease_token
    with pytest.raises(errors.LeaseExpired):  # the old lease stays dead
        client.report_result(
            lease.invoice_token, lease.lease_token, IntegrationResult.delivered("/a")
        )


def test_lease_lapses_after_acknowledge_too(sandbox: Any, client: NuntiqClient) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1, lease_ttl_seconds=60)
    client.acknowledge(lease.invoice_token, lease.lease_token)
    sandbox.control.advance_clock(61)

    with pytest.raises(errors.LeaseExpired):
        client.report_result(
            lease.invoice_token, lease.lease_token, IntegrationResult.delivered("/a")
        )
    assert sandbox.control.invoice(lease.invoice_token)["status"] == 91


def test_another_lease_holding_the_invoice_is_lease_expired(
    sandbox: Any, client: NuntiqClient
) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1)
    with pytest.raises(errors.LeaseExpired):
        client.acknowledge(lease.invoice_token, str(uuid.uuid4()))


def test_eight_threads_lease_every_invoice_exactly_once(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    tokens = sandbox.control.seed(200)
    claimed: list[list[str]] = [[] for _ in range(8)]
    failures: list[BaseException] = []
    clients = [make_client() for _ in range(8)]

    def worker(n: int) -> None:
        try:
            while leases := clients[n].claim(limit=7):
                claimed[n].extend(lease.invoice_token for lease in leases)
        except BaseException as exc:  # surfaced by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == []
    everything = [token for batch in claimed for token in batch]
    assert sorted(everything) == sorted(tokens)  # each once: no duplicates, none missing
    assert set(sandbox.control.statuses().values()) == {92}


# --- attachments ----------------------------------------------------------------------


def _an_attachment(sandbox: Any, client: NuntiqClient) -> Any:
    sandbox.control.seed(20, awkward=True)
    for row in sandbox.control.invoices():
        attachments = client.get_invoice(row["invoice_token"]).invoice.attachments
        if attachments:
            return max(attachments, key=lambda a: a.content_type == "application/pdf")
    raise AssertionError("the awkward seed has no invoice with attachments")


def _served_bytes(sandbox: Any, token: str) -> bytes:
    response = httpx.get(
        f"{sandbox.base_url}/v1/attachment/{token}", headers={"X-API-Key": sandbox.api_key}
    )
    response.raise_for_status()
    return response.content


class ChunkRecorder(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def write(self, data: Any) -> int:
        self.writes.append(len(data))
        return super().write(data)


def test_attachment_is_streamed_to_a_file(
    sandbox: Any, client: NuntiqClient, tmp_path: Path
) -> None:
    attachment = _an_attachment(sandbox, client)
    target = tmp_path / "download.bin"

    with target.open("wb") as f:
        written = client.download_attachment(attachment.attachment_token, f)

    served = _served_bytes(sandbox, attachment.attachment_token)
    assert target.read_bytes() == served
    assert written == len(served)


def test_attachment_arrives_in_chunks(sandbox: Any, client: NuntiqClient) -> None:
    attachment = _an_attachment(sandbox, client)
    dest = ChunkRecorder()
    written = client.download_attachment(attachment.attachment_token, dest)
    assert written > 64 * 1024, "expected the ~100 KB PDF"
    assert len(dest.writes) > 1
    assert max(dest.writes) <= 64 * 1024


def test_attachment_download_is_retried_after_a_reset(sandbox: Any, client: NuntiqClient) -> None:
    attachment = _an_attachment(sandbox, client)
    sandbox.control.set_faults([fault("attachment", "reset", count=1)])
    dest = io.BytesIO(b"kept prefix:")
    dest.seek(0, io.SEEK_END)

    client.download_attachment(attachment.attachment_token, dest)

    served = _served_bytes(sandbox, attachment.attachment_token)
    assert dest.getvalue() == b"kept prefix:" + served
    assert counts(sandbox)["attachment"] == 3  # reset, retry, and our reference download


def test_attachment_errors(sandbox: Any, client: NuntiqClient) -> None:
    with pytest.raises(errors.NuntiqNotFound) as missing:
        client.download_attachment(str(uuid.uuid4()), io.BytesIO())
    assert (missing.value.status, missing.value.code) == (404, "NOT_FOUND")
    with pytest.raises(errors.NuntiqValidationError) as bad:
        client.download_attachment("not-a-uuid", io.BytesIO())
    assert (bad.value.status, bad.value.code) == (400, "VALIDATION_ERROR")
    assert counts(sandbox) == {"attachment": 2}


# --- delta streams --------------------------------------------------------------------


def test_delta_stream_lifecycle(sandbox: Any, client: NuntiqClient) -> None:
    idle = client.delta_get("erp-push", "pushed_invoices")
    assert (idle.status, idle.committed_cursor_value) == ("idle", None)

    begun = client.delta_begin("erp-push", "pushed_invoices")
    assert (begun.status, begun.cursor_type) == ("running", "timestamp_utc")
    done = client.delta_complete(
        "erp-push",
        "pushed_invoices",
        new_cursor_value="2024-05-01T10:00:00Z",
        records_processed=7,
        metadata={"run": "abc"},
    )
    assert (done.status, done.records_processed, done.metadata) == ("succeeded", 7, {"run": "abc"})
    assert done.committed_cursor_value == "2024-05-01T10:00:00Z"

    # The same completion again (what a retry sends) is accepted: equal is not a regression.
    client.delta_complete(
        "erp-push",
        "pushed_invoices",
        new_cursor_value="2024-05-01T10:00:00Z",
        records_processed=7,
        metadata={"run": "abc"},
    )

    client.delta_begin("erp-push", "pushed_invoices")
    with pytest.raises(errors.NuntiqValidationError) as regression:
        client.delta_complete(
            "erp-push",
            "pushed_invoices",
            new_cursor_value="2024-04-01T00:00:00Z",
            records_processed=0,
            metadata={},
        )
    assert (regression.value.status, regression.value.code) == (422, "CURSOR_REGRESSION")

    failed = client.delta_fail("erp-push", "pushed_invoices", "SFTP down")
    assert (failed.status, failed.error_summary) == ("failed", "SFTP down")
    assert failed.committed_cursor_value == "2024-05-01T10:00:00Z"


def test_delta_errors(sandbox: Any, client: NuntiqClient) -> None:
    with pytest.raises(errors.NuntiqNotFound):
        client.delta_complete(
            "erp-push",
            "never-begun",
            new_cursor_value="2024-01-01T00:00:00Z",
            records_processed=0,
            metadata={},
        )
    with pytest.raises(errors.NuntiqNotFound):
        client.delta_fail("erp-push", "never-begun", "x")
    with pytest.raises(errors.NuntiqValidationError) as bad_type:
        client.delta_begin("erp-push", "s", cursor_type="weekday")
    assert bad_type.value.status == 422


def test_path_parameters_are_url_quoted() -> None:
    # A token or stream name can never add or climb path segments.
    assert wire.path_for(wire.DELTA_BEGIN, connector="erp push/ü", stream="a/../b") == (
        "/v1/delta/streams/erp%20push%2F%C3%BC/a%2F..%2Fb/begin"
    )
    assert wire.path_for(wire.GET_INVOICE, invoice_token="../../x?y#z") == (
        "/v1/invoices/..%2F..%2Fx%3Fy%23z"
    )


# --- errors ---------------------------------------------------------------------------


def test_unknown_invoice_is_not_found(sandbox: Any, client: NuntiqClient) -> None:
    token = str(uuid.uuid4())
    for call in (
        lambda: client.get_invoice(token),
        lambda: client.acknowledge(token, str(uuid.uuid4())),
        lambda: client.report_result(token, str(uuid.uuid4()), IntegrationResult.delivered("/a")),
    ):
        with pytest.raises(errors.NuntiqNotFound) as caught:
            call()
        assert (caught.value.status, caught.value.code) == (404, "NOT_FOUND")
        assert token in str(caught.value)


def test_acknowledging_an_unclaimed_invoice_is_an_invalid_transition(
    sandbox: Any, client: NuntiqClient
) -> None:
    (token,) = sandbox.control.seed(1)
    with pytest.raises(errors.InvalidTransition) as caught:
        client.acknowledge(token, str(uuid.uuid4()))
    assert "INVALID_TRANSITION" in str(caught.value)


def test_wrong_key_is_an_auth_error_and_not_retried(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    client = make_client(api_key="sk_wrong")
    with pytest.raises(errors.NuntiqAuthError) as caught:
        client.claim(limit=1)
    assert (caught.value.status, caught.value.code) == (401, "UNAUTHORIZED")
    assert caught.value.exit_code == errors.ExitCode.NUNTIQ
    assert caught.value.hint
    assert counts(sandbox) == {"claim": 1}


def test_read_only_key_may_read_but_not_write(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    (token,) = sandbox.control.seed(1)
    client = make_client(api_key=sandbox.readonly_api_key)
    assert client.get_invoice(token).invoice.status == 90
    with pytest.raises(errors.NuntiqAuthError) as caught:
        client.claim(limit=1)
    assert (caught.value.status, caught.value.code) == (403, "FORBIDDEN")


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 51}, "limit"),
        ({"limit": 5, "lease_ttl_seconds": 59}, "lease_ttl_seconds"),
        ({"limit": 5, "lease_ttl_seconds": 1801}, "lease_ttl_seconds"),
        ({"limit": 5, "idempotency_key": "k" * 256}, "idempotency_key"),
        ({"limit": 5, "ext_references": {6: "ACME"}}, "ext_reference"),
    ],
)
def test_claim_limits_are_checked_before_sending(
    sandbox: Any, client: NuntiqClient, kwargs: dict[str, Any], what: str
) -> None:
    with pytest.raises(errors.NuntiqRequestInvalid) as caught:
        client.claim(**kwargs)
    assert what in str(caught.value)
    assert caught.value.attempts == 0
    assert isinstance(caught.value, errors.NuntiqValidationError)
    assert counts(sandbox) == {}


@pytest.mark.parametrize(
    ("result", "what"),
    [
        (IntegrationResult.failed("lower_case", "m"), "failure_code"),
        (IntegrationResult.failed("A" * 65, "m"), "failure_code"),
        (IntegrationResult(success=False), "failure_code"),
        (IntegrationResult.delivered("/" + "p" * 255), "external_id_1"),
        (
            IntegrationResult(success=True, external_messages=(None, None, "m" * 256)),
            "external_message_3",
        ),
    ],
)
def test_result_limits_are_checked_before_sending(
    sandbox: Any, client: NuntiqClient, result: IntegrationResult, what: str
) -> None:
    with pytest.raises(errors.NuntiqRequestInvalid) as caught:
        client.report_result(str(uuid.uuid4()), str(uuid.uuid4()), result)
    assert what in str(caught.value)
    assert counts(sandbox) == {}


# --- retries --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_statuses_are_retried(
    sandbox: Any, client: NuntiqClient, sleeps: Sleeps, status: int
) -> None:
    sandbox.control.seed(3)
    sandbox.control.set_faults([fault("claim", status=status, count=2)])

    leases = client.claim(limit=3)

    assert len(leases) == 3
    assert counts(sandbox) == {"claim": 3}
    assert len(sleeps) == 2
    assert all(0 < s <= FAST.max_delay for s in sleeps)


def test_retry_after_is_honoured(sandbox: Any, client: NuntiqClient, sleeps: Sleeps) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults(
        [
            fault("get", status=429, retry_after=3, count=1),
            fault("get", status=503, retry_after=1, count=1),
        ]
    )

    client.get_invoice(token)

    assert counts(sandbox) == {"get": 3}
    assert sleeps[0] >= 3
    assert sleeps[1] >= 1


def test_retry_after_beyond_the_cap_stops_retrying(
    sandbox: Any, client: NuntiqClient, sleeps: Sleeps
) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", status=429, retry_after=3600)])

    with pytest.raises(errors.NuntiqTransientError) as caught:
        client.get_invoice(token)

    assert "3600" in str(caught.value)
    assert (caught.value.status, caught.value.code) == (429, "RATE_LIMITED")
    assert counts(sandbox) == {"get": 1}
    assert sleeps == []


def test_exhausted_retries_say_how_many_attempts_were_made(
    sandbox: Any, client: NuntiqClient, sleeps: Sleeps
) -> None:
    sandbox.control.seed(1)
    sandbox.control.set_faults([fault("*", status=503)])

    with pytest.raises(errors.NuntiqTransientError) as caught:
        client.claim(limit=1)

    error = caught.value
    assert (error.status, error.code, error.attempts) == (503, "SERVICE_UNAVAILABLE", 5)
    assert "5 attempts" in str(error)
    assert error.transient
    assert counts(sandbox) == {"claim": 5}
    assert len(sleeps) == 4
    assert set(sandbox.control.statuses().values()) == {90}


def test_each_retry_is_logged_with_its_reason(
    sandbox: Any, client: NuntiqClient, caplog: pytest.LogCaptureFixture
) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", status=503, count=1), fault("get", "reset", count=1)])

    with caplog.at_level(logging.WARNING, logger="erp_push.nuntiq"):
        client.get_invoice(token)

    messages = [r.getMessage() for r in caplog.records if r.name == "erp_push.nuntiq"]
    assert len(messages) == 2
    assert "get_invoice" in messages[0]
    assert "attempt 1/5" in messages[0]
    assert "HTTP 503 SERVICE_UNAVAILABLE" in messages[0]
    assert "retrying in" in messages[0]
    assert "attempt 2/5" in messages[1]
    assert "RemoteProtocolError" in messages[1]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.NuntiqValidationError),
        (401, errors.NuntiqAuthError),
        (403, errors.NuntiqAuthError),
        (404, errors.NuntiqNotFound),
        (409, errors.NuntiqConflict),
        (422, errors.NuntiqValidationError),
        (500, errors.NuntiqServerError),
    ],
)
def test_other_errors_are_not_retried(
    sandbox: Any,
    client: NuntiqClient,
    sleeps: Sleeps,
    status: int,
    expected: type[errors.NuntiqError],
) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1)
    sandbox.control.set_faults([fault("acknowledge", status=status)])

    with pytest.raises(expected) as caught:
        client.acknowledge(lease.invoice_token, lease.lease_token)

    assert caught.value.status == status
    assert counts(sandbox) == {"claim": 1, "acknowledge": 1}
    assert sleeps == []


def test_a_500_is_transient_for_the_run_but_not_retried(sandbox: Any, client: NuntiqClient) -> None:
    sandbox.control.set_faults([fault("delta", status=500)])
    with pytest.raises(errors.NuntiqServerError) as caught:
        client.delta_get("erp-push", "pushed_invoices")
    assert caught.value.transient
    assert (caught.value.status, caught.value.code, caught.value.attempts) == (
        500,
        "INTERNAL_ERROR",
        1,
    )
    assert counts(sandbox) == {"delta": 1}


@pytest.mark.parametrize("endpoint", ["acknowledge", "integration_result", "delta"])
def test_writes_that_are_safe_to_repeat_are_retried(
    sandbox: Any, client: NuntiqClient, endpoint: str
) -> None:
    sandbox.control.seed(1)
    (lease,) = client.claim(limit=1)
    faults = [fault(endpoint, "reset", count=1), fault(endpoint, status=502, count=1)]
    # Bookkeeping (delta) calls are retried once only, so only one fault there.
    sandbox.control.set_faults(faults[:1] if endpoint == "delta" else faults)

    if endpoint == "acknowledge":
        assert client.acknowledge(lease.invoice_token, lease.lease_token).status_changed
    elif endpoint == "integration_result":
        client.report_result(
            lease.invoice_token, lease.lease_token, IntegrationResult.delivered("/a")
        )
    else:
        client.delta_begin("erp-push", "pushed_invoices")
        sandbox.control.set_faults([fault("delta", "reset", count=1)])
        client.delta_complete(
            "erp-push",
            "pushed_invoices",
            new_cursor_value="2024-01-01T00:00:00Z",
            records_processed=1,
            metadata={},
        )
        client.delta_fail("erp-push", "pushed_invoices", "x")  # nothing faulted any more

    # delta: begin 2 (reset, ok) + complete 2 (reset, ok) + fail 1
    expected = {"acknowledge": 3, "integration_result": 3, "delta": 5}[endpoint]
    assert counts(sandbox)[endpoint] == expected


def test_connection_resets_are_retried_until_exhausted(sandbox: Any, client: NuntiqClient) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "reset")])
    with pytest.raises(errors.NuntiqUnavailable) as caught:
        client.get_invoice(token)
    assert caught.value.status is None
    assert caught.value.attempts == 5
    assert counts(sandbox) == {"get": 5}


def test_a_timeout_is_retried(
    sandbox: Any, make_client: Callable[..., NuntiqClient], caplog: pytest.LogCaptureFixture
) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "latency", latency_ms=1000, count=1)])
    client = make_client(timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="erp_push.nuntiq"):
        assert client.get_invoice(token).invoice.invoice_token == token
    assert "ReadTimeout" in caplog.text
    assert counts(sandbox) == {"get": 2}


def test_claim_retried_after_a_lost_response_does_not_lease_twice(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    """The first claim runs on the server but its answer never arrives (the client times
    out during the injected latency, the server carries on). The retry carries the same
    idempotency key, so it gets that claim's leases instead of leasing 3 more."""
    sandbox.control.seed(10)
    sandbox.control.set_faults([fault("claim", "latency", latency_ms=600, count=1)])
    delays: list[float] = []

    def sleep_past_the_first_attempt(seconds: float) -> None:
        delays.append(seconds)
        threading.Event().wait(1.0)  # let the slow first attempt commit first

    client = make_client(timeout=0.2, sleep=sleep_past_the_first_attempt)

    leases = client.claim(limit=3)

    assert len(delays) == 1
    assert counts(sandbox) == {"claim": 2}
    leased = {t for t, s in sandbox.control.statuses().items() if s == 92}
    assert leased == {lease.invoice_token for lease in leases}
    assert len(leased) == 3


def test_claim_retry_after_a_reset_keeps_its_key(sandbox: Any, client: NuntiqClient) -> None:
    sandbox.control.seed(10)
    sandbox.control.set_faults([fault("claim", "reset", count=1)])
    leases = client.claim(limit=4)
    assert len(leases) == 4
    assert counts(sandbox) == {"claim": 2}
    assert sorted(sandbox.control.statuses().values()).count(92) == 4


# --- secrets --------------------------------------------------------------------------


@pytest.fixture
def secret_sandbox(tmp_path: Path) -> Iterator[tuple[str, SandboxControl]]:
    """A sandbox whose API key is distinctive enough to grep for."""
    with (
        SandboxServer(str(tmp_path / "secret.sqlite3"), api_key=SECRET) as server,
        SandboxControl(server.base_url, SECRET) as control,
    ):
        yield server.base_url, control


def test_the_api_key_never_leaks(
    secret_sandbox: tuple[str, SandboxControl],
    sleeps: Sleeps,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base_url, control = secret_sandbox
    (token,) = control.seed(1)
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included

    client = NuntiqClient(base_url, SecretStr(SECRET), retry=FAST, sleep=sleeps)
    seen += [repr(client), str(vars(client)), *map(repr, client._transports)]

    calls: list[tuple[list[dict[str, Any]], Callable[[], object]]] = [
        ([], lambda: client.get_invoice(str(uuid.uuid4()))),  # 404
        ([], lambda: client.acknowledge(token, str(uuid.uuid4()))),  # 409
        ([fault("claim", status=503)], lambda: client.claim(limit=1)),  # exhausted
        ([fault("get", "reset")], lambda: client.get_invoice(token)),  # no response
        ([fault("get", status=429, retry_after=999)], lambda: client.get_invoice(token)),
        ([fault("delta", status=500)], lambda: client.delta_get("c", "s")),
        ([], lambda: client.claim(limit=0)),  # local validation
    ]
    for rules, call in calls:
        control.set_faults(rules)
        with pytest.raises(errors.NuntiqError) as caught:
            call()
        exc: BaseException | None = caught.value
        seen.append("".join(traceback.format_exception(caught.value)))
        while exc is not None:
            seen += [str(exc), repr(exc), str(vars(exc))]
            exc = exc.__cause__ or exc.__context__
    client.close()

    # A wrong key sent to a server must not leak either.
    wrong = NuntiqClient(base_url, SecretStr(SECRET + "_wrong"), retry=FAST, sleep=sleeps)
    with pytest.raises(errors.NuntiqAuthError) as denied:
        wrong.get_invoice(token)
    seen += [
        str(denied.value),
        repr(denied.value),
        "".join(traceback.format_exception(denied.value)),
    ]
    wrong.close()

    out, err = capsys.readouterr()
    seen += [out, err, caplog.text]
    seen += [str(r.__dict__) for r in caplog.records]
    assert len(caplog.records) > 5  # the capture did see the traffic
    for text in seen:
        assert SECRET not in text


def test_a_key_echoed_by_the_server_is_redacted() -> None:
    body = b'{"error":"UNAUTHORIZED","message":"bad key sk_ECHO_1"}'
    with (
        _TinyServer(401, body) as url,
        NuntiqClient(url, SecretStr("sk_ECHO_1"), retry=FAST) as client,
        pytest.raises(errors.NuntiqAuthError) as caught,
    ):
        client.get_invoice("x")
    assert "sk_ECHO_1" not in str(caught.value)
    assert "bad key ***" in str(caught.value)


# --- base URL and malformed answers (a tiny stand-in server, still real HTTP) ----------


class _TinyServer:
    """Answers every request with one fixed status, body and headers. ``promised`` bytes
    are announced as Content-Length (default: the body's length); announcing more than
    the body breaks the connection mid-body."""

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        promised: int | None = None,
    ) -> None:
        reply = (status, body, headers or {"Content-Type": "application/json"})
        length = len(body) if promised is None else promised
        self.requests = 0
        tiny = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                tiny.requests += 1
                code, data, extra = reply
                self.close_connection = True  # no idle keep-alive threads left behind
                self.send_response(code)
                self.send_header("Connection", "close")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/api"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_download_broken_mid_body_is_rewound_and_retried() -> None:
    tiny = _TinyServer(200, b"x" * 100_000, {"Content-Type": "application/pdf"}, promised=200_000)
    dest = io.BytesIO(b"prefix")
    dest.seek(0, io.SEEK_END)
    sleeps = Sleeps()
    with (
        tiny,
        NuntiqClient(tiny.url, SecretStr("k"), retry=FAST, sleep=sleeps) as client,
        pytest.raises(errors.NuntiqUnavailable) as caught,
    ):
        client.download_attachment(str(uuid.uuid4()), dest)
    assert "RemoteProtocolError" in str(caught.value)
    assert (caught.value.attempts, tiny.requests, len(sleeps)) == (5, 5, 4)
    assert dest.getvalue() == b"prefix"  # no half file left behind


class _Unseekable(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)


def test_a_download_broken_mid_body_into_an_unseekable_sink_is_not_retried() -> None:
    tiny = _TinyServer(200, b"x" * 100_000, {"Content-Type": "application/pdf"}, promised=200_000)
    sink = _Unseekable()
    with (
        tiny,
        NuntiqClient(tiny.url, SecretStr("k"), retry=FAST, sleep=Sleeps()) as client,
        pytest.raises(errors.NuntiqUnavailable) as caught,
    ):
        client.download_attachment(str(uuid.uuid4()), sink)  # type: ignore[arg-type]
    assert (caught.value.attempts, tiny.requests) == (1, 1)


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b'{"leases": [{"invoice_token": 1}]}', b'{"items": []}', b"[]"],
)
def test_a_malformed_success_is_a_protocol_error(body: bytes) -> None:
    with (
        _TinyServer(200, body) as url,
        NuntiqClient(url, SecretStr("k"), retry=FAST) as client,
        pytest.raises(errors.NuntiqProtocolError) as caught,
    ):
        client.claim(limit=1)
    assert "claim" in str(caught.value)
    assert not caught.value.transient


def test_a_redirect_is_not_followed() -> None:
    headers = {"Location": "https://elsewhere.example/steal"}
    with (
        _TinyServer(302, b"", headers) as url,
        NuntiqClient(url, SecretStr("k"), retry=FAST) as client,
        pytest.raises(errors.NuntiqFatalError) as caught,
    ):
        client.get_invoice("x")
    assert caught.value.status == 302


def test_an_error_body_of_another_shape_still_gives_status_and_reason() -> None:
    with (
        _TinyServer(404, b"<h1>Not Found</h1>", {"Content-Type": "text/html"}) as url,
        NuntiqClient(url, SecretStr("k"), retry=FAST) as client,
        pytest.raises(errors.NuntiqNotFound) as caught,
    ):
        client.get_invoice("x")
    assert (caught.value.status, caught.value.code) == (404, None)
    assert "HTTP 404 Not Found" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/api",
        "http://127.9.9.9/api",
        "http://localhost/api",
        "http://[::1]:8080/api",
        "https://test-api.apreceiving.com/api",
    ],
)
def test_https_or_loopback_base_urls_are_accepted(url: str) -> None:
    NuntiqClient(url, SecretStr("k")).close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://test-api.apreceiving.com/api", "https://"),
        ("http://10.0.0.1/api", "https://"),
        ("ftp://host/api", "https://host/api"),
        ("test-api.apreceiving.com/api", "https://host/api"),
        ("https://user:hunter2@host/api", "user name or password"),
    ],
)
def test_other_base_urls_are_refused_clearly(url: str, why: str) -> None:
    with pytest.raises(errors.SettingsError) as caught:
        NuntiqClient(url, SecretStr("k"))
    assert why in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["https://host/api?api_key=hunter2", "https://host/api#x", "http://localhost/api?a=1"]
)
def test_a_base_url_with_a_query_or_fragment_is_refused_without_echoing_it(url: str) -> None:
    """One base-URL rule for settings and client: request paths are appended to it, so a
    query or fragment could not work, and a query string is where keys end up."""
    with pytest.raises(errors.SettingsError) as caught:
        NuntiqClient(url, SecretStr("k"))
    assert "?query or #fragment" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(errors.SettingsError, match="API key is empty"):
        NuntiqClient("https://host/api", SecretStr(" "))


def test_an_unreachable_server_is_unavailable_after_retries() -> None:
    with _TinyServer(200, b"{}") as url:
        pass  # the port is free again: nothing listens there now
    sleeps = Sleeps()
    with (
        NuntiqClient(url, SecretStr("k"), retry=FAST, sleep=sleeps) as client,
        pytest.raises(errors.NuntiqUnavailable) as caught,
    ):
        client.get_invoice("x")
    assert "ConnectError" in str(caught.value)
    assert caught.value.attempts == 5
    assert len(sleeps) == 4


# --- the retry policy and wire helpers (pure) ------------------------------------------


def test_backoff_grows_is_capped_and_jittered() -> None:
    import random

    policy = RetryPolicy(base_delay=0.5, max_delay=10.0)
    rng = random.Random(1)
    for retry, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (40, 10.0)]:
        for _ in range(50):
            delay = policy.backoff(retry, rng)
            assert ceiling / 2 <= delay <= ceiling
    full = RetryPolicy(jitter="full")
    assert all(0 <= full.backoff(3, rng) <= 2.0 for _ in range(50))
    assert policy.delay(1, 7.0, rng) == 7.0
    assert policy.delay(1, 61.0, rng) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_retry_after_parsing() -> None:
    from datetime import UTC, datetime

    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert wire.retry_after_seconds("5") == 5.0
    assert wire.retry_after_seconds(" 2.5 ") == 2.5
    assert wire.retry_after_seconds("Mon, 01 Jan 2024 12:00:30 GMT", now=now) == 30.0
    assert wire.retry_after_seconds("soon") is None
    assert wire.retry_after_seconds(None) is None


def test_truncation_never_splits_a_character() -> None:
    assert wire.truncate_text("abc", 3) == "abc"
    assert wire.truncate_text("abcd", 3) == "ab…"
    cut = wire.truncate_text("🙂" * 10, 6)  # each emoji is 2 UTF-16 units
    assert cut == "🙂🙂…"
    assert wire.text_length(cut) <= 6


def test_every_error_status_maps_to_the_tree() -> None:
    assert wire.error_class(409, "LEASE_EXPIRED") is errors.LeaseExpired
    assert wire.error_class(409, "INVALID_TRANSITION") is errors.InvalidTransition
    assert wire.error_class(409, "AMBIGUOUS_REFERENCE") is errors.NuntiqConflict
    assert wire.error_class(429, None) is errors.NuntiqTransientError
    assert wire.error_class(501, None) is errors.NuntiqServerError
    assert wire.error_class(410, None) is errors.NuntiqFatalError
    assert wire.error_class(307, None) is errors.NuntiqFatalError


# --- answers that lie, garble, or are too large -------------------------------------------


def test_an_answer_about_another_invoice_is_refused(sandbox: Any, client: NuntiqClient) -> None:
    """Issue 8.3: a GET answered with another invoice's body must never pass for the one
    asked for; it is transient, so the invoice waits for a later run."""
    asked, other = sandbox.control.seed(2)
    sandbox.control.set_faults([fault("get", "swap", count=1)])
    with pytest.raises(errors.NuntiqReplyMismatch) as caught:
        client.get_invoice(asked)
    assert caught.value.transient
    assert asked in str(caught.value) and other in str(caught.value)
    assert client.get_invoice(asked).invoice.invoice_token == asked  # the fault is spent


def test_a_result_answer_about_another_invoice_is_refused() -> None:
    body = json.dumps(
        {
            "ok": True,
            "previous_status": "PendingResult",
            "new_status": "Processed",
            "invoice_token": "someone-else",
            "status_changed": True,
        }
    ).encode()
    with (
        _TinyServer(200, body) as url,
        NuntiqClient(url, SecretStr("k"), retry=FAST) as client,
        pytest.raises(errors.NuntiqReplyMismatch),
    ):
        client.report_result("mine", "lease", IntegrationResult.delivered("/a"))


def test_an_answer_that_is_not_json_once_is_retried(sandbox: Any, client: NuntiqClient) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "garbled", count=1)])
    assert client.get_invoice(token).invoice.invoice_token == token
    assert counts(sandbox) == {"get": 2}


def test_an_answer_that_is_never_json_is_a_protocol_error(
    sandbox: Any, client: NuntiqClient
) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "garbled")])
    with pytest.raises(errors.NuntiqProtocolError) as caught:
        client.get_invoice(token)
    assert "not JSON" in str(caught.value)
    assert (caught.value.failure_code, caught.value.attempts) == ("NUNTIQ_INVOICE_INVALID", 5)
    assert counts(sandbox) == {"get": 5}


def test_a_garbled_answer_seen_once_is_not_held_against_the_invoice(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    """Garbled, then out of attempts on a 503: one garbled answer proves nothing about
    the invoice, so the error stays transient (it waits rather than fails)."""
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "garbled", count=1), fault("get", status=503)])
    client = make_client(retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    with pytest.raises(errors.NuntiqTransientError):
        client.get_invoice(token)
    sandbox.control.set_faults([fault("get", status=503, count=1), fault("get", "garbled")])
    with pytest.raises(errors.NuntiqTransientError) as caught:
        client.get_invoice(token)
    assert not isinstance(caught.value, errors.NuntiqProtocolError)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_huge_answer_is_refused_without_reading_it(chunked: bool) -> None:
    """Weak spot (a): a 1 GiB reply took 2.2 GB of RAM. Reading stops at the cap and the
    connection is dropped: the server could send only a little of its 300 MB."""
    total = 300 * 1024 * 1024
    with (
        hostile_http.RawServer(hostile_http.flooding(total, chunked=chunked)) as server,
        NuntiqClient(server.url, SecretStr("k"), retry=FAST, max_reply_bytes=1_000_000) as client,
        pytest.raises(errors.NuntiqReplyTooLarge) as caught,
    ):
        client.get_invoice("x")
    server.wait_finished()
    assert caught.value.failure_code == "NUNTIQ_INVOICE_TOO_LARGE"
    assert caught.value.attempts == 1  # the same invoice would be as large again
    (talk,) = server.conversations
    assert talk.hung_up
    assert talk.sent < total // 10


def test_an_answer_under_the_cap_is_read_whole(sandbox: Any, make_client: Any) -> None:
    (token,) = sandbox.control.seed(1)
    client = make_client(max_reply_bytes=100_000)
    assert client.get_invoice(token).invoice.invoice_token == token


# --- time: whole requests, call budgets, bookkeeping, the run's deadline -------------------


@pytest.mark.parametrize("in_headers", [True, False], ids=["headers", "body"])
def test_a_slow_loris_cannot_hold_a_request_past_its_timeout(in_headers: bool) -> None:
    """Issue 8.4: a byte every 50 ms resets any per-read timeout for ever (400 bytes take
    20 s). The request as a whole must end at its timeout: a timeout error, and the
    connection dropped long before the server got all its bytes out."""
    total = 400
    policy = RetryPolicy(max_attempts=1)
    with (
        hostile_http.RawServer(
            hostile_http.trickling(total, 0.05, in_headers=in_headers)
        ) as server,
        NuntiqClient(server.url, SecretStr("k"), timeout=0.5, retry=policy) as client,
        pytest.raises(errors.NuntiqUnavailable) as caught,
    ):
        client.get_invoice("x")
    server.wait_finished()
    assert "within 0.5s" in str(caught.value)
    assert "ReadTimeout" in str(caught.value)
    (talk,) = server.conversations
    assert talk.hung_up
    assert talk.sent < total


def test_a_slow_request_is_retried_within_the_budget(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    """A request cut at its timeout is a transient failure like any other: retried."""
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "latency", latency_ms=800, count=1)])
    client = make_client(timeout=0.3)
    assert client.get_invoice(token).invoice.invoice_token == token
    assert counts(sandbox) == {"get": 2}


def test_a_call_ends_within_its_time_budget(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    """Fifty attempts allowed, but the budget of the call runs out before: fifty waits of
    at least 50 ms do not fit in 2 s."""
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", status=503)])
    policy = RetryPolicy(
        max_attempts=50, base_delay=0.1, max_delay=0.1, jitter="equal", max_elapsed=2.0
    )
    client = make_client(retry=policy, sleep=time.sleep)
    with pytest.raises(errors.NuntiqTransientError) as caught:
        client.get_invoice(token)
    assert "time budget" in str(caught.value)
    assert 1 < caught.value.attempts < 50
    assert counts(sandbox)["get"] == caught.value.attempts


def test_the_budget_also_cuts_a_single_slow_attempt(
    sandbox: Any, make_client: Callable[..., NuntiqClient], sleeps: Sleeps
) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([fault("get", "latency", latency_ms=3000)])
    client = make_client(timeout=30, retry=RetryPolicy(max_elapsed=0.4))
    with pytest.raises(errors.NuntiqUnavailable) as caught:
        client.get_invoice(token)
    assert "within 0.4s" in str(caught.value)
    assert (caught.value.attempts, sleeps) == (1, [])


@pytest.mark.parametrize("call", ["delta_begin", "delta_complete", "delta_fail", "delta_get"])
def test_bookkeeping_does_not_wait_for_a_long_retry_after(
    sandbox: Any, client: NuntiqClient, sleeps: Sleeps, call: str
) -> None:
    """Issue 8.4: with 429 Retry-After: 60 on every endpoint, delta_begin alone took 240 s.
    The run's bookkeeping gives up at once rather than wait a minute."""
    sandbox.control.set_faults([fault("*", status=429, retry_after=60)])
    with pytest.raises(errors.NuntiqTransientError) as caught:
        _delta_call(client, call)
    assert (caught.value.attempts, sleeps) == (1, [])
    assert counts(sandbox) == {"delta": 1}


def test_bookkeeping_retries_once_after_a_short_wait(
    sandbox: Any, client: NuntiqClient, sleeps: Sleeps
) -> None:
    sandbox.control.set_faults([fault("delta", status=429, retry_after=2)])
    with pytest.raises(errors.NuntiqTransientError) as caught:
        client.delta_begin("erp-push", "pushed_invoices")
    assert caught.value.attempts == 2
    assert len(sleeps) == 1 and 2 <= sleeps[0] <= 3
    sandbox.control.set_faults([fault("delta", status=503, count=1)])
    client.delta_begin("erp-push", "pushed_invoices")  # the retry gets through


def _delta_call(client: NuntiqClient, call: str) -> object:
    connector, stream = "erp-push", "pushed_invoices"
    if call == "delta_begin":
        return client.delta_begin(connector, stream)
    if call == "delta_complete":
        return client.delta_complete(
            connector,
            stream,
            new_cursor_value="2024-01-01T00:00:00Z",
            records_processed=0,
            metadata={},
        )
    if call == "delta_fail":
        return client.delta_fail(connector, stream, "x")
    return client.delta_get(connector, stream)


def test_past_the_deadline_no_invoice_call_is_sent_but_bookkeeping_is(
    sandbox: Any, make_client: Callable[..., NuntiqClient]
) -> None:
    sandbox.control.seed(1)
    client = make_client(deadline=time.monotonic() - 1)
    with pytest.raises(errors.NuntiqDeadlineReached) as caught:
        client.claim(limit=1)
    assert caught.value.transient and caught.value.attempts == 0
    with pytest.raises(errors.NuntiqDeadlineReached):
        client.get_invoice(str(uuid.uuid4()))
    assert counts(sandbox) == {}
    client.delta_begin("erp-push", "pushed_invoices")  # bookkeeping still goes
    assert counts(sandbox) == {"delta": 1}
    client.deadline = None  # the deadline is the caller's to move
    assert len(client.claim(limit=1)) == 1


def test_no_retry_waits_past_the_deadline(
    sandbox: Any, make_client: Callable[..., NuntiqClient], sleeps: Sleeps
) -> None:
    """A retry whose wait would end after the deadline is not waited for at all."""
    sandbox.control.seed(1)
    sandbox.control.set_faults([fault("claim", status=503)])
    policy = RetryPolicy(base_delay=10.0, max_delay=10.0)  # each wait at least 5 s
    client = make_client(retry=policy, deadline=time.monotonic() + 2)
    with pytest.raises(errors.NuntiqDeadlineReached) as caught:
        client.claim(limit=1)
    assert caught.value.attempts == 1
    assert caught.value.status == 503
    assert sleeps == []
    assert counts(sandbox) == {"claim": 1}


def test_the_connection_pool_is_sized_by_max_connections() -> None:
    """Issue 7.2: the pool is sized to the lanes. Six threads, two connections: the
    server sees two connections, kept alive and reused."""
    tiny = _CountingServer()
    with tiny, NuntiqClient(tiny.url, SecretStr("k"), retry=FAST, max_connections=2) as client:
        threads = [
            threading.Thread(target=lambda: [client.delta_get("c", "s") for _ in range(3)])
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert tiny.requests == 18
    assert tiny.connections == 2


class _CountingServer:
    """Keep-alive HTTP server answering every request with an empty delta state after a
    short pause; counts connections and requests."""

    def __init__(self) -> None:
        self.connections = self.requests = 0
        lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with lock:
                    counter.connections += 1

            def do_GET(self) -> None:
                with lock:
                    counter.requests += 1
                time.sleep(0.05)  # long enough for the threads to overlap
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/api"

    def __enter__(self) -> _CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_proxy_named_by_the_environment_is_still_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our bounded transport replaces the one httpx would build; HTTP_PROXY must still
    be honoured as httpx would (and NO_PROXY too)."""

    def proxy(conn: socket.socket, request: Any, talk: Any) -> None:
        talk.send(conn, hostile_http.response_head(200, headers={"Content-Length": "2"}) + b"{}")

    with hostile_http.RawServer(proxy) as server:
        monkeypatch.setenv("HTTP_PROXY", server.url.removesuffix("/api"))
        with NuntiqClient("http://127.0.0.1:9/api", SecretStr("k"), retry=FAST) as client:
            client.delta_get("c", "s")
        (talk,) = server.conversations
        assert talk.request is not None
        assert talk.request.target == "http://127.0.0.1:9/api/v1/delta/streams/c/s"

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with (
            NuntiqClient("http://127.0.0.1:9/api", SecretStr("k"), retry=FAST) as client,
            pytest.raises(errors.NuntiqUnavailable, match="ConnectError"),
        ):
            client.delta_get("c", "s")
        assert len(server.conversations) == 1


# --- the key echoed back by a server -------------------------------------------------------

ECHOED = "sk_ECHOED_KEY_5a1d"


def _echoing(status: int) -> hostile_http.Handler:
    """Answers ``status`` with the key in the reason phrase, a header and the body (there
    also JSON-escaped, which decoding turns back into the key)."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in ECHOED)

    def handle(conn: socket.socket, request: Any, talk: Any) -> None:
        body = f'{{"error": "{ECHOED}", "message": "bad key {escaped}"}}'.encode()
        head = hostile_http.response_head(
            status,
            f"bad key {ECHOED}",
            {
                "X-Echo": ECHOED,
                "Content-Type": "application/json",
                "Retry-After": "0",
                "Content-Length": str(len(body)),
            },  # fmt: skip
        )
        talk.send(conn, head + body)

    return handle


@pytest.mark.parametrize("status", [401, 503, 404])
def test_a_key_echoed_in_reason_header_or_body_is_cut_everywhere(
    status: int, caplog: pytest.LogCaptureFixture, sleeps: Sleeps
) -> None:
    """Issue 8.5: reason phrase, headers (logged by httpcore at DEBUG) and body."""
    caplog.set_level(logging.DEBUG)
    # As with --debug; an in-process CLI run earlier in the session (test_cli) leaves
    # httpcore's own level above CRITICAL.
    caplog.set_level(logging.DEBUG, logger="httpcore")
    with (
        hostile_http.RawServer(_echoing(status)) as server,
        NuntiqClient(server.url, SecretStr(ECHOED), retry=FAST, sleep=sleeps) as client,
        pytest.raises(errors.NuntiqError) as caught,
    ):
        client.get_invoice("x")
    seen = [str(caught.value), repr(caught.value), str(caught.value.code), caplog.text]
    seen += ["".join(traceback.format_exception(caught.value))]
    seen += [str(r.__dict__) for r in caplog.records]
    assert "bad key ***" in str(caught.value)
    assert "X-Echo" in caplog.text  # httpcore did log the headers
    if status == 503:
        assert "attempt 1/5 failed" in caplog.text
    for text in seen:
        assert ECHOED not in text


def test_every_connection_shares_one_tls_context() -> None:
    """A connection per lane must not load the CA bundle once per lane (32 lanes: 32
    copies in memory and as many loads of the bundle)."""
    client = NuntiqClient("https://nuntiq.example/api", SecretStr("k"), max_connections=3)
    try:
        with client._lend() as a, client._lend() as b, client._lend() as c:
            contexts = {id(http._pool._ssl_context) for http in (a, b, c)}  # type: ignore[attr-defined]
            assert len({id(http) for http in (a, b, c)}) == 3
        assert len(contexts) == 1
    finally:
        client.close()
