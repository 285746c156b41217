"""Attachments pushed with their invoice (``config.push_attachments``), the CSV last.

Against the Nuntiq sandbox (generated attachments of a chosen size, awkward names, an
attachment that vanishes, downloads that break or stall) and real SFTP servers (asyncssh
and OpenSSH): names made safe and distinct, types selected, failures per invoice, the
attachments a failed invoice left removed, a SIGKILL at every step without a second copy
or a CSV without its attachments, and flat memory for a 50 MB attachment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
from pydantic import SecretStr

from erp_push.attachments import MAX_NAME_BYTES, remote_names, safe_part
from erp_push.claim import NuntiqClient, RetryPolicy
from erp_push.errors import ExitCode
from erp_push.journal import Journal
from erp_push.models import Attachment
from erp_push.render import render_invoice
from erp_push.report import Result
from erp_push.settings import Config
from erp_push.transport import TMP_PATTERN
from tests.bench.rig import run_child
from tests.helpers import MakeSettings, push, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sandbox.seeding import attachment_content
from tests.sftp_servers.fixtures import SftpServerInfo

LEASE_TTL = 60
ON = {"push_attachments": True}


# --- helpers ---------------------------------------------------------------------------


def content(token: str, size: int) -> bytes:
    return b"".join(attachment_content(token, size))


def served(sandbox: Sandbox, token: str) -> dict[str, Any]:
    """The invoice as Nuntiq serves it (attachments with their names and tokens)."""
    with NuntiqClient(sandbox.base_url, SecretStr(sandbox.api_key)) as client:
        return client.get_invoice(token).invoice.model_dump()


def expected_csv(sandbox: Sandbox, token: str) -> tuple[str, bytes]:
    with NuntiqClient(sandbox.base_url, SecretStr(sandbox.api_key)) as client:
        invoice = client.get_invoice(token).invoice
    config = Config()
    file = render_invoice(
        invoice,
        keys=config.field_keys(),
        today=datetime.now(UTC).date(),
        rules=config.render_rules(),
    )
    return file.file_name, file.body


def outbox_files(server: SftpServerInfo) -> dict[str, bytes]:
    return {name: server.read(f"{server.outbox}/{name}") for name in server.listdir(server.outbox)}


def expected_set(
    sandbox: Sandbox, tokens: list[str], size: int, *, types: set[str] | None = None
) -> dict[str, bytes]:
    """Every file push should leave in the outbox for generated invoices: name -> bytes."""
    files: dict[str, bytes] = {}
    for token in tokens:
        csv_name, body = expected_csv(sandbox, token)
        files[csv_name] = body
        atts = [
            Attachment.model_validate(a)
            for a in served(sandbox, token)["attachments"]
            if types is None or a["type"] in types
        ]
        for att, name in zip(atts, remote_names(csv_name, atts), strict=True):
            files[name] = content(att.attachment_token, size)
    return files


def settled(server: SftpServerInfo) -> dict[str, bytes]:
    """The outbox once a killed client's last requests have landed on the server."""
    import time

    before = outbox_files(server)
    for _ in range(50):
        time.sleep(0.2)
        now = outbox_files(server)
        if now == before:
            return now
        before = now
    return before


def cli(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "_ERP_PUSH_KILL_AT"}
    if kill_at is not None:
        env["_ERP_PUSH_KILL_AT"] = kill_at
    return run_cli(*args, env=env)


def quick_client(sandbox: Sandbox, **kwargs: Any) -> NuntiqClient:
    """A client that retries once, at once: a transient fault is seen within the test."""
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01)
    return NuntiqClient(sandbox.base_url, SecretStr(sandbox.api_key), retry=retry, **kwargs)


# --- names -----------------------------------------------------------------------------


def _att(name: str, n: int = 0) -> Attachment:
    return Attachment(
        attachment_token=f"00000000-0000-4000-8000-{n:012d}",
        file_name=name,
        content_type="application/pdf",
        type="INVOICE_IMAGE",
    )


