"""Batch mode (``output_mode: batch``): each claimed batch becomes one file, one row per invoice.

    claim ─► settle earlier batches ─► get + render each ─► look for rows already delivered
          ─► journal the batch ─► publish invoices-<YYYYMMDDTHHMMSSZ>.csv ─► acknowledge
             and report each member (external_id_1 = the file, external_message_1 = its row)

The file is the per-invoice file's format (BOM, tabs, LF, the same header) with one data
row per invoice, in claim order; it is published through ``publish``, like any file: a
tmp name first, never over anything, an identical file under its names counts as there.

Exactly once, batch-wise (see ``batch_journal``):

- Every invoice is rendered before anything is written: one that cannot be fails alone
  and is left out; a batch where every invoice fails writes no file.
- The batch (members, rows, exact bytes) is journaled before the upload. Only the run that
  journaled it uploads it, while it lives; after that run died, the batch is settled by
  looking for its exact bytes in the outbox and sent/: there, every member is delivered
  at that path; not there, the batch is void and its members may go into a new one. So no
  invoice is in two batch files, and none is lost.
- Without the journal (lost, or another machine), an invoice that comes back is looked for
  as a row of the batch files of the last ``LOOKBACK_DAYS`` days in the outbox and sent/
  (``BatchIndex``); its row there proves delivery.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from erp_push.batch_journal import PUBLISHED, RECORDED, BatchLedger, Member, Membership
from erp_push.errors import (
    ErpPushError,
    FailureCode,
    LeaseLapsing,
    NuntiqAuthError,
    NuntiqError,
    NuntiqProtocolError,
    RenderError,
    SftpError,
    SftpOperationError,
)
from erp_push.journal import Entry
from erp_push.models import Lease
from erp_push.render import BOM, HEADER, RenderedFile, render_invoice
from erp_push.report import Outcome, Result, truncate

if TYPE_CHECKING:
    from erp_push.pipeline import InvoiceWorker
    from erp_push.publish import Drop
    from erp_push.report import PreviewedFile
    from erp_push.transport import RemoteFile, SftpSession

log = logging.getLogger(__name__)
_T = TypeVar("_T")

HEADER_LINE = (BOM + "\t".join(HEADER) + "\n").encode("utf-8")
# invoices-20261201T000000Z.csv, and the -2, -3, ... names publish gives a taken one.
BATCH_FILE = re.compile(r"invoices-(?P<at>[0-9]{8}T[0-9]{6}Z)(?:-[0-9]+)?\.csv")
# The lost-journal lookup reads batch files named up to this many days back (publish's
# bound for per-invoice files), the newest first and at most BATCH_LOOKBACK_FILES of them.
LOOKBACK_DAYS = 7
BATCH_LOOKBACK_FILES = 2000
# A batch file is at most 50 rows; anything much larger under such a name is not ours.
MAX_BATCH_FILE_BYTES = 16 * 1024 * 1024


def batch_file_name(now: datetime) -> str:
    return f"invoices-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}.csv"


def row_of(file: RenderedFile) -> bytes:
    """The data row of a rendered one-invoice file, with its LF."""
    assert file.body.startswith(HEADER_LINE), "render's header changed"
    return file.body[len(HEADER_LINE) :]


def rows_in(body: bytes) -> list[bytes] | None:
    """The data rows of a batch file (each with its LF); None if it is not one of ours."""
    if not body.startswith(HEADER_LINE):
        return None
    data = body[len(HEADER_LINE) :]
    if not data:
        return []
    if not data.endswith(b"\n"):
        return None  # cut short (a direct-mode file still being written, say)
    return [line + b"\n" for line in data[:-1].split(b"\n")]


def digest(row: bytes) -> str:
    return hashlib.sha256(row).hexdigest()[:32]


def batch_file(name: str, rows: list[bytes]) -> RenderedFile:
    body = HEADER_LINE + b"".join(rows)
    return RenderedFile(
        file_name=name,
        body=body,
        invoice_number=f"{len(rows)} invoices",
        sha256=hashlib.sha256(body).hexdigest(),
    )


def _as_file(found: Membership) -> RenderedFile:
    assert found.body is not None
    return RenderedFile(
        file_name=found.file_name,
        body=found.body,
        invoice_number="",
        sha256=hashlib.sha256(found.body).hexdigest(),
    )


# --- the lost-journal lookup ----------------------------------------------------------


@dataclass(frozen=True)
class _Listing:
    files: list[RemoteFile]
    mtime: float  # the folder's own mtime when it was listed
    listed_at: float  # time.monotonic() just before the listing was asked for


class FolderListings:
    """The drop folders' listings for one run, each reused while its folder did not change.

    Listing a sent/ that holds years of archive costs seconds, and a drain would pay it for
    every batch. A folder's own mtime changes whenever a file is added, removed or renamed
    in it, but only to the second: a change in the same second as the last one leaves it
    as it was. So a listing is reused only while the folder's mtime is the one it had at
    least a second before the listing began (any later change then falls in a later second
    and shows), and the folder is listed again as soon as its mtime moves.
    """

    # A folder's mtime must have held this long before a listing that is to be reused.
    SETTLED_SECONDS = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mtime_seen: dict[str, tuple[float, float]] = {}  # folder -> (mtime, first seen)
        self._listings: dict[str, _Listing] = {}

    def files(self, session: SftpSession, folder: str) -> list[RemoteFile]:
        found = session.stat(folder)
        if found is None:
            return []  # a sent/ that does not exist yet holds nothing
        checked = time.monotonic()  # the mtime was `found.mtime` by now
        mtime = found.mtime
        if mtime:
            with self._lock:
                seen = self._mtime_seen.get(folder)
                if seen is None or seen[0] != mtime:
                    seen = self._mtime_seen[folder] = (mtime, checked)
                cached = self._listings.get(folder)
                if (
                    cached is not None
                    and cached.mtime == mtime
                    and cached.listed_at >= seen[1] + self.SETTLED_SECONDS
                ):
                    return cached.files
        files = session.list_files(folder)
        if mtime:
            with self._lock:
                self._listings[folder] = _Listing(files, mtime, checked)
        return files


class BatchIndex:
    """Which rows the recent batch files in the outbox and sent/ hold.

    Batch files are named by time, so unlike per-invoice files they cannot be looked up by
    name: the folders are listed for every batch (a file that landed just before the batch
    was claimed must be seen; ``FolderListings`` reuses a listing while its folder did not
    change), and each recent batch file is read once, its rows remembered in the journal
    by name and size (``ledger``; None for dry-run).
    """

    def __init__(
        self,
        session: SftpSession,
        drop: Drop,
        ledger: BatchLedger | None,
        listings: FolderListings | None = None,
        now: datetime | None = None,
    ) -> None:
        self.session = session
        self.drop = drop
        self.ledger = ledger
        self.listings = listings or FolderListings()
        self.now = now or datetime.now(UTC)

    def find(self, rows: list[bytes]) -> dict[bytes, tuple[str, int]]:
        """For each of ``rows`` found in a recent batch file: that file's path and row."""
        known = self.rows()
        return {row: known[digest(row)] for row in rows if digest(row) in known}

    def rows(self) -> dict[str, tuple[str, int]]:
        """Row digest -> the path and row number of the newest recent file holding it."""
        known: dict[str, tuple[str, int]] = {}
        for path, size in self._recent_files():
            for number, row_digest in enumerate(self._digests(path, size), start=1):
                known.setdefault(row_digest, (path, number))
        return known

    def _recent_files(self) -> list[tuple[str, int]]:
        oldest = (self.now - timedelta(days=LOOKBACK_DAYS)).strftime("%Y%m%dT000000Z")
        files: list[tuple[str, str, int]] = []
        # The outbox first, then sent/: a file the ERP moves in between is seen in one of
        # them (it only moves that way).
        for folder in self.drop.folders:
            for remote in self.listings.files(self.session, folder):
                name = posixpath.basename(remote.path)
                match = BATCH_FILE.fullmatch(name)
                if match and match["at"] >= oldest and 0 < remote.size <= MAX_BATCH_FILE_BYTES:
                    files.append((match["at"], remote.path, remote.size))
        files.sort(reverse=True)  # newest first: a recent crash is the likely case
        return [(path, size) for _, path, size in files[:BATCH_LOOKBACK_FILES]]

    def _digests(self, path: str, size: int) -> list[str]:
        name = posixpath.basename(path)
        if self.ledger is not None:
            known = self.ledger.seen(name, size)
            if known is not None:
                return known
        try:
            body = self.session.read(path, size)
        except SftpOperationError as exc:
            log.debug("cannot read %s: %s", path, exc.message)
            return []
        rows = rows_in(body or b"")
        digests = [digest(row) for row in rows or []]
        if self.ledger is not None and body is not None and len(body) == size:
            self.ledger.remember(name, size, digests)
        return digests


