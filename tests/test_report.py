"""The run summary: what people see on a terminal and what tools read."""

from __future__ import annotations

import io
import json

from rich.console import Console

from erp_push.report import FULL_TABLE_MAX, Outcome, Result, RunReport, integration_result_for


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