def test_attachment_names_are_safe_bounded_and_distinct() -> None:
    awkward = [
        "../../etc/passwd.pdf",
        "sub/dir\\scan.png",
        "bell\x07and\r\nnewline.pdf",
        "..",
        "",
        "long-" + "y" * 300 + ".pdf",
        "long-" + "y" * 299 + "z.pdf",
        "Scan.PNG",
        "scan.png",
        "scan.png",
        "rapport été.pdf",
        "archive.tar.gz",
        "weird.ext with space",
        "statement.CSV",  # the ERP reads every *.csv in the outbox as an invoice
    ]
    names = remote_names("INV-1-20261201.csv", [_att(n, i) for i, n in enumerate(awkward)])
    assert all(n.startswith("INV-1-20261201-") for n in names)
    for name in names:
        assert "/" not in name and "\\" not in name and ".." not in name
        assert name.isascii() and name.isprintable()
        assert len(name.encode()) <= MAX_NAME_BYTES
    assert len({n.lower() for n in names}) == len(names), names
    assert names[0] == "INV-1-20261201-______etc_passwd.pdf"
    assert names[3] == names[4].replace("_2", "") == "INV-1-20261201-attachment"
    assert names[5].endswith(".pdf") and names[6].endswith(".pdf") and names[5] != names[6]
    assert names[7:10] == [
        "INV-1-20261201-Scan.PNG",
        "INV-1-20261201-scan_2.png",
        "INV-1-20261201-scan_3.png",
    ]
    assert names[10] == "INV-1-20261201-rapport__t_.pdf"
    assert names[11] == "INV-1-20261201-archive_tar.gz"
    assert names[12] == "INV-1-20261201-weird_ext_with_space"
    assert names[13] == "INV-1-20261201-statement_CSV.txt"
    assert not any(n.lower().endswith(".csv") for n in names)
    # The same invoice gets the same names on every run.
    assert names == remote_names("INV-1-20261201.csv", [_att(n, i) for i, n in enumerate(awkward)])
    # A CSV stem at its longest still leaves the attachment a recognisable part.
    long_csv = "X" * 187 + "-20261201.csv"
    (long,) = remote_names(long_csv, [_att("invoice scan.pdf")])
    assert len(long.encode()) <= MAX_NAME_BYTES + 10 and long.endswith(".pdf")
    assert safe_part("a" * 50 + ".pdf", 30).endswith(".pdf") and len(safe_part("a" * 50, 30)) == 30
    # A stem of letters from another script counts in bytes (UTF-8), as file systems do.
    wide_csv = "\u00e4" * 95 + "-20261201.csv"  # 199 bytes of stem, 104 characters
    (wide,) = remote_names(wide_csv, [_att("s" * 200 + ".pdf")])
    assert len(wide.encode()) <= MAX_NAME_BYTES + 10 and wide.endswith(".pdf")


def test_attachment_types_come_from_the_file_or_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Config().attachment_options() is None
    options = Config(push_attachments=True).attachment_options()
    assert options is not None and options.types is None and options.max_bytes == 100_000_000
    monkeypatch.setenv("ERP_PUSH_ATTACHMENT_TYPES", "INVOICE_IMAGE, EMAIL")
    monkeypatch.setenv("ERP_PUSH_PUSH_ATTACHMENTS", "true")
    from erp_push.settings import Settings

    options = Settings().config.attachment_options()
    assert options is not None and options.types == frozenset({"INVOICE_IMAGE", "EMAIL"})


# --- the sandbox's attachment controls ---------------------------------------------------


def test_the_sandbox_serves_generated_attachments_and_its_controls(sandbox: Sandbox) -> None:
    (token,) = sandbox.control.seed(1, attachments_per_invoice=3, attachment_bytes=200_000)
    atts = served(sandbox, token)["attachments"]
    assert [a["type"] for a in atts] == ["INVOICE_IMAGE", "EMAIL_ATTACHMENT", "EMAIL"]
    first = atts[0]["attachment_token"]
    with quick_client(sandbox) as client:
        dest = _Sink()
        assert client.download_attachment(first, as_file(dest)) == 200_000
        assert dest.digest() == hashlib.sha256(content(first, 200_000)).hexdigest()
        # a download that breaks mid-body is retried from the start
        sandbox.control.set_faults([_fault("truncate", after_bytes=70_000, count=1)])
        dest = _Sink()
        assert client.download_attachment(first, as_file(dest)) == 200_000
        assert dest.digest() == hashlib.sha256(content(first, 200_000)).hexdigest()
        sandbox.control.delete_attachment(first)
        from erp_push.errors import NuntiqNotFound

        with pytest.raises(NuntiqNotFound):
            client.download_attachment(first, as_file(_Sink()))
    assert sandbox.control.request_counts()["attachment"] == 4
    # bad control input is refused, as every control's is
    for body in ({"attachments_per_invoice": -1}, {"attachment_bytes": "big"}):
        with pytest.raises(RuntimeError, match="400"):
            sandbox.control._call("POST", "/seed", {"count": 1, **body})
    with pytest.raises(RuntimeError, match="attachment endpoint only"):
        sandbox.control.set_faults([{"endpoint": "get", "kind": "truncate"}])
    with pytest.raises(RuntimeError, match="404"):
        sandbox.control.delete_attachment(first)


