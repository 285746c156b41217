"""output_mode batch: one file per claimed batch, one row per invoice, exactly once.

Every test drives the real command line (``python -m erp_push``) against the Nuntiq
sandbox and real SFTP servers (asyncssh and its quirky variants, OpenSSH sshd), and kills
runs with SIGKILL at the batch steps through ``_ERP_PUSH_KILL_AT=<step>[@<n>]``.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from erp_push.batch import BATCH_FILE, HEADER_LINE, FolderListings, row_of, rows_in
from erp_push.errors import ExitCode
from erp_push.journal import Journal
from erp_push.render import RenderedFile
from erp_push.report import Result
from erp_push.transport import SftpSession
from tests.helpers import MakeSettings, push
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo
from tests.test_exactly_once import (
    FINISHED,
    KILLED,
    LEASE_TTL,
    Factory,
    cleanup_removes_only_our_tmp,
    cli,
    erp_tmp_files,
    expected_files,
    final_files,
    move_outbox_to_sent,
    push_cli,
    push_through_chaos,
    report_of,
    reported_path,
    settled_files,
)

BATCH = {"output_mode": "batch", "lease_ttl_seconds": LEASE_TTL}


def data_row(body: bytes) -> bytes:
    """The row a one-invoice rendering contributes to a batch file."""
    return row_of(RenderedFile("x.csv", body, "x", ""))


def batch_files(server: SftpServerInfo) -> dict[str, list[bytes]]:
    """Every final file, parsed as a batch file (each must be one)."""
    out: dict[str, list[bytes]] = {}
    for path, body in final_files(server).items():
        name = path.rpartition("/")[2]
        assert BATCH_FILE.fullmatch(name), f"{path} is not a batch file"
        rows = rows_in(body)
        assert rows, f"{path} is not a whole batch file: {body!r}"
        out[path] = rows
    return out


def assert_batches_exactly_once(
    sandbox: Sandbox, server: SftpServerInfo, expected: dict[str, bytes | None]
) -> dict[str, list[bytes]]:
    """Every invoice finished; each renderable one is exactly one row of one batch file,
    the row Nuntiq was told (external_id_1 = the file, external_message_1 = the row)."""
    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert set(rows) == set(expected)
    stuck = {t: r["status"] for t, r in rows.items() if r["status"] not in FINISHED}
    assert stuck == {}, "invoices left unfinished"
    files = batch_files(server)
    all_rows = [row for file_rows in files.values() for row in file_rows]
    for token, body in expected.items():
        row = rows[token]
        if body is None:
            assert row["status"] == 97 and row["failure_code"].startswith("RENDER_"), row
            continue
        assert row["status"] == 100, row
        path = reported_path(row)
        if path not in files:  # the ERP moved it to sent/ after it was reported
            path = f"{server.sent}/{path.rpartition('/')[2]}"
        number = int(row["external_message_1"])
        assert files[path][number - 1] == data_row(body), f"row {number} of {path} is not {token}"
        assert all_rows.count(data_row(body)) == 1, f"invoice {token} is in the files twice"
    delivered = [b for b in expected.values() if b is not None]
    assert len(all_rows) == len(delivered), "a row that is no invoice's"
    return files


def _server(kind: str, request: pytest.FixtureRequest, factory: Factory) -> SftpServerInfo:
    """OpenSSH (shared by the session, emptied before and after), plain asyncssh, or an
    asyncssh variant: ``instant_pickup`` (the ERP moves each file to sent/ the moment it
    appears), ``rename_overwrites`` (and no hardlink)."""
    if kind == "openssh":
        server: SftpServerInfo = request.getfixturevalue("openssh_sftp")
        server.clear()
        request.addfinalizer(server.clear)
        return server
    if kind == "asyncssh":
        return factory()
    return factory(kind, hardlink=kind != "rename_overwrites")


# --- the file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["asyncssh", "instant_pickup", pytest.param("openssh", marks=pytest.mark.sshd)]
)
def test_each_claimed_batch_is_one_file_of_rows_in_claim_order(
    kind: str,
    sandbox: Sandbox,
    request: pytest.FixtureRequest,
    sftp_server_factory: Factory,
    make_settings: MakeSettings,
) -> None:
    server = _server(kind, request, sftp_server_factory)
    tokens = sandbox.control.seed(7, awkward=True)  # two of them cannot be rendered
    expected = expected_files(sandbox, tokens)
    path = make_settings(server, config={**BATCH, "batch_size": 3})
    before = datetime.now(UTC).replace(microsecond=0)

    result = push_cli(path)
    report = report_of(result)

    files = assert_batches_exactly_once(sandbox, server, expected)
    assert result.returncode == ExitCode.SOME_FAILED  # the two that failed alone
    failed = {o["invoice_token"] for o in report["invoices"] if o["result"] == "failed"}
    assert failed == {t for t, b in expected.items() if b is None}
    # One file per claimed batch of 3 (the failed invoices are left out of theirs).
    batches = [tokens[i : i + 3] for i in range(0, len(tokens), 3)]
    wanted = [[data_row(expected[t] or b"") for t in batch if expected[t]] for batch in batches]
    assert sorted(files.values()) == sorted(rows for rows in wanted if rows)
    for file_path in files:
        data = server.read(file_path)
        assert data.startswith(HEADER_LINE) and data.endswith(b"\n") and b"\r" not in data
        stamp = BATCH_FILE.fullmatch(file_path.rpartition("/")[2])
        assert stamp is not None
        at = datetime.strptime(stamp["at"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert before - timedelta(seconds=1) <= at <= datetime.now(UTC)
    by_token = {o["invoice_token"]: o for o in report["invoices"]}
    for token, expected_body in expected.items():
        if expected_body is not None:
            assert by_token[token]["row"] is not None


def test_a_batch_where_every_invoice_fails_writes_no_file(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(3)
    path = make_settings(asyncssh_sftp, config={**BATCH, "field_invoice_number": "noSuchField"})

    result = push_cli(path)
    report = report_of(result)

    assert result.returncode == ExitCode.SOME_FAILED
    assert {o["failure_code"] for o in report["invoices"]} == {"RENDER_MISSING_FIELD"}
    assert set(sandbox.control.statuses().values()) == {97}
    assert asyncssh_sftp.files() == {}


def test_a_server_refusal_fails_the_batch_with_its_code_and_stops(
    sandbox: Sandbox, sftp_server_factory: Factory, make_settings: MakeSettings
) -> None:
    server = sftp_server_factory("permission_denied_write")
    sandbox.control.seed(6)
    path = make_settings(server, config={**BATCH, "batch_size": 3})

    report = report_of(push_cli(path))

    assert report["claimed"] == 3  # the first batch; the run then stops claiming
    assert {o["failure_code"] for o in report["invoices"]} == {"SFTP_PERMISSION_DENIED"}
    assert any("refused writes" in note for note in report["notes"])
    assert server.files() == {}


def test_dry_run_shows_the_file_and_rows_and_render_says_the_mode(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(5)
    path = make_settings(asyncssh_sftp, config={**BATCH, "batch_size": 3})

    result = cli("dry-run", "--settings", str(path), "--json", "--limit", "5")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)["invoices"]
    assert [p["row"] for p in shown] == [1, 2, 3, 1, 2]  # a file per batch of 3, as push
    first, second = shown[0]["file_name"], shown[3]["file_name"]
    assert {p["file_name"] for p in shown} == {first, second} and first != second
    assert BATCH_FILE.fullmatch(first) and BATCH_FILE.fullmatch(second)
    assert asyncssh_sftp.files() == {}

    rendered = cli("render", tokens[0], "--settings", str(path))
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.encode().startswith(HEADER_LINE)
    assert "batch" in rendered.stderr


# --- exactly once, batch-wise -----------------------------------------------------------

# Every step of batch mode a run can die at; "@2": the second batch (the first is in
# flight or done), "acknowledged@2": between two members' acknowledgements (a batch's
# members are finished in parallel). Awkward seed 6 in batches of 3: two invoices fail
# rendering, so both batches have rows.
CRASH_POINTS = {
    "claimed": "claimed@2",  # the second batch's claims journaled
    "batch_fetched": "batch_fetched@2",  # rendered, nothing journaled for the batch
    "batch_recorded": "batch_recorded@2",  # journaled, upload not begun
    "tmp_open": "tmp_open@2",  # tmp created, nothing written
    "tmp_written": "tmp_written@2",  # tmp whole, not yet published
    "published": "published@2",  # under its final name, not yet journaled
    "batch_published_recorded": "batch_published_recorded@2",  # journaled, none acknowledged
    "acknowledged": "acknowledged@2",  # one member acknowledged, the next not
    "reported": "reported@3",  # members partly reported
}


CRASH_CASES = [
    *[pytest.param(step, "asyncssh", id=step) for step in CRASH_POINTS],
    # OpenSSH publishes by hardlink: the moments around it once more on the real thing
    *[
        pytest.param(step, "openssh", id=f"{step}-openssh", marks=pytest.mark.sshd)
        for step in ("tmp_written", "published", "acknowledged")
    ],
]


@pytest.mark.parametrize(("step", "kind"), CRASH_CASES)
def test_a_batch_run_killed_at_any_step_is_finished_without_duplicates(
    step: str,
    kind: str,
    sandbox: Sandbox,
    request: pytest.FixtureRequest,
    sftp_server_factory: Factory,
    make_settings: MakeSettings,
) -> None:
    server = _server(kind, request, sftp_server_factory)
    tokens = sandbox.control.seed(6, awkward=True)
    expected = expected_files(sandbox, tokens)
    path = make_settings(server, config={**BATCH, "batch_size": 3})

    killed = push_cli(path, kill_at=CRASH_POINTS[step])
    assert killed.returncode == KILLED, f"crash point {step} never fired: {killed.stderr}"
    settled_files(server)
    if step in ("tmp_open", "tmp_written"):
        assert erp_tmp_files(server), "the killed upload left no tmp file"

    sandbox.control.advance_clock(LEASE_TTL + 1)  # every lease lapses, at 92 and at 93
    finished = cli("push", "--settings", str(path), "--drain", "--json", "--verbose")
    report_of(finished)

    assert_batches_exactly_once(sandbox, server, expected)
    if step == "published":  # settled from the journal's record, not the folders' rows
        assert "had landed as" in finished.stderr
    if step in ("batch_recorded", "tmp_open", "tmp_written"):
        assert "never landed" in finished.stderr
    cleanup_removes_only_our_tmp(path, server)


@pytest.mark.parametrize("step", ["batch_published_recorded", "acknowledged"])
def test_a_dead_batch_runs_live_leases_are_finished_at_once_with_their_rows(
    step: str, sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """No clock advance: the next run reports what the dead run's file delivered, each
    member with its row, under the still-live leases, without a second file."""
    server = asyncssh_sftp
    tokens = sandbox.control.seed(4)
    expected = expected_files(sandbox, tokens)
    path = make_settings(server, config={**BATCH, "batch_size": 4})

    assert push_cli(path, kill_at=step).returncode == KILLED
    assert len(final_files(server)) == 1

    report = report_of(push_cli(path))
    assert report["recovered"] == 4
    assert_batches_exactly_once(sandbox, server, expected)
    assert len(final_files(server)) == 1
    for row in sandbox.control.invoices():
        assert row["claim_count"] == 1 and row["result_count"] == 1


LOST_JOURNAL_CASES = [
    # (step the first run dies at, ERP moved the files to sent/ meanwhile, server)
    pytest.param("batch_recorded", False, "asyncssh", id="recorded-nothing_landed"),
    pytest.param("published", False, "asyncssh", id="published-in_outbox"),
    pytest.param("acknowledged", True, "asyncssh", id="acknowledged-in_sent"),
    pytest.param("published", False, "rename_overwrites", id="published-overwriting"),
    pytest.param(
        "published", True, "openssh", id="published-in_sent-openssh", marks=pytest.mark.sshd
    ),
]


@pytest.mark.parametrize(("step", "moved_to_sent", "kind"), LOST_JOURNAL_CASES)
def test_a_lost_journal_finds_the_rows_in_recent_batch_files(
    step: str,
    moved_to_sent: bool,
    kind: str,
    sandbox: Sandbox,
    request: pytest.FixtureRequest,
    sftp_server_factory: Factory,
    make_settings: MakeSettings,
    tmp_path: Path,
) -> None:
    """The journal is gone (another machine takes over): an invoice whose row is in a
    batch file in the outbox or sent/ is delivered there, at that row; the others go
    into a new file; none is in two files."""
    server = _server(kind, request, sftp_server_factory)
    tokens = sandbox.control.seed(5)
    expected = expected_files(sandbox, tokens)
    path = make_settings(server, config={**BATCH, "batch_size": 3})

    assert push_cli(path, kill_at=f"{step}@2").returncode == KILLED
    landed_rows = {row for rows in batch_files_settled(server).values() for row in rows}
    unfinished = {t for t, s in sandbox.control.statuses().items() if s not in FINISHED}
    landed = {t for t in unfinished if data_row(expected[t] or b"") in landed_rows}
    if step != "batch_recorded":
        assert landed, "no unfinished invoice had its row published before the crash"
    shutil.rmtree(tmp_path / "state")
    if moved_to_sent:
        move_outbox_to_sent(server)

    sandbox.control.advance_clock(LEASE_TTL + 1)
    report = report_of(push_cli(path))

    assert_batches_exactly_once(sandbox, server, expected)
    already = {o["invoice_token"] for o in report["invoices"] if o["result"] == "already_delivered"}
    assert already == landed


def batch_files_settled(server: SftpServerInfo) -> dict[str, list[bytes]]:
    settled_files(server)
    return batch_files(server)


def test_a_row_in_a_batch_file_older_than_the_lookback_is_not_looked_for(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """The limit of the lost-journal lookup: batch files named up to 7 days back."""
    server = asyncssh_sftp
    tokens = sandbox.control.seed(2)
    expected = expected_files(sandbox, tokens)
    rows = [data_row(expected[t] or b"") for t in tokens]
    recent = datetime.now(UTC) - timedelta(days=6)
    old = datetime.now(UTC) - timedelta(days=9)
    server.write(f"{server.sent}/invoices-{recent:%Y%m%dT%H%M%SZ}.csv", HEADER_LINE + rows[0])
    server.write(f"{server.sent}/invoices-{old:%Y%m%dT%H%M%SZ}.csv", HEADER_LINE + rows[1])

    report = report_of(push_cli(make_settings(server, config=BATCH)))

    results = {o["invoice_token"]: (o["result"], o["row"]) for o in report["invoices"]}
    assert results[tokens[0]] == ("already_delivered", 1)
    assert results[tokens[1]] == ("delivered", 1)
    assert len(final_files(server)) == 3


def test_concurrent_batch_runs_put_each_invoice_in_one_file(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    import subprocess
    import sys

    tokens = sandbox.control.seed(60)
    expected = expected_files(sandbox, tokens)
    path = make_settings(asyncssh_sftp, config={**BATCH, "batch_size": 5})
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "erp_push",
                "push",
                "--settings",
                str(path),
                "--drain",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    files = assert_batches_exactly_once(sandbox, asyncssh_sftp, expected)
    assert all(len(rows) <= 5 for rows in files.values())
    for row in sandbox.control.invoices():
        assert row["claim_count"] == 1 and row["result_count"] == 1


def test_a_folder_listing_is_reused_only_while_the_folder_did_not_change(
    asyncssh_sftp: SftpServerInfo,
) -> None:
    """A sent/ of years of archive is not listed for every batch of a drain, yet a file
    the ERP moves there meanwhile is seen at the next batch."""
    server = asyncssh_sftp
    server.write(f"{server.sent}/invoices-20261130T000000Z.csv", HEADER_LINE + b"a\n")
    listings = FolderListings()
    with SftpSession.connect(server.options()) as session:
        first = listings.files(session, server.sent)
        time.sleep(FolderListings.SETTLED_SECONDS + 0.2)
        second = listings.files(session, server.sent)  # listed again: now settled
        assert second is not first and second == first
        assert listings.files(session, server.sent) is second  # unchanged: reused
        server.write(f"{server.sent}/invoices-20261130T000001Z.csv", HEADER_LINE + b"b\n")
        third = listings.files(session, server.sent)
        assert len(third) == 2  # the folder's mtime moved: listed again
        assert listings.files(session, f"{server.sent}/missing") == []


def test_an_invoice_whose_batch_a_live_run_may_still_publish_is_left_alone(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    """A run that stalled past its leases with a batch recorded may still publish it:
    another run that claims its invoices leaves them pending (never puts them in a second
    file) until that run is gone, and then settles the batch."""
    server = asyncssh_sftp
    tokens = sandbox.control.seed(3)
    expected = expected_files(sandbox, tokens)
    path = make_settings(server, config={**BATCH, "batch_size": 3})
    assert push_cli(path, kill_at="batch_recorded").returncode == KILLED
    journal = Journal(tmp_path / "state")
    try:
        [(run_id,)] = journal.query("SELECT run_id FROM batches")
    finally:
        journal.close()
    # The recording run, alive again as far as the journal can tell: its lock is held.
    lock = open(tmp_path / "state" / "runs" / f"{run_id}.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        sandbox.control.advance_clock(LEASE_TTL + 1)
        waiting = report_of(push_cli(path))
        assert {o["result"] for o in waiting["invoices"]} == {"pending"}
        assert all("live run" in o["message"] for o in waiting["invoices"])
        assert final_files(server) == {}
    finally:
        lock.close()
    sandbox.control.advance_clock(LEASE_TTL + 1)
    report_of(push_cli(path))
    assert_batches_exactly_once(sandbox, server, expected)
    assert len(final_files(server)) == 1


def test_a_batch_stalled_past_its_leases_is_never_published_and_settled_later(
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run frozen after writing the batch's tmp wakes up with its leases nearly gone:
    the tmp is removed, nothing becomes visible, the batch stays recorded (an earlier try
    could have landed, for all the run knows), and the next run settles it and delivers
    each invoice once."""
    from erp_push import pipeline

    server = asyncssh_sftp
    tokens = sandbox.control.seed(3)
    expected = expected_files(sandbox, tokens)
    path = make_settings(server, config={**BATCH, "batch_size": 3})
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "LEASE_SAFETY_MARGIN", timedelta(seconds=LEASE_TTL - 2))

        def stall(step: str) -> None:
            if step == "tmp_written":
                time.sleep(2.5)  # the leases now have less than the margin left

        patch.setattr(pipeline, "checkpoint", stall)
        report = push(path)
    assert {o.result for o in report.outcomes} == {Result.PENDING}
    assert server.files() == {}  # no file, no tmp

    sandbox.control.advance_clock(LEASE_TTL + 1)
    finished = cli("push", "--settings", str(path), "--drain", "--json", "--verbose")
    report_of(finished)
    assert "never landed" in finished.stderr
    assert_batches_exactly_once(sandbox, server, expected)


