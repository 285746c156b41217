"""Attachments pushed with their invoice (``config.push_attachments``), the CSV last.

For each invoice, every attachment of a selected ``type`` is downloaded from Nuntiq into
a local temporary file (streamed: never held whole in memory), then published next to
the CSV as ``<csv stem>-<safe file name>`` through the same tmp-then-publish path, and
only then the CSV itself, so the ERP's poller never sees a CSV before all its files::

    download each ─► choose the CSV's name ─► publish each attachment ─► publish the CSV
                     (preview: no write)      journal each one         under that name

The CSV's name is chosen first (its first free name, or an identical file already there:
then everything landed before) because the attachments carry its stem; the CSV is then
published under exactly that name, and if someone else's file took it meanwhile
(``NameTaken``) the attachments this run wrote are removed and the invoice waits for the
next run. Two invoices with the same number in one run take turns (a lock per name).

Exactly once: each attachment is journaled once it is under its final name; a later try
(a crash between the attachments and the CSV, a dropped connection) re-uses it when it
is still there with its size, and otherwise ``publish`` finds an identical file under its
name. An attachment journaled under a name the invoice no longer uses (its CSV name
changed) is ours and is removed. When the invoice fails, the attachments erp-push wrote
for it are removed: the CSV never landed.

Failures: an attachment Nuntiq no longer has fails the invoice alone
(ATTACHMENT_MISSING); one over ``max_attachment_bytes`` fails it (ATTACHMENT_TOO_LARGE);
a download interrupted or refused transiently raises the client's ``NuntiqError`` (the
invoice stays pending for the next run).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, BinaryIO

from erp_push import errors
from erp_push.errors import AttachmentFailed, FailureCode, LeaseLapsing, NameTaken
from erp_push.journal import AttachmentEntry, Journal
from erp_push.render import MAX_FILE_NAME_BYTES, RenderedFile

if TYPE_CHECKING:
    from erp_push.claim import NuntiqClient
    from erp_push.models import Attachment, Invoice
    from erp_push.publish import Checkpoint, Delivery, Drop, ServerTraits
    from erp_push.transport import SftpSession

log = logging.getLogger("erp_push.attachments")

# A whole attachment name, ASCII: room for the CSV's stem (itself at most
# MAX_FILE_NAME_BYTES), and still, with a collision suffix ("-12") and the tmp suffix
# (".<8 hex>.erp-push.tmp"), under the 255 bytes file systems allow.
MAX_NAME_BYTES = MAX_FILE_NAME_BYTES + 24
# What an attachment's own part keeps at least, however long the CSV's stem.
MIN_PART_BYTES = 24
# An extension is kept when it is this short and only letters and digits.
MAX_EXTENSION = 10
_HASH_HEX = 8
SPOOL_CHUNK = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class AttachmentOptions:
    """What push does with attachments; ``Config.attachment_options()`` builds it."""

    types: frozenset[str] | None  # None: every type
    max_bytes: int

    def selects(self, attachment: Attachment) -> bool:
        return self.types is None or attachment.type in self.types


# --- names ----------------------------------------------------------------------------


def remote_names(csv_name: str, attachments: Sequence[Attachment]) -> list[str]:
    """``<csv stem>-<safe file name>`` for each attachment, distinct within the invoice.

    Safe like an invoice number: only ASCII letters, digits, '-' and '_' (so no path
    separator, '..' or control character survives), a short alphanumeric extension
    kept, the whole bounded (a cut name gets 8 hex of its sha256). Two attachments whose
    names come out the same (ignoring case, as Windows servers do) get ``_2``, ``_3``…
    in the order Nuntiq lists them, so a later run gives them the same names.
    """
    stem, csv_ext = posixpath.splitext(csv_name)
    # Bytes, not characters: the stem keeps letters of any script (file_name_charset).
    room = max(MAX_NAME_BYTES - len(stem.encode("utf-8")) - 1, MIN_PART_BYTES)
    seen: set[str] = set()
    names = []
    for attachment in attachments:
        part = safe_part(attachment.file_name, room, avoid=csv_ext)
        n = 1
        while part.lower() in seen:
            n += 1
            part = safe_part(attachment.file_name, room, dedupe=n, avoid=csv_ext)
        seen.add(part.lower())
        names.append(f"{stem}-{part}")
    return names


def safe_part(
    file_name: str, room: int = MAX_FILE_NAME_BYTES, *, dedupe: int = 1, avoid: str = ".csv"
) -> str:
    """An attachment's own file name made safe, at most ``room`` bytes (see remote_names).

    An attachment with the extension of the ERP's own files (``avoid``: the poller reads
    every ``*.csv`` in the outbox as an invoice) keeps it inside its name and gets
    ``.txt``: ``data.csv`` becomes ``data_csv.txt``.
    """
    base, dot, extension = file_name.rpartition(".")
    if not (dot and base.strip(".") and _plain_extension(extension)):
        base, extension = file_name, ""
    if extension and f".{extension}".lower() == avoid.lower():
        base, extension = f"{base}_{extension}", "txt"
    ext = f".{extension}" if extension else ""
    safe = "".join(c if _is_safe_name_char(c) else "_" for c in base)
    if not safe.strip("_"):
        safe = "attachment"  # "..", "///", control characters only: nothing to keep
    tail = f"_{dedupe}" if dedupe > 1 else ""
    fits = room - len(ext) - len(tail)
    if len(safe) > fits:
        digest = hashlib.sha256(file_name.encode("utf-8", "surrogatepass")).hexdigest()
        safe = safe[: fits - 1 - _HASH_HEX] + "_" + digest[:_HASH_HEX]
    return safe + tail + ext


def _plain_extension(extension: str) -> bool:
    return 0 < len(extension) <= MAX_EXTENSION and extension.isascii() and extension.isalnum()


def _is_safe_name_char(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char in "-_")


# --- downloading ----------------------------------------------------------------------


class Spooled:
    """One downloaded attachment in an unnamed local temporary file (gone with the
    process, even on SIGKILL); a ``publish.Content`` once it has its remote name."""

    def __init__(self, attachment: Attachment, spool: BinaryIO, size: int, sha256: str) -> None:
        self.attachment = attachment
        self._spool = spool
        self._size = size
        self.sha256 = sha256
        self.file_name = ""  # given once the CSV's name is known
        self.other_name: str | None = None  # attachment names are ASCII in either charset
        self.created_on: date | None = None  # looked for under today's names only

    @property
    def size(self) -> int:
        return self._size

    def chunks(self, size: int) -> Iterator[bytes]:
        self._spool.seek(0)
        while data := self._spool.read(size):
            yield data

    def close(self) -> None:
        self._spool.close()


def download(
    nuntiq: NuntiqClient,
    attachment: Attachment,
    options: AttachmentOptions,
    *,
    must_end_by: datetime | None = None,
) -> Spooled:
    """Stream one attachment into a temporary file.

    Raises AttachmentFailed (ATTACHMENT_MISSING, ATTACHMENT_TOO_LARGE) for the invoice
    to fail alone; LeaseLapsing when no time is left before ``must_end_by``; any other
    ``NuntiqError`` (interrupted, refused for now) as the client raised it.
    """
    budget = nuntiq.attachment_budget(options.max_bytes)
    if must_end_by is not None:
        left = (must_end_by - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise LeaseLapsing("the lease is too close to expiry to download the attachments")
        budget = min(budget, left)  # a download that outlives the lease is of no use
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (owned by the Spooled returned)
    try:
        size = nuntiq.download_attachment(
            attachment.attachment_token, spool, max_bytes=options.max_bytes, budget=budget
        )
        digest = hashlib.sha256()
        spool.seek(0)
        while data := spool.read(SPOOL_CHUNK):
            digest.update(data)
    except errors.AttachmentTooLarge as exc:
        spool.close()
        raise AttachmentFailed(
            f"{_shown(attachment)}: {exc.message}", failure_code=FailureCode.ATTACHMENT_TOO_LARGE
        ) from None
    except (errors.NuntiqNotFound, errors.NuntiqValidationError) as exc:
        spool.close()
        raise AttachmentFailed(
            f"{_shown(attachment)}: Nuntiq no longer has it ({exc.message})",
            failure_code=FailureCode.ATTACHMENT_MISSING,
        ) from None
    except BaseException:
        spool.close()
        raise
    return Spooled(attachment, spool, size, digest.hexdigest())


def _shown(attachment: Attachment) -> str:
    from erp_push.text import printable, shorten

    name = shorten(printable(attachment.file_name), 80)
    return f"attachment {name!r} ({attachment.attachment_token})"


def selected(invoice: Invoice, options: AttachmentOptions) -> list[Attachment]:
    return [a for a in invoice.attachments if options.selects(a)]


# --- publishing -----------------------------------------------------------------------

# Invoices whose CSVs share a name (the same invoice number) take turns from choosing the
# name to publishing the CSV, so each CSV's attachments carry its own stem.
_NAME_LOCKS: dict[str, threading.Lock] = {}
_NAME_LOCKS_LOCK = threading.Lock()


def _name_lock(csv_name: str) -> threading.Lock:
    with _NAME_LOCKS_LOCK:
        return _NAME_LOCKS.setdefault(csv_name.lower(), threading.Lock())


class InvoiceFiles:
    """One invoice's downloaded attachments and its CSV, to publish in that order."""

    def __init__(
        self,
        invoice_token: str,
        csv: RenderedFile,
        files: list[Spooled],
        journal: Journal,
        failure: AttachmentFailed | None = None,
    ) -> None:
        self.invoice_token = invoice_token
        self.csv = csv
        self.files = files
        self.journal = journal
        self.failure = failure

    @classmethod
    def fetch(
        cls,
        nuntiq: NuntiqClient,
        invoice: Invoice,
        csv: RenderedFile,
        options: AttachmentOptions,
        journal: Journal,
        *,
        must_end_by: datetime | None = None,
        on_checkpoint: Callable[[str], None] = lambda _step: None,
    ) -> InvoiceFiles | None:
        """Download the selected attachments; None when the invoice has none (and no
        earlier try left any): its CSV is published as without attachments. A missing
        or too large one is kept as ``failure`` (``publish`` then removes what earlier
        tries left, and raises it); a transient failure raises at once."""
        wanted = selected(invoice, options)
        if not wanted and not journal.attachments(invoice.invoice_token):
            return None
        files: list[Spooled] = []
        failure = None
        try:
            for attachment in wanted:
                try:
                    files.append(download(nuntiq, attachment, options, must_end_by=must_end_by))
                except AttachmentFailed as exc:
                    failure = exc
                    break
        except BaseException:
            for spooled in files:
                spooled.close()
            raise
        if failure is not None and not journal.attachments(invoice.invoice_token):
            for spooled in files:
                spooled.close()
            raise failure  # nothing of it on the server to remove: no SFTP needed
        on_checkpoint("attachments_downloaded")
        return cls(invoice.invoice_token, csv, files, journal, failure)

    def close(self) -> None:
        for spooled in self.files:
            spooled.close()

    def publish(
        self,
        session: SftpSession,
        drop: Drop,
        *,
        traits: ServerTraits,
        may_publish: Callable[[], bool],
        on_checkpoint: Checkpoint,
    ) -> Delivery:
        """Publish the attachments, then the CSV under the name they carry.

        Raises what ``publish.publish`` raises (the attachments erp-push wrote for this
        invoice are removed first, unless the lease is lapsing: then the next run re-uses
        them), NameTaken, or the download's AttachmentFailed.
        """
        from erp_push import publish

        if self.failure is not None:
            self._remove(session, drop, self.journal.attachments(self.invoice_token).values())
            raise self.failure

        def attachment_step(step: str) -> None:
            on_checkpoint(f"attachment_{step}")

        with _name_lock(self.csv.file_name):
            planned = publish.preview(session, drop, self.csv)
            if planned.already_delivered:
                return planned  # the CSV landed before: its attachments did, before it
            csv_name = posixpath.basename(planned.remote_path)
            names = remote_names(csv_name, [f.attachment for f in self.files])
            known = self.journal.attachments(self.invoice_token)
            written: list[AttachmentEntry] = []
            used: set[str] = set()  # where this try's attachments are
            try:
                for spooled, name in zip(self.files, names, strict=True):
                    spooled.file_name = name
                    token = spooled.attachment.attachment_token
                    path = self._still_there(session, spooled, known.get(token))
                    if path is not None:
                        used.add(path)
                        continue
                    delivery = publish.publish(
                        session,
                        drop,
                        spooled,
                        traits=traits,
                        may_publish=may_publish,
                        on_checkpoint=attachment_step,
                    )
                    entry = AttachmentEntry(
                        attachment_token=token,
                        remote_path=delivery.remote_path,
                        sha256=spooled.sha256,
                        size=spooled.size,
                        created=not delivery.already_delivered,
                    )
                    self.journal.record_attachment(self.invoice_token, entry)
                    used.add(entry.remote_path)
                    if entry.created:
                        written.append(entry)
                    on_checkpoint("attachment_recorded")
                # Written by an earlier try under a name this one no longer uses (its CSV
                # name changed): ours, and now nobody's.
                self._remove(
                    session, drop, [e for e in known.values() if e.remote_path not in used]
                )
                return publish.publish(
                    session,
                    drop,
                    self.csv,
                    traits=traits,
                    may_publish=may_publish,
                    on_checkpoint=on_checkpoint,
                    only_name=csv_name,
                )
            except LeaseLapsing:
                raise  # another run may hold the invoice soon and re-use them: hands off
            except (errors.SftpOperationError, NameTaken):
                earlier = [e for e in known.values() if e.created]
                self._remove(session, drop, [*written, *earlier])
                raise

    def _still_there(
        self, session: SftpSession, spooled: Spooled, entry: AttachmentEntry | None
    ) -> str | None:
        """The journaled path of this very file, if an earlier try published it under
        the name it gets now and it is still there with its size; else None (then
        ``publish`` looks for an identical file itself)."""
        if entry is None or entry.sha256 != spooled.sha256 or entry.size != spooled.size:
            return None
        if posixpath.basename(entry.remote_path) != spooled.file_name:
            return None
        found = session.stat(entry.remote_path)
        if found is None or found.size != spooled.size:
            return None
        return entry.remote_path

    def _remove(self, session: SftpSession, drop: Drop, entries: Iterable[AttachmentEntry]) -> None:
        """Remove attachments erp-push wrote for this invoice (only those: ``created``),
        from the outbox only; best effort, each forgotten by the journal once gone."""
        for entry in entries:
            in_outbox = posixpath.join(drop.outbox, posixpath.basename(entry.remote_path))
            if not entry.created or entry.remote_path != in_outbox:
                continue
            try:
                with session.exchange(f"removing {entry.remote_path}") as batch:
                    reply = batch.remove(entry.remote_path)
            except errors.SftpOperationError as exc:
                log.warning("could not remove %s: %s", entry.remote_path, exc.message)
                continue
            if reply.error is not None and not isinstance(reply.error, errors.RemoteFileMissing):
                log.warning("could not remove %s: %s", entry.remote_path, reply.error.message)
                continue
            self.journal.forget_attachment(self.invoice_token, entry)
            log.info("removed %s (its invoice's CSV was not published)", entry.remote_path)
