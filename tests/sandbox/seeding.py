"""Invoice generator for the sandbox's ``POST /_sandbox/seed`` control.

Content comes from ``random.Random`` seeded per call, so a given ``seed`` produces the
same invoices every time (after a reset). Invoice numbers and tokens are derived from the
invoice's position in the database (``first_id + i``), which keeps them unique across
repeated seed calls while staying reproducible from an empty database.

Normal invoices are deliberately boring: they must render into a file without any
special handling. ``awkward=True`` instead cycles through ``AWKWARD_CASES`` (12 cases, so
any batch of 12 or more contains each one at least once) — the inputs that break naive
renderers, file-name builders and CSV writers.
"""

from __future__ import annotations

import random
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

# Tokens are uuid5 names in this namespace: stable per (seed, position), never random.
TOKEN_NAMESPACE = uuid.UUID("5b0c3f7e-6a7d-4c1e-9a57-2f0d8a6b1c42")

# Each awkward invoice exercises one case; the collision case takes two consecutive slots
# (the second repeats the first one's invoice number). Order matters: it is the cycle.
AWKWARD_CASES: tuple[str, ...] = (
    "slash_number_tab_value",  # "INV/2024/000007"; a tab in a line and in the vendor name
    "dotdot_number_newline_value",  # "../INV-000008.." and a newline inside a value
    "space_number_formula_values",  # "INV 000009 A" and values starting with = + - @
    "non_ascii_number",  # "Größe-ø-000010"
    "long_number",  # 200+ characters
    "missing_number",  # invoiceNumber present with a null value (omitted by default)
    "money_mixed",  # amounts as JSON numbers and as strings, in header, lines and taxes
    "no_vendor",  # neither a vendor address nor a supplierCode
    "many_lines",  # 300 lines
    "attachments",  # a PDF-ish and a PNG-ish attachment
    "collision_first",  # same invoice number as the next one
    "collision_second",
)

MANY_LINES = 300

VENDORS = (
    ("Acme Supplies GmbH", "Hauptstrasse 1", "Berlin", "10115", "DE"),
    ("Northwind Traders Ltd", "12 Harbour Road", "Leeds", "LS1 4AB", "GB"),
    ("Contoso Office BV", "Keizersgracht 100", "Amsterdam", "1015 AA", "NL"),
    ("Fabrikam Industrial Inc", "400 Main Street", "Springfield", "62701", "US"),
    ("Tailspin Paper AB", "Storgatan 5", "Uppsala", "753 20", "SE"),
)
ITEMS = (
    "Office chairs",
    "Printer paper A4",
    "Toner cartridge",
    "Desk lamp",
    "Network cable 5m",
    "Consulting hours",
    "Coffee beans 1kg",
    "Whiteboard markers",
)
CURRENCIES = ("EUR", "USD", "GBP", "SEK")
COMPANIES = ("ACME", "GLOBEX")  # ext_reference_1 values, for the claim filters

# The smallest valid PNG (1x1 transparent pixel), and a PDF-shaped blob large enough
# (~100 KB) that the attachment endpoint really streams it in several chunks.
PNG_BYTES = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def _pdf_bytes(n: int) -> bytes:
    body = b"".join(b"%% filler line %06d for streaming tests\n" % i for i in range(2500))
    return (
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
        + b"1 0 obj << /Type /Catalog >> endobj\n"
        + b"% sandbox invoice image "
        + str(n).encode()
        + b"\n"
        + body
        + b"%%EOF\n"
    )


# Generated attachments (``attachments_per_invoice``) cycle through Nuntiq's types.
ATTACHMENT_TYPES = ("INVOICE_IMAGE", "EMAIL_ATTACHMENT", "EMAIL")
_GENERATED_BLOCK = 64 * 1024


def attachment_content(attachment_token: str, size: int) -> Iterator[bytes]:
    """The deterministic bytes of a generated attachment, in blocks of 64 KiB.

    Never held whole: the server streams a 50 MB attachment without 50 MB of memory,
    and a test computes the same bytes (or their hash) to compare with what landed.
    Each block starts with its number, so blocks delivered out of order do not match.
    """
    base = random.Random(f"attachment:{attachment_token}").randbytes(_GENERATED_BLOCK)
    sent = 0
    block = 0
    while sent < size:
        data = (b"%016d" % block + base[16:])[: size - sent]
        yield data
        sent += len(data)
        block += 1


def _awkward_attachments(seed: int, invoice_id: int) -> list[dict[str, Any]]:
    """Names that must never reach the outbox as given: path separators, '..', control
    characters, a very long name, and the same name twice in one invoice."""
    names = (
        "../../etc/passwd.pdf",
        "sub/dir\\scan.png",
        "bell\x07and\r\nnewline.pdf",
        "..",
        "long-" + "y" * 300 + ".pdf",
        "scan-page-1.png",  # the same name as the PNG above
    )
    return [
        {
            "attachment_token": _token(f"attachment-awkward-{i}", seed, invoice_id),
            "file_name": name,
            "content_type": "image/png" if name.endswith(".png") else "application/pdf",
            "type": "EMAIL_ATTACHMENT",
            "parent_token": None,
            "data": f"awkward attachment {i} of invoice {invoice_id}\n".encode(),
        }
        for i, name in enumerate(names)
    ]