class _Sink:
    """A destination that keeps a hash, not the bytes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._pos += len(data)
        return len(data)

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int) -> int:
        assert pos == 0
        self._hash, self._pos = hashlib.sha256(), 0
        return 0

    def truncate(self) -> int:
        return 0

    def digest(self) -> str:
        return self._hash.hexdigest()


def as_file(sink: _Sink) -> BinaryIO:
    """The sink where the client wants a file: it only writes, tells, seeks, truncates."""
    return cast(BinaryIO, sink)


def _fault(kind: str, **fields: Any) -> dict[str, Any]:
    return {"endpoint": "attachment", "kind": kind, **fields}


def test_a_stalled_download_is_cut_by_the_idle_timeout_not_waited_for(sandbox: Sandbox) -> None:
    """The per-read idle bound: a body that stops for longer than the timeout is retried
    (a whole-request deadline would not do for a large file, and none is used)."""
    (token,) = sandbox.control.seed(1, attachments_per_invoice=1, attachment_bytes=300_000)
    att = served(sandbox, token)["attachments"][0]["attachment_token"]
    sandbox.control.set_faults([_fault("stall", after_bytes=100_000, latency_ms=3000, count=1)])
    with quick_client(sandbox, timeout=0.5) as client:
        dest = _Sink()
        assert client.download_attachment(att, as_file(dest)) == 300_000
    assert dest.digest() == hashlib.sha256(content(att, 300_000)).hexdigest()
    assert sandbox.control.request_counts()["attachment"] == 2  # cut, then whole


def test_a_download_without_a_length_stops_at_the_cap() -> None:
    """A chunked body (no Content-Length to refuse up front) is counted as it streams:
    reading stops past max_bytes, long before the server is done."""
    from erp_push.errors import AttachmentTooLarge
    from tests import hostile_http

    total = 200_000_000
    with (
        hostile_http.RawServer(hostile_http.flooding(total, chunked=True)) as server,
        NuntiqClient(server.url, SecretStr("k")) as client,
        pytest.raises(AttachmentTooLarge, match="more than 1,000,000 bytes"),
    ):
        client.download_attachment("x", as_file(_Sink()), max_bytes=1_000_000)
    server.wait_finished()
    (talk,) = server.conversations
    assert talk.hung_up and talk.sent < total


def test_a_trickled_download_ends_within_its_budget() -> None:
    """A byte every 20 ms satisfies any idle timeout for ever; the download's own budget
    (retries included) still ends it, the connection dropped before all was sent."""
    from erp_push.errors import NuntiqUnavailable
    from tests import hostile_http

    total = 400
    with (
        hostile_http.RawServer(hostile_http.trickling(total, 0.02, in_headers=False)) as server,
        NuntiqClient(server.url, SecretStr("k"), timeout=5) as client,
        pytest.raises(NuntiqUnavailable),
    ):
        client.download_attachment("x", as_file(_Sink()), budget=1.0)
    server.wait_finished()
    assert all(talk.hung_up and talk.sent < total for talk in server.conversations)


# --- pushing -----------------------------------------------------------------------------


@pytest.fixture(params=["asyncssh", "openssh"])
def server(request: pytest.FixtureRequest) -> Iterator[SftpServerInfo]:
    if request.param == "asyncssh":
        yield request.getfixturevalue("asyncssh_sftp")
        return
    info: SftpServerInfo = request.getfixturevalue("openssh_sftp")
    info.clear()
    yield info
    info.clear()


def test_attachments_land_next_to_their_csv(
    sandbox: Sandbox, server: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(3, attachments_per_invoice=2, attachment_bytes=3000)
    expected = expected_set(sandbox, tokens, 3000)
    report = push(make_settings(server, config=ON))
    assert [o.result for o in report.outcomes] == [Result.DELIVERED] * 3
    assert outbox_files(server) == expected
    assert {r["status"] for r in sandbox.control.invoices()} == {100}


def test_attachment_types_select_what_is_pushed(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(2, attachments_per_invoice=3, attachment_bytes=100)
    config = {**ON, "attachment_types": ["INVOICE_IMAGE", "EMAIL"]}
    push(make_settings(asyncssh_sftp, config=config))
    expected = expected_set(sandbox, tokens, 100, types={"INVOICE_IMAGE", "EMAIL"})
    assert outbox_files(asyncssh_sftp) == expected
    assert len(expected) == 2 * 3  # each CSV and two of its three attachments


def test_without_the_setting_no_attachment_is_downloaded(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(2, attachments_per_invoice=2)
    push(make_settings(asyncssh_sftp))
    assert set(outbox_files(asyncssh_sftp)) == {expected_csv(sandbox, t)[0] for t in tokens}
    assert sandbox.control.request_counts()["attachment"] == 0


def test_awkward_attachment_names_never_leave_the_outbox(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(12, awkward=True)
    report = push(make_settings(asyncssh_sftp, config=ON))
    (with_atts,) = [t for t in tokens if served(sandbox, t)["attachments"]]
    outcome = next(o for o in report.outcomes if o.invoice_token == with_atts)
    assert outcome.result is Result.DELIVERED
    csv_name = outcome.remote_path.rpartition("/")[2]  # type: ignore[union-attr]
    stem = csv_name.removesuffix(".csv")
    files = outbox_files(asyncssh_sftp)
    mine = sorted(n for n in files if n.startswith(stem + "-"))
    assert len(mine) == 8  # the PDF, the PNG and six awkward ones, the duplicate kept apart
    for name in mine:
        assert name.isascii() and name.isprintable() and ".." not in name
    # nothing was written anywhere but the outbox (no ../ escape, no sub-folders)
    root = asyncssh_sftp.root
    assert root is not None
    written = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert all(p.startswith("outbox/") and p.count("/") == 1 for p in written), written


def test_a_missing_attachment_fails_its_invoice_alone(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(3, attachments_per_invoice=2, attachment_bytes=500)
    gone = served(sandbox, tokens[1])["attachments"][1]["attachment_token"]
    sandbox.control.delete_attachment(gone)
    report = push(make_settings(asyncssh_sftp, config=ON))
    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert rows[tokens[1]]["status"] == 97
    assert rows[tokens[1]]["failure_code"] == "ATTACHMENT_MISSING"
    assert {rows[t]["status"] for t in (tokens[0], tokens[2])} == {100}
    expected = expected_set(sandbox, [tokens[0], tokens[2]], 500)
    assert outbox_files(asyncssh_sftp) == expected
    assert report.exit_code == ExitCode.SOME_FAILED


def test_a_too_large_attachment_fails_its_invoice(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    small = sandbox.control.seed(1, attachments_per_invoice=1, attachment_bytes=1000)
    large = sandbox.control.seed(1, seed=1, attachments_per_invoice=1, attachment_bytes=300_000)
    config = {**ON, "max_attachment_bytes": 200_000}
    push(make_settings(asyncssh_sftp, config=config))
    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert rows[small[0]]["status"] == 100
    assert (rows[large[0]]["status"], rows[large[0]]["failure_code"]) == (
        97,
        "ATTACHMENT_TOO_LARGE",
    )
    assert outbox_files(asyncssh_sftp) == expected_set(sandbox, small, 1000)


def test_a_download_that_keeps_breaking_leaves_the_invoice_for_the_next_run(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(1, attachments_per_invoice=2, attachment_bytes=200_000)
    sandbox.control.set_faults([_fault("truncate", after_bytes=100_000)])
    path = make_settings(asyncssh_sftp, config={**ON, "lease_ttl_seconds": LEASE_TTL})
    with quick_client(sandbox) as client:
        report = push(path, nuntiq=client)
    assert [o.result for o in report.outcomes] == [Result.PENDING]
    assert outbox_files(asyncssh_sftp) == {}
    assert sandbox.control.invoices()[0]["status"] == 92  # not failed: its lease lapses
    sandbox.control.clear_faults()
    sandbox.control.advance_clock(LEASE_TTL + 1)
    with quick_client(sandbox) as client:
        report = push(path, nuntiq=client)
    assert [o.result for o in report.outcomes] == [Result.DELIVERED]
    assert outbox_files(asyncssh_sftp) == expected_set(sandbox, tokens, 200_000)


@pytest.mark.parametrize("after", ["csv", "second attachment"])
def test_a_refused_write_removes_the_attachments_the_run_wrote(
    after: str,
    sandbox: Sandbox,
    sftp_server_factory: Any,
    make_settings: MakeSettings,
) -> None:
    """The server fills up after the attachments (or after the first of them): the
    invoice fails with today's SFTP code, and nothing of it stays in the outbox."""
    server = sftp_server_factory("disk_full", disk_full_after=4100 if after == "csv" else 2500)
    tokens = sandbox.control.seed(1, attachments_per_invoice=2, attachment_bytes=2048)
    push(make_settings(server, config={**ON, "concurrency": 1}))
    row = sandbox.control.invoice(tokens[0])
    assert (row["status"], row["failure_code"]) == (97, "SFTP_DISK_FULL")
    assert server.listdir(server.outbox) == []


