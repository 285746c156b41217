"""`erp-push push` end to end against a Nuntiq that lies, garbles, floods or echoes the key.

The sandbox's fault rules (``swap``, ``garbled``) and the misbehaving servers of
``tests/hostile_http.py``, with a real SFTP server (asyncssh) behind. Issue 8, items 3 and
5 and the weak spots on huge and garbled replies.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from typing import Any

from erp_push.errors import ExitCode
from erp_push.report import Result
from tests import hostile_http
from tests.helpers import MakeSettings, push
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo


def test_an_answer_about_another_invoice_is_never_published_as_this_one(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Issue 8.3: the first GET of the run is answered with another invoice's body. The
    invoice asked for stays pending (leased, not Processed), no file carries another
    invoice's data under its name, and the rest of the batch is delivered."""
    tokens = sandbox.control.seed(3)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "swap", "count": 1}])

    report = push(make_settings(asyncssh_sftp))

    (pending,) = [o for o in report.outcomes if o.result is Result.PENDING]
    assert "the answer is about" in (pending.message or "")
    statuses = sandbox.control.statuses()
    assert statuses[pending.invoice_token] == 92  # still leased, for a later run
    delivered = [t for t in tokens if t != pending.invoice_token]
    assert all(statuses[t] == 100 for t in delivered)
    assert len(asyncssh_sftp.files()) == len(delivered)  # one file each, none for it
    assert sandbox.control.invoice(pending.invoice_token)["result_count"] == 0


def test_an_invoice_larger_than_the_cap_fails_alone_with_its_code(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Weak spot (a): an over-cap answer fails that invoice alone
    (NUNTIQ_INVOICE_TOO_LARGE); the others are delivered."""
    big, *small = sandbox.control.seed(3)
    with sqlite3.connect(sandbox.server.db_path) as db:  # behind the sandbox's back
        (doc,) = db.execute("SELECT doc FROM invoices WHERE invoice_token = ?", (big,)).fetchone()
        padded = json.loads(doc)
        padded["charges"] = [{"description": "x" * 1000}] * 300  # ~300 kB
        db.execute("UPDATE invoices SET doc = ? WHERE invoice_token = ?", (json.dumps(padded), big))

    report = push(make_settings(asyncssh_sftp, config={"max_invoice_bytes": 100_000}))

    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert rows[big]["status"] == 97
    assert rows[big]["failure_code"] == "NUNTIQ_INVOICE_TOO_LARGE"
    assert all(rows[t]["status"] == 100 for t in small)
    assert report.exit_code == ExitCode.SOME_FAILED


def test_an_answer_garbled_once_is_retried_not_failed(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Weak spot (b): a GET answered once with a proxy's HTML page used to fail the
    invoice for good (NUNTIQ_INVOICE_INVALID); it is retried and delivered."""
    tokens = sandbox.control.seed(2)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "garbled", "count": 1}])

    report = push(make_settings(asyncssh_sftp))

    assert report.exit_code == ExitCode.OK
    assert set(sandbox.control.statuses().values()) == {100}
    assert sandbox.control.request_counts()["get"] == len(tokens) + 1


# --- the key echoed back ---------------------------------------------------------------

ECHOED_KEY = "sk_ECHO_E2E_0c7b"


class _EchoingNuntiq:
    """Delta bookkeeping succeeds; claim answers 503 twice, then 401, each time with the
    key in the reason phrase, a header and the body. Records every request body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.claims = 0

    def __call__(self, conn: socket.socket, request: Any, talk: Any) -> None:
        self.bodies.append(request.body)
        echo = {"X-Echo": f"key={ECHOED_KEY}", "Retry-After": "0"}
        if request.target.endswith("/claim"):
            self.claims += 1
            status = 503 if self.claims <= 2 else 401
            code = "SERVICE_UNAVAILABLE" if status == 503 else ECHOED_KEY
            body = json.dumps({"error": code, "message": f"bad key {ECHOED_KEY}"}).encode()
            reason = f"bad key {ECHOED_KEY}"
        else:
            body = json.dumps({"connector_name": "acme_erp_push", "status": "running"}).encode()
            reason = f"OK {ECHOED_KEY}"
            status = 200
        head = hostile_http.response_head(
            status,
            reason,
            {**echo, "Content-Type": "application/json", "Content-Length": str(len(body))},
        )
        talk.send(conn, head + body)


def test_a_key_echoed_by_nuntiq_never_reaches_any_output(
    asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Issue 8.5: the key came back in retry warnings, the error line, the --json report,
    the delta stream's error_summary and (--debug) httpcore's header logs."""
    echoing = _EchoingNuntiq()
    with hostile_http.RawServer(echoing) as server:
        path = make_settings(
            asyncssh_sftp,
            config={"nuntiq_base_url": server.url},
            secrets={"nuntiq_api_key": ECHOED_KEY},
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "erp_push",
                "--debug",
                "push",
                "--json",
                "--settings",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    output = result.stdout + result.stderr
    assert result.returncode == ExitCode.NUNTIQ, output
    # The echoes did arrive and were logged (redacted), so the search means something.
    assert "attempt 1/5 failed" in result.stderr
    assert "X-Echo" in result.stderr
    assert "bad key ***" in output
    assert json.loads(result.stdout)["exit_code"] == ExitCode.NUNTIQ
    summaries = [b for b in echoing.bodies if b"error_summary" in b]
    assert summaries, "the failed run was recorded on the delta stream"
    assert ECHOED_KEY not in output
    assert all(ECHOED_KEY.encode() not in body for body in echoing.bodies)
