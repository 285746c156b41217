"""`erp-push push` end to end: the sandbox Nuntiq over HTTP and real SFTP servers.

Each test names the guarantee of the README it proves (G3 no partial files, G4 no
clobbering, G5 fast when idle, G6 clear failure, G7 no secret leaks).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from erp_push import commands
from erp_push.claim import NuntiqClient
from erp_push.errors import ExitCode
from erp_push.render import render_invoice
from erp_push.report import Result
from erp_push.settings import Config, load_settings
from tests.helpers import PUSH_NEEDS, MakeSettings, push, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo


def expected_files(sandbox: Sandbox, tokens: list[str]) -> dict[str, bytes]:
    """What each invoice should look like, rendered independently of the push."""
    today = datetime.now(UTC).date()
    out = {}
    with NuntiqClient(sandbox.base_url, _secret(sandbox.api_key)) as client:
        for token in tokens:
            rendered = render_invoice(
                client.get_invoice(token).invoice,
                keys=Config().field_keys(),
                rules=Config().render_rules(),
                today=today,
            )
            out[token] = rendered.body
    return out


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def assert_no_tmp(server: SftpServerInfo) -> None:
    leftovers = [p for p in server.files() if p.endswith(".tmp")]
    assert leftovers == []


# --- the happy path on each server kind ----------------------------------------------------


@pytest.mark.parametrize("server_fixture", ["asyncssh_sftp", "openssh_sftp", "proftpd_sftp"])
def test_push_delivers_every_invoice_exactly_as_rendered(
    server_fixture: str,
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    make_settings: MakeSettings,
) -> None:
    """G3: every file appears whole under its final name; Nuntiq gets path and message."""
    server: SftpServerInfo = request.getfixturevalue(server_fixture)
    server.clear()
    tokens = sandbox.control.seed(7)
    report = push(make_settings(server))

    assert report.exit_code == ExitCode.OK
    assert report.count(Result.DELIVERED) == 7
    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    expected = expected_files(sandbox, tokens)
    files = server.files()
    assert len(files) == 7
    for token in tokens:
        row = rows[token]
        assert row["status"] == 100
        assert row["external_message_1"] == "SFTP_DELIVERED"
        assert files[row["external_id_1"]] == expected[token]  # exact bytes, final name
    assert_no_tmp(server)


def test_one_batch_takes_batch_size_and_drain_takes_all(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(12)
    path = make_settings(asyncssh_sftp, config={"batch_size": 5})
    first = push(path)
    assert first.claimed == 5
    assert sorted(sandbox.control.statuses().values()).count(100) == 5
    bounded = push(path, drain=True, max_invoices=4)
    assert bounded.claimed == 4
    rest = push(path, drain=True)
    assert rest.claimed == 3
    assert set(sandbox.control.statuses().values()) == {100}
    assert len(asyncssh_sftp.files()) == 12


def test_awkward_invoices_fail_alone_with_a_code(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """G6: a bad invoice fails alone, with a machine-readable failure_code; the batch goes on."""
    sandbox.control.seed(24, awkward=True)
    report = push(make_settings(asyncssh_sftp), drain=True)

    rows = sandbox.control.invoices()
    assert {r["status"] for r in rows} == {100, 97}
    failed = {r["failure_code"] for r in rows if r["status"] == 97}
    assert failed == {"RENDER_MISSING_FIELD", "RENDER_UNSAFE_VALUE"}
    assert all(len(r["failure_message"]) <= 500 for r in rows if r["status"] == 97)
    assert report.exit_code == ExitCode.SOME_FAILED
    delivered = [r for r in rows if r["status"] == 100]
    files = asyncssh_sftp.files()
    assert sorted(r["external_id_1"] for r in delivered) == sorted(files)
    for path in files:  # odd numbers never escape the folder or make unsafe names
        name = path.removeprefix("/outbox/")
        assert "/" not in name and not name.startswith(".")
        assert len(name.encode()) <= 255
    assert not any("UNKNOWN" in p for p in files)


# --- G4: no clobbering -----------------------------------------------------------------


@pytest.mark.parametrize(
    "server_fixture", ["asyncssh_sftp", "openssh_sftp", "proftpd_sftp", "sftpserver_sftp"]
)
def test_taken_names_get_a_suffix_and_identical_files_count_as_delivered(
    server_fixture: str,
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    make_settings: MakeSettings,
) -> None:
    """G4 and G2: names taken in outbox or sent/ get a suffix; nothing is overwritten; an
    identical file already in sent/ counts as delivered. (Names in another case count as
    taken where the server says so: test_transport's case-insensitive server.)"""
    server: SftpServerInfo = request.getfixturevalue(server_fixture)
    server.clear()
    a, b, c = sandbox.control.seed(3)
    expected = expected_files(sandbox, [a, b, c])
    numbers = {r["invoice_token"]: r["invoice_number"] for r in sandbox.control.invoices()}
    day = datetime.now(UTC).strftime("%Y%m%d")
    name = {t: f"{numbers[t]}-{day}.csv" for t in (a, b, c)}
    strangers = {
        f"{server.outbox}/{name[a]}": b"someone else's file, outbox\n",
        f"{server.sent}/{name[b]}": b"someone else's file, sent\n",
    }
    for path, data in strangers.items():
        server.write(path, data)
    server.write(f"{server.sent}/{name[c]}", expected[c])  # delivered before, ERP took it

    report = push(make_settings(server))

    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert {r["status"] for r in rows.values()} == {100}
    assert rows[a]["external_id_1"] == f"{server.outbox}/{name[a][:-4]}-2.csv"
    assert rows[b]["external_id_1"] == f"{server.outbox}/{name[b][:-4]}-2.csv"
    assert rows[c]["external_id_1"] == f"{server.sent}/{name[c]}"
    assert {o.invoice_token: o.result for o in report.outcomes}[c] is Result.ALREADY_DELIVERED
    files = server.files()
    for path, data in strangers.items():
        assert files[path] == data  # untouched
    assert files[rows[a]["external_id_1"]] == expected[a]
    assert files[rows[b]["external_id_1"]] == expected[b]
    assert len(files) == 5  # 2 strangers + c's earlier delivery + a and b: no duplicate of c
    assert_no_tmp(server)


# --- G5: fast when idle ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nothing_to_claim_means_no_sftp_login(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """G5: with nothing pending, push never contacts the SFTP server (here: nothing
    listens on its port, so any connection attempt would fail the run)."""
    path = make_settings(asyncssh_sftp, config={"sftp_port": _closed_port()})
    report = push(path, drain=True)
    assert report.exit_code == ExitCode.OK
    assert report.claimed == 0
    assert sandbox.control.request_counts()["claim"] == 1


# --- G6: clear failure and distinct exit codes ---------------------------------------------


def test_sftp_unreachable_strands_at_most_one_invoice(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """G6: SFTP down -> one clear line, exit 5, and only the probe invoice is leased."""
    sandbox.control.seed(6)
    path = make_settings(asyncssh_sftp, config={"sftp_port": _closed_port()})
    result = run_cli("push", "--settings", str(path))
    assert result.returncode == ExitCode.SFTP
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "127.0.0.1" in result.stderr
    statuses = sorted(sandbox.control.statuses().values())
    assert statuses == [90, 90, 90, 90, 90, 92]
    # the run was recorded as failed on the delta stream
    with NuntiqClient(sandbox.base_url, _secret(sandbox.api_key)) as client:
        state = client.delta_get("acme_erp_push", "pushed_invoices")
    assert state.status == "failed"


def test_nuntiq_unreachable_exits_4(
    asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    path = make_settings(
        asyncssh_sftp, config={"nuntiq_base_url": f"http://127.0.0.1:{_closed_port()}/api"}
    )
    result = run_cli("push", "--settings", str(path), timeout=180)
    assert result.returncode == ExitCode.NUNTIQ
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


def test_wrong_api_key_exits_4_without_retrying(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(2)
    path = make_settings(asyncssh_sftp, secrets={"nuntiq_api_key": "sk_wrong_key_123456"})
    result = run_cli("push", "--settings", str(path))
    assert result.returncode == ExitCode.NUNTIQ
    assert "sk_wrong_key_123456" not in result.stderr + result.stdout
    assert set(sandbox.control.statuses().values()) == {90}


def test_bad_settings_are_all_named_before_anything_happens(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(2)
    path = make_settings(
        asyncssh_sftp, config={"sftp_port": 70000, "batch_size": 0, "sftp_hots": "typo"}
    )
    result = run_cli("push", "--settings", str(path))
    assert result.returncode == ExitCode.SETTINGS
    for needle in (
        "config.sftp_port",
        "ERP_PUSH_SFTP_PORT",
        "config.batch_size",
        "config.sftp_hots",
    ):
        assert needle in result.stderr
    assert sandbox.control.request_counts().get("claim", 0) == 0


def test_sftp_login_refused_exits_5(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(3)
    path = make_settings(asyncssh_sftp, secrets={"sftp_password": "pw-WRONG-do-not-print-77"})
    result = run_cli("push", "--settings", str(path))
    assert result.returncode == ExitCode.SFTP
    assert "pw-WRONG-do-not-print-77" not in result.stderr + result.stdout
    assert sorted(sandbox.control.statuses().values()) == [90, 90, 92]


def test_unknown_host_key_is_refused_with_its_fingerprint(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    sandbox.control.seed(1)
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    path = make_settings(asyncssh_sftp, config={"sftp_known_hosts": str(empty)})
    result = run_cli("push", "--settings", str(path))
    assert result.returncode == ExitCode.SFTP
    assert asyncssh_sftp.host_key_sha256 in result.stderr
    assert "known_hosts" in result.stderr or "sftp_host_key_sha256" in result.stderr
    assert asyncssh_sftp.files() == {}


# --- G7: no secret leaks --------------------------------------------------------------------


API_KEY_SECRET = "sk_LEAKCHECK_api_key_4b1d"
SFTP_PASSWORD_SECRET = "pw-LEAKCHECK-sftp-9c3e"


def test_secrets_never_appear_in_any_output(
    sandbox_server: Any, sftp_server_factory: Callable[..., SftpServerInfo], tmp_path: Path
) -> None:
    """G7: distinctive secrets, every command, success and failure paths, --debug on:
    neither the API key nor the SFTP password shows up in stdout, stderr or logs."""
    from tests.sandbox.control import SandboxControl
    from tests.sandbox.server import SandboxServer

    with SandboxServer(str(tmp_path / "leak.sqlite3"), api_key=API_KEY_SECRET) as nuntiq:
        with SandboxControl(nuntiq.base_url, API_KEY_SECRET) as control:
            tokens = control.seed(6, awkward=True)
        server = sftp_server_factory()
        good = {
            "customer_number": "1",
            "secrets": {"nuntiq_api_key": API_KEY_SECRET, "sftp_password": server.password},
            "config": {
                "connector_name": "leak",
                "nuntiq_base_url": nuntiq.base_url,
                "sftp_host": server.host,
                "sftp_port": server.port,
                "sftp_user": server.user,
                "sftp_known_hosts": str(server.known_hosts_path),
                "remote_outbox": server.outbox,
                "remote_sent": server.sent,
                "state_dir": str(tmp_path / "state"),
            },
        }
        settings = tmp_path / "s.json"
        settings.write_text(json.dumps(good))
        wrong_pw = json.loads(json.dumps(good))
        wrong_pw["secrets"]["sftp_password"] = SFTP_PASSWORD_SECRET
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(wrong_pw))
        bad_value = json.loads(json.dumps(wrong_pw))
        bad_value["config"]["sftp_port"] = "not a port"
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(bad_value))

        outputs = [
            run_cli("--debug", "push", "--settings", str(wrong), "--json"),  # login refused
            run_cli("--debug", "cleanup-tmp", "--settings", str(wrong)),
            run_cli("--debug", "push", "--settings", str(settings), "--json"),  # some fail
            run_cli("--debug", "push", "--settings", str(settings)),  # idle
            run_cli("--debug", "render", tokens[1], "--settings", str(settings)),
            run_cli("--debug", "render", tokens[0], "--settings", str(settings)),  # a tab
            run_cli("push", "--settings", str(bad)),
            run_cli("--debug", "resend", tokens[2], "--yes", "--settings", str(settings)),
            run_cli("--debug", "status", "--settings", str(settings), "--json"),  # the runs
        ]
    assert [o.returncode for o in outputs] == [5, 5, 1, 0, 0, 1, 3, 0, 0]
    everything = "\n".join(o.stdout + o.stderr for o in outputs)
    # The journal too: `status` shows why each run stopped, from what the journal kept.
    everything += (tmp_path / "state" / "journal.sqlite3").read_bytes().decode(errors="replace")
    assert "DEBUG" in everything  # the debug logs really were produced and searched
    assert API_KEY_SECRET not in everything
    assert SFTP_PASSWORD_SECRET not in everything
    assert server.password not in everything


# --- reporting ------------------------------------------------------------------------------


def test_json_report_is_one_document_on_stdout(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(13, awkward=True)
    result = run_cli("push", "--settings", str(make_settings(asyncssh_sftp)), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == report["exit_code"] == ExitCode.SOME_FAILED
    assert report["claimed"] == 13
    by_result: dict[str, list[dict[str, Any]]] = {}
    for inv in report["invoices"]:
        by_result.setdefault(inv["result"], []).append(inv)
    assert {i["failure_code"] for i in by_result["failed"]} <= {
        "RENDER_MISSING_FIELD",
        "RENDER_UNSAFE_VALUE",
    }
    assert all(i["remote_path"].startswith("/outbox/") for i in by_result["delivered"])
    assert all(i["invoice_token"] for i in report["invoices"])
    statuses = sandbox.control.statuses()
    assert all(statuses[i["invoice_token"]] == 100 for i in by_result["delivered"])


def test_delta_stream_records_the_run_and_its_failure_never_undoes_delivery(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(2)
    path = make_settings(asyncssh_sftp)
    push(path)
    with NuntiqClient(sandbox.base_url, _secret(sandbox.api_key)) as client:
        state = client.delta_get("acme_erp_push", "pushed_invoices")
    assert state.status == "succeeded"
    assert state.records_processed == 2

    sandbox.control.seed(2)
    sandbox.control.set_faults([{"endpoint": "delta", "kind": "status", "status": 500}])
    report = push(path)
    assert report.exit_code == ExitCode.OK
    assert set(sandbox.control.statuses().values()) == {100}


def test_parallel_workers_share_one_ssh_login(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Invoices in flight at once use SFTP channels on one connection: one login per run
    (ERP servers limit logins), falling back to more connections only when refused."""
    from erp_push.transport import SftpSession

    openssh_sftp.clear()
    sandbox.control.seed(12)
    settings = load_settings(
        make_settings(openssh_sftp, config={"concurrency": 4}), needs=PUSH_NEEDS
    )
    logins: list[SftpSession] = []
    real_connect = commands.sftp_connector(settings)

    def counting_connect() -> SftpSession:
        session = real_connect()
        logins.append(session)
        return session

    report = commands.push(settings, connect_sftp=counting_connect)
    assert report.count(Result.DELIVERED) == 12
    assert len(logins) == 1
    assert len(openssh_sftp.files()) == 12


