"""Typed payloads exchanged with Nuntiq: what it sends (``Lease``, ``Invoice``, ...) and
what erp-push reports back (``IntegrationResult``).

Tolerant where Nuntiq may grow (unknown fields are kept but ignored, unknown status codes
such as 95/96/98 are accepted), strict where erp-push depends on a value (tokens, lease
fields, the status number). Money may arrive as a number or a string; it is kept as the
exact text Nuntiq sent (``MoneyText``) so the file shows what the platform shows.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def number_text(value: int | float | Decimal) -> str:
    """A number as the text Nuntiq meant: no float noise, no exponent.

    repr() of a float is the shortest text that round-trips (12.1 → "12.1", not
    12.0999…); format "f" avoids exponents (1e+20 → "100000000000000000000").
    """
    exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return format(exact, "f")


def _money_as_text(value: Any) -> str | None:
    """Numbers and numeric strings both become text, without float noise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a boolean is not an amount")
    if isinstance(value, int | float | Decimal):
        return number_text(value)
    return str(value)


MoneyText = Annotated[str | None, BeforeValidator(_money_as_text)]


class Model(BaseModel):
    """Base for every payload: keep unknown fields (forward compatible), never fail on them."""

    # Schemas are built at import (no defer_build): the first validation happens in the
    # pipeline's worker threads, and a deferred build racing there is only safe from
    # pydantic 2.14 on (its rebuild lock).
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


# --- claim ----------------------------------------------------------------------------


class Lease(Model):
    invoice_token: str
    lease_token: str
    lease_expires_at: datetime


class ClaimResponse(Model):
    leases: list[Lease]


# --- invoice --------------------------------------------------------------------------


class StatusInfo(Model):
    code: int
    key: str | None = None
    label: str | None = None
    description: str | None = None


class InvoiceField(Model):
    """A template-driven header or line field: ``key`` is the stable machine name."""

    key: str
    label: str | None = None
    value: Any = None


class Line(Model):
    id: int | None = None
    invoice_id: int | None = None
    invoice_line_number: int | str | None = None
    fields: list[InvoiceField] = Field(default_factory=list)


class Address(Model):
    address_type: str | None = None
    address_name: str | None = None
    street: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None


class Tax(Model):
    tax_name: str | None = None
    tax_rate: MoneyText = None
    tax_base_amount: MoneyText = None
    tax_amount: MoneyText = None


class Attachment(Model):
    attachment_token: str
    file_name: str
    content_type: str
    type: str  # INVOICE_IMAGE | EMAIL_ATTACHMENT | EMAIL (kept open: more may come)
    parent_token: str | None = None


class Invoice(Model):
    id: int
    invoice_token: str
    email_token: str | None = None
    status: int  # any code is accepted; 95/96/98 exist with undocumented meaning
    status_info: StatusInfo | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    fields: list[InvoiceField] = Field(default_factory=list)
    lines: list[Line] = Field(default_factory=list)
    addresses: list[Address] = Field(default_factory=list)
    taxes: list[Tax] = Field(default_factory=list)
    charges: list[dict[str, Any]] = Field(default_factory=list)
    discounts: list[dict[str, Any]] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)

    # Accessors the renderer needs -----------------------------------------------------

    def field(self, key: str) -> Any:
        """The value of header field ``key`` (template key, exact match), or None."""
        for f in self.fields:
            if f.key == key:
                return f.value
        return None

    @property
    def line_count(self) -> int:
        return len(self.lines)

    def address(self, address_type: str) -> Address | None:
        """The first address of ``address_type`` (case-insensitive), e.g. ``vendor``."""
        wanted = address_type.casefold()
        for a in self.addresses:
            if (a.address_type or "").casefold() == wanted:
                return a
        return None


class Email(Model):
    email_token: str | None = None
    eml_from: str | None = None
    eml_to: str | None = None
    eml_replyto: str | None = None
    eml_subject: str | None = None
    eml_body: str | None = None
    eml_received: datetime | None = None


class InvoiceDetail(Model):
    email: Email | None = None
    invoice: Invoice


# --- acknowledge / integration result -------------------------------------------------


class AcknowledgeResponse(Model):
    ok: bool
    previous_status: str
    new_status: str
    invoice_id: int
    status_changed: bool
    idempotent: bool | None = None


# external_message_1 of a delivered invoice, beside its path in external_id_1.
DELIVERED_MESSAGE = "SFTP_DELIVERED"


class IntegrationResult(Model):
    """What we report for one invoice. Build with ``delivered()`` or ``failed()``."""

    success: bool
    external_ids: tuple[str | None, str | None, str | None] = (None, None, None)
    external_messages: tuple[str | None, str | None, str | None] = (None, None, None)
    failure_code: str | None = None
    failure_message: str | None = None

    @classmethod
    def delivered(cls, remote_path: str, message: str = DELIVERED_MESSAGE) -> IntegrationResult:
        return cls(
            success=True,
            external_ids=(remote_path, None, None),
            external_messages=(message, None, None),
        )

    @classmethod
    def failed(cls, failure_code: str, failure_message: str) -> IntegrationResult:
        return cls(success=False, failure_code=failure_code, failure_message=failure_message)


class IntegrationResultResponse(Model):
    ok: bool
    previous_status: str
    new_status: str
    invoice_token: str
    status_changed: bool
    previous_status_code: int | None = None
    new_status_code: int | None = None
    previous_status_info: StatusInfo | None = None
    new_status_info: StatusInfo | None = None


# --- delta streams --------------------------------------------------------------------


class DeltaStreamState(Model):
    connector_name: str | None = None
    stream_name: str | None = None
    cursor_type: str | None = None
    committed_cursor_value: str | None = None
    committed_at_utc: datetime | None = None
    status: str | None = None
    started_at_utc: datetime | None = None
    completed_at_utc: datetime | None = None
    records_processed: int | None = None
    error_summary: str | None = None
    metadata: dict[str, Any] | None = None
    updated_at_utc: datetime | None = None
    updated_by: str | None = None
