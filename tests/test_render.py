"""render.py: exact bytes against golden files, file names, and per-invoice failures.

Golden files are compared byte for byte (BOM, tabs, LF). To regenerate after a deliberate
format change: ``UPDATE_GOLDEN=1 pytest tests/test_render.py`` — then read the diff.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from erp_push.errors import FailureCode, RenderError
from erp_push.models import Invoice, InvoiceField
from erp_push.render import (
    MAX_FILE_NAME_BYTES,
    FileNameCharset,
    RenderedFile,
    RenderRules,
    file_name_for,
    render_invoice,
)
from erp_push.settings import Config

GOLDEN = Path(__file__).parent / "golden"
TODAY = date(2024, 3, 5)
KEYS = Config().field_keys()  # the default template keys
RULES = Config().render_rules()  # the default rules: formula guard on, Unicode names
OFF = replace(RULES, formula_guard="off")
ASCII = replace(RULES, file_name_charset="ascii")


def nuntiq_invoice(
    fields: dict[str, Any],
    *,
    addresses: list[dict[str, Any]] | None = None,
    lines: int = 1,
) -> Invoice:
    """An Invoice built from a dict shaped like Nuntiq's GET /v1/invoices/{token} body."""
    payload = {
        "id": 4711,
        "invoice_token": "inv-tok-4711",
        "email_token": None,
        "status": 92,
        "status_info": {"code": 92, "key": "Claimed", "label": "Claimed"},
        "created_at": "2024-03-04T09:15:00Z",
        "fields": [{"key": k, "label": k, "value": v} for k, v in fields.items()],
        "lines": [
            {
                "id": n,
                "invoice_id": 4711,
                "invoice_line_number": n,
                "fields": [{"key": "description", "value": f"item {n}"}],
            }
            for n in range(1, lines + 1)
        ],
        "addresses": addresses if addresses is not None else [],
        "taxes": [{"tax_name": "VAT", "tax_rate": 19, "tax_amount": "197.10"}],
        "attachments": [],
    }
    return Invoice.model_validate(payload)


def render(invoice: Invoice, rules: RenderRules = RULES) -> RenderedFile:
    return render_invoice(invoice, keys=KEYS, rules=rules, today=TODAY)


def assert_golden(name: str, body: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_bytes(body)
    assert body == path.read_bytes(), f"{name} differs from the golden file"


# --- golden files ---------------------------------------------------------------------

NORMAL = {
    "invoiceNumber": "INV-2024-0042",
    "invoiceDate": "2024-03-01",
    "currencyCode": "EUR",
    "grossAmount": "1234.50",
    "supplierCode": "ACME-001",
}


def test_normal_invoice() -> None:
    rendered = render(nuntiq_invoice(NORMAL, lines=3))

    assert_golden("normal.tsv", rendered.body)
    assert rendered.file_name == "INV-2024-0042-20240305.csv"
    assert rendered.invoice_number == "INV-2024-0042"


def test_format_is_bom_tab_separated_lf_with_final_newline() -> None:
    # Pins the format independently of the golden files.
    body = render(nuntiq_invoice(NORMAL, lines=3)).body

    assert body == (
        b"\xef\xbb\xbf"
        b"invoice_number\tdate\tcurrency\ttotal\tsupplier_code\tline_count\n"
        b"INV-2024-0042\t2024-03-01\tEUR\t1234.50\tACME-001\t3\n"
    )


def test_supplier_code_falls_back_to_vendor_address_name() -> None:
    fields = {k: v for k, v in NORMAL.items() if k != "supplierCode"}
    addresses = [
        {"address_type": "bill_to", "address_name": "Our Company AG"},
        {"address_type": "Vendor", "address_name": "Acme Supplies GmbH", "city": "Köln"},
    ]

    rendered = render(nuntiq_invoice(fields, addresses=addresses))

    assert_golden("supplier_fallback.tsv", rendered.body)
    assert b"\tAcme Supplies GmbH\t" in rendered.body


def test_supplier_code_field_wins_over_vendor_address() -> None:
    addresses = [{"address_type": "vendor", "address_name": "Acme Supplies GmbH"}]

    body = render(nuntiq_invoice(NORMAL, addresses=addresses)).body

    assert b"\tACME-001\t" in body
    assert b"Acme Supplies" not in body


def test_vendor_address_type_comes_from_the_keys() -> None:
    fields = {k: v for k, v in NORMAL.items() if k != "supplierCode"}
    addresses = [{"address_type": "remit_to", "address_name": "Remit Ltd"}]
    keys = replace(KEYS, vendor_address_type="remit_to")

    body = render_invoice(
        nuntiq_invoice(fields, addresses=addresses), keys=keys, rules=RULES, today=TODAY
    )

    assert b"\tRemit Ltd\t" in body.body


def test_no_supplier_at_all_is_an_empty_cell() -> None:
    fields = {k: v for k, v in NORMAL.items() if k != "supplierCode"}

    body = render(nuntiq_invoice(fields)).body

    assert body.endswith(b"\t1234.50\t\t1\n")


def test_money_as_number() -> None:
    # 12.1 as a JSON number must not become 12.0999999...
    invoice = nuntiq_invoice({**NORMAL, "grossAmount": 12.1})

    assert_golden("money_number.tsv", render(invoice).body)


def test_money_as_string_is_written_as_given() -> None:
    invoice = nuntiq_invoice({**NORMAL, "grossAmount": " 12.10 "})

    assert_golden("money_string.tsv", render(invoice).body)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (100, "100"),
        (0.1 + 0.2, "0.30000000000000004"),  # the float Nuntiq sent, exactly
        (1e20, "100000000000000000000"),
        (-12.5, "-12.5"),
        (Decimal("1234.500"), "1234.500"),
        ("1.234,50", "1.234,50"),
    ],
)
def test_money_text(value: Any, text: str) -> None:
    invoice = nuntiq_invoice({**NORMAL, "grossAmount": value})

    assert f"\tEUR\t{text}\tACME-001\t".encode() in render(invoice).body


