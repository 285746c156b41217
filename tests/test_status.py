"""`erp-push status` (the journal, read alone) and `erp-push resend` (a deliberate re-send).

Driven through the real command line in child processes, against the Nuntiq sandbox and
real SFTP servers (asyncssh, OpenSSH). Runs are killed with SIGKILL through the
``_ERP_PUSH_KILL_AT`` checkpoint hook, as in ``test_exactly_once.py``.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from erp_push import pipeline
from erp_push.errors import ExitCode
from erp_push.journal import SCHEMA_VERSION, Entry, Journal, Step
from erp_push.settings import load_settings
from erp_push.status import (
    FINISHED_FROM_JOURNAL,
    LEASE,
    LIVE_RUN,
    NUNTIQ,
    read_status,
    why_waiting,
)
from tests.helpers import MakeSettings, cli_fetching, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo, free_port
from tests.test_exactly_once import (
    KILLED,
    LEASE_TTL,
    erp_tmp_files,
    expected_files,
    final_files,
    push_cli,
    reported_path,
    settled_files,
)

NEVER_IN_STATUS = ("httpx", "httpcore", "paramiko", "erp_push.claim", "erp_push.transport")


def status_json(settings: Path) -> dict[str, Any]:
    """``erp-push status --json``'s document, made in this process (the command line
    itself is run where it is what a test is about: a child process costs a second)."""
    state_dir = load_settings(settings, needs=set()).config.state_dir
    report: dict[str, Any] = json.loads(read_status(state_dir).to_json())
    return report


def status_cli_json(settings: Path) -> dict[str, Any]:
    result = run_cli("status", "--settings", str(settings), "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def push_report(settings: Path) -> dict[str, Any]:
    result = push_cli(settings)
    assert result.returncode in (ExitCode.OK, ExitCode.SOME_FAILED), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


# --- status ---------------------------------------------------------------------------------


def test_status_of_a_fresh_state_dir_says_so_creates_nothing_and_loads_no_network_library(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"config": {"state_dir": str(state)}}))

    shown = run_cli("status", "--settings", str(settings))
    assert shown.returncode == 0, shown.stderr
    assert "no push has run with this state_dir yet" in shown.stderr
    assert shown.stdout == ""  # stdout is data: only --json writes there

    traced = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "erp_push", "status", "--json"]
        + ["--settings", str(settings)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert traced.returncode == 0, traced.stderr[-2000:]
    report = json.loads(traced.stdout)
    assert report["journal_exists"] is False
    assert (report["unfinished"], report["runs"], report["last_success"]) == ([], [], None)
    loaded = {
        line.rsplit("|", 1)[-1].strip()
        for line in traced.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "erp_push.status" in loaded
    for name in NEVER_IN_STATUS:
        assert name not in loaded, f"status imported {name}"
    assert not state.exists()  # status reads; it never creates the journal


def test_status_after_sigkilled_runs_shows_each_invoices_step_and_what_it_waits_for(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Two runs killed outright: one after fetching its invoice (nothing uploaded: it
    waits for its lease), one after journaling its upload (it waits for Nuntiq). Both
    runs show as started and never finished. A clean run then finishes the second."""
    tokens = sandbox.control.seed(3)
    settings = make_settings(asyncssh_sftp)
    assert push_cli(settings, kill_at="fetched").returncode == KILLED
    assert push_cli(settings, kill_at="published_recorded").returncode == KILLED
    leased = [t for t, s in sandbox.control.statuses().items() if s == 92]
    assert len(leased) == 2

    report = status_cli_json(settings)
    assert report["journal_exists"] is True
    waiting = {w["invoice_token"]: w for w in report["unfinished"]}
    assert set(waiting) == set(leased)
    fetched, published = leased  # the sandbox hands out the oldest first
    assert waiting[fetched]["step"] == "claimed"
    assert waiting[fetched]["waiting_for"] == LEASE
    assert waiting[fetched]["run_alive"] is False and waiting[fetched]["lease_alive"] is True
    assert "waits for its lease to lapse" in waiting[fetched]["reason"]
    assert waiting[published]["step"] == "published"
    assert waiting[published]["waiting_for"] == NUNTIQ
    assert waiting[published]["remote_path"] in final_files(asyncssh_sftp)
    assert "the next push tells Nuntiq at once" in waiting[published]["reason"]
    assert [r["state"] for r in report["runs"]] == ["died", "died"]
    assert all(r["exit_code"] is None and r["finished_at"] is None for r in report["runs"])
    assert report["last_success"] is None

    people = run_cli("status", "--settings", str(settings))
    assert people.returncode == 0, people.stderr
    assert "unfinished invoices: 2" in people.stderr
    assert "died: started, never finished" in people.stderr
    assert "last successful run: none recorded" in people.stderr

    finished = push_report(settings)  # recovers the published one; the other's lease lives
    assert finished["recovered"] == 1
    after = status_json(settings)
    assert [w["invoice_token"] for w in after["unfinished"]] == [fetched]
    newest = after["runs"][0]
    assert newest["state"] == "finished" and newest["exit_code"] == 0
    assert newest["recovered"] == 1 and newest["claimed"] == 1
    assert newest["counts"]["delivered"] == 1 and newest["counts"]["already_delivered"] == 1
    assert after["last_success"]["run_id"] == newest["run_id"]
    assert sandbox.control.statuses()[tokens[2]] == 100


