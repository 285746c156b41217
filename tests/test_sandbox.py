"""The Nuntiq sandbox itself, over real HTTP: state machine, errors, concurrency, controls.

Every test gets a freshly reset sandbox (``sandbox`` fixture). Responses are also parsed
with erp-push's own pydantic models, so the sandbox cannot drift from what the client reads.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from erp_push.models import (
    AcknowledgeResponse,
    ClaimResponse,
    DeltaStreamState,
    IntegrationResultResponse,
    InvoiceDetail,
)
from tests.sandbox.fixtures import Sandbox
from tests.sandbox.server import SandboxServer

CLAIM = "/v1/invoices/claim"


@pytest.fixture
def api(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=sandbox.base_url, headers={"X-API-Key": sandbox.api_key}, timeout=30, verify=False
    ) as client:  # plain HTTP: no CA loading
        yield client


def claim(api: httpx.Client, limit: int = 10, **extra: Any) -> list[dict[str, Any]]:
    r = api.post(CLAIM, json={"state": "PendingIntegration", "limit": limit, **extra})
    assert r.status_code == 200, r.text
    ClaimResponse.model_validate(r.json())
    leases: list[dict[str, Any]] = r.json()["leases"]
    return leases


def ack(api: httpx.Client, token: str, lease: str) -> httpx.Response:
    return api.post(f"/v1/invoices/{token}/acknowledge", json={"lease_token": lease})


def result(
    api: httpx.Client, token: str, lease: str, success: bool = True, query: str = "", **extra: Any
) -> httpx.Response:
    body = {"lease_token": lease, "success": success, **extra}
    return api.post(f"/v1/invoices/{token}/integration-result{query}", json=body)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]


def field(detail: dict[str, Any], key: str) -> Any:
    return next((f["value"] for f in detail["invoice"]["fields"] if f["key"] == key), None)


# --- the state machine ----------------------------------------------------------------


def test_claim_acknowledge_success_flow(sandbox: Sandbox, api: httpx.Client) -> None:
    tokens = sandbox.control.seed(3)
    leases = claim(api, limit=2)
    assert [x["invoice_token"] for x in leases] == tokens[:2]  # oldest first
    token, lease = leases[0]["invoice_token"], leases[0]["lease_token"]
    assert sandbox.control.statuses() == {tokens[0]: 92, tokens[1]: 92, tokens[2]: 90}

    r = api.get(f"/v1/invoices/{token}")
    assert r.status_code == 200
    detail = InvoiceDetail.model_validate(r.json())
    assert detail.invoice.status == 92
    assert detail.invoice.status_info is not None
    assert detail.invoice.status_info.key == "PENDING_ACKNOWLEDGEMENT"

    r = ack(api, token, lease)
    assert r.status_code == 200, r.text
    body = AcknowledgeResponse.model_validate(r.json())
    assert (body.previous_status, body.new_status) == ("PendingAcknowledgement", "PendingResult")
    assert body.status_changed is True and body.idempotent is False
    assert body.invoice_id == detail.invoice.id

    again = AcknowledgeResponse.model_validate(ack(api, token, lease).json())
    assert again.status_changed is False and again.idempotent is True

    r = result(
        api,
        token,
        lease,
        True,
        "?debug=true",
        external_id_1="/outbox/INV-000001.csv",
        external_message_1="SFTP_DELIVERED",
    )
    assert r.status_code == 200, r.text
    res = IntegrationResultResponse.model_validate(r.json())
    assert (res.previous_status, res.new_status, res.status_changed) == (
        "PendingResult",
        "Processed",
        True,
    )
    assert (res.previous_status_code, res.new_status_code) == (93, 100)
    assert res.new_status_info is not None and res.new_status_info.key == "PROCESSED"
    assert res.invoice_token == token

    # Success again on 100 is idempotent; failure on 100 is not a valid transition.
    r = result(api, token, lease, True)
    assert r.status_code == 200 and r.json()["status_changed"] is False
    assert "previous_status_code" not in r.json()  # only with ?debug=true
    assert_error(result(api, token, lease, False, failure_code="X"), 409, "INVALID_TRANSITION")
    assert_error(ack(api, token, lease), 409, "INVALID_TRANSITION")

    row = sandbox.control.invoice(token)
    assert row["status"] == 100 and row["lease_token"] is None
    assert row["external_id_1"] == "/outbox/INV-000001.csv"
    assert row["external_message_1"] == "SFTP_DELIVERED"
    assert row["result_count"] == 2
    assert row["invoice_number"] == "INV-000001"


def test_failure_flow_straight_from_92(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.control.seed(1)
    (lease,) = claim(api)
    token, lt = lease["invoice_token"], lease["lease_token"]
    r = result(api, token, lt, False, failure_code="RENDER_FAILED", failure_message="bad date")
    assert r.status_code == 200, r.text
    assert (r.json()["previous_status"], r.json()["new_status"]) == (
        "PendingAcknowledgement",
        "IntegrationFailed",
    )
    again = result(api, token, lt, False, failure_code="RENDER_FAILED", failure_message="x")
    assert again.status_code == 200 and again.json()["status_changed"] is False
    assert_error(result(api, token, lt, True), 409, "INVALID_TRANSITION")
    assert_error(result(api, token, lt, False, failure_code="OTHER"), 409, "INVALID_TRANSITION")
    row = sandbox.control.invoice(token)
    assert (row["status"], row["failure_code"], row["failure_message"]) == (
        97,
        "RENDER_FAILED",
        "bad date",
    )


def test_acknowledge_and_result_errors(sandbox: Sandbox, api: httpx.Client) -> None:
    t1, t2 = sandbox.control.seed(2)
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_error(ack(api, unknown, unknown), 404, "NOT_FOUND")
    assert_error(result(api, unknown, unknown), 404, "NOT_FOUND")
    assert_error(ack(api, t1, unknown), 409, "INVALID_TRANSITION")  # never claimed (90)
    assert_error(result(api, t1, unknown), 409, "INVALID_TRANSITION")
    (lease, _) = claim(api, limit=2)
    assert_error(ack(api, t1, unknown), 409, "LEASE_EXPIRED")  # held by another lease
    assert_error(result(api, t1, unknown), 409, "LEASE_EXPIRED")
    assert_error(api.post(f"/v1/invoices/{t2}/acknowledge", json={}), 400, "VALIDATION_ERROR")
    assert ack(api, t1, lease["lease_token"]).status_code == 200
    assert_error(ack(api, t1, unknown), 409, "LEASE_EXPIRED")  # at 93, other lease


def test_forced_unknown_status_is_not_claimable(sandbox: Sandbox, api: httpx.Client) -> None:
    t1, t2 = sandbox.control.seed(2)
    sandbox.control.set_status(t1, 95)
    assert [x["invoice_token"] for x in claim(api)] == [t2]
    detail = InvoiceDetail.model_validate(api.get(f"/v1/invoices/{t1}").json())
    assert detail.invoice.status == 95
    assert_error(ack(api, t1, "x"), 409, "INVALID_TRANSITION")


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"limit": 5},
        {"state": "PendingResult", "limit": 5},
        {"state": "PendingIntegration"},
        {"state": "PendingIntegration", "limit": 0},
        {"state": "PendingIntegration", "limit": 51},
        {"state": "PendingIntegration", "limit": "5"},
        {"state": "PendingIntegration", "limit": True},
        {"state": "PendingIntegration", "limit": 5, "lease_ttl_seconds": 59},
        {"state": "PendingIntegration", "limit": 5, "lease_ttl_seconds": 1801},
        {"state": "PendingIntegration", "limit": 5, "idempotency_key": "k" * 256},
        {"state": "PendingIntegration", "limit": 5, "idempotency_key": 7},
        {"state": "PendingIntegration", "limit": 5, "ext_reference_1": 3},
        {"state": "PendingIntegration", "limit": 5, "ttl": 60},  # misspelt field
    ],
)
def test_claim_validation(sandbox: Sandbox, api: httpx.Client, body: dict[str, Any]) -> None:
    assert_error(api.post(CLAIM, json=body), 400, "VALIDATION_ERROR")


def test_claim_accepts_the_bounds(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.control.seed(2)
    assert len(claim(api, limit=50, lease_ttl_seconds=60, idempotency_key="k" * 255)) == 2
    assert claim(api, limit=1, lease_ttl_seconds=1800, ext_reference_5=None) == []


@pytest.mark.parametrize(
    "body",
    [
        {"success": True},  # no lease_token
        {"lease_token": "L"},  # no success
        {"lease_token": "L", "success": "yes"},
        {"lease_token": "L", "success": False},  # failure without failure_code
        {"lease_token": "L", "success": False, "failure_code": "lower_case"},
        {"lease_token": "L", "success": False, "failure_code": "9STARTS_WITH_DIGIT"},
        {"lease_token": "L", "success": False, "failure_code": "A" * 65},
        {"lease_token": "L", "success": False, "failure_code": "X", "failure_message": "m" * 501},
        {"lease_token": "L", "success": True, "external_id_1": "i" * 256},
        {"lease_token": "L", "success": True, "external_message_3": "m" * 256},
        {"lease_token": "L", "success": True, "external_id_4": "x"},
        {"lease_token": "L", "success": True, "external_id_2": "\N{GRINNING FACE}" * 128},
    ],
)
def test_result_validation(sandbox: Sandbox, api: httpx.Client, body: dict[str, Any]) -> None:
    (token,) = sandbox.control.seed(1)
    r = api.post(f"/v1/invoices/{token}/integration-result", json=body)
    assert_error(r, 400, "VALIDATION_ERROR")


def test_result_accepts_the_bounds(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.control.seed(1)
    (lease,) = claim(api)
    r = result(
        api,
        lease["invoice_token"],
        lease["lease_token"],
        False,
        failure_code="A" + "B_9" * 21,
        failure_message="m" * 500,
        external_id_3="i" * 255,
        external_message_2="m" * 255,
        external_id_1="\N{GRINNING FACE}" * 127 + "x",
    )  # 255 UTF-16 units
    assert r.status_code == 200, r.text


def test_protocol_errors(sandbox: Sandbox, api: httpx.Client) -> None:
    assert_error(api.get("/v1/nothing-here"), 404, "NOT_FOUND")
    assert_error(api.get("/elsewhere"), 404, "NOT_FOUND")
    r = api.post(CLAIM, content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "VALIDATION_ERROR")
    assert_error(api.post(CLAIM, json=[1, 2]), 400, "VALIDATION_ERROR")
    assert_error(api.get("/v1/invoices/x/acknowledge"), 405, "METHOD_NOT_ALLOWED")


def test_expect_100_continue_is_answered_before_the_body(sandbox: Sandbox) -> None:
    """Responses are buffered into one send; the interim 100 must still go out at once,
    or a client that waits for it (curl with a large body) stalls."""
    url = httpx.URL(sandbox.base_url)
    body = b'{"count": 1}'
    with socket.create_connection((url.host, url.port or 80), timeout=10) as conn:
        conn.sendall(
            f"POST {url.path}/_sandbox/seed HTTP/1.1\r\nHost: x\r\n"
            f"X-API-Key: {sandbox.api_key}\r\nContent-Type: application/json\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n")
        conn.sendall(body)
        assert conn.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")


def _exchange_raw(sandbox: Sandbox, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` as is; the answer's first bytes, and whether the server then
    closed the connection."""
    url = httpx.URL(sandbox.base_url)
    with socket.create_connection((url.host, url.port or 80), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(65536)
            if not chunk:
                return answer, True
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head)
        while length is not None and len(body) < int(length[1]):
            body += conn.recv(65536)
        conn.settimeout(0.5)
        try:
            closed = conn.recv(1) == b""
        except TimeoutError:
            closed = False
        return answer, closed