def test_dry_run_lists_the_attachment_files(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(1, attachments_per_invoice=2, attachment_bytes=100)
    path = make_settings(asyncssh_sftp, config=ON)
    result = cli("dry-run", "--settings", str(path), "--json")
    assert result.returncode == 0, result.stderr
    (previewed,) = json.loads(result.stdout)["invoices"]
    names = sorted(expected_set(sandbox, tokens, 100))
    assert sorted([previewed["file_name"], *previewed["attachments"]]) == names
    assert asyncssh_sftp.listdir(asyncssh_sftp.outbox) == []


def test_render_saves_the_attachments_under_push_names(
    sandbox: Sandbox, make_settings: MakeSettings, tmp_path: Path
) -> None:
    (token,) = sandbox.control.seed(1, attachments_per_invoice=2, attachment_bytes=70_000)
    path = make_settings(None)
    folder = tmp_path / "atts"
    result = cli("render", token, "--settings", str(path), "--attachments", str(folder))
    assert result.returncode == 0, result.stderr
    expected = expected_set(sandbox, [token], 70_000)
    csv_name, body = expected_csv(sandbox, token)
    assert result.stdout.encode() == body
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        n: b for n, b in expected.items() if n != csv_name
    }
    # a folder that cannot be written is one line, not a traceback
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = cli("render", token, "--settings", str(path), "--attachments", str(blocked / "x"))
    assert result.returncode == ExitCode.SOME_FAILED
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr


