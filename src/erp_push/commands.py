"""One function per CLI command: settings in, a result out. No printing here.

The CLI parses options, loads settings, calls one of these and shows the result (a
``report.CommandReport``, or the rendered file). Tests call them directly too; each takes
optional ready-made clients (seams) and builds real ones from settings only when none
are passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from erp_push import logs, status
from erp_push.claim import NuntiqClient
from erp_push.errors import RenderError, SftpError, SftpOperationError
from erp_push.journal import Journal
from erp_push.pipeline import Pusher
from erp_push.render import RenderedFile, render_invoice
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
    from erp_push.doctor import DoctorReport
    from erp_push.models import Attachment
    from erp_push.processes import HelperLink

    # The SSH library is imported on first connect: a run with nothing to upload never
    # pays for it (see sftp_connector).
    from erp_push.transport import SftpSession


# Dry-run has to claim to look (the contract has no list endpoint); the shortest TTL
# Nuntiq allows keeps the invoices away from real pushes for as short a time as possible.
DRY_RUN_LEASE_TTL_SECONDS = 60


# --- builders: settings -> clients ----------------------------------------------------


def nuntiq_client(settings: Settings) -> NuntiqClient:
    return NuntiqClient(**settings.nuntiq_client_options())


def sftp_connector(settings: Settings) -> Callable[[], SftpSession]:
    outbox, sent = settings.remote_folders()

    def connect() -> SftpSession:
        from erp_push.transport import SftpSession

        session = SftpSession.connect(settings.sftp_options())
        try:
            session.check_folders(outbox, sent)
        except SftpError:
            session.close()
            raise
        return session

    return connect


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
    helper_command: list[str] | None = None,
    link: HelperLink | None = None,
) -> RunReport:
    """One push run: recover what earlier runs left, then claim and deliver.

    A drain may share its work with helper processes (``processes``): the command line
    passes ``helper_command``, how to start one. A helper itself runs with ``link``, its
    pipes to the first process, which keeps the run's record.
    """
    cfg = settings.config
    logs.event(
        "run_started",
        f"push: Nuntiq {cfg.nuntiq_base_url}, SFTP {cfg.sftp_user}@{cfg.sftp_host}:"
        f"{cfg.sftp_port} {cfg.remote_outbox}, journal {cfg.state_dir}",
        nuntiq_base_url=cfg.nuntiq_base_url,
        sftp_host=cfg.sftp_host,
        sftp_port=cfg.sftp_port,
        sftp_user=cfg.sftp_user,
        remote_outbox=cfg.remote_outbox,
        state_dir=str(cfg.state_dir),
        drain=drain,
        max_invoices=max_invoices,
    )
    client = nuntiq or nuntiq_client(settings)
    journal = Journal(Path(settings.config.state_dir))
    try:
        # The run is recorded for `erp-push status` under its lock, so a recorded run
        # without an end is either still going (its lock is held) or was killed.
        journal.start_run()
        if link is None:  # a helper's work is recorded by the first process
            status.record_run_started(journal, "push")
        pusher = Pusher(
            nuntiq=client,
            connect_sftp=connect_sftp or sftp_connector(settings),
            journal=journal,
            plan=settings.push_plan(drain=drain, max_invoices=max_invoices),
            on_outcome=on_outcome,
            on_claimed=on_claimed,
            helper_command=helper_command,
            link=link,
        )
        try:
            report = pusher.run()
        except BaseException as exc:  # Ctrl-C, SIGTERM, a bug: still how the run ended
            if link is None:
                status.record_run_finished(journal, pusher.report, exc)
            raise
        if link is None:
            status.record_run_finished(journal, report)
        else:
            link.finished(report)
        return report
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
    keys = settings.config.field_keys()
    rules = settings.config.render_rules()
    folders = settings.remote_folders()
    today = today or datetime.now(UTC).date()
    report = DryRunReport(lease_ttl_seconds=DRY_RUN_LEASE_TTL_SECONDS)
    try:
        leases = client.claim(
            limit=limit or settings.config.batch_size,
            lease_ttl_seconds=DRY_RUN_LEASE_TTL_SECONDS,
        )
        rendered: list[tuple[str, RenderedFile | RenderError]] = []
        attached: dict[str, list[Attachment]] = {}  # what push would upload with each
        options = settings.config.attachment_options()
        for lease in leases:
            invoice = client.get_invoice(lease.invoice_token).invoice
            if options is not None:
                from erp_push.attachments import selected

                attached[lease.invoice_token] = selected(invoice, options)
            try:
                rendered.append(
                    (
                        lease.invoice_token,
                        render_invoice(invoice, keys=keys, rules=rules, today=today),
                    )
                )
            except RenderError as exc:
                rendered.append((lease.invoice_token, exc))
        if not rendered:
            return report
        session = (connect_sftp or sftp_connector(settings))()
        report.sftp_checked = True
        try:
            if settings.config.output_mode == "batch":
                from erp_push.batch import preview_batch
                from erp_push.publish import Drop

                drop = Drop(outbox=folders[0], sent=folders[1])
                batch_size = settings.config.batch_size
                report.files.extend(preview_batch(session, drop, rendered, batch_size))
                return report
            for token, item in rendered:
                previewed = _preview_one(session, folders, token, item)
                if previewed.file_name is not None and attached.get(token):
                    from erp_push.attachments import remote_names

                    names = remote_names(previewed.file_name, attached[token])
                    previewed = replace(previewed, attachments=names)
                report.files.append(previewed)
        finally:
            session.close()
        return report
    finally:
        if nuntiq is None:
            client.close()


def _preview_one(
    session: SftpSession,
    folders: tuple[str, str | None],
    token: str,
    item: RenderedFile | RenderError,
) -> PreviewedFile:
    if isinstance(item, RenderError):
        return PreviewedFile(token, None, None, failure_code=item.failure_code, message=str(item))
    from erp_push import publish

    outbox, sent = folders
    drop = publish.Drop(outbox=outbox, sent=sent)
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
            invoice,
            keys=settings.config.field_keys(),
            rules=settings.config.render_rules(),
            today=today or datetime.now(UTC).date(),
        )
    finally:
        if nuntiq is None:
            client.close()


def save_attachments(
    settings: Settings,
    invoice_token: str,
    folder: Path,
    *,
    file_name: str,
    nuntiq: NuntiqClient | None = None,
) -> list[Path]:
    """Download the invoice's attachments (those ``attachment_types`` selects) into
    ``folder`` under the names push would give them next to ``file_name`` (its CSV's
    name before collisions); streamed, each at most ``max_attachment_bytes``."""
    from erp_push.attachments import remote_names, selected
    from erp_push.errors import AttachmentTooLarge, ErpPushError, NuntiqNotFound

    options = settings.config.attachment_selection()
    client = nuntiq or nuntiq_client(settings)
    try:
        attachments = selected(client.get_invoice(invoice_token).invoice, options)
        saved = []
        for attachment, name in zip(attachments, remote_names(file_name, attachments), strict=True):
            path = folder / name
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as dest:
                    client.download_attachment(
                        attachment.attachment_token, dest, max_bytes=options.max_bytes
                    )
            except OSError as exc:
                raise ErpPushError(f"cannot write {path}: {exc.strerror or exc}") from None
            except (AttachmentTooLarge, NuntiqNotFound):
                path.unlink(missing_ok=True)
                raise
            saved.append(path)
        return saved
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
    outbox, _ = settings.remote_folders()
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


# --- doctor -----------------------------------------------------------------------------


def doctor(settings_path: Path | None, *, watch_seconds: float) -> DoctorReport:
    """Check settings, Nuntiq, the SFTP server and the journal; changes no invoice. Takes
    the settings file, not ``Settings``: a file with problems is checked as far as it goes."""
    from erp_push import doctor as checks

    return checks.run(settings_path, watch_seconds=watch_seconds)


__all__ = [
    "cleanup_tmp",
    "doctor",
    "dry_run",
    "push",
    "render_one",
    "save_attachments",
]