def test_status_shows_a_live_runs_invoice_and_a_sigterm_run_ends_with_143(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(1)
    settings = str(make_settings(asyncssh_sftp))
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 3000}])
    with cli_fetching(sandbox.control, "push", "--settings", settings) as child:
        during = status_json(Path(settings))
        child.send_signal(signal.SIGTERM)
        _out, err = child.communicate(timeout=60)
    assert child.returncode == 143, err

    [live] = during["unfinished"]
    assert (live["waiting_for"], live["run_alive"]) == (LIVE_RUN, True)
    assert [r["state"] for r in during["runs"]] == ["running"]
    after = status_json(Path(settings))
    [run] = after["runs"]
    assert (run["state"], run["exit_code"]) == ("finished", 143)
    assert run["error"] == "Terminated"
    assert after["unfinished"][0]["waiting_for"] == LEASE  # its run is gone now


def test_the_runs_history_keeps_each_runs_exit_code_newest_first(
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    tmp_path: Path,
) -> None:
    """Runs ending 0, 4 (Nuntiq refuses the key), 5 (SFTP unreachable) and 3 (a broken
    known_hosts file, found mid-run) are all recorded, with their counts and errors."""
    good = make_settings(asyncssh_sftp)
    assert run_cli("push", "--settings", str(good)).returncode == 0  # nothing to push
    bad_key = make_settings(
        asyncssh_sftp, secrets={"nuntiq_api_key": "not-the-key-7f3a"}, name="k.json"
    )
    assert run_cli("push", "--settings", str(bad_key)).returncode == 4
    sandbox.control.seed(2)
    closed = make_settings(asyncssh_sftp, config={"sftp_port": free_port()}, name="p.json")
    assert run_cli("push", "--settings", str(closed)).returncode == 5
    broken = tmp_path / "broken_known_hosts"
    broken.write_text("@cert-authority\n")
    bad_hosts = make_settings(
        asyncssh_sftp, config={"sftp_known_hosts": str(broken)}, name="h.json"
    )
    result = run_cli("push", "--settings", str(bad_hosts))
    assert result.returncode == 3, result.stderr

    report = status_json(good)
    runs = report["runs"]
    assert [r["exit_code"] for r in runs] == [3, 5, 4, 0]
    assert all(r["state"] == "finished" and r["command"] == "push" for r in runs)
    assert [r["claimed"] for r in runs] == [1, 1, 0, 0]
    assert runs[0]["error"].startswith("SettingsError: ")
    assert runs[1]["error"].startswith("SftpUnreachable")
    assert runs[2]["error"].startswith("NuntiqAuthError")
    assert "7f3a" not in json.dumps(report)  # nothing secret (the bad key) in the journal
    assert report["last_success"]["run_id"] == runs[3]["run_id"]

    people = run_cli("status", "--settings", str(good), "--runs", "2")
    assert people.returncode == 0, people.stderr
    assert "last 2 run(s)" in people.stderr and "exit 3" in people.stderr
    assert "exit 0" not in people.stderr  # only the last two runs
    assert "last successful run: " in people.stderr