# --- exactly once: a SIGKILL at every step ------------------------------------------------

CRASH_POINTS = {
    "downloaded": "attachments_downloaded@2",
    "attachment_tmp_open": "attachment_tmp_open@3",
    "attachment_tmp_written": "attachment_tmp_written@3",
    "attachment_published": "attachment_published@3",  # under its name, not journaled
    "attachment_recorded": "attachment_recorded@3",
    "csv_tmp_written": "tmp_written@2",  # every attachment there, the CSV not yet
    "csv_published": "published@2",
    "csv_recorded": "published_recorded@2",
}


def _no_csv_without_its_attachments(
    files: dict[str, bytes], expected: dict[str, bytes], csvs: list[str]
) -> None:
    for csv_name in csvs:
        if csv_name in files:
            stem = csv_name.removesuffix(".csv") + "-"
            mine = {n for n in expected if n.startswith(stem)}
            assert mine <= set(files), f"{csv_name} landed without {mine - set(files)}"


# Every step on asyncssh; on OpenSSH where the attachments are there and the CSV is not.
# A lost journal matters there too: they are found by their bytes then.
CRASHES = [(step, "kept", "asyncssh") for step in CRASH_POINTS] + [
    ("attachment_recorded", "kept", "openssh"),
    ("attachment_published", "lost", "asyncssh"),
    ("attachment_recorded", "lost", "asyncssh"),
]