@pytest.mark.parametrize(
    ("request_head", "status", "closed"),
    [
        (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n", b"404", False),  # keep-alive
        (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n", b"404", True),
        (b"GET /v1/nothing HTTP/1.0\r\n", b"404", True),  # 1.0: closes by default...
        (b"GET /v1/nothing HTTP/1.0\r\nConnection: Keep-Alive\r\n", b"404", False),  # ...or not
        (b"GET /v1/nothing HTTP/2.0\r\n", b"505", True),  # other lines: http.server's
        (b"GET /v1/nothing HTTP/1.x\r\n", b"400", True),
        (b"GET /v1/nothing HTTP/1.1\r\nno colon here\r\n", b"400", True),
        (b"GET /v1/nothing HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n", b"431", True),
        (b"GET /v1/nothing HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101, b"431", True),
    ],
    ids=["1.1", "1.1-close", "1.0", "1.0-keep-alive", "2.0", "1.x", "no-colon", "long", "many"],
)
def test_the_request_head_is_read_as_http_server_would(
    sandbox: Sandbox, request_head: bytes, status: bytes, closed: bool
) -> None:
    """The sandbox reads request heads with a plain loop (http.server's goes through the
    email package, a quarter of its CPU): the same answers and connection handling."""
    answer, was_closed = _exchange_raw(sandbox, request_head + b"\r\n")
    if answer.startswith(b"HTTP/"):
        assert answer.split(b" ", 2)[1] == status, answer[:200]
    else:  # http.server answers a line it cannot read without a status line
        assert b"Error code: " + status in answer, answer[:400]
    assert was_closed == closed


def test_header_names_are_matched_in_any_case_and_the_first_of_a_repeated_one_counts(
    sandbox: Sandbox,
) -> None:
    url = httpx.URL(sandbox.base_url)
    request = (
        f"GET {url.path}/v1/invoices/00000000-0000-4000-8000-000000000000 HTTP/1.1\r\n"
        f"host: x\r\nx-api-KEY:   {sandbox.api_key}  \r\nX-Api-Key: second\r\n\r\n"
    ).encode()
    answer, _ = _exchange_raw(sandbox, request)
    # Authenticated by the first of the repeated key: an unknown invoice, not 401.
    assert answer.split(b" ", 2)[1] == b"404"


# --- get invoice ----------------------------------------------------------------------


def test_get_invoice_detail(sandbox: Sandbox, api: httpx.Client) -> None:
    (token,) = sandbox.control.seed(1)
    assert_error(api.get("/v1/invoices/00000000-0000-4000-8000-000000000000"), 404, "NOT_FOUND")
    r = api.get(f"/v1/invoices/{token}")  # readable at 90, before any claim
    assert r.status_code == 200
    detail = InvoiceDetail.model_validate(r.json())
    inv = detail.invoice
    assert inv.invoice_token == token and inv.status == 90
    assert inv.status_info is not None and inv.status_info.key == "PENDING_INTEGRATION_FIRST"
    assert inv.field("invoiceNumber") == "INV-000001"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", inv.field("invoiceDate"))
    assert inv.address("vendor") is not None
    assert 1 <= inv.line_count <= 5
    assert all(line.invoice_id == inv.id and line.fields for line in inv.lines)
    keys = [f["key"] for f in r.json()["invoice"]["fields"]]
    assert "dueDate" not in keys  # null values are omitted by default
    with_nulls = api.get(f"/v1/invoices/{token}", params={"includeNull": "true"}).json()
    assert "dueDate" in [f["key"] for f in with_nulls["invoice"]["fields"]]


# --- lease expiry and idempotency keys -------------------------------------------------


def test_lease_lapses_at_92(sandbox: Sandbox, api: httpx.Client) -> None:
    (token,) = sandbox.control.seed(1)
    (lease,) = claim(api, lease_ttl_seconds=60)
    sandbox.control.advance_clock(59)
    assert sandbox.control.statuses() == {token: 92}
    sandbox.control.advance_clock(2)
    row = sandbox.control.invoice(token)
    assert (row["status"], row["lease_token"], row["lease_expires_at"]) == (91, None, None)
    detail = api.get(f"/v1/invoices/{token}").json()
    assert detail["invoice"]["status_info"]["key"] == "PENDING_INTEGRATION_RETRY"
    assert_error(ack(api, token, lease["lease_token"]), 409, "LEASE_EXPIRED")
    (again,) = claim(api)  # claimable again, under a new lease
    assert again["invoice_token"] == token and again["lease_token"] != lease["lease_token"]
    assert_error(ack(api, token, lease["lease_token"]), 409, "LEASE_EXPIRED")
    assert ack(api, token, again["lease_token"]).status_code == 200


def test_lease_lapses_at_93(sandbox: Sandbox, api: httpx.Client) -> None:
    (token,) = sandbox.control.seed(1)
    (lease,) = claim(api, lease_ttl_seconds=120)
    assert ack(api, token, lease["lease_token"]).status_code == 200
    sandbox.control.advance_clock(121)
    assert sandbox.control.statuses() == {token: 91}
    assert_error(result(api, token, lease["lease_token"]), 409, "LEASE_EXPIRED")
    assert [x["invoice_token"] for x in claim(api)] == [token]


def test_finished_invoice_ignores_lease_expiry(sandbox: Sandbox, api: httpx.Client) -> None:
    (token,) = sandbox.control.seed(1)
    (lease,) = claim(api, lease_ttl_seconds=60)
    assert result(api, token, lease["lease_token"]).status_code == 200
    sandbox.control.advance_clock(3600)
    assert sandbox.control.statuses() == {token: 100}
    # The repeat with the lease that finished it stays a 200, though the lease is long gone.
    r = result(api, token, lease["lease_token"])
    assert r.status_code == 200 and r.json()["status_changed"] is False
    assert_error(result(api, token, "another-lease"), 409, "LEASE_EXPIRED")


def test_exactly_the_due_leases_lapse_among_many_held(sandbox: Sandbox, api: httpx.Client) -> None:
    """Leases lapse lazily (one invoice per request; claim and the listing sweep the due
    ones through an index). With hundreds held, exactly the due ones come back at 91, at 92
    and at 93 alike, and claim hands them out oldest first among the 90s."""
    tokens = sandbox.control.seed(600)
    short: list[dict[str, Any]] = []  # blocks of 50 alternate: 60 s leases, 30 min leases
    long: list[dict[str, Any]] = []
    for block in range(12):
        ttl = 60 if block % 2 == 0 else 1800
        (short if ttl == 60 else long).extend(claim(api, limit=50, lease_ttl_seconds=ttl))
    assert len(short) == len(long) == 300
    for lease in short[::3] + long[::3]:  # some at 93: they lapse too
        assert ack(api, lease["invoice_token"], lease["lease_token"]).status_code == 200
    finished = short[1:30:7] + long[1:30:7]  # at 100: never lapse
    for lease in finished:
        assert result(api, lease["invoice_token"], lease["lease_token"]).status_code == 200
    forced = [x["invoice_token"] for x in long[2:60:9]]  # 90s among the lapsed ones, by age
    for token in forced:
        sandbox.control.set_status(token, 90)

    sandbox.control.advance_clock(61)

    # One invoice at a time, before anything sweeps: each already answers as lapsed or not.
    done = {x["invoice_token"] for x in finished}
    lapsed = [x for x in short if x["invoice_token"] not in done]
    live = [x for x in long if x["invoice_token"] not in done and x["invoice_token"] not in forced]
    for lease in lapsed[::25]:
        detail = api.get(f"/v1/invoices/{lease['invoice_token']}").json()
        assert detail["invoice"]["status"] == 91
    for lease in lapsed[1::25]:
        assert_error(ack(api, lease["invoice_token"], lease["lease_token"]), 409, "LEASE_EXPIRED")
    for lease in lapsed[2::25]:
        assert_error(
            result(api, lease["invoice_token"], lease["lease_token"]), 409, "LEASE_EXPIRED"
        )
    for lease in live[::25]:
        assert ack(api, lease["invoice_token"], lease["lease_token"]).status_code == 200

    expected = {x["invoice_token"]: 91 for x in lapsed}
    expected |= {x["invoice_token"]: 92 for x in live}
    expected |= {x["invoice_token"]: 93 for x in long[::3] + live[::25]}
    expected |= {token: 100 for token in done} | {token: 90 for token in forced}
    assert sandbox.control.statuses() == expected

    claimable = [t for t in tokens if expected[t] in (90, 91)]  # seed order = age
    first = claim(api, limit=50)
    assert [x["invoice_token"] for x in first] == claimable[:50]
    rest = [x["invoice_token"] for _ in range(10) for x in claim(api, limit=50)]
    assert rest == claimable[50:]


def test_a_request_about_one_invoice_lapses_only_that_one(
    sandbox: Sandbox, api: httpx.Client
) -> None:
    """What keeps a request's cost independent of the leases held: a request about one
    invoice lapses that invoice alone, the others stay as they are until a claim or the
    listing looks at them. Read from the file behind the sandbox's back, because through
    the API every due lease already looks lapsed (the test above)."""
    tokens = sandbox.control.seed(100)
    leases = claim(api, limit=50, lease_ttl_seconds=60) + claim(api, limit=50, lease_ttl_seconds=60)
    sandbox.control.advance_clock(61)

    def in_file() -> Counter[int]:
        with contextlib.closing(sqlite3.connect(sandbox.server.db_path)) as db:
            return Counter(status for (status,) in db.execute("SELECT status FROM invoices"))

    assert api.get(f"/v1/invoices/{tokens[7]}").json()["invoice"]["status"] == 91
    assert_error(ack(api, tokens[8], leases[8]["lease_token"]), 409, "LEASE_EXPIRED")
    assert in_file() == {92: 98, 91: 2}
    assert set(sandbox.control.statuses().values()) == {91}  # the listing sweeps
    assert in_file() == {91: 100}


def test_idempotency_key(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.control.seed(6)
    first = claim(api, limit=2, lease_ttl_seconds=60, idempotency_key="run-1")
    assert len(first) == 2
    assert claim(api, limit=2, lease_ttl_seconds=60, idempotency_key="run-1") == first
    other = claim(api, limit=2, idempotency_key="run-2")
    assert {x["invoice_token"] for x in other}.isdisjoint(x["invoice_token"] for x in first)
    sandbox.control.advance_clock(61)  # run-1's TTL is over (and so are its leases)
    later = claim(api, limit=2, lease_ttl_seconds=60, idempotency_key="run-1")
    assert len(later) == 2
    assert {x["lease_token"] for x in later}.isdisjoint(x["lease_token"] for x in first)


def test_claim_filters_ext_reference_case_insensitively(
    sandbox: Sandbox, api: httpx.Client
) -> None:
    sandbox.control.seed(20)
    by_company = {
        row["invoice_token"]: row["ext_reference_1"] for row in sandbox.control.invoices()
    }
    assert set(by_company.values()) == {"ACME", "GLOBEX"}
    leases = claim(api, limit=50, ext_reference_1="acme")
    assert leases and all(by_company[x["invoice_token"]] == "ACME" for x in leases)
    assert len(leases) == list(by_company.values()).count("ACME")
    assert claim(api, limit=50, ext_reference_2="anything") == []


def test_concurrent_claims_never_share_an_invoice(sandbox: Sandbox) -> None:
    tokens = sandbox.control.seed(200)
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    got: list[list[str]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with httpx.Client(
                base_url=sandbox.base_url, timeout=60, headers={"X-API-Key": sandbox.api_key}
            ) as client:
                barrier.wait()
                while True:
                    r = client.post(CLAIM, json={"state": "PendingIntegration", "limit": 7})
                    r.raise_for_status()
                    leases = r.json()["leases"]
                    if not leases:
                        return
                    got[i].extend(x["invoice_token"] for x in leases)
        except BaseException as e:  # reported below: a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    claimed = Counter(tok for per_thread in got for tok in per_thread)
    assert set(claimed) == set(tokens)
    assert set(claimed.values()) == {1}  # every invoice leased exactly once
    assert set(sandbox.control.statuses().values()) == {92}
    assert sum(1 for per_thread in got if per_thread) > 1  # they really did compete


# --- attachments ----------------------------------------------------------------------


def test_attachment_download(sandbox: Sandbox, api: httpx.Client) -> None:
    tokens = sandbox.control.seed(12, awkward=True)
    details = [api.get(f"/v1/invoices/{t}").json() for t in tokens]
    atts = [a for d in details for a in d["invoice"]["attachments"]]
    assert {a["content_type"] for a in atts} == {"application/pdf", "image/png"}
    pdf = next(a for a in atts if a["content_type"] == "application/pdf")
    png = next(a for a in atts if a["content_type"] == "image/png")

    with api.stream("GET", f"/v1/attachment/{pdf['attachment_token']}") as r:
        assert r.status_code == 200
        data = b"".join(r.iter_bytes())
    assert r.headers["Content-Type"] == "application/pdf"
    assert r.headers["Content-Disposition"].startswith(f'attachment; filename="{pdf["file_name"]}"')
    assert data.startswith(b"%PDF-") and int(r.headers["Content-Length"]) == len(data) > 65536

    r = api.get(f"/v1/attachment/{png['attachment_token']}", params={"inline": "true"})
    assert r.headers["Content-Disposition"].startswith("inline")
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")

    assert_error(api.get("/v1/attachment/00000000-0000-4000-8000-000000000000"), 404, "NOT_FOUND")
    assert_error(api.get("/v1/attachment/not-a-token"), 400, "VALIDATION_ERROR")


# --- delta streams --------------------------------------------------------------------


def test_delta_stream(sandbox: Sandbox, api: httpx.Client) -> None:
    base = "/v1/delta/streams/erp-push/pushed_invoices"
    idle = DeltaStreamState.model_validate(api.get(base).json())
    assert (idle.status, idle.cursor_type, idle.committed_cursor_value) == ("idle", None, None)
    assert (idle.connector_name, idle.stream_name) == ("erp-push", "pushed_invoices")

    body = {"new_cursor_value": "2024-01-01T00:00:00Z", "records_processed": 1, "metadata": {}}
    assert_error(api.post(base + "/complete", json=body), 404, "NOT_FOUND")
    assert_error(api.post(base + "/fail", json={"error_summary": "x"}), 404, "NOT_FOUND")
    assert_error(
        api.post(base + "/begin", json={"cursor_type": "vector_clock"}), 422, "INVALID_CURSOR_TYPE"
    )

    r = api.post(base + "/begin", json={"cursor_type": "timestamp_utc"})
    begun = DeltaStreamState.model_validate(r.json())
    assert (begun.status, begun.committed_cursor_value) == ("running", None)
    assert begun.started_at_utc is not None

    body = {
        "new_cursor_value": "2024-05-01T10:00:00Z",
        "records_processed": 3,
        "metadata": {"run_id": "r1"},
    }
    done = DeltaStreamState.model_validate(api.post(base + "/complete", json=body).json())
    assert (done.status, done.committed_cursor_value, done.records_processed) == (
        "succeeded",
        "2024-05-01T10:00:00Z",
        3,
    )
    assert done.metadata == {"run_id": "r1"} and done.committed_at_utc is not None

    again = api.post(base + "/begin", json={"cursor_type": "timestamp_utc"}).json()
    assert again["committed_cursor_value"] == "2024-05-01T10:00:00Z"  # the lower bound
    back = {"new_cursor_value": "2024-04-30T23:59:59Z", "records_processed": 0}
    assert_error(api.post(base + "/complete", json=back), 422, "CURSOR_REGRESSION")
    same = {"new_cursor_value": "2024-05-01T10:00:00Z", "records_processed": 0}
    assert api.post(base + "/complete", json=same).status_code == 200

    failed = api.post(base + "/fail", json={"error_summary": "sftp down"}).json()
    assert (failed["status"], failed["error_summary"]) == ("failed", "sftp down")
    assert failed["committed_cursor_value"] == "2024-05-01T10:00:00Z"  # unchanged
    assert (
        api.post(base + "/begin", json={"cursor_type": "timestamp_utc"}).json()["error_summary"]
        is None
    )  # cleared by the next begin
    assert api.get(base).json()["status"] == "running"


def test_delta_numeric_and_opaque_cursors(sandbox: Sandbox, api: httpx.Client) -> None:
    num = "/v1/delta/streams/c/numbers"
    api.post(num + "/begin", json={"cursor_type": "numeric_id"})
    ok = api.post(num + "/complete", json={"new_cursor_value": "100", "records_processed": 1})
    assert ok.status_code == 200
    api.post(num + "/begin", json={"cursor_type": "numeric_id"})
    bad = api.post(num + "/complete", json={"new_cursor_value": "99", "records_processed": 1})
    assert_error(bad, 422, "CURSOR_REGRESSION")
    opaque = "/v1/delta/streams/c/opaque"
    api.post(opaque + "/begin", json={"cursor_type": "opaque_token"})
    for value in ("zzz", "aaa"):  # any different value is an advance
        r = api.post(opaque + "/complete", json={"new_cursor_value": value, "records_processed": 0})
        assert r.status_code == 200


# --- faults and request counts --------------------------------------------------------


def test_status_fault_with_retry_after_and_count(sandbox: Sandbox, api: httpx.Client) -> None:
    sandbox.control.seed(1)
    sandbox.control.set_faults(
        [{"endpoint": "claim", "kind": "status", "status": 429, "retry_after": 7, "count": 2}]
    )
    for _ in range(2):
        r = api.post(CLAIM, json={"state": "PendingIntegration", "limit": 1})
        assert_error(r, 429, "RATE_LIMITED")
        assert r.headers["Retry-After"] == "7"
    assert len(claim(api, limit=1)) == 1  # the rule's count is used up
    assert api.get("/v1/delta/streams/a/b").status_code == 200  # other endpoints untouched
    counts = sandbox.control.request_counts()
    assert counts["claim"] == 3 and counts["delta"] == 1 and counts["get"] == 0


def test_reset_fault_drops_the_connection(sandbox: Sandbox, api: httpx.Client) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "reset", "count": 1}])
    with pytest.raises(httpx.TransportError):
        api.get(f"/v1/invoices/{token}")
    assert api.get(f"/v1/invoices/{token}").status_code == 200
    assert sandbox.control.request_counts()["get"] == 2


def test_wildcard_latency_and_probability_rules(sandbox: Sandbox, api: httpx.Client) -> None:
    (token,) = sandbox.control.seed(1)
    sandbox.control.set_faults(
        [
            {"endpoint": "*", "kind": "latency", "latency_ms": 20},
            {"endpoint": "*", "kind": "status", "status": 503, "probability": 0.0},
        ]
    )
    assert api.get(f"/v1/invoices/{token}").status_code == 200
    sandbox.control.set_faults([{"endpoint": "*", "kind": "status", "status": 502}])
    assert_error(api.get(f"/v1/invoices/{token}"), 502, "BAD_GATEWAY")
    assert sandbox.control.seed(1)  # controls are never faulted
    sandbox.control.clear_faults()
    assert api.get(f"/v1/invoices/{token}").status_code == 200


@pytest.mark.parametrize(
    "rule",
    [
        {"endpoint": "nope", "kind": "status"},
        {"endpoint": "claim", "kind": "explode"},
        {"endpoint": "claim", "kind": "status", "status": 200},
        {"endpoint": "claim", "kind": "status", "probability": 2},
        {"endpoint": "claim", "kind": "status", "count": -1},
    ],
)
def test_fault_rule_validation(sandbox: Sandbox, rule: dict[str, Any]) -> None:
    with httpx.Client(headers={"X-API-Key": sandbox.api_key}) as c:
        r = c.post(sandbox.base_url + "/_sandbox/faults", json={"rules": [rule]})
    assert_error(r, 400, "VALIDATION_ERROR")


def test_reset_clears_everything(sandbox: Sandbox, api: httpx.Client) -> None:
    ctl = sandbox.control
    ctl.seed(3)
    claim(api, limit=1)
    api.post("/v1/delta/streams/a/b/begin", json={"cursor_type": "timestamp_utc"})
    ctl.set_faults([{"endpoint": "delta", "kind": "status", "status": 500}])
    before = ctl.advance_clock(86400)
    ctl.reset()
    assert ctl.invoices() == [] and ctl.request_counts()["claim"] == 0
    assert ctl.now() < before  # clock offset gone
    assert api.get("/v1/delta/streams/a/b").json()["status"] == "idle"  # no fault, no row
    ctl.seed(1)
    assert ctl.invoices()[0]["invoice_number"] == "INV-000001"  # ids restart


# --- seeding --------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_normal_seed_is_boring_and_deterministic(sandbox: Sandbox, api: httpx.Client) -> None:
    tokens = sandbox.control.seed(30, seed=7)
    details = [api.get(f"/v1/invoices/{t}").json() for t in tokens]
    for d in details:
        InvoiceDetail.model_validate(d)
        assert re.fullmatch(r"INV-\d{6}", field(d, "invoiceNumber"))
        assert d["invoice"]["attachments"] == []
        assert any(a["address_type"] == "vendor" for a in d["invoice"]["addresses"])
        for text in _strings(d["invoice"]):
            assert "\t" not in text and "\n" not in text and text[:1] not in "=+-@"
    assert any(field(d, "supplierCode") is None for d in details)  # vendor-name fallback
    assert any(field(d, "supplierCode") is not None for d in details)
    numbers = [field(d, "invoiceNumber") for d in details]
    assert len(set(numbers)) == 30

    more = sandbox.control.seed(30, seed=7)  # a repeated seed call: new, unique invoices
    assert set(more).isdisjoint(tokens)
    sandbox.control.reset()
    assert sandbox.control.seed(30, seed=7) == tokens  # same seed, empty db: same invoices
    assert [api.get(f"/v1/invoices/{t}").json()["invoice"]["fields"] for t in tokens] == [
        d["invoice"]["fields"] for d in details
    ]


def test_awkward_seed_contains_every_case(sandbox: Sandbox, api: httpx.Client) -> None:
    tokens = sandbox.control.seed(12, awkward=True)
    details = [api.get(f"/v1/invoices/{t}").json() for t in tokens]
    for d in details:
        InvoiceDetail.model_validate(d)
    numbers = [field(d, "invoiceNumber") for d in details]
    present = [n for n in numbers if n is not None]
    assert any("/" in n for n in present)
    assert any(".." in n for n in present)
    assert any(" " in n for n in present)
    assert any(not n.isascii() for n in present)
    assert any(len(n) >= 200 for n in present)
    assert None in numbers  # missing number
    assert len(present) != len(set(present))  # two invoices share a number

    texts = [s for d in details for s in _strings(d["invoice"])]
    assert any("\t" in s for s in texts) and any("\n" in s for s in texts)
    for start in "=+-@":
        assert any(s.startswith(start) for s in texts), start

    money = [field(d, "grossAmount") for d in details]
    assert any(isinstance(m, str) for m in money) and any(isinstance(m, float) for m in money)
    assert any(
        not any(a["address_type"] == "vendor" for a in d["invoice"]["addresses"])
        and field(d, "supplierCode") is None
        for d in details
    )
    assert max(len(d["invoice"]["lines"]) for d in details) >= 300
    assert sum(len(d["invoice"]["attachments"]) for d in details) >= 2

    rows = sandbox.control.invoices()
    assert [r["invoice_number"] for r in rows] == numbers


# --- auth -----------------------------------------------------------------------------


def test_auth(sandbox: Sandbox) -> None:
    (token,) = sandbox.control.seed(1)
    claim_body = {"state": "PendingIntegration", "limit": 1}
    with httpx.Client(base_url=sandbox.base_url) as anon:
        assert_error(anon.get(f"/v1/invoices/{token}"), 401, "UNAUTHORIZED")
        assert_error(anon.post(CLAIM, json=claim_body), 401, "UNAUTHORIZED")
        assert_error(anon.get("/_sandbox/invoices"), 401, "UNAUTHORIZED")
        bad = {"X-API-Key": "wrong"}
        assert_error(anon.get(f"/v1/invoices/{token}", headers=bad), 401, "UNAUTHORIZED")
        ro = {"X-API-Key": sandbox.readonly_api_key}
        assert anon.get(f"/v1/invoices/{token}", headers=ro).status_code == 200
        assert_error(anon.post(CLAIM, json=claim_body, headers=ro), 403, "FORBIDDEN")
        assert_error(anon.post("/_sandbox/reset", headers=ro), 403, "FORBIDDEN")
    assert sandbox.control.statuses() == {token: 90}


# --- process-level entry points -------------------------------------------------------


def test_two_servers_on_one_database_share_the_clock_and_state(
    sandbox: Sandbox, sandbox_server: SandboxServer
) -> None:
    from tests.sandbox.control import SandboxControl

    tokens = sandbox.control.seed(2)
    with (
        SandboxServer(sandbox_server.db_path, api_key="k2") as other,
        SandboxControl(other.base_url, "k2") as ctl2,
    ):
        now = ctl2.advance_clock(3600)
        assert sandbox.control.now() >= now
        assert list(ctl2.statuses()) == tokens


def test_command_line_entry_point(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.sandbox",
            "--port",
            "0",
            "--api-key",
            "k",
            "--db",
            str(tmp_path / "cli.sqlite3"),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://\S+/api", line)
        assert match, line
        with httpx.Client(base_url=match.group(0), headers={"X-API-Key": "k"}) as c:
            r = c.post("/_sandbox/seed", json={"count": 1})
            assert r.status_code == 200 and len(r.json()["invoice_tokens"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
