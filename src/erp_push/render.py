"""Invoice → the exact file the ERP reads. Pure functions: no I/O, no clock, no settings.

The format is the seed's: UTF-8 with a BOM, tab-separated, LF line ends, one header row
and one data row::

    invoice_number<TAB>date<TAB>currency<TAB>total<TAB>supplier_code<TAB>line_count<LF>
    INV-1<TAB>2024-03-05<TAB>EUR<TAB>12.10<TAB>ACME<TAB>3<LF>

Values are written as Nuntiq sent them (trimmed); nothing is quoted or escaped. Anything
that would need escaping (tab, CR, LF, other control characters) fails the invoice with
RENDER_UNSAFE_VALUE instead, because the ERP's reader is plain TSV and would split or
shift columns. So does, unless ``formula_guard`` is off, a text value a spreadsheet would
run as a formula (see ``_guard_formula``). Same invoice, same rules and same ``today`` →
same bytes, so a re-delivered file can be recognised by its sha256.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from erp_push.errors import FailureCode, RenderError
from erp_push.models import Invoice, number_text
from erp_push.text import printable, shorten

HEADER = ("invoice_number", "date", "currency", "total", "supplier_code", "line_count")
BOM = "\ufeff"  # the ERP's finance users open these files in Excel, which needs it for UTF-8

# Whole file name, in UTF-8 bytes. Most file systems allow 255; erp-push may add a
# collision suffix ("-12") and, while uploading, ".<8 hex>.erp-push.tmp" (≈ 30 bytes), so
# 200 leaves room for both.
MAX_FILE_NAME_BYTES = 200

# Control and format characters (Cc, Cf), line/paragraph separators (Zl, Zp: U+2028,
# U+2029, which some readers treat as line ends) and lone surrogates (Cs: not encodable
# as UTF-8). Cf has no exceptions: bidi overrides can make a value read differently from
# what it is, and zero-width characters make two equal-looking codes differ.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})

# Letters that are drawn as nothing (Default_Ignorable, but not Cf): the combining
# grapheme joiner and the Hangul fillers. A number made of them is as good as missing.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u3164\uffa0")


@dataclass(frozen=True, kw_only=True)
class FieldKeys:
    """Template keys of the customer's invoice template; built by
    ``settings.Config.field_keys()``, which owns their defaults."""

    invoice_number: str
    invoice_date: str
    currency: str
    total: str
    supplier_code: str
    vendor_address_type: str  # the address whose address_name is the supplier fallback


FormulaGuard = Literal["reject", "off"]
FileNameCharset = Literal["unicode", "ascii"]


@dataclass(frozen=True, kw_only=True)
class RenderRules:
    """How values and the file name are written; built by ``settings.Config.render_rules()``,
    which owns their defaults."""

    formula_guard: FormulaGuard  # reject: a value a spreadsheet would run fails the invoice
    file_name_charset: FileNameCharset  # unicode: letters and digits of any script kept


@dataclass(frozen=True)
class RenderedFile:
    file_name: str  # "<safe number>-<YYYYMMDD>.csv"
    body: bytes  # exact bytes to upload
    invoice_number: str  # as written in the file (trimmed)
    sha256: str  # hex digest of body
    # The name the other file_name_charset gives, where it differs: a run before the
    # setting changed (or before erp-push had it) may have published the file under it.
    other_name: str | None = None
    # The UTC day Nuntiq created the invoice (None: not known). No run can have published
    # a file for it before then, so publish looks back no further than that.
    created_on: date | None = None

    # What publish streams (publish.Content): a CSV is one small piece.
    @property
    def size(self) -> int:
        return len(self.body)

    def chunks(self, size: int) -> Iterator[bytes]:
        for start in range(0, len(self.body), size):
            yield self.body[start : start + size]


def render_invoice(
    invoice: Invoice, *, keys: FieldKeys, rules: RenderRules, today: date
) -> RenderedFile:
    """Render one invoice. ``today`` is the UTC date of the push (it is in the file name).

    Raises RenderError (RENDER_MISSING_FIELD, RENDER_UNSAFE_VALUE, RENDER_INVALID_VALUE);
    it concerns this invoice only.
    """
    number = _cell(invoice.field(keys.invoice_number), keys.invoice_number)
    if _blank(number):
        # A no-break space alone would be delivered as "_-20261130.csv": nothing the ERP
        # could match to an invoice. What cannot be seen counts as missing.
        shown = f" (only {_code_points(number)})" if number else ""
        raise RenderError(
            f"the invoice has no invoice number{shown} (template field {keys.invoice_number!r})",
            failure_code=FailureCode.RENDER_MISSING_FIELD,
        )
    row = {
        "invoice_number": number,
        "date": _cell(invoice.field(keys.invoice_date), keys.invoice_date),
        "currency": _cell(invoice.field(keys.currency), keys.currency),
        "total": _cell(invoice.field(keys.total), keys.total),
        "supplier_code": _supplier_code(invoice, keys),
        "line_count": str(invoice.line_count),
    }
    for column, value in row.items():
        _reject_unsafe(value, column)
    if rules.formula_guard == "reject":
        for column, value in row.items():
            _guard_formula(value, column)
    body = _tsv_bytes([list(HEADER), [row[column] for column in HEADER]])
    name = file_name_for(number, today, charset=rules.file_name_charset)
    other: FileNameCharset = "ascii" if rules.file_name_charset == "unicode" else "unicode"
    other_name = file_name_for(number, today, charset=other)
    return RenderedFile(
        file_name=name,
        body=body,
        invoice_number=number,
        sha256=hashlib.sha256(body).hexdigest(),
        other_name=None if other_name == name else other_name,
        created_on=_utc_day(invoice.created_at),
    )


def _utc_day(moment: datetime | None) -> date | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # Nuntiq's times are UTC
        return moment.date()
    return moment.astimezone(UTC).date()


# --- values ---------------------------------------------------------------------------


def _blank(text: str) -> bool:
    """Nothing a reader could see: empty, or only whitespace (any Unicode space, e.g. a
    no-break space), control and format characters (e.g. a zero-width space, which
    ``str.isspace`` does not cover) and the few letters that render as nothing."""
    return all(
        char.isspace() or char in _INVISIBLE or unicodedata.category(char) in ("Cc", "Cf")
        for char in text
    )


def _code_points(text: str, limit: int = 5) -> str:
    shown = " ".join(f"U+{ord(char):04X}" for char in text[:limit])
    return shown + (" …" if len(text) > limit else "")


def _supplier_code(invoice: Invoice, keys: FieldKeys) -> str:
    code = _cell(invoice.field(keys.supplier_code), keys.supplier_code)
    if not _blank(code):
        return code
    vendor = invoice.address(keys.vendor_address_type)
    if vendor is None:
        return ""
    name = _cell(vendor.address_name, f"{keys.vendor_address_type} address_name")
    return "" if _blank(name) else name


def _cell(value: Any, field: str) -> str:
    """One value as the exact text to write; None → empty cell.

    Money may arrive as a number or a string: numbers are written as ``number_text``
    writes them, strings as given. Dates (already parsed) become YYYY-MM-DD;
    date strings are written as Nuntiq sent them.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        # Only spaces: a tab or line break at either end must fail, not vanish silently.
        return value.strip(" ")
    if isinstance(value, bool):  # before int: bool is an int subclass
        raise _invalid(field, "is true/false, not a value the ERP can read")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        return _number_text(value, field)
    if isinstance(value, datetime):  # before date: datetime is a date subclass
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    raise _invalid(field, f"is a {type(value).__name__}, not a single value")