def test_an_unknown_output_mode_is_named_before_anything_happens(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(1)
    path = make_settings(asyncssh_sftp, config={"output_mode": "batches"})
    result = push_cli(path)
    assert result.returncode == ExitCode.SETTINGS
    assert "config.output_mode" in result.stderr and "ERP_PUSH_OUTPUT_MODE" in result.stderr
    assert "Traceback" not in result.stderr
    assert set(sandbox.control.statuses().values()) == {90}


def test_batch_mode_never_shows_the_secrets(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """G7 in batch mode: push (delivering, then idle), dry-run and render with --debug:
    neither the API key nor the SFTP password shows up anywhere."""
    tokens = sandbox.control.seed(4, awkward=True)
    path = make_settings(asyncssh_sftp, config={**BATCH, "batch_size": 2})
    outputs = [
        cli("--debug", "dry-run", "--settings", str(path), "--json", "--limit", "2"),
        cli("--debug", "push", "--settings", str(path), "--drain", "--json", "--verbose"),
        cli("--debug", "push", "--settings", str(path), "--json"),
        cli("--debug", "render", tokens[0], "--settings", str(path)),
    ]
    for result in outputs:
        for secret in (sandbox.api_key, asyncssh_sftp.password):
            assert secret not in result.stdout and secret not in result.stderr


def test_resend_is_refused_in_batch_mode_and_marks_nothing(tmp_path: Path) -> None:
    """A re-send makes a fresh per-invoice file; in batch mode the invoice's row lives in
    a batch file, so `resend` says so (exit 3) instead of marking a token push ignores."""
    state = tmp_path / "state"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"config": {"state_dir": str(state), **BATCH}}))
    refused = cli(
        "resend", "3f2b6c1e-0000-4000-8000-000000000001", "--yes", "--settings", str(settings)
    )
    assert refused.returncode == ExitCode.SETTINGS, refused.stderr
    assert "config.output_mode" in refused.stderr and "Traceback" not in refused.stderr
    shown = cli("status", "--json", "--settings", str(settings))
    assert shown.returncode == 0 and json.loads(shown.stdout)["resends"] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server_fixture", "seed"),
    [
        pytest.param("asyncssh_sftp", 4, id="asyncssh-4"),
        pytest.param("openssh_sftp", 5, id="openssh-5", marks=pytest.mark.sshd),
    ],
)
def test_random_kills_while_the_erp_takes_batch_files_put_each_invoice_in_one_row(
    server_fixture: str,
    seed: int,
    sandbox: Sandbox,
    make_settings: MakeSettings,
    request: pytest.FixtureRequest,
) -> None:
    """The chaos of test_exactly_once in batch mode: runs killed at random moments while
    the ERP takes every batch file to sent/. Every invoice ends in exactly one row of one
    batch file, the row Nuntiq was told."""
    server: SftpServerInfo = request.getfixturevalue(server_fixture)
    server.clear()
    path = make_settings(server, config={**BATCH, "batch_size": 10})
    expected = push_through_chaos(sandbox, server, path, seed)
    assert_batches_exactly_once(sandbox, server, expected)