def _push_counting_logins(
    settings_path: Path, caplog: pytest.LogCaptureFixture
) -> tuple[Any, int, list[int]]:
    """A drain with the real SFTP connector, counting its logins and the lanes it chose."""
    from erp_push.transport import SftpSession

    settings = load_settings(settings_path, needs=PUSH_NEEDS)
    logins: list[SftpSession] = []
    real_connect = commands.sftp_connector(settings)

    def counting_connect() -> SftpSession:
        logins.append(real_connect())
        return logins[-1]

    with caplog.at_level(logging.INFO, logger="erp_push.events"):
        report = commands.push(settings, drain=True, connect_sftp=counting_connect)
    chosen = [
        r.fields["lanes"]  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "lanes_chosen"
    ]
    return report, len(logins), chosen


def test_concurrency_auto_uses_few_lanes_on_a_fast_link_and_all_on_a_slow_one(
    sandbox: Sandbox,
    openssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """concurrency auto (the default): the probe invoice goes alone and its time says how
    many lanes the round trips need (Little's law). On loopback that is a few: one SSH
    login serves them all. When each invoice waits 300 ms on Nuntiq, all 64: beyond one
    login's 10 channels, more logins."""
    openssh_sftp.clear()
    path = make_settings(openssh_sftp, config={"sftp_max_channels": 10})
    sandbox.control.seed(60)
    report, logins, chosen = _push_counting_logins(path, caplog)
    assert report.count(Result.DELIVERED) == 60
    (fast,) = chosen
    assert 4 <= fast < 64
    assert logins == -(-fast // 10)  # as many logins as the chosen lanes need, no more

    caplog.clear()
    sandbox.control.seed(100)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 300}])
    report, logins, chosen = _push_counting_logins(path, caplog)
    assert report.count(Result.DELIVERED) == 100
    assert chosen == [64]
    assert logins > 1
    assert len(openssh_sftp.files()) == 160