def test_why_waiting_follows_the_pipelines_rules() -> None:
    assert FINISHED_FROM_JOURNAL == pipeline.RESUMABLE
    now = datetime.now(UTC)

    def entry(step: Step, lease_left: float) -> Entry:
        delivered = step in (Step.PUBLISHED, Step.ACKNOWLEDGED)
        return Entry(
            invoice_token="t",
            lease_token="l",
            lease_expires_at=now + timedelta(seconds=lease_left),
            run_id="r",
            step=step,
            invoice_number="INV-1",
            file_name="INV-1-20261201.csv",
            sha256=None,
            remote_path="/outbox/INV-1-20261201.csv" if delivered else None,
            failure_code="SFTP_DISK_FULL" if step is Step.FAILED else None,
            failure_message=None,
            updated_at=now,
        )

    cases = [
        (Step.RENDERED, 300, True, LIVE_RUN),
        (Step.CLAIMED, 300, False, LEASE),
        (Step.RENDERED, 300, False, LEASE),
        (Step.RENDERED, -1, False, NUNTIQ),
        (Step.PUBLISHED, 300, False, NUNTIQ),
        (Step.ACKNOWLEDGED, -1, False, NUNTIQ),
        (Step.FAILED, 300, False, NUNTIQ),
    ]
    for step, left, alive, expected in cases:
        got = why_waiting(entry(step, left), run_alive=alive, now=now)
        assert got.waiting_for == expected, (step, left, alive)
    lapsed = why_waiting(entry(Step.PUBLISHED, -1), run_alive=False, now=now)
    assert "without uploading it again" in lapsed.reason


