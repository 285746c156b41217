"""Each command's report: what people see on a terminal and what tools read."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from erp_push import wire
from erp_push.errors import ExitCode, FailureCode
from erp_push.report import (
    FULL_TABLE_MAX,
    NOTHING_TO_PUSH,
    CleanupReport,
    CommandReport,
    DryRunReport,
    NotRemoved,
    Outcome,
    PreviewedFile,
    Result,
    RunReport,
    integration_result_for,
)
from erp_push.transport import RemoteFile


def _report(delivered: int, failed: int) -> RunReport:
    report = RunReport(command="push", claimed=delivered + failed)
    for i in range(delivered):
        report.add(Outcome(f"tok-ok-{i}", Result.DELIVERED, f"INV-{i}", f"/outbox/INV-{i}.csv"))
    for i in range(failed):
        report.add(Outcome(f"tok-bad-{i}", Result.FAILED, f"BAD-{i}", failure_code="RENDER_X"))
    return report.finish()


def _table(report: RunReport) -> str:
    out = io.StringIO()
    report.render_table(Console(file=out, width=200))
    return out.getvalue()


def test_short_runs_list_every_invoice() -> None:
    text = _table(_report(3, 1))
    assert all(f"INV-{i}" in text for i in range(3)) and "BAD-0" in text
    assert "4 claimed: 3 delivered, 0 already delivered, 1 failed" in text


def test_long_runs_list_only_what_needs_attention() -> None:
    text = _table(_report(FULL_TABLE_MAX + 5, 2))
    assert "BAD-0" in text and "BAD-1" in text
    assert "INV-0 " not in text and "/outbox/INV-0.csv" not in text
    assert f"{FULL_TABLE_MAX + 5} delivered invoices not listed" in text


def test_json_report_is_one_line_with_every_invoice() -> None:
    report = _report(FULL_TABLE_MAX + 5, 2)
    line = report.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert len(data["invoices"]) == FULL_TABLE_MAX + 7
    assert data["exit_code"] == 1 and data["counts"]["failed"] == 2


def test_a_path_too_long_for_one_external_id_is_split() -> None:
    folder = "/inbound/" + "d" * 100
    name = "N" * 190 + "-20261125.csv"
    result = integration_result_for(Outcome("t", Result.DELIVERED, "N", f"{folder}/{name}"))
    assert result.external_ids == (name, folder, None)
    short = integration_result_for(Outcome("t", Result.DELIVERED, "N", "/outbox/a.csv"))
    assert short.external_ids[0] == "/outbox/a.csv"
    assert short.external_messages[0] == "SFTP_DELIVERED"


def test_failure_messages_are_cut_to_nuntiqs_limit() -> None:
    result = integration_result_for(Outcome("t", Result.FAILED, None, None, "SFTP_X", "x" * 900))
    assert result.failure_code == "SFTP_X"
    assert result.failure_message is not None and len(result.failure_message) == 500


# --- failure codes: the README's table is the enum ----------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_failure_codes() -> list[str]:
    """The first column of the README's ``| failure_code | why |`` table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| failure_code | why |") + 2  # past the header and |---|---|
    codes = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cell = line.split("|")[1].strip()
        assert cell.startswith("`") and cell.endswith("`"), f"not a code cell: {line!r}"
        codes.append(cell.strip("`"))
    return codes


def test_the_readme_lists_every_failure_code_and_no_other() -> None:
    listed = _readme_failure_codes()
    assert len(listed) == len(set(listed)), "a code is listed twice"
    assert set(listed) == {code.value for code in FailureCode}


def test_failure_codes_fit_nuntiqs_rule() -> None:
    for code in FailureCode:
        assert wire.FAILURE_CODE_RE.fullmatch(code), code


# --- every command's report has the same shape --------------------------------------------


class _Screen:
    """A Screen that records plain lines; drawing a table must ask for ``console``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.out = io.StringIO()
        self.drew = False

    def say(self, text: str, *, label: str = "", style: str = "") -> None:
        self.lines.append(f"{label} {text}" if label else text)

    @property
    def console(self) -> Console:
        self.drew = True
        return Console(file=self.out, width=200)


def _stale(name: str) -> RemoteFile:
    return RemoteFile(f"/outbox/{name}", 4, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def _reports() -> list[CommandReport]:
    return [
        _report(1, 0),
        DryRunReport(lease_ttl_seconds=60, files=[PreviewedFile("t", "INV-1", "INV-1.csv")]),
        CleanupReport(older_than=timedelta(minutes=60), stale=[_stale("a.0a1b2c3d.erp-push.tmp")]),
    ]


def test_every_command_report_shows_itself_and_becomes_one_json_line() -> None:
    for report in _reports():
        screen = _Screen()
        report.show(screen)
        assert screen.lines or screen.drew, type(report).__name__
        document = report.to_json()
        assert "\n" not in document
        assert json.loads(document) == json.loads(json.dumps(report.to_dict()))
        assert report.exit_code is ExitCode.OK and report.error is None


def test_nothing_to_show_is_one_plain_line_without_rich() -> None:
    for report in (RunReport(command="push"), DryRunReport(lease_ttl_seconds=60)):
        screen = _Screen()
        report.show(screen)
        assert screen.lines == [NOTHING_TO_PUSH] and not screen.drew


def test_cleanup_exits_1_when_a_file_could_not_be_removed() -> None:
    stale = _stale("a.0a1b2c3d.erp-push.tmp")
    report = CleanupReport(
        older_than=timedelta(minutes=90), stale=[stale], not_removed=[NotRemoved(stale, "denied")]
    )
    screen = _Screen()
    report.show(screen)
    assert report.exit_code is ExitCode.SOME_FAILED
    assert screen.lines == [
        "could not remove /outbox/a.0a1b2c3d.erp-push.tmp: denied",
        "0 stale tmp file(s) removed (older than 90 min); 1 could not be removed",
    ]
    assert report.to_dict()["not_removed"] == [
        {
            "path": "/outbox/a.0a1b2c3d.erp-push.tmp",
            "size": 4,
            "mtime": "2026-01-02T03:04:05+00:00",
            "error": "denied",
        }
    ]


def test_the_json_report_written_in_pieces_is_the_whole_document() -> None:
    """A long drain writes its report an invoice at a time (its memory stays flat in N):
    the pieces make exactly the one-line document ``to_dict`` describes."""
    report = RunReport("push", claimed=3)
    report.add(Outcome("tok-1", Result.DELIVERED, "INV-1", "/outbox/a.csv"))
    report.add(Outcome("tok-2", Result.FAILED, "Gr\u00f6\u00dfe\x7f", None, "RENDER_FAILED", "bad"))
    report.add(Outcome("tok-3", Result.PENDING, None, message="lease too close to expiry"))
    report.notes.append("a note")
    report.finish()

    chunks = list(report.json_chunks())

    assert len(chunks) > 3  # really in pieces, not one string
    text = "".join(chunks)
    assert "\n" not in text and "\x7f" not in text
    assert json.loads(text) == json.loads(json.dumps(report.to_dict()))
    assert json.loads(text)["invoices"][1]["invoice_number"] == "Gr\u00f6\u00dfe\x7f"
    assert json.loads("".join(RunReport("push").json_chunks()))["invoices"] == []