@dataclass
class SeedInvoice:
    """One generated invoice, ready to insert. ``doc`` is the JSON body of the detail."""

    invoice_token: str
    email_token: str | None
    invoice_number: str | None
    ext_references: tuple[str | None, ...]
    doc: dict[str, Any]
    email: dict[str, Any] | None
    attachments: list[dict[str, Any]] = field(default_factory=list)  # with "data": bytes
    case: str = "normal"


def _token(kind: str, seed: int, position: int) -> str:
    return str(uuid.uuid5(TOKEN_NAMESPACE, f"{kind}:{seed}:{position}"))


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01")))


def _field(key: str, label: str, value: Any) -> dict[str, Any]:
    return {"key": key, "label": label, "value": value}


def generate(
    count: int,
    *,
    seed: int,
    first_id: int,
    awkward: bool,
    attachments_per_invoice: int = 0,
    attachment_bytes: int = 2048,
) -> Iterator[SeedInvoice]:
    """``count`` invoices whose database ids will be ``first_id``, ``first_id + 1``, ...

    One at a time: a caller that turns each into a row right away never holds thousands of
    invoices as Python objects (memory, and the garbage collector's time over them).
    ``attachments_per_invoice`` generated attachments of ``attachment_bytes`` each are
    added to every invoice (their bytes come from ``attachment_content``, never stored);
    the awkward ``attachments`` case keeps its own besides.
    """
    # zlib.crc32 keeps the stream stable per (seed, first_id) without relying on hash().
    rng = random.Random(zlib.crc32(f"{seed}:{first_id}".encode()))
    previous: SeedInvoice | None = None
    for i in range(count):
        invoice_id = first_id + i
        case = AWKWARD_CASES[i % len(AWKWARD_CASES)] if awkward else "normal"
        previous = _one(rng, seed=seed, invoice_id=invoice_id, case=case, previous=previous)
        for k in range(attachments_per_invoice):
            generated = {
                "attachment_token": _token(f"attachment-generated-{k}", seed, invoice_id),
                "file_name": f"document-{invoice_id:06d}-{k + 1}.pdf",
                "content_type": "application/pdf",
                "type": ATTACHMENT_TYPES[k % len(ATTACHMENT_TYPES)],
                "parent_token": None,
                "size": attachment_bytes,  # no "data": generated as it is served
            }
            previous.attachments.append(generated)
            previous.doc["attachments"].append(
                {k: v for k, v in generated.items() if k not in ("data", "size")}
            )
        yield previous


