"""SFTP servers that refuse, lie about their limits or forbid deletion (issue: hostile world).

Real servers throughout: OpenSSH with a real full or read-only tmpfs as the outbox,
ProFTPD mod_sftp, and asyncssh variants that answer exactly as those do.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from erp_push.errors import ExitCode
from erp_push.report import Result
from tests.helpers import MakeSettings, push, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo


def tmp_files(server: SftpServerInfo, folder: str | None = None) -> list[str]:
    return [n for n in server.listdir(folder or server.outbox) if n.endswith(".erp-push.tmp")]


def csv_files(server: SftpServerInfo) -> list[str]:
    return [p for p in server.files() if p.endswith(".csv")]


# --- 1. a full or read-only disk fails the invoices in flight, not the queue -------------


@pytest.mark.sshd
def test_a_full_disk_on_openssh_fails_the_few_in_flight_not_the_queue(
    sandbox: Sandbox,
    openssh_mounted_outbox: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """OpenSSH answers ENOSPC with a bare "Failure"; its statvfs extension tells why."""
    server = openssh_mounted_outbox("full", size="16k")
    tokens = sandbox.control.seed(40)
    settings = make_settings(server, config={"concurrency": 4, "batch_size": 5})

    report = push(settings, drain=True)

    by_result = {r: [o for o in report.outcomes if o.result is r] for r in Result}
    failed = by_result[Result.FAILED]
    assert failed, "the disk filled up: some invoice must have been refused"
    assert {o.failure_code for o in failed} == {"SFTP_DISK_FULL"}
    # Only what was in flight when the disk filled up: at most a lane each plus the
    # batch claimed ahead; the rest of the queue was never claimed.
    assert len(failed) <= 4 + 5
    assert report.claimed < 40
    assert any("refused writes" in note for note in report.notes)
    statuses = sandbox.control.statuses()
    assert sum(1 for t in tokens if statuses[t] == 90) >= 40 - report.claimed
    assert tmp_files(server) == []


@pytest.mark.sshd
def test_a_read_only_outbox_on_openssh_fails_one_invoice_and_stops(
    sandbox: Sandbox,
    openssh_mounted_outbox: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = openssh_mounted_outbox("read_only")
    tokens = sandbox.control.seed(30)

    report = push(make_settings(server, config={"concurrency": 4}), drain=True)

    (outcome,) = report.outcomes  # the probe, and nothing after it
    assert outcome.result is Result.FAILED
    assert outcome.failure_code == "SFTP_PERMISSION_DENIED"
    assert "read-only" in (outcome.message or "")
    statuses = sandbox.control.statuses()
    assert sorted(statuses[t] for t in tokens).count(90) == 29


def test_a_write_failure_nobody_explains_leaves_invoices_pending_and_stops(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """A bare "Failure" on a server with no way to ask why: not the invoice's fault as far
    as anyone can tell, so nothing is failed for good; two in a row stop the run."""
    server = sftp_server_factory("disk_full_generic", disk_full_after=0, statvfs=False)
    tokens = sandbox.control.seed(30)

    report = push(make_settings(server, config={"concurrency": 2, "batch_size": 3}))

    assert report.outcomes
    assert {o.result for o in report.outcomes} == {Result.PENDING}
    assert report.claimed <= 1 + 3
    assert any("two writes in a row" in note for note in report.notes)
    statuses = sandbox.control.statuses()
    assert 97 not in {statuses[t] for t in tokens}
    assert tmp_files(server) == []


# --- 8. never more channels on a login than the server allows ----------------------------


@pytest.mark.parametrize("kind", ["asyncssh-channel_limit", "proftpd"])
def test_sixteen_in_flight_never_ask_one_login_for_an_eleventh_channel(
    kind: str,
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    make_settings: MakeSettings,
) -> None:
    """ProFTPD drops the whole connection on an 11th channel (tmp files orphaned, logins
    repeated): erp-push opens a second login instead."""
    if kind == "proftpd":
        server: SftpServerInfo = request.getfixturevalue("proftpd_sftp")
    else:
        server = request.getfixturevalue("sftp_server_factory")("channel_limit")
    tokens = sandbox.control.seed(40)
    settings = make_settings(server, config={"concurrency": 16, "batch_size": 20})

    result = run_cli("push", "--settings", str(settings), "--drain", "--json")

    assert result.returncode == ExitCode.OK, result.stderr
    assert "lost" not in result.stderr and "FAILED" not in result.stderr
    statuses = sandbox.control.statuses()
    assert {statuses[t] for t in tokens} == {100}
    assert len(csv_files(server)) == 40
    assert tmp_files(server) == []


# --- 9. an upload-only folder: no second name for every file ------------------------------


@pytest.mark.parametrize("kind", ["asyncssh-upload_only", "proftpd-upload_only"])
def test_an_upload_only_folder_is_detected_and_published_by_rename(
    kind: str,
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    make_settings: MakeSettings,
) -> None:
    if kind.startswith("proftpd"):
        server: SftpServerInfo = request.getfixturevalue("proftpd_factory")("upload_only")
    else:
        server = request.getfixturevalue("sftp_server_factory")("upload_only")
    tokens = sandbox.control.seed(12)
    settings = make_settings(server, config={"concurrency": 4})

    result = run_cli("push", "--settings", str(settings), "--drain", "--json")

    assert result.returncode == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)
    assert {o["result"] for o in report["invoices"]} == {"delivered"}
    assert {sandbox.control.statuses()[t] for t in tokens} == {100}
    assert len(csv_files(server)) == 12
    # The first file was published by link before the server showed that it forbids
    # deletion: its tmp name stays (nothing can remove it). Every later one was renamed.
    assert len(tmp_files(server)) <= 1
    assert result.stderr.count("upload-only") == 1
