"""One function per CLI command: settings in, a result out. No printing here.

The CLI parses options, loads settings, calls one of these and shows the result (a
``report.CommandReport``, or the rendered file). Tests call them directly too; each takes
optional ready-made clients (seams) and builds real ones from settings only when none
are passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from erp_push.claim import NuntiqClient
from erp_push.errors import RenderError, SftpError, SftpOperationError
from erp_push.journal import Journal
from erp_push.pipeline import Pusher, PushPlan
from erp_push.render import FieldKeys, RenderedFile, render_invoice
from erp_push.report import (
    CleanupReport,
    DryRunReport,
    NotRemoved,
    Outcome,
    PreviewedFile,
    RunReport,
)
from erp_push.settings import Settings

if TYPE_CHECKING:
    # The SSH library is imported on first connect: a run with nothing to upload never
    # pays for it (see sftp_connector).
    from erp_push.transport import SftpOptions, SftpSession

log = logging.getLogger("erp_push.commands")

# Dry-run has to claim to look (the contract has no list endpoint); the shortest TTL
# Nuntiq allows keeps the invoices away from real pushes for as short a time as possible.
DRY_RUN_LEASE_TTL_SECONDS = 60


# --- builders: settings -> clients ----------------------------------------------------


def nuntiq_client(settings: Settings) -> NuntiqClient:
    cfg, secrets = settings.config, settings.secrets
    assert cfg.nuntiq_base_url is not None and secrets.nuntiq_api_key is not None
    return NuntiqClient(
        str(cfg.nuntiq_base_url),
        secrets.nuntiq_api_key,
        timeout=cfg.nuntiq_timeout_seconds,
        max_reply_bytes=cfg.max_invoice_bytes,
        # one keep-alive connection per lane: no lane waits for another's socket
        max_connections=cfg.concurrency,
    )


def sftp_options(settings: Settings) -> SftpOptions:
    from erp_push.transport import SftpOptions

    cfg, secrets = settings.config, settings.secrets
    assert cfg.sftp_host is not None and cfg.sftp_user is not None
    return SftpOptions(
        host=cfg.sftp_host,
        port=cfg.sftp_port,
        user=cfg.sftp_user,
        password=secrets.sftp_password,
        private_key_path=cfg.sftp_private_key_path,
        private_key_passphrase=secrets.sftp_private_key_passphrase,
        known_hosts=cfg.sftp_known_hosts,
        host_key_sha256=cfg.sftp_host_key_sha256,
        connect_timeout=cfg.sftp_connect_timeout_seconds,
        operation_timeout=cfg.sftp_operation_timeout_seconds,
        keepalive_interval=round(cfg.sftp_keepalive_seconds),
        publish_mode=cfg.publish_mode,
    )


def sftp_connector(settings: Settings) -> Callable[[], SftpSession]:
    outbox, sent = settings.config.remote_outbox, settings.config.remote_sent
    assert outbox is not None

    def connect() -> SftpSession:
        from erp_push.transport import SftpSession

        session = SftpSession.connect(sftp_options(settings))
        try:
            session.check_folders(outbox, sent)
        except SftpError:
            session.close()
            raise
        return session

    return connect


def field_keys(settings: Settings) -> FieldKeys:
    cfg = settings.config
    return FieldKeys(
        invoice_number=cfg.field_invoice_number,
        invoice_date=cfg.field_invoice_date,
        currency=cfg.field_currency,
        total=cfg.field_total,
        supplier_code=cfg.field_supplier_code,
        vendor_address_type=cfg.vendor_address_type,
    )


def push_plan(
    settings: Settings, *, drain: bool = False, max_invoices: int | None = None
) -> PushPlan:
    cfg = settings.config
    assert cfg.remote_outbox is not None
    return PushPlan(
        connector_name=cfg.connector_name or "erp_push",
        outbox=cfg.remote_outbox,
        sent=cfg.remote_sent,
        field_keys=field_keys(settings),
        batch_size=cfg.batch_size,
        lease_ttl_seconds=cfg.lease_ttl_seconds,
        concurrency=cfg.concurrency,
        drain=drain,
        max_invoices=max_invoices,
        max_run_seconds=cfg.max_run_seconds,
        publish_mode=cfg.publish_mode,
    )


# --- push -----------------------------------------------------------------------------


def push(
    settings: Settings,
    *,
    drain: bool = False,
    max_invoices: int | None = None,
    nuntiq: NuntiqClient | None = None,
    connect_sftp: Callable[[], SftpSession] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_claimed: Callable[[int], None] | None = None,
) -> RunReport:
    """One push run: recover what earlier runs left, then claim and deliver."""
    cfg = settings.config
    log.info(
        "push: Nuntiq %s, SFTP %s@%s:%s %s, journal %s",
        cfg.nuntiq_base_url,
        cfg.sftp_user,
        cfg.sftp_host,
        cfg.sftp_port,
        cfg.remote_outbox,
        cfg.state_dir,
    )
    client = nuntiq or nuntiq_client(settings)
    journal = Journal(Path(settings.config.state_dir))
    try:
        return Pusher(
            nuntiq=client,
            connect_sftp=connect_sftp or sftp_connector(settings),
            journal=journal,
            plan=push_plan(settings, drain=drain, max_invoices=max_invoices),
            on_outcome=on_outcome,
            on_claimed=on_claimed,
            max_channels=settings.config.sftp_max_channels,
        ).run()
    finally:
        journal.close()
        if nuntiq is None:
            client.close()


# --- dry-run --------------------------------------------------------------------------


def dry_run(
    settings: Settings,
    *,
    limit: int | None = None,
    nuntiq: NuntiqClient | None = None,
    connect_sftp: Callable[[], SftpSession] | None = None,
    today: date | None = None,
) -> DryRunReport:
    """Show what the next push would take and the names its files would get.

    Writes nothing on the SFTP server and never acknowledges or reports. It must lease to
    look: those invoices are held for DRY_RUN_LEASE_TTL_SECONDS, then return to the queue.
    """
    client = nuntiq or nuntiq_client(settings)
    plan = push_plan(settings)
    today = today or datetime.now(UTC).date()
    report = DryRunReport(lease_ttl_seconds=DRY_RUN_LEASE_TTL_SECONDS)
    try:
        leases = client.claim(
            limit=limit or plan.batch_size, lease_ttl_seconds=DRY_RUN_LEASE_TTL_SECONDS
        )
        rendered: list[tuple[str, RenderedFile | RenderError]] = []
        for lease in leases:
            invoice = client.get_invoice(lease.invoice_token).invoice
            try:
                rendered.append(
                    (
                        lease.invoice_token,
                        render_invoice(invoice, keys=plan.field_keys, today=today),
                    )
                )
            except RenderError as exc:
                rendered.append((lease.invoice_token, exc))
        if not rendered:
            return report
        session = (connect_sftp or sftp_connector(settings))()
        report.sftp_checked = True
        try:
            for token, item in rendered:
                report.files.append(_preview_one(session, plan, token, item))
        finally:
            session.close()
        return report
    finally:
        if nuntiq is None:
            client.close()


def _preview_one(
    session: SftpSession, plan: PushPlan, token: str, item: RenderedFile | RenderError
) -> PreviewedFile:
    if isinstance(item, RenderError):
        return PreviewedFile(token, None, None, failure_code=item.failure_code, message=str(item))
    from erp_push import publish

    drop = publish.Drop(outbox=plan.outbox, sent=plan.sent)
    delivery = publish.preview(session, drop, item)
    if delivery.already_delivered:
        return PreviewedFile(
            token, item.invoice_number, None, already_delivered=delivery.remote_path
        )
    name = delivery.remote_path.rpartition("/")[2]
    collision = None if name == item.file_name else f"{item.file_name} is taken"
    return PreviewedFile(token, item.invoice_number, name, collision=collision)


# --- render ---------------------------------------------------------------------------


def render_one(
    settings: Settings,
    invoice_token: str,
    *,
    today: date | None = None,
    nuntiq: NuntiqClient | None = None,
) -> RenderedFile:
    """Exactly the bytes push would upload for this invoice (the name before collisions)."""
    client = nuntiq or nuntiq_client(settings)
    try:
        invoice = client.get_invoice(invoice_token).invoice
        return render_invoice(
            invoice, keys=field_keys(settings), today=today or datetime.now(UTC).date()
        )
    finally:
        if nuntiq is None:
            client.close()


# --- cleanup-tmp ----------------------------------------------------------------------


def cleanup_tmp(
    settings: Settings,
    *,
    older_than: timedelta,
    dry_run: bool = False,
    connect_sftp: Callable[[], SftpSession] | None = None,
) -> CleanupReport:
    """List, and unless ``dry_run`` remove, erp-push's own stale tmp files in the outbox."""
    outbox = settings.config.remote_outbox
    assert outbox is not None
    report = CleanupReport(older_than=older_than, dry_run=dry_run)
    session = (connect_sftp or sftp_connector(settings))()
    try:
        report.stale = session.list_stale_tmp(outbox, older_than)
        if not dry_run:
            for remote in report.stale:
                try:
                    session.remove(remote.path)
                    report.removed.append(remote)
                except SftpOperationError as exc:  # one undeletable file does not stop the rest
                    report.not_removed.append(NotRemoved(remote, str(exc)))
        return report
    finally:
        session.close()


__all__ = [
    "cleanup_tmp",
    "dry_run",
    "push",
    "render_one",
]