@pytest.mark.parametrize(("step", "journal", "kind"), CRASHES)
def test_a_run_killed_at_any_step_delivers_every_file_once(
    step: str,
    journal: str,
    kind: str,
    sandbox: Sandbox,
    make_settings: MakeSettings,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    server: SftpServerInfo = request.getfixturevalue(f"{kind}_sftp")
    server.clear()
    tokens = sandbox.control.seed(3, attachments_per_invoice=2, attachment_bytes=40_000)
    expected = expected_set(sandbox, tokens, 40_000)
    csvs = [expected_csv(sandbox, t)[0] for t in tokens]
    path = make_settings(server, config={**ON, "lease_ttl_seconds": LEASE_TTL})

    killed = cli("push", "--settings", str(path), "--json", kill_at=CRASH_POINTS[step])
    assert killed.returncode == -9, f"{step} never fired: {killed.stderr}"
    landed = settled(server)
    _no_csv_without_its_attachments(landed, expected, csvs)
    if journal == "lost":
        for name in os.listdir(tmp_path / "state"):
            if name.startswith(Journal.FILE_NAME):
                os.remove(tmp_path / "state" / name)

    sandbox.control.advance_clock(LEASE_TTL + 1)
    finished = cli("push", "--settings", str(path), "--json")
    assert finished.returncode == 0, finished.stderr + finished.stdout
    assert {r["status"] for r in sandbox.control.invoices()} == {100}
    # Every file once, whole, under its name: no second copy. Besides them, at most tmp
    # files of uploads the kill interrupted (cleanup-tmp's to remove).
    final = {n: b for n, b in outbox_files(server).items() if not TMP_PATTERN.match(n)}
    assert final == expected
    server.clear()


def test_a_later_failure_removes_the_attachments_an_earlier_run_left(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Killed after both attachments landed, before the CSV; meanwhile one attachment
    vanished from Nuntiq: the invoice fails, and what the dead run wrote goes too."""
    server = asyncssh_sftp
    (token,) = sandbox.control.seed(1, attachments_per_invoice=2, attachment_bytes=3000)
    path = make_settings(server, config={**ON, "lease_ttl_seconds": LEASE_TTL})
    killed = cli("push", "--settings", str(path), kill_at="attachment_recorded@2")
    assert killed.returncode == -9, killed.stderr
    assert len(settled(server)) == 2  # both attachments, no CSV
    sandbox.control.delete_attachment(served(sandbox, token)["attachments"][0]["attachment_token"])
    sandbox.control.advance_clock(LEASE_TTL + 1)
    assert cli("push", "--settings", str(path)).returncode == ExitCode.SOME_FAILED
    row = sandbox.control.invoice(token)
    assert (row["status"], row["failure_code"]) == (97, "ATTACHMENT_MISSING")
    assert outbox_files(server) == {}


# --- memory --------------------------------------------------------------------------------


def _peak_rss_of_push(path: Path, tmp_path: Path) -> tuple[float, dict[str, Any]]:
    """Run ``push`` in a child process; its own peak RSS in MB, and its report.

    Through the bench's small launcher: Linux carries a process's peak RSS across exec,
    so a child forked straight from this (large) test process would report at least
    this process's RSS as its own peak (see tests/bench/launch.py)."""
    argv = [sys.executable, "-m", "erp_push", "push", "--settings", str(path), "--json"]
    child = run_child(argv, dict(os.environ), timeout=300)
    assert child.exit_code == 0, child.stderr
    return child.peak_rss_mb, json.loads(child.stdout)


def test_a_50_mb_attachment_pushes_with_flat_memory(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    """Peak RSS of the push process itself, not time: under 100 MB with a 50 MB
    attachment, and hardly more than the same push with a 2 KB one."""
    size = 50 * 1024 * 1024
    server = openssh_sftp
    server.clear()
    path = make_settings(server, config={**ON, "nuntiq_timeout_seconds": 5})
    sandbox.control.seed(1, attachments_per_invoice=1, attachment_bytes=2048)
    small_mb, _ = _peak_rss_of_push(path, tmp_path)
    (token,) = sandbox.control.seed(1, seed=1, attachments_per_invoice=1, attachment_bytes=size)
    peak_mb, report = _peak_rss_of_push(path, tmp_path)
    print(f"peak RSS of the push: {peak_mb:.1f} MB (with a 2 KB attachment: {small_mb:.1f} MB)")
    assert peak_mb < 100, f"peak RSS {peak_mb:.1f} MB"
    assert peak_mb - small_mb < 20, f"{peak_mb:.1f} MB against {small_mb:.1f} MB"
    (outcome,) = report["invoices"]
    assert outcome["result"] == "delivered"
    att = served(sandbox, token)["attachments"][0]
    csv_name, _ = expected_csv(sandbox, token)
    (name,) = remote_names(csv_name, [Attachment.model_validate(att)])
    digest = hashlib.sha256()
    with open(server.local(f"{server.outbox}/{name}"), "rb") as f:
        while data := f.read(1 << 20):
            digest.update(data)
    want = hashlib.sha256()
    for block in attachment_content(att["attachment_token"], size):
        want.update(block)
    assert digest.hexdigest() == want.hexdigest()
    server.clear()


# --- names shared by two invoices -----------------------------------------------------------


def _landed_with_their_attachments(
    sandbox: Sandbox, server: SftpServerInfo, outcomes: list[Any], size: int
) -> None:
    """Each delivered CSV has its own attachments under its own stem, with their bytes."""
    files = outbox_files(server)
    for outcome in outcomes:
        csv_name = outcome.remote_path.rpartition("/")[2]
        atts = [
            Attachment.model_validate(a)
            for a in served(sandbox, outcome.invoice_token)["attachments"]
        ]
        generated = [a for a in atts if a.file_name.startswith("document-")]
        for att, name in zip(atts, remote_names(csv_name, atts), strict=True):
            if att in generated:
                assert files[name] == content(att.attachment_token, size), name


def test_two_invoices_with_one_number_each_get_their_own_attachments(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(12, awkward=True, attachments_per_invoice=1, attachment_bytes=700)
    report = push(make_settings(asyncssh_sftp, config=ON))
    delivered = [o for o in report.outcomes if o.result is Result.DELIVERED]
    names = [o.remote_path.rpartition("/")[2] for o in delivered]  # type: ignore[union-attr]
    assert any(n.endswith("-2.csv") for n in names), names  # the pair shares a number
    _landed_with_their_attachments(sandbox, asyncssh_sftp, delivered, 700)


def test_a_csv_name_taken_before_the_csv_lands_moves_all_its_files(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """Someone else's file takes the CSV's name after its attachments landed: they are
    removed (their stem is no longer the CSV's), the invoice waits, and the next run
    publishes all of them under the next free name."""
    from erp_push import commands
    from erp_push.pipeline import Pusher
    from erp_push.settings import load_settings
    from tests.helpers import PUSH_NEEDS

    server = asyncssh_sftp
    (token,) = sandbox.control.seed(1, attachments_per_invoice=2, attachment_bytes=900)
    csv_name, _ = expected_csv(sandbox, token)
    rival = b"someone else's file\n"
    settings = load_settings(
        make_settings(server, config={**ON, "lease_ttl_seconds": LEASE_TTL}), needs=PUSH_NEEDS
    )

    def take_the_name(step: str) -> None:
        if step == "attachment_recorded" and not server.exists(f"{server.outbox}/{csv_name}"):
            server.write(f"{server.outbox}/{csv_name}", rival)

    def run(hook: Any = None) -> Any:
        with NuntiqClient(**settings.nuntiq_client_options()) as client:
            journal = Journal(settings.config.state_dir)
            try:
                return Pusher(
                    nuntiq=client,
                    connect_sftp=commands.sftp_connector(settings),
                    journal=journal,
                    plan=settings.push_plan(drain=False, max_invoices=None),
                    on_checkpoint=hook,
                ).run()
            finally:
                journal.close()

    first = run(take_the_name)
    assert [o.result for o in first.outcomes] == [Result.PENDING]
    assert outbox_files(server) == {csv_name: rival}
    sandbox.control.advance_clock(LEASE_TTL + 1)
    second = run()
    assert [o.result for o in second.outcomes] == [Result.DELIVERED]
    moved = csv_name.replace(".csv", "-2.csv")
    assert second.outcomes[0].remote_path == f"{server.outbox}/{moved}"
    files = outbox_files(server)
    assert files.pop(csv_name) == rival
    atts = [Attachment.model_validate(a) for a in served(sandbox, token)["attachments"]]
    want = {moved: expected_csv(sandbox, token)[1]}
    for att, name in zip(atts, remote_names(moved, atts), strict=True):
        want[name] = content(att.attachment_token, 900)
    assert files == want


def test_direct_mode_pushes_attachments_too(
    sandbox: Sandbox, sftp_server_factory: Any, make_settings: MakeSettings
) -> None:
    server = sftp_server_factory("no_rename")
    tokens = sandbox.control.seed(2, attachments_per_invoice=2, attachment_bytes=1500)
    push(make_settings(server, config={**ON, "publish_mode": "direct"}))
    assert outbox_files(server) == expected_set(sandbox, tokens, 1500)