def test_a_set_concurrency_is_used_as_it_is(
    sandbox: Sandbox,
    openssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator who sets concurrency gets that many lanes, whatever the probe took."""
    openssh_sftp.clear()
    sandbox.control.seed(40)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 300}])
    path = make_settings(openssh_sftp, config={"concurrency": 3, "sftp_max_channels": 2})
    report, logins, chosen = _push_counting_logins(path, caplog)
    assert report.count(Result.DELIVERED) == 40
    assert chosen == []
    assert logins == 2  # three lanes on two-channel logins


def test_an_invoice_that_does_not_fit_the_contract_fails_alone_instead_of_waiting(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """G1/G6: an invoice whose data Nuntiq serves malformed would stop every run the same
    way; it fails alone (97, NUNTIQ_INVOICE_INVALID) and the others are delivered."""
    import sqlite3

    bad, *good = sandbox.control.seed(3)
    broken = {"fields": [], "lines": "not a list", "addresses": [], "taxes": [],
              "charges": [], "discounts": [], "attachments": []}  # fmt: skip
    with sqlite3.connect(sandbox.server.db_path) as db:  # behind the sandbox's back
        db.execute("UPDATE invoices SET doc = ? WHERE invoice_token = ?", (json.dumps(broken), bad))

    report = push(make_settings(asyncssh_sftp))

    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert rows[bad]["status"] == 97
    assert rows[bad]["failure_code"] == "NUNTIQ_INVOICE_INVALID"
    assert "lines" in rows[bad]["failure_message"]
    assert all(rows[t]["status"] == 100 for t in good)
    assert report.exit_code == ExitCode.SOME_FAILED


def test_an_api_key_with_a_line_end_works_and_an_unsendable_key_never_shows(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """G7: `echo KEY > file` leaves a line end: stripped. A key httpx refuses to send
    (control characters) must not be quoted in the error httpx raises about it."""
    from erp_push.errors import NuntiqError

    sandbox.control.seed(1)
    path = make_settings(asyncssh_sftp, secrets={"nuntiq_api_key": sandbox.api_key + "\r\n"})
    assert push(path).exit_code == ExitCode.OK

    key = "sk_CR_LEAK_7f1e\r"
    with (
        NuntiqClient(sandbox.base_url, _secret(key)) as client,
        pytest.raises(NuntiqError) as caught,
    ):
        client.claim(limit=1)
    everything = f"{caught.value} {caught.value!r} {caught.value.__cause__!r}"
    assert "sk_CR_LEAK_7f1e" not in everything


def test_a_connection_dropped_mid_batch_does_not_stop_the_run(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """With several invoices in flight on channels of one connection, a drop kills them
    all: the run must not hand out dead channels, it reconnects and delivers the rest."""
    server = sftp_server_factory("drop_after_rename", drop_after=6)
    tokens = sandbox.control.seed(12)
    report = push(make_settings(server, config={"concurrency": 4}))
    assert report.error is None
    assert report.exit_code == ExitCode.OK, [o for o in report.outcomes if not o.ok]
    statuses = sandbox.control.statuses()
    assert all(statuses[t] == 100 for t in tokens)
    assert len([p for p in server.files() if p.endswith(".csv")]) == 12


@pytest.mark.sshd
def test_a_run_stalled_past_its_lease_never_publishes_its_tmp(
    sandbox: Sandbox,
    openssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run frozen (SIGSTOP, a swapped-out VM) after writing its tmp wakes up with a
    lapsed lease: another run may hold the invoice by now, so the tmp is removed and
    nothing becomes visible to the ERP. The freeze is a sleep at the tmp_written step,
    with the safety margin raised so that a short sleep crosses it."""
    from erp_push import pipeline

    server = openssh_sftp
    server.clear()
    (token,) = sandbox.control.seed(1)
    monkeypatch.setattr(pipeline, "LEASE_SAFETY_MARGIN", timedelta(seconds=60 - 2))
    stalled: list[str] = []

    def stall(step: str) -> None:
        if step == "tmp_written":
            stalled.append(step)
            time.sleep(2.5)  # the lease now has less than the margin left

    monkeypatch.setattr(pipeline, "checkpoint", stall)
    report = push(make_settings(server, config={"lease_ttl_seconds": 60}))

    assert stalled == ["tmp_written"]
    (outcome,) = report.outcomes
    assert outcome.result is Result.PENDING
    assert "lease" in (outcome.message or "")
    assert server.listdir(server.outbox) == []  # no file, no tmp
    assert sandbox.control.statuses()[token] == 92  # still leased; it comes back later


def test_a_run_stops_at_max_run_seconds_with_the_rest_pending(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """A slow Nuntiq cannot keep a cron run going into the next one: past the deadline
    nothing is claimed or started; what was in flight finishes its steps."""
    server = asyncssh_sftp
    tokens = sandbox.control.seed(40)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 300}])
    settings = make_settings(
        server, config={"max_run_seconds": 1, "concurrency": 2, "batch_size": 4}
    )

    report = push(settings, drain=True)

    assert any("max_run_seconds" in note for note in report.notes)
    assert 0 < report.claimed < 40
    statuses = sandbox.control.statuses()
    assert 97 not in statuses.values()
    delivered = [o for o in report.outcomes if o.result is Result.DELIVERED]
    assert len(delivered) == sum(1 for t in tokens if statuses[t] == 100)
    # Nothing half done: every file that landed belongs to a finished invoice.
    assert len([p for p in server.files() if p.endswith(".csv")]) == len(delivered)
    assert not [n for n in server.listdir(server.outbox) if n.endswith(".tmp")]
