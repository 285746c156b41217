"""The CSV-injection guard (config.formula_guard): render rules, golden files, and an
invoice failing alone in a real push against the sandbox and an SFTP server.

Finance opens the ERP's files in Excel, and supplier-controlled text reaches them: a cell
starting with = + - @ (or tab, CR) is run as a formula there.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from erp_push import render as render_module
from erp_push.errors import ExitCode, FailureCode, RenderError
from erp_push.render import FORMULA_TRIGGERS
from erp_push.report import Result
from tests.helpers import MakeSettings, push, set_invoice_fields
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo
from tests.test_render import NORMAL, OFF, RULES, assert_golden, nuntiq_invoice, render

PAYLOAD = "=cmd|' /C calc'!A0"

TEXT_COLUMNS = [
    ("invoiceNumber", "invoice_number"),
    ("invoiceDate", "date"),
    ("currencyCode", "currency"),
    ("supplierCode", "supplier_code"),
]


def refused(fields: dict[str, Any], **kwargs: Any) -> RenderError:
    with pytest.raises(RenderError) as caught:
        render(nuntiq_invoice(fields, **kwargs))
    assert caught.value.failure_code == FailureCode.RENDER_UNSAFE_VALUE
    return caught.value


def test_the_default_is_reject() -> None:
    assert RULES.formula_guard == "reject"


# --- text columns ---------------------------------------------------------------------


@pytest.mark.parametrize("start", ["=", "+", "-", "@"])
@pytest.mark.parametrize(("key", "column"), TEXT_COLUMNS)
def test_a_text_column_starting_with_a_formula_character_fails(
    start: str, key: str, column: str
) -> None:
    error = refused({**NORMAL, key: f"{start}HYPERLINK(1)"})

    assert f"column {column} starts with '{start}'" in error.message


@pytest.mark.parametrize("start", ["\t", "\r"], ids=["tab", "CR"])
@pytest.mark.parametrize(("key", "column"), TEXT_COLUMNS)
def test_tab_and_cr_at_the_start_fail_too_even_with_the_guard_off(
    start: str, key: str, column: str
) -> None:
    for rules in (RULES, OFF):
        with pytest.raises(RenderError) as caught:
            render(nuntiq_invoice({**NORMAL, key: f"{start}=1+1"}), rules)
        assert caught.value.failure_code == FailureCode.RENDER_UNSAFE_VALUE
        assert column in caught.value.message
    assert {"\t", "\r"} <= set(FORMULA_TRIGGERS)


def test_the_vendor_name_standing_in_for_the_supplier_code_is_guarded() -> None:
    fields = {k: v for k, v in NORMAL.items() if k != "supplierCode"}
    addresses = [{"address_type": "vendor", "address_name": "@SUM(1+1)*cmd|' /C calc'!A0"}]

    error = refused(fields, addresses=addresses)

    assert "column supplier_code starts with '@'" in error.message


def test_spaces_before_the_formula_do_not_hide_it() -> None:
    # Values are trimmed of spaces before they are written, so " =1" is written "=1".
    error = refused({**NORMAL, "invoiceNumber": "   =1+1"})

    assert "invoice_number" in error.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("invoiceNumber", "INV=1+1"),
        ("invoiceNumber", "2024-0042"),
        ("supplierCode", "ACME@north"),
        ("supplierCode", "A-1"),
        ("currencyCode", "€"),
    ],
)
def test_formula_characters_after_the_first_are_fine(key: str, value: str) -> None:
    body = render(nuntiq_invoice({**NORMAL, key: value})).body

    assert f"{value}\t".encode() in body


def test_the_message_names_the_column_and_shows_only_the_start_of_the_value() -> None:
    tail = "SECRET-LOOKING-TAIL" * 20

    error = refused({**NORMAL, "supplierCode": "=HYPERLINK(" + tail})

    assert error.message.startswith("column supplier_code starts with '='")
    assert "=HYPERLINK(SECRET-LOOKING-TAIL" in error.message
    assert tail not in error.message
    assert "config.formula_guard" in error.message
    assert len(error.message) < 200


def test_the_message_is_printable_on_its_own() -> None:
    # render refuses control characters before the guard looks; the guard's message does
    # not rely on that order.
    with pytest.raises(RenderError) as caught:
        render_module._guard_formula("=\x1b[2J\r\u202eevil", "invoice_number")

    assert not any(c in caught.value.message for c in "\x1b\r\u202e")
    assert "\\x1b" in caught.value.message


# --- numeric columns ------------------------------------------------------------------


@pytest.mark.parametrize(
    "total",
    ["-12.50", "+12.50", "-1.234,50", "-1'234.50", "-12 345", "-.5", -12.5, Decimal("-0.10")],
)
def test_a_negative_total_is_a_number_and_stays_fine(total: Any) -> None:
    body = render(nuntiq_invoice({**NORMAL, "grossAmount": total})).body

    assert b"\tEUR\t" + str(total).encode() + b"\tACME-001\t" in body


@pytest.mark.parametrize(
    "total", ["-1+1", "=1+1", "@SUM(A1)", "+cmd|' /C calc'!A0", "-12.50 EUR", "-", "--1"]
)
def test_a_total_that_is_not_a_number_is_held_to_the_text_rule(total: str) -> None:
    error = refused({**NORMAL, "grossAmount": total})

    assert f"column total is not a number and starts with '{total[0]}'" in error.message


def test_a_total_that_is_not_a_number_without_a_formula_start_is_written() -> None:
    # Nothing a spreadsheet would run: the ERP may read "12,50 EUR" its own way.
    body = render(nuntiq_invoice({**NORMAL, "grossAmount": "12,50 EUR"})).body

    assert b"\t12,50 EUR\t" in body


# --- golden files: both settings ------------------------------------------------------

# Values that come close: formula characters inside values and a negative total.
CLOSE_CALLS = {
    "invoiceNumber": "INV=2024+0042",
    "invoiceDate": "2024-03-01",
    "currencyCode": "EUR",
    "grossAmount": "-12.50",
    "supplierCode": "ACME@north-1",
}


def test_golden_with_the_guard_on() -> None:
    rendered = render(nuntiq_invoice(CLOSE_CALLS))

    assert_golden("formula_guard_reject.tsv", rendered.body)
    assert b"\nINV=2024+0042\t2024-03-01\tEUR\t-12.50\tACME@north-1\t1\n" in rendered.body


def test_golden_with_the_guard_off_writes_values_as_sent() -> None:
    invoice = nuntiq_invoice({**NORMAL, "invoiceNumber": PAYLOAD, "grossAmount": "-1+1"})

    rendered = render(invoice, OFF)

    assert_golden("formula_guard_off.tsv", rendered.body)
    assert f"\n{PAYLOAD}\t2024-03-01\tEUR\t-1+1\tACME-001\t1\n".encode() in rendered.body


def test_the_guard_changes_nothing_in_a_file_it_lets_through() -> None:
    invoice = nuntiq_invoice(CLOSE_CALLS)

    assert render(invoice) == render(invoice, OFF)
    assert render(invoice) == render(invoice, replace(RULES, formula_guard="reject"))


# --- a real push ------------------------------------------------------------------------


def test_an_injected_invoice_fails_alone_and_the_rest_is_delivered(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    bad, credit_note, plain = sandbox.control.seed(3)
    db = sandbox.server.db_path
    set_invoice_fields(db, bad, invoiceNumber=PAYLOAD)
    set_invoice_fields(db, credit_note, grossAmount="-12.50")

    report = push(make_settings(asyncssh_sftp))

    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    assert rows[bad]["status"] == 97
    assert rows[bad]["failure_code"] == "RENDER_UNSAFE_VALUE"
    assert "column invoice_number starts with '='" in rows[bad]["failure_message"]
    assert rows[credit_note]["status"] == rows[plain]["status"] == 100
    assert report.exit_code == ExitCode.SOME_FAILED
    files = asyncssh_sftp.files()
    assert sorted(files) == sorted(
        [rows[credit_note]["external_id_1"], rows[plain]["external_id_1"]]
    )
    assert b"\t-12.50\t" in files[rows[credit_note]["external_id_1"]]
    assert not any(PAYLOAD.encode() in body for body in files.values())


def test_with_the_guard_off_the_value_is_delivered_as_sent(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    (token,) = sandbox.control.seed(1)
    set_invoice_fields(sandbox.server.db_path, token, invoiceNumber=PAYLOAD)

    report = push(make_settings(asyncssh_sftp, config={"formula_guard": "off"}))

    assert [o.result for o in report.outcomes] == [Result.DELIVERED]
    row = sandbox.control.invoice(token)
    day = datetime.now(UTC).strftime("%Y%m%d")
    # The name never carries the payload's punctuation; the file holds it unchanged.
    assert row["external_id_1"] == f"{asyncssh_sftp.outbox}/_cmd____C_calc__A0-{day}.csv"
    assert f"\n{PAYLOAD}\t".encode() in asyncssh_sftp.read(row["external_id_1"])


@pytest.mark.parametrize("guard", ["reject", "off"])
def test_the_sandbox_awkward_formula_invoice(
    guard: str, sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    # Its supplier column starts with + or = (a supplierCode "+SUP-0001", or the vendor
    # name "=Acme ..." standing in for it). Delivered before the guard existed; now it
    # fails alone unless the guard is off. The other awkward cases are unchanged.
    sandbox.control.seed(12, awkward=True)

    push(make_settings(asyncssh_sftp, config={"formula_guard": guard}), drain=True)

    rows = {r["seed_case"]: r for r in sandbox.control.invoices()}
    formula = rows["space_number_formula_values"]
    if guard == "reject":
        assert formula["status"] == 97
        assert formula["failure_code"] == "RENDER_UNSAFE_VALUE"
        assert "column supplier_code starts with" in formula["failure_message"]
    else:
        assert formula["status"] == 100
    failed = {case for case, row in rows.items() if row["status"] == 97}
    expected = {"slash_number_tab_value", "missing_number"}
    assert failed == (expected | {"space_number_formula_values"} if guard == "reject" else expected)