# --- delivering one claimed batch -----------------------------------------------------


@dataclass
class _Row:
    lease: Lease
    file: RenderedFile  # the invoice alone, as render makes it

    @property
    def token(self) -> str:
        return self.lease.invoice_token


class BatchWorker:
    """Delivers one claimed batch as one file. Stateless apart from the shared parts."""

    def __init__(self, worker: InvoiceWorker, ledger: BatchLedger) -> None:
        self.worker = worker
        self.ledger = ledger
        self._listing_refused = False  # warned once: the lost-journal lookup is off
        self._listings = FolderListings()

    def deliver(self, work: list[tuple[Lease, Entry]]) -> tuple[list[Outcome], ErpPushError | None]:
        """Every member's outcome in claim order, and the error that stops the run, if any.

        Members finished before such an error keep their outcome; the rest are pending.
        """
        outcomes: dict[str, Outcome] = {}
        finished: set[str] = set()  # Nuntiq was told (or refused, and they stay pending)
        try:
            fresh: list[tuple[Lease, Entry]] = []
            for lease, entry in work:
                decided = self._decided(entry)
                if decided is None:
                    fresh.append((lease, entry))
                else:
                    outcomes[lease.invoice_token] = decided
            if fresh:
                self._build_and_publish(fresh, outcomes)
            stop: NuntiqAuthError | None = None
            leases = [lease for lease, _ in work]
            for lease, told in zip(
                leases, self._each(self._finish_one, leases, outcomes), strict=True
            ):
                if isinstance(told, NuntiqAuthError):
                    stop = stop or told
                else:
                    outcomes[lease.invoice_token] = told
                    finished.add(lease.invoice_token)
            if stop is not None:
                raise stop
            return [outcomes[lease.invoice_token] for lease in leases], None
        except (NuntiqAuthError, SftpError) as exc:
            stopped = f"run stopped: {exc}"
            return [
                outcomes[lease.invoice_token]
                if lease.invoice_token in finished
                else Outcome(
                    lease.invoice_token, Result.PENDING, entry.invoice_number, message=stopped
                )
                for lease, entry in work
            ], exc

    def _each(
        self,
        step: Callable[[Lease, dict[str, Outcome]], _T],
        leases: list[Lease],
        outcomes: dict[str, Outcome],
    ) -> list[_T]:
        """``step`` for each lease, in parallel: a batch's Nuntiq calls are independent,
        and one after the other they would cost a round trip per invoice."""
        if len(leases) <= 1:
            return [step(lease, outcomes) for lease in leases]
        lanes = min(len(leases), self.worker.plan.concurrency)
        with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="batch") as pool:
            return list(pool.map(lambda lease: step(lease, outcomes), leases))

    def _finish_one(self, lease: Lease, outcomes: dict[str, Outcome]) -> Outcome | NuntiqAuthError:
        """Acknowledge and report one member; a refused key is returned, to stop the run."""
        outcome = outcomes[lease.invoice_token]
        try:
            return self.worker._finish(lease, outcome)
        except NuntiqAuthError as exc:
            return exc
        except NuntiqError as exc:  # settling a refused transition failed too
            return replace(
                outcome,
                result=Result.PENDING,
                message=f"Nuntiq: {exc}; the next run finishes it",
            )

    def _decided(self, entry: Entry) -> Outcome | None:
        """What the journal already decided for this invoice, if anything."""
        if entry.failed:
            return self.worker._failure(entry, entry.failure_code, entry.failure_message)
        if entry.delivered:
            return Outcome(
                entry.invoice_token,
                Result.ALREADY_DELIVERED,
                entry.invoice_number,
                entry.remote_path,
                row=self.ledger.row_of(entry.invoice_token),
            )
        return None

    def _build_and_publish(
        self, fresh: list[tuple[Lease, Entry]], outcomes: dict[str, Outcome]
    ) -> None:
        worker = self.worker
        todo = fresh
        earlier = {
            lease.invoice_token: self.ledger.membership(lease.invoice_token) for lease, _ in fresh
        }
        if any(earlier.values()):
            with worker.sessions.session() as sftp:
                todo = self._settle_earlier_batches(sftp, fresh, earlier, outcomes)
            if not todo:
                return
        # The folders are read for rows delivered without the journal's record while the
        # invoices are fetched: both are round trips, and neither needs the other.
        with worker.sessions.session() as sftp, ThreadPoolExecutor(1, "batch-look") as side:
            delivered = side.submit(self._recent_rows, sftp)
            rows = self._render(todo, outcomes)
            worker.checkpoint("batch_fetched")
            rows = self._drop_delivered_rows(rows, delivered.result(), outcomes)
        if not rows:
            return  # nothing left to write: no file
        pending = self._not_now(rows)
        if pending is not None:
            for row in rows:
                outcomes[row.token] = _pending(row, pending)
            return
        self._publish(rows, outcomes)

    # --- steps ----------------------------------------------------------------------

    def _settle_earlier_batches(
        self,
        sftp: SftpSession,
        fresh: list[tuple[Lease, Entry]],
        memberships: dict[str, Membership | None],
        outcomes: dict[str, Outcome],
    ) -> list[tuple[Lease, Entry]]:
        """Invoices that were in a batch before (``memberships``): delivered there,
        waiting, or free again."""
        from erp_push import publish

        drop = self._drop()
        settled: dict[str, str | None] = {}  # batch id -> where it landed (None: void)
        alive: dict[str, bool] = {}  # run id -> its lock is held (asked once per run)
        todo: list[tuple[Lease, Entry]] = []
        for lease, entry in fresh:
            token = lease.invoice_token
            earlier = memberships[token]
            if earlier is None:
                todo.append((lease, entry))
                continue
            if earlier.state == RECORDED and earlier.batch_id not in settled:
                if earlier.run_id not in alive:
                    alive[earlier.run_id] = self.worker.journal.run_is_alive(earlier.run_id)
                if alive[earlier.run_id]:
                    # Its run may still publish it: hands off until it is done.
                    outcomes[token] = Outcome(
                        token,
                        Result.PENDING,
                        entry.invoice_number,
                        message=f"its batch file {earlier.file_name} is still being written "
                        "by a live run; the next run finishes it",
                    )
                    continue
                # Its run died: the file landed before that, or it never will.
                try:
                    landed = publish.find_delivered(sftp, drop, _as_file(earlier))
                except SftpOperationError as exc:  # cannot tell: decide nothing yet
                    outcomes[token] = Outcome(
                        token,
                        Result.PENDING,
                        entry.invoice_number,
                        message=truncate(
                            f"cannot look for its batch file {earlier.file_name}: {exc}"
                        ),
                    )
                    continue
                if landed is None:
                    self.ledger.void(earlier.batch_id)
                    log.info(
                        "batch %s never landed; its invoices go into a new batch", earlier.file_name
                    )
                else:
                    self.ledger.published(earlier.batch_id, landed)
                    log.info(
                        "batch %s had landed as %s before its run died", earlier.file_name, landed
                    )
                settled[earlier.batch_id] = landed
            path = earlier.remote_path if earlier.state == PUBLISHED else settled[earlier.batch_id]
            if path is None:
                todo.append((lease, entry))
            else:
                outcomes[token] = Outcome(
                    token, Result.ALREADY_DELIVERED, entry.invoice_number, path, row=earlier.row
                )
        return todo

    def _render(self, todo: list[tuple[Lease, Entry]], outcomes: dict[str, Outcome]) -> list[_Row]:
        """Get and render each invoice; one that cannot be rendered fails alone."""
        leases = [lease for lease, _ in todo]
        rows: list[_Row] = []
        stop: NuntiqAuthError | None = None
        for lease, got in zip(leases, self._each(self._render_one, leases, outcomes), strict=True):
            if isinstance(got, _Row):
                rows.append(got)
            elif isinstance(got, NuntiqAuthError):
                stop = stop or got
            else:
                outcomes[lease.invoice_token] = got
        if stop is not None:
            raise stop
        return rows

    def _render_one(
        self, lease: Lease, outcomes: dict[str, Outcome]
    ) -> _Row | Outcome | NuntiqAuthError:
        worker = self.worker
        token = lease.invoice_token
        try:
            detail = worker.nuntiq.get_invoice(token)
        except NuntiqProtocolError as exc:  # also NuntiqReplyTooLarge
            return worker._fail_alone(token, exc.failure_code, str(exc))
        except NuntiqAuthError as exc:
            return exc
        except NuntiqError as exc:  # after its retries: the lease lapses, it comes back
            return Outcome(token, Result.PENDING, message=f"Nuntiq: {exc}")
        try:
            file = render_invoice(
                detail.invoice,
                keys=worker.plan.field_keys,
                today=worker.today,
                rules=worker.plan.render_rules,
            )
        except RenderError as exc:
            return worker._fail_alone(token, exc.failure_code, str(exc))
        except Exception as exc:
            log.exception("rendering %s failed unexpectedly", token)
            return worker._fail_alone(
                token, FailureCode.RENDER_FAILED, f"unexpected {type(exc).__name__} while rendering"
            )
        return _Row(lease, file)

    def _recent_rows(self, sftp: SftpSession) -> dict[str, tuple[str, int]]:
        """The rows of the recent batch files; none when the folders cannot be listed."""
        if self._listing_refused:
            return {}
        try:
            return BatchIndex(sftp, self._drop(), self.ledger, self._listings).rows()
        except SftpOperationError as exc:
            # An upload-only folder that cannot be listed: the journal alone proves delivery.
            self._listing_refused = True
            log.warning(
                "cannot list the drop folders to look for rows delivered without the "
                "journal's record (%s); relying on the journal alone",
                exc.message,
            )
            return {}

    def _drop_delivered_rows(
        self, rows: list[_Row], found: dict[str, tuple[str, int]], outcomes: dict[str, Outcome]
    ) -> list[_Row]:
        """Rows already in a recent batch file (the journal lost them) are delivered."""
        left: list[_Row] = []
        for r in rows:
            hit = found.get(digest(row_of(r.file)))
            if hit is None:
                left.append(r)
                continue
            path, number = hit
            self.ledger.found(Member(r.token, number, r.file.invoice_number), path)
            outcomes[r.token] = Outcome(
                r.token, Result.ALREADY_DELIVERED, r.file.invoice_number, path, row=number
            )
        return left

    def _not_now(self, rows: list[_Row]) -> str | None:
        """Why the batch must not be uploaded now, if it must not."""
        worker = self.worker
        if any(worker._lease_too_short(r.lease) for r in rows):
            return "lease too close to expiry"
        if worker.health.refusing is not None:
            return f"not uploaded: {worker.health.refusing}"
        return None

    def _publish(self, rows: list[_Row], outcomes: dict[str, Outcome]) -> None:
        from erp_push.pipeline import SERVER_REFUSALS, UNEXPLAINED_WRITE_FAILURE

        worker = self.worker
        file = batch_file(batch_file_name(datetime.now(UTC)), [row_of(r.file) for r in rows])
        members = [Member(r.token, i, r.file.invoice_number) for i, r in enumerate(rows, 1)]
        batch_id = self.ledger.record(file.file_name, file.body, file.sha256, members)
        worker.checkpoint("batch_recorded")
        # The member whose lease ends first decides: publish asks it at the last moment.
        first_to_lapse = min((r.lease for r in rows), key=lambda lease: lease.lease_expires_at)
        try:
            delivery = worker._publish(file, first_to_lapse)
        except LeaseLapsing as exc:
            # Usually nothing became visible (publish removed its tmp), but after a lost
            # connection an earlier try may have published it: the batch stays recorded,
            # and the run that gets its invoices back after this one settles it by looking.
            for row in rows:
                outcomes[row.token] = _pending(row, str(exc))
            return
        except SftpOperationError as exc:
            if exc.failure_code == UNEXPLAINED_WRITE_FAILURE:
                worker.health.unexplained_failure(str(exc))
                self.ledger.void(batch_id)
                for row in rows:
                    outcomes[row.token] = _pending(row, f"{exc}; left for the next run")
                return
            if exc.failure_code in SERVER_REFUSALS:
                worker.health.refused(exc.failure_code)
            message = truncate(str(exc))
            self.ledger.failed(batch_id, exc.failure_code, message)
            for row in rows:
                outcomes[row.token] = Outcome(
                    row.token,
                    Result.FAILED,
                    row.file.invoice_number,
                    failure_code=exc.failure_code,
                    message=message,
                )
            return
        worker.health.published()
        self.ledger.published(batch_id, delivery.remote_path)
        worker.checkpoint("batch_published_recorded")
        self.ledger.remember(
            posixpath.basename(delivery.remote_path),
            len(file.body),
            [digest(row_of(r.file)) for r in rows],
        )
        result = Result.ALREADY_DELIVERED if delivery.already_delivered else Result.DELIVERED
        for member in members:
            outcomes[member.invoice_token] = Outcome(
                member.invoice_token,
                result,
                member.invoice_number,
                delivery.remote_path,
                row=member.row,
            )

    def _drop(self) -> Drop:
        from erp_push.publish import Drop

        plan = self.worker.plan
        return Drop(outbox=plan.outbox, sent=plan.sent, mode=plan.publish_mode)