def test_non_ascii_values_are_utf8_and_the_name_keeps_letters() -> None:
    invoice = nuntiq_invoice(
        {
            "invoiceNumber": "RÉF-2024/ü7",
            "invoiceDate": "2024-03-01",
            "currencyCode": "€",
            "grossAmount": "99,95",
            "supplierCode": "Müller & Söhne — Zürich 東京",
        }
    )

    rendered = render(invoice)

    assert_golden("non_ascii.tsv", rendered.body)
    assert rendered.file_name == "RÉF-2024_ü7-20240305.csv"
    assert rendered.invoice_number == "RÉF-2024/ü7"
    in_ascii = render(invoice, ASCII)
    assert in_ascii.body == rendered.body
    assert in_ascii.file_name == "R_F-2024__7-20240305.csv"  # the names of before the setting


def test_300_lines() -> None:
    rendered = render(nuntiq_invoice(NORMAL, lines=300))

    assert_golden("lines_300.tsv", rendered.body)
    assert rendered.body.endswith(b"\t300\n")


def test_values_starting_with_formula_characters_are_preserved_with_the_guard_off() -> None:
    invoice = nuntiq_invoice(
        {
            "invoiceNumber": "=INV+1",
            "invoiceDate": "@2024-03-01",
            "currencyCode": "+EUR",
            "grossAmount": "-12.50",
            "supplierCode": '=HYPERLINK("x")',
        }
    )

    rendered = render(invoice, OFF)

    assert_golden("formula_prefixes.tsv", rendered.body)
    assert b'=INV+1\t@2024-03-01\t+EUR\t-12.50\t=HYPERLINK("x")\t1\n' in rendered.body


def test_date_objects_are_written_as_iso_dates() -> None:
    invoice = nuntiq_invoice(NORMAL)
    fields = [
        InvoiceField(key=f.key, value=datetime(2024, 3, 1, 23, 30, tzinfo=UTC))
        if f.key == "invoiceDate"
        else f
        for f in invoice.fields
    ]

    body = render(invoice.model_copy(update={"fields": fields})).body

    assert b"\t2024-03-01\t" in body


def test_date_strings_are_written_as_given() -> None:
    invoice = nuntiq_invoice({**NORMAL, "invoiceDate": "01.03.2024"})

    assert b"\t01.03.2024\t" in render(invoice).body


def test_missing_optional_values_are_empty_cells() -> None:
    invoice = nuntiq_invoice({"invoiceNumber": "INV-1", "currencyCode": None})

    assert render(invoice).body.endswith(b"\nINV-1\t\t\t\t\t1\n")


def test_template_keys_come_from_the_keys() -> None:
    keys = replace(KEYS, invoice_number="docNo", total="amountGross")
    invoice = nuntiq_invoice({"docNo": "D-9", "amountGross": 5})

    rendered = render_invoice(invoice, keys=keys, rules=RULES, today=TODAY)

    assert rendered.body.endswith(b"\nD-9\t\t\t5\t\t1\n")
    assert rendered.file_name == "D-9-20240305.csv"