def test_an_older_journal_is_migrated_and_read_by_status_without_migrating(
    tmp_path: Path,
) -> None:
    """A journal written before runs were recorded (user_version 0): status reads it as it
    is; the next push (Journal) migrates it, keeping its rows."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / Journal.FILE_NAME)
    db.executescript(
        """
        CREATE TABLE invoices (invoice_token TEXT PRIMARY KEY, lease_token TEXT NOT NULL,
            lease_expires_at TEXT NOT NULL, run_id TEXT NOT NULL, step TEXT NOT NULL,
            invoice_number TEXT, file_name TEXT, sha256 TEXT, remote_path TEXT,
            failure_code TEXT, failure_message TEXT, updated_at TEXT NOT NULL);
        INSERT INTO invoices VALUES ('tok', 'lease', '2026-01-01T00:00:00+00:00', 'gone',
            'published', 'INV-9', 'INV-9-20260101.csv', NULL, '/outbox/INV-9-20260101.csv',
            NULL, NULL, '2026-01-01T00:00:00+00:00');
        """
    )
    db.close()
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"config": {"state_dir": str(state)}}))

    old = status_cli_json(settings)
    assert old["runs_recorded"] is False and old["runs"] == []
    [waiting] = old["unfinished"]
    assert (waiting["step"], waiting["waiting_for"]) == ("published", NUNTIQ)
    version = sqlite3.connect(state / Journal.FILE_NAME).execute("PRAGMA user_version")
    assert version.fetchone() == (0,)  # status changed nothing

    journal = Journal(state)
    try:
        entry = journal.get("tok")
        assert entry is not None and entry.remote_path == "/outbox/INV-9-20260101.csv"
        journal.record_run_started("push")
    finally:
        journal.close()
    db = sqlite3.connect(state / Journal.FILE_NAME)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()
    assert status_json(settings)["runs"][0]["state"] == "died"


# --- resend ---------------------------------------------------------------------------------


def _resend_end_to_end(
    sandbox: Sandbox, server: SftpServerInfo, make_settings: MakeSettings, state: Path
) -> None:
    [token] = sandbox.control.seed(1)
    body = expected_files(sandbox, [token])[token]
    settings = make_settings(server)
    [first] = push_report(settings)["invoices"]
    assert first["result"] == "delivered"
    old_path = first["remote_path"]
    old_mtime = server.local(old_path).stat().st_mtime_ns

    # Put back into the queue in Nuntiq: without resend, it counts as delivered.
    sandbox.control.set_status(token, 91)
    [again] = push_report(settings)["invoices"]
    assert (again["result"], again["remote_path"]) == ("already_delivered", old_path)

    sandbox.control.set_status(token, 91)
    marked = run_cli("resend", token, "--yes", "--settings", str(settings))
    assert marked.returncode == 0, marked.stderr
    assert "does not put the invoice back into Nuntiq's queue" in marked.stderr
    assert old_path in marked.stderr  # the earlier file, which stays

    report = push_report(settings)
    assert report["exit_code"] == 0
    [resent] = report["invoices"]
    new_path = resent["remote_path"]
    assert resent["result"] == "delivered" and new_path != old_path
    assert new_path == old_path.replace(".csv", "-2.csv")  # the next free name, same day
    assert "re-sent" in resent["message"]
    files = final_files(server)
    assert files == {old_path: body, new_path: body}
    assert server.local(old_path).stat().st_mtime_ns == old_mtime  # untouched
    assert reported_path(sandbox.control.invoice(token)) == new_path  # Nuntiq has the new one
    assert erp_tmp_files(server) == []

    journal = Journal(state)
    try:
        [done] = journal.resends(token)
        assert (done.previous_path, done.remote_path) == (old_path, new_path)
        assert done.done_at is not None and journal.open_resends() == []
    finally:
        journal.close()
    # The mark is used up: re-queued once more, it is delivered (the new file), not re-sent.
    sandbox.control.set_status(token, 91)
    [later] = push_report(settings)["invoices"]
    assert (later["result"], later["remote_path"]) == ("already_delivered", new_path)
    assert len(final_files(server)) == 2


def test_resend_end_to_end_asyncssh(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    _resend_end_to_end(sandbox, asyncssh_sftp, make_settings, tmp_path / "state")


@pytest.mark.sshd
def test_resend_end_to_end_openssh(
    sandbox: Sandbox,
    openssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    openssh_sftp.clear()  # shared by the whole session
    request.addfinalizer(openssh_sftp.clear)
    _resend_end_to_end(sandbox, openssh_sftp, make_settings, tmp_path / "state")


def test_resend_refuses_without_yes_off_a_terminal_and_asks_on_one(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"config": {"state_dir": str(state)}}))

    refused = run_cli("resend", "tok-1", "--settings", str(settings))  # stdin: /dev/null
    assert refused.returncode == ExitCode.USAGE
    assert refused.stderr.count("\n") == 1 and "--yes" in refused.stderr
    assert "nothing was marked" in refused.stderr
    assert not state.exists()
    bad = run_cli("resend", "two words", "--yes", "--settings", str(settings))
    assert bad.returncode == ExitCode.USAGE and "not an invoice token" in bad.stderr

    for answer, code in (("n", 1), ("y", 0)):
        out = _on_a_terminal(["resend", "tok-1", "--settings", str(settings)], answer)
        assert out[0] == code, out[1]
        assert "does not re-queue it in Nuntiq" in out[1]  # the question says it
    marks = status_json(settings)["resends"]
    assert [m["invoice_token"] for m in marks] == ["tok-1"]  # only the "y" marked it


def _on_a_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """The command line with a pseudo-terminal as stdin, answering its question."""
    leader, follower = pty.openpty()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "erp_push", *args],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(leader, f"{answer}\n".encode())
        _out, err = child.communicate(timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    return child.returncode, err


@pytest.mark.parametrize("step", ["published", "tmp_written"])
def test_a_sigkill_during_the_resent_publish_makes_no_third_copy(
    step: str,
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    tmp_path: Path,
) -> None:
    """Killed right after the fresh file was linked (before the journal knew) or before
    it was: the next run ends with exactly the earlier file and one fresh copy."""
    server = asyncssh_sftp
    [token] = sandbox.control.seed(1)
    body = expected_files(sandbox, [token])[token]
    settings = make_settings(server, config={"lease_ttl_seconds": LEASE_TTL})
    [first] = push_report(settings)["invoices"]
    old_path = first["remote_path"]
    sandbox.control.set_status(token, 91)
    assert run_cli("resend", token, "--yes", "--settings", str(settings)).returncode == 0

    assert push_cli(settings, kill_at=step).returncode == KILLED
    landed = settled_files(server)
    assert len(landed) == (2 if step == "published" else 1)
    sandbox.control.advance_clock(LEASE_TTL + 1)  # its lease lapses: back in the queue
    [resent] = push_report(settings)["invoices"]

    new_path = old_path.replace(".csv", "-2.csv")
    assert resent["remote_path"] == new_path
    assert resent["result"] == ("already_delivered" if step == "published" else "delivered")
    assert final_files(server) == {old_path: body, new_path: body}
    assert sandbox.control.invoice(token)["status"] == 100
    assert reported_path(sandbox.control.invoice(token)) == new_path
    journal = Journal(tmp_path / "state")
    try:
        assert journal.open_resends() == []
        assert [r.remote_path for r in journal.resends(token)] == [new_path]
    finally:
        journal.close()


def test_prune_forgets_old_runs_and_done_resends_but_keeps_an_open_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    try:
        journal.record_run_started("push")
        journal.request_resend("open-one")
        journal.request_resend("done-one")
        journal.record_resent("done-one", "/outbox/X-2.csv")
        long_ago = (datetime.now(UTC) - timedelta(days=91)).isoformat()
        db = sqlite3.connect(journal.path)
        db.execute("UPDATE runs SET started_at = ?", (long_ago,))
        db.execute("UPDATE resends SET requested_at = ?, done_at = ?", (long_ago, long_ago))
        db.execute("UPDATE resends SET done_at = NULL WHERE invoice_token = 'open-one'")
        db.commit()
        db.close()
        journal.prune()
        assert [r.invoice_token for r in journal.open_resends()] == ["open-one"]
        assert journal.resends("done-one") == []
    finally:
        journal.close()
    assert read_status(tmp_path / "state").runs == []


def test_the_last_success_is_the_last_run_that_went_through_as_the_metrics_count_it(
    tmp_path: Path,
) -> None:
    """Exit 1 (some invoices failed alone, each reported) is a run that did its job, as
    erp_push_last_success_timestamp_seconds counts it; 3, 4 and 5 are not."""
    from erp_push.journal import Journal
    from erp_push.status import read_status

    ran = []
    for code in (0, 1, 4):
        journal = Journal(tmp_path)
        journal.start_run()
        journal.record_run_started("push")
        journal.record_run_finished(exit_code=code, claimed=1, recovered=0, counts={}, error=None)
        ran.append(journal.run_id)
        journal.close()

    report = read_status(tmp_path)
    assert report.last_success is not None
    assert report.last_success.run_id == ran[1]  # the exit-1 run, not the later exit 4