def _pending(row: _Row, message: str) -> Outcome:
    return Outcome(row.token, Result.PENDING, row.file.invoice_number, message=truncate(message))


# --- dry-run --------------------------------------------------------------------------


def preview_batch(
    session: SftpSession,
    drop: Drop,
    rendered: list[tuple[str, RenderedFile | RenderError]],
    batch_size: int,
) -> list[PreviewedFile]:
    """What push would write for these invoices, ``batch_size`` to a file as push claims
    them: each file's name (after collisions) and each invoice's row; rows found in
    recent batch files count as delivered, an invoice that cannot be rendered is left
    out. Writes nothing."""
    files = [row_of(item) for _, item in rendered if isinstance(item, RenderedFile)]
    found = BatchIndex(session, drop, None).find(files)
    shown: list[PreviewedFile] = []
    names: set[str] = set()
    for start in range(0, len(rendered), batch_size):
        shown.extend(
            _preview_one_batch(session, drop, rendered[start : start + batch_size], found, names)
        )
    return shown


def _preview_one_batch(
    session: SftpSession,
    drop: Drop,
    rendered: list[tuple[str, RenderedFile | RenderError]],
    found: dict[bytes, tuple[str, int]],
    names: set[str],
) -> list[PreviewedFile]:
    from erp_push import publish
    from erp_push.report import PreviewedFile

    new = [
        (token, item)
        for token, item in rendered
        if isinstance(item, RenderedFile) and row_of(item) not in found
    ]
    name = collision = None
    if new:
        file = batch_file(batch_file_name(datetime.now(UTC)), [row_of(f) for _, f in new])
        delivery = publish.preview(session, drop, file)
        name = posixpath.basename(delivery.remote_path)
        # Batches written in the same second: each takes the next free name.
        taken = 1
        while name in names:
            name = publish.family_name(file.file_name, taken)
            taken += 1
        names.add(name)
        if delivery.already_delivered:
            collision = f"an identical file is already there: {delivery.remote_path}"
        elif name != file.file_name:
            collision = f"{file.file_name} is taken"
    rows = {token: i for i, (token, _) in enumerate(new, start=1)}
    shown: list[PreviewedFile] = []
    for token, item in rendered:
        if isinstance(item, RenderError):
            shown.append(
                PreviewedFile(token, None, None, failure_code=item.failure_code, message=str(item))
            )
        elif token in rows:
            shown.append(
                PreviewedFile(token, item.invoice_number, name, collision, row=rows[token])
            )
        else:
            path, number = found[row_of(item)]
            shown.append(
                PreviewedFile(
                    token, item.invoice_number, None, already_delivered=f"{path} row {number}"
                )
            )
    return shown


__all__ = ["BatchIndex", "BatchWorker", "batch_file", "batch_file_name", "preview_batch", "rows_in"]