def _one(
    rng: random.Random, *, seed: int, invoice_id: int, case: str, previous: SeedInvoice | None
) -> SeedInvoice:
    number: str | None = f"INV-{invoice_id:06d}"
    if case == "slash_number_tab_value":
        number = f"INV/2024/{invoice_id:06d}"
    elif case == "dotdot_number_newline_value":
        number = f"../INV-{invoice_id:06d}.."
    elif case == "space_number_formula_values":
        number = f"INV {invoice_id:06d} A"
    elif case == "non_ascii_number":
        number = f"Größe-ø-{invoice_id:06d}"
    elif case == "long_number":
        number = f"INV-{invoice_id:06d}-" + "X" * 210
    elif case == "missing_number":
        number = None
    elif case == "collision_second" and previous and previous.case == "collision_first":
        number = previous.invoice_number

    vendor = VENDORS[rng.randrange(len(VENDORS))]
    currency = CURRENCIES[rng.randrange(len(CURRENCIES))]
    invoice_date = date(2024, 1, 1) + timedelta(days=rng.randrange(365))
    # The tab case has no supplierCode, so the supplier column falls back to the vendor
    # name that carries the tab: a value the renderer must refuse (RENDER_UNSAFE_VALUE).
    has_supplier_code = rng.random() < 0.75 and case not in ("no_vendor", "slash_number_tab_value")
    supplier_code = f"SUP-{rng.randrange(1, 9999):04d}"
    company = COMPANIES[rng.randrange(len(COMPANIES))]

    n_lines = MANY_LINES if case == "many_lines" else rng.randint(1, 5)
    lines: list[dict[str, Any]] = []
    net_total = Decimal(0)
    for line_no in range(1, n_lines + 1):
        qty = rng.randint(1, 20)
        unit = Decimal(rng.randrange(100, 50000)) / 100
        net = unit * qty
        net_total += net
        description = ITEMS[rng.randrange(len(ITEMS))]
        unit_value: Any = _money(unit)
        net_value: Any = _money(net)
        if case == "money_mixed" and line_no % 2 == 1:
            unit_value, net_value = float(unit), float(net)  # numbers on odd lines
        if line_no == 1:
            if case == "slash_number_tab_value":
                description = "Office chairs\tblue"
            elif case == "dotdot_number_newline_value":
                description = "Office chairs\nsecond line"
        lines.append(
            {
                "id": invoice_id * 1000 + line_no,
                "invoice_id": invoice_id,
                "invoice_line_number": line_no,
                "fields": [
                    _field("lineNumber", "Line", line_no),
                    _field("description", "Description", description),
                    _field("quantity", "Quantity", qty),
                    _field("unitPrice", "Unit price", unit_value),
                    _field("netAmount", "Net amount", net_value),
                    _field("sku", "SKU", f"SKU-{rng.randrange(100000):05d}"),
                ],
            }
        )
    if case == "space_number_formula_values":
        # Each spreadsheet-formula trigger at the start of a value (CSV injection).
        starts = ("=SUM(A1:A9)", "+49 30 1234", "-5 pcs returned", "@vendor note")
        for line, text in zip(lines, starts * MANY_LINES, strict=False):
            line["fields"][1]["value"] = text
        extra = [_field("note", "Note", t) for t in starts]
    else:
        extra = []

    tax = (net_total * Decimal("0.20")).quantize(Decimal("0.01"))
    gross = net_total + tax
    gross_value: Any = _money(gross)
    tax_value: Any = _money(tax)
    if case == "money_mixed":
        gross_value, tax_value = float(gross), _money(tax)  # header number, tax string

    fields = [
        _field("invoiceNumber", "Invoice number", number),
        _field("invoiceDate", "Invoice date", invoice_date.isoformat()),
        _field("dueDate", "Due date", None),  # always null: shows up only with includeNull
        _field("currencyCode", "Currency", currency),
        _field(
            "netAmount",
            "Net amount",
            _money(net_total) if case != "money_mixed" else float(net_total),
        ),
        _field("taxAmount", "Tax amount", tax_value),
        _field("grossAmount", "Gross amount", gross_value),
        _field("poNumber", "PO number", None),
    ]
    if has_supplier_code:
        code = "+SUP-0001" if case == "space_number_formula_values" else supplier_code
        fields.append(_field("supplierCode", "Supplier code", code))
    fields.extend(extra)

    addresses: list[dict[str, Any]] = []
    if case != "no_vendor":
        name = vendor[0]
        if case == "slash_number_tab_value":
            name = vendor[0] + "\tDept. 7"
        elif case == "space_number_formula_values":
            name = "=" + vendor[0]
        addresses.append(
            {
                "address_type": "vendor",
                "address_name": name,
                "street": vendor[1],
                "city": vendor[2],
                "state": None,
                "postal_code": vendor[3],
                "country": vendor[4],
            }
        )
    addresses.append(
        {
            "address_type": "billto",
            "address_name": f"{company.title()} Corp",
            "street": "1 Buyer Way",
            "city": "Hamburg",
            "state": None,
            "postal_code": "20095",
            "country": "DE",
        }
    )
    taxes: list[dict[str, Any]] = [
        {
            "tax_name": "VAT",
            "tax_rate": 20 if case == "money_mixed" else "20.00",
            "tax_base_amount": float(net_total) if case == "money_mixed" else _money(net_total),
            "tax_amount": tax_value,
        }
    ]

    invoice_token = _token("invoice", seed, invoice_id)
    email_token = _token("email", seed, invoice_id) if rng.random() < 0.8 else None
    email = None
    if email_token is not None:
        email = {
            "email_token": email_token,
            "eml_from": "billing@" + vendor[0].split()[0].lower() + ".example",
            "eml_to": "ap@" + company.lower() + ".example",
            "eml_replyto": None,
            "eml_subject": f"Invoice {number or '(no number)'}",
            "eml_body": "Please find our invoice attached.",
            "eml_received": f"{invoice_date.isoformat()}T08:30:00Z",
        }

    attachments: list[dict[str, Any]] = []
    if case == "attachments":
        pdf_token = _token("attachment-pdf", seed, invoice_id)
        attachments = [
            {
                "attachment_token": pdf_token,
                "file_name": f"invoice {invoice_id:06d}.pdf",
                "content_type": "application/pdf",
                "type": "INVOICE_IMAGE",
                "parent_token": None,
                "data": _pdf_bytes(invoice_id),
            },
            {
                "attachment_token": _token("attachment-png", seed, invoice_id),
                "file_name": "scan-page-1.png",
                "content_type": "image/png",
                "type": "EMAIL_ATTACHMENT",
                "parent_token": pdf_token,
                "data": PNG_BYTES,
            },
            *_awkward_attachments(seed, invoice_id),
        ]

    doc = {
        "fields": fields,
        "lines": lines,
        "addresses": addresses,
        "taxes": taxes,
        "charges": [],
        "discounts": [],
        "attachments": [
            {k: v for k, v in a.items() if k not in ("data", "size")} for a in attachments
        ],
    }
    return SeedInvoice(
        invoice_token=invoice_token,
        email_token=email_token,
        invoice_number=number,
        ext_references=(company, None, None, None, None),
        doc=doc,
        email=email,
        attachments=attachments,
        case=case,
    )