def _number_text(value: float | Decimal, field: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(field, "is not a finite number")
    if isinstance(value, Decimal) and not value.is_finite():
        raise _invalid(field, "is not a finite number")
    return number_text(value)


def _invalid(field: str, why: str) -> RenderError:
    return RenderError(f"field {field!r} {why}", failure_code=FailureCode.RENDER_INVALID_VALUE)


def _reject_unsafe(value: str, column: str) -> None:
    # Values are never quoted, because quoting would change what the ERP reads. So a
    # character that ends a cell or a line must fail the invoice, never be written.
    for position, char in enumerate(value, start=1):
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            raise RenderError(
                f"column {column} contains the control character U+{ord(char):04X} at "
                f"position {position}; the ERP's tab-separated reader would misread it",
                failure_code=FailureCode.RENDER_UNSAFE_VALUE,
            )


# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google
# Sheets (OWASP "CSV injection"): '=cmd|' /C calc'!A0' starts a program, '@SUM(...)' and
# '+HYPERLINK(...)' send data away. Tab and CR are refused anywhere in a value already
# (_reject_unsafe); they are listed so that the rule stands on its own.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# Columns that hold numbers: a value that is a number may start with a sign (the total
# -12.50 is a credit note); anything else in them is held to the text rule.
NUMERIC_COLUMNS = frozenset({"total", "line_count"})
# A number as invoices write it: a sign, ASCII digits, and . , ' or spaces as decimal and
# grouping marks ("-1.234,50", "+1'234.50", "-12 345"). Nothing a spreadsheet could run.
_NUMBER = re.compile(r"[+-]?[.,]?[0-9](?:[0-9.,' \u00a0\u202f]*[0-9])?")
# How much of a refused value its failure message shows: enough to find it, never a
# whole supplier-controlled payload.
_SHOWN_CHARS = 32


def _guard_formula(value: str, column: str) -> None:
    """Refuse a value a spreadsheet would run. Values are refused, not altered: a "'"
    prefix or quotes would change what the ERP imports."""
    if not value.startswith(FORMULA_TRIGGERS):
        return
    if column in NUMERIC_COLUMNS and _NUMBER.fullmatch(value):
        return
    kind = "is not a number and starts with" if column in NUMERIC_COLUMNS else "starts with"
    raise RenderError(
        f"column {column} {kind} {printable(repr(value[0]))}, which a spreadsheet would run "
        f"as a formula: {printable(shorten(value, _SHOWN_CHARS))} "
        "(refused by config.formula_guard)",
        failure_code=FailureCode.RENDER_UNSAFE_VALUE,
    )


def _tsv_bytes(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    buffer.write(BOM)
    # QUOTE_NONE with no quote character: a '"' is an ordinary character, and since every
    # tab and line break was rejected above, nothing needs escaping (csv raises if it did).
    writer = csv.writer(
        buffer, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, quotechar=None
    )
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


# --- file name ------------------------------------------------------------------------

_HASH_HEX = 8


def file_name_for(invoice_number: str, today: date, *, charset: FileNameCharset) -> str:
    """``<safe number>-<YYYYMMDD>.csv``, at most MAX_FILE_NAME_BYTES bytes of UTF-8.

    ``unicode`` (the seed's rule, so 'Größe-7' stays readable): the number is
    NFC-normalised, so é sent precomposed or as e + ◌́ gives one name, and a later run
    (or another machine) looks up exactly the name an earlier one wrote. Letters and
    digits of any script (``str.isalnum``) are kept with the combining marks that follow
    them, as are '-' and '_'; everything else becomes '_'. So '../etc/passwd' is
    '___etc_passwd' and can never leave the outbox, and no name holds a separator, a
    control or format character, or a letter that is drawn as nothing.

    ``ascii``, for servers that store names in a code page and mangle the rest: only
    ASCII letters and digits, '-' and '_' are kept. The number is not normalised, so
    these are exactly the names erp-push gave before it had the setting. Either way the
    number itself is in the file, unchanged.

    A number too long for the bound is cut between characters (never inside one, nor
    between a letter and its accents) and gets '_' + 8 hex of its sha256, so two long
    numbers sharing a prefix still get different names.
    """
    suffix = f"-{today:%Y%m%d}.csv"
    if charset == "unicode":
        invoice_number = unicodedata.normalize("NFC", invoice_number)
    pieces = _name_pieces(invoice_number, charset)
    room = MAX_FILE_NAME_BYTES - len(suffix)  # the suffix is ASCII: characters == bytes
    if sum(len(piece.encode()) for piece in pieces) <= room:
        return "".join(pieces) + suffix
    digest = hashlib.sha256(invoice_number.encode("utf-8", "surrogatepass")).hexdigest()
    budget = room - 1 - _HASH_HEX
    kept: list[str] = []
    for piece in pieces:
        budget -= len(piece.encode())
        if budget < 0:
            break
        kept.append(piece)
    return "".join(kept) + "_" + digest[:_HASH_HEX] + suffix


def _name_pieces(number: str, charset: FileNameCharset) -> list[str]:
    """The name's characters, each with the combining marks it carries ("e" + U+0301 is
    one piece): a cut for the length bound falls between pieces."""
    pieces: list[str] = []
    kept_last = False  # whether the last piece is a kept character (marks may follow)
    for char in number:
        if charset == "ascii":
            kept_last = char.isascii() and (char.isalnum() or char in "-_")
            pieces.append(char if kept_last else "_")
        elif unicodedata.category(char).startswith("M"):
            # A mark belongs to the letter before it; after anything replaced it would
            # sit on the '_' (or on the '-' of the date), so it is replaced too.
            if kept_last and pieces[-1] not in ("-", "_"):
                pieces[-1] += char
            else:
                pieces.append("_")
                kept_last = False
        else:
            kept_last = (char.isalnum() and char not in _INVISIBLE) or char in "-_"
            pieces.append(char if kept_last else "_")
    return pieces