def test_rendering_is_deterministic() -> None:
    first = render(nuntiq_invoice(NORMAL, lines=3))
    second = render(nuntiq_invoice(NORMAL, lines=3))

    assert first == second
    assert first.sha256 == hashlib.sha256(first.body).hexdigest()


def test_another_day_changes_only_the_name() -> None:
    invoice = nuntiq_invoice(NORMAL)

    today = render_invoice(invoice, keys=KEYS, rules=RULES, today=TODAY)
    tomorrow = render_invoice(invoice, keys=KEYS, rules=RULES, today=date(2024, 3, 6))

    assert today.body == tomorrow.body
    assert tomorrow.file_name == "INV-2024-0042-20240306.csv"


# --- file names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "name"),
    [
        ("../etc/passwd", "___etc_passwd-20240305.csv"),
        ("..", "__-20240305.csv"),
        ("INV 2024.01/7", "INV_2024_01_7-20240305.csv"),
        ("C:\\x\\y", "C__x_y-20240305.csv"),
        ("///", "___-20240305.csv"),
        ("a*b?c<d>e|f:g", "a_b_c_d_e_f_g-20240305.csv"),
        ("under_score-dash", "under_score-dash-20240305.csv"),
    ],
)
@pytest.mark.parametrize("charset", ["unicode", "ascii"])
def test_file_name_is_sanitised(number: str, name: str, charset: FileNameCharset) -> None:
    assert file_name_for(number, TODAY, charset=charset) == name


def test_path_traversal_never_leaves_the_folder() -> None:
    rendered = render(nuntiq_invoice({**NORMAL, "invoiceNumber": "../../etc/passwd"}))

    assert "/" not in rendered.file_name
    assert "\\" not in rendered.file_name
    assert not rendered.file_name.startswith(".")
    # The number in the file is untouched.
    assert b"\n../../etc/passwd\t" in rendered.body


def test_long_number_is_cut_with_a_hash_and_stays_within_the_bound() -> None:
    number = "INV-" + "7" * 400

    name = file_name_for(number, TODAY, charset="unicode")

    assert len(name.encode("utf-8")) == MAX_FILE_NAME_BYTES
    stem = name.removesuffix("-20240305.csv")
    assert stem.startswith("INV-777")
    assert stem[-9] == "_" and all(c in "0123456789abcdef" for c in stem[-8:])
    # Even with the collision and tmp suffixes erp-push may add, it fits 255 bytes.
    assert len((name + "-12.0123abcd.erp-push.tmp").encode()) <= 255


def test_long_numbers_sharing_a_prefix_get_different_names() -> None:
    prefix = "X" * 300

    first = file_name_for(prefix + "-A", TODAY, charset="unicode")
    second = file_name_for(prefix + "-B", TODAY, charset="unicode")

    assert first != second
    assert len(first) == len(second) == MAX_FILE_NAME_BYTES


def test_long_non_ascii_number_is_bounded_in_bytes_in_ascii() -> None:
    name = file_name_for("Ü" * 300, TODAY, charset="ascii")

    assert len(name.encode("utf-8")) <= MAX_FILE_NAME_BYTES
    assert name.isascii()


def test_number_at_the_bound_is_not_hashed() -> None:
    number = "N" * (MAX_FILE_NAME_BYTES - len("-20240305.csv"))

    assert file_name_for(number, TODAY, charset="unicode") == number + "-20240305.csv"


def test_a_long_invoice_renders_with_a_bounded_name() -> None:
    rendered = render(nuntiq_invoice({**NORMAL, "invoiceNumber": "9" * 1000}))

    assert len(rendered.file_name.encode()) <= MAX_FILE_NAME_BYTES
    assert rendered.invoice_number == "9" * 1000


# --- failures -------------------------------------------------------------------------


@pytest.mark.parametrize("number", [None, "", "   "])
def test_missing_invoice_number_fails(number: str | None) -> None:
    invoice = nuntiq_invoice({**NORMAL, "invoiceNumber": number})

    with pytest.raises(RenderError) as caught:
        render(invoice)

    assert caught.value.failure_code == FailureCode.RENDER_MISSING_FIELD
    assert "invoiceNumber" in caught.value.message


BLANK_NUMBERS = {
    "no-break space": "\u00a0",
    "ideographic space": "\u3000",
    "mixed spaces": " \u00a0\u2003\u202f ",
    "zero-width space": "\u200b",  # not str.isspace()
    "zero-width joiners and word joiner": "\u200c\u200d\u2060",
    "byte order mark": "\ufeff",
    "hangul filler": "\u3164",
    "tab": "\t",
}


@pytest.mark.parametrize("number", list(BLANK_NUMBERS.values()), ids=list(BLANK_NUMBERS))
def test_invoice_number_that_cannot_be_seen_is_missing(number: str) -> None:
    """A no-break space alone was delivered as '_-20240305.csv'."""
    with pytest.raises(RenderError) as caught:
        render(nuntiq_invoice({**NORMAL, "invoiceNumber": number}))

    assert caught.value.failure_code == FailureCode.RENDER_MISSING_FIELD
    assert "invoiceNumber" in caught.value.message
    assert f"U+{ord(number.strip(' ')[0]):04X}" in caught.value.message


def test_invisible_characters_around_a_visible_number_are_kept() -> None:
    rendered = render(nuntiq_invoice({**NORMAL, "invoiceNumber": "\u00a0INV-7"}))
    assert rendered.invoice_number == "\u00a0INV-7"
    assert rendered.file_name == "_INV-7-20240305.csv"


@pytest.mark.parametrize("code", ["\u00a0", "\u200b"], ids=["no-break space", "zero-width"])
def test_supplier_code_that_cannot_be_seen_falls_back_to_the_vendor(code: str) -> None:
    addresses = [{"address_type": "vendor", "address_name": "Acme Supplies GmbH"}]
    body = render(nuntiq_invoice({**NORMAL, "supplierCode": code}, addresses=addresses)).body
    assert b"\tAcme Supplies GmbH\t" in body


def test_absent_invoice_number_field_fails() -> None:
    fields = {k: v for k, v in NORMAL.items() if k != "invoiceNumber"}

    with pytest.raises(RenderError) as caught:
        render(nuntiq_invoice(fields))

    assert caught.value.failure_code == FailureCode.RENDER_MISSING_FIELD


UNSAFE_CHARACTERS = ["\t", "\n", "\r", "\x00", "\x1b", "\u2028", "\u2029", "\u202e", "\x85"]


@pytest.mark.parametrize("char", UNSAFE_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(
    ("key", "column"),
    [
        ("invoiceNumber", "invoice_number"),
        ("invoiceDate", "date"),
        ("currencyCode", "currency"),
        ("grossAmount", "total"),
        ("supplierCode", "supplier_code"),
    ],
)
def test_unsafe_character_in_any_field_fails(char: str, key: str, column: str) -> None:
    secret_looking_tail = "z" * 500
    invoice = nuntiq_invoice({**NORMAL, key: f"A{char}B{secret_looking_tail}"})

    with pytest.raises(RenderError) as caught:
        render(invoice)

    assert caught.value.failure_code == FailureCode.RENDER_UNSAFE_VALUE
    assert column in caught.value.message
    assert f"U+{ord(char):04X}" in caught.value.message
    assert secret_looking_tail not in caught.value.message


@pytest.mark.parametrize("char", ["\t", "\n"])
def test_unsafe_character_at_the_end_is_not_trimmed_away(char: str) -> None:
    invoice = nuntiq_invoice({**NORMAL, "invoiceNumber": f"INV-1{char}"})

    with pytest.raises(RenderError) as caught:
        render(invoice)

    assert caught.value.failure_code == FailureCode.RENDER_UNSAFE_VALUE


def test_unsafe_character_in_vendor_address_name_fails() -> None:
    fields = {k: v for k, v in NORMAL.items() if k != "supplierCode"}
    addresses = [{"address_type": "vendor", "address_name": "Acme\tGmbH"}]

    with pytest.raises(RenderError) as caught:
        render(nuntiq_invoice(fields, addresses=addresses))

    assert caught.value.failure_code == FailureCode.RENDER_UNSAFE_VALUE
    assert "supplier_code" in caught.value.message


@pytest.mark.parametrize("value", [True, {"amount": 1}, [1, 2], float("nan"), float("inf")])
def test_values_that_are_not_plain_values_fail(value: Any) -> None:
    invoice = nuntiq_invoice({**NORMAL, "grossAmount": value})

    with pytest.raises(RenderError) as caught:
        render(invoice)

    assert caught.value.failure_code == FailureCode.RENDER_INVALID_VALUE
    assert "grossAmount" in caught.value.message


def test_double_quotes_are_written_literally() -> None:
    invoice = nuntiq_invoice({**NORMAL, "supplierCode": 'ACME "North"'})

    assert b'\tACME "North"\t' in render(invoice).body
