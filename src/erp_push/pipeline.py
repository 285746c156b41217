"""The order of steps for each invoice, recovery of earlier runs, and concurrency.

    claim ─► get ─► render ─► publish (SFTP) ─► acknowledge ─► report result
                                  │
           each step is written to the journal before the next begins

Guarantees this module is responsible for (see README, "Guarantees"):

- Nothing stuck: every claimed invoice ends reported (100 or 97), or stays in the journal
  as unfinished, and a later run finishes it: a dead run's invoices with a live lease are
  resumed at the start of the next run; an invoice whose lease lapsed comes back through
  claim and is finished from the journal's evidence without a second upload.
- No duplicates: the upload is skipped when the journal, or an identical file in the
  outbox or sent folder, proves the invoice was delivered before.
- Fast when idle: the first claim asks for a single invoice, and SFTP is only contacted
  once there is something to deliver. That same probe means an unreachable SFTP server
  leaves at most one invoice waiting for its lease to lapse.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Literal

from erp_push import logs
from erp_push.batch_journal import BatchLedger
from erp_push.claim import NuntiqClient
from erp_push.errors import (
    AttachmentFailed,
    ErpPushError,
    FailureCode,
    InvalidTransition,
    LeaseExpired,
    LeaseLapsing,
    NameTaken,
    NuntiqAuthError,
    NuntiqDeadlineReached,
    NuntiqError,
    NuntiqProtocolError,
    RenderError,
    SftpDropped,
    SftpError,
    SftpOperationError,
    SftpUnreachable,
)
from erp_push.journal import Entry, Journal, Step
from erp_push.models import Invoice, Lease
from erp_push.render import FieldKeys, RenderedFile, RenderRules, render_invoice
from erp_push.report import Outcome, Result, RunReport, integration_result_for, truncate

if TYPE_CHECKING:  # the SSH library is loaded only when there is something to upload
    from erp_push.attachments import AttachmentOptions
    from erp_push.batch import BatchWorker
    from erp_push.processes import HelperLink, Helpers
    from erp_push.publish import Checkpoint, Delivery, ServerTraits
    from erp_push.transport import SftpSession

log = logging.getLogger("erp_push.pipeline")

DELTA_STREAM = "pushed_invoices"
# An invoice is only started when its lease has at least this long left: an upload that
# outlives its lease could be delivered twice (another run may claim it meanwhile).
LEASE_SAFETY_MARGIN = timedelta(seconds=30)
# Steps a later run finishes from the journal alone. Earlier steps are never resumed
# under the old lease: nothing is uploaded on a lease that may have lapsed (another run
# could hold the invoice by now). Those invoices return through claim once the lease
# lapses, and publish then finds an identical file if one landed before the crash.
RESUMABLE = {Step.PUBLISHED, Step.ACKNOWLEDGED, Step.FAILED}
# Statuses that mean someone finished the invoice: 100 Processed, 97 IntegrationFailed.
FINISHED_STATUSES = {100, 97}
# Failures that say the server, not the invoice, is the problem: a run stops claiming
# after one, so a full disk fails the invoices in flight, not the whole queue.
SERVER_REFUSALS = frozenset(
    {
        FailureCode.SFTP_DISK_FULL,
        FailureCode.SFTP_PERMISSION_DENIED,
        FailureCode.SFTP_PUBLISH_FAILED,
    }
)
# A write failure whose cause the server does not name. Not the invoice's fault as far
# as anyone can tell: the invoice stays pending, and a second one in a row (no file
# published in between) stops the run, so a broken server cannot burn the queue.
UNEXPLAINED_WRITE_FAILURE = FailureCode.SFTP_UPLOAD_FAILED
# A publish whose connection drops is tried again on a fresh one, this many times (each
# try first looks for the file the last one may have published).
PUBLISH_RETRIES = 2
# How long invoices already in flight at max_run_seconds may still talk to Nuntiq.
DEADLINE_GRACE_SECONDS = 60
# The outcome of an invoice whose lease lapsed at Nuntiq before we finished: it comes
# back through claim, in this run or a later one.
LEASE_LAPSED = "lease lapsed before the result was reported; the next run finishes it"
# The note on a deliberate re-send's outcome (`erp-push resend`).
RESENT = "re-sent on request: a fresh file beside the earlier one"


@dataclass(frozen=True, kw_only=True)
class PushPlan:
    """What one `erp-push push` does: ``Settings.push_plan()`` builds it from the settings
    (which own every default) and the command-line options."""

    connector_name: str
    outbox: str
    sent: str | None
    field_keys: FieldKeys
    batch_size: int
    lease_ttl_seconds: int
    concurrency: int  # the most invoices in flight at once
    choose_lanes: bool  # True: as many as the probe shows are needed, up to concurrency
    max_channels: int  # SFTP channels per SSH login
    drain: bool
    max_invoices: int | None
    max_run_seconds: float
    publish_mode: Literal["rename", "direct"]
    render_rules: RenderRules
    output_mode: Literal["per_invoice", "batch"]
    processes: int  # a drain's processes in all: more than 1 starts helpers (processes.py)
    attachments: AttachmentOptions | None = None  # None: no attachments are pushed


class RunStopped(Exception):
    """Raised inside a worker to stop the whole run (server unreachable, key refused)."""

    def __init__(self, error: ErpPushError) -> None:
        super().__init__(str(error))
        self.error = error


# --- checkpoints: named steps where crash tests kill or stall a run --------------------

# Crash tests only; never set in production. "<step>" kills at the first time any worker
# reaches ``step``; "<step>@<n>" at the n-th time (so that other invoices are in flight).
_KILL_STEP, _, _KILL_NTH = (os.environ.get("_ERP_PUSH_KILL_AT") or "").partition("@")
_KILL_HITS = itertools.count(1)
_KILL_LOCK = threading.Lock()


def checkpoint(step: str) -> None:
    """Kill this process hard at ``step`` when a crash test asked for it (SIGKILL: no cleanup).

    The run's default ``on_checkpoint`` hook: every step of the pipeline ("claimed",
    "fetched", "published_recorded", "acknowledged", "reported"), of batch mode
    ("batch_fetched", "batch_recorded", "batch_published_recorded") and of publish
    ("tmp_open", "tmp_written", "published") passes through it; with attachments also
    "attachments_downloaded", each attachment's publish steps prefixed "attachment_",
    and "attachment_recorded".
    """
    if not _KILL_STEP or step != _KILL_STEP:
        return
    with _KILL_LOCK:
        if next(_KILL_HITS) >= int(_KILL_NTH or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# --- SFTP sessions: one per worker, opened only when needed ---------------------------


# New SFTP logins opened at once by one run. Each costs several round trips (about 0.2 s
# at a 10 ms delay each way), so 64 lanes on 10-channel logins ramp up in three rounds,
# not six. Not more: OpenSSH drops unauthenticated connections at random beyond 10
# (MaxStartups 10:30:100). A dropped login is tried again (the first one too, see
# _first_login), but each drop costs a pause, so four runs starting together should
# stay under that (3 at once measured 8% faster at 10 ms once, no faster another day).
PARALLEL_LOGINS = 2

# Lanes (invoices worked on at once) are chosen from the time the probe spent waiting,
# see Pusher._choose_lanes: enough in flight for this many invoices/s, about what one
# process reaches when it never waits, and never fewer than MIN_LANES (nor more than
# concurrency).
LANE_RATE = 450
MIN_LANES = 4


class SessionPool:
    """Hands each worker its own SFTP session (paramiko's client is not thread-safe).

    Sessions are opened lazily, so a run that has nothing to upload never logs in. Extra
    workers get their own SFTP channel on an existing login, at most ``max_channels`` per
    login (servers cap channels per connection, and ProFTPD drops the whole connection
    on one too many); beyond that more logins are opened, PARALLEL_LOGINS at a time. A
    server that will not take another login (OpenSSH's MaxStartups drops connections
    that arrive in a burst) caps the pool at the logins it has: workers then wait for a
    free session.
    """

    def __init__(
        self,
        connect: Callable[[], SftpSession],
        max_channels: int,
        *,
        login_retry_delay: float = 1.0,
    ) -> None:
        self._connect = connect
        self._max_channels = max_channels
        self._login_retry_delay = login_retry_delay
        self._idle: queue.SimpleQueue[SftpSession] = queue.SimpleQueue()
        self._all: list[SftpSession] = []
        self._lock = threading.Lock()  # guards _all, _opening_on, _capped, the counts below
        self._logging_in = threading.BoundedSemaphore(PARALLEL_LOGINS)
        # Logins being opened, and the workers waiting for a channel on one of them: a
        # worker waits for a login in progress that has a channel to spare rather than
        # open one more (twenty lanes need two logins, not four).
        self._login_done = threading.Condition(self._lock)
        self._logins_opening = 0
        self._awaiting_logins = 0
        self._opening_on: dict[int, int] = {}  # channels being opened, per login
        self._capped = False  # the server refused another login: make do with these
        self._traits: ServerTraits | None = None

    @property
    def traits(self) -> ServerTraits:
        """What this run learned about the server, shared by every session."""
        with self._lock:
            if self._traits is None:
                from erp_push.publish import ServerTraits

                self._traits = ServerTraits()
            return self._traits

    @contextmanager
    def session(self) -> Iterator[SftpSession]:
        session = self._acquire()
        try:
            yield session
        except SftpError:
            self._discard(session)  # a broken connection is never reused
            raise
        except BaseException:
            self._idle.put(session)  # one file failed; the session is fine
            raise
        else:
            self._idle.put(session)

    def warm_up(self) -> None:
        """Open one session now, so an unreachable server is found before claiming more."""
        with self.session():
            pass

    def close(self) -> None:
        with self._lock:
            sessions, self._all = self._all, []
        # Channels first, then the connections they run on.
        for session in sorted(sessions, key=lambda session: session.owns_connection):
            session.close()

    def _acquire(self) -> SftpSession:
        while True:
            session = self._take_idle()
            if session is not None:
                return session
            session = self._open()
            if session is not None:
                return session
            # Capped: every session is busy; one comes back when its file is done.
            try:
                session = self._idle.get(timeout=1.0)
            except queue.Empty:
                continue
            if session.connected:
                return session
            self._discard(session)

    def _take_idle(self) -> SftpSession | None:
        """An idle session whose connection still lives (channels die with it)."""
        while True:
            try:
                session = self._idle.get_nowait()
            except queue.Empty:
                return None
            if session.connected:
                return session
            self._discard(session)

    def _open(self) -> SftpSession | None:
        """A new channel on a login with room, else a new login; None when capped.

        Channels are opened in parallel (each costs a round trip or two); logins a few
        at a time (PARALLEL_LOGINS), since servers throttle bursts of them.
        """
        while True:
            session, refused = self._open_channel()
            if session is not None:
                return session
            if not refused and self._await_login_in_progress():
                continue  # a login finished (or failed): look again
            with self._logging_in:
                session = self._take_idle()  # one may have come back while we waited
                if session is not None:
                    return session
                # Another worker's new login may have room now: use it (unless a
                # login just refused us a channel: then a login of our own).
                if not refused and self._has_room():
                    continue
                return self._open_login()

    def _open_channel(self) -> tuple[SftpSession | None, bool]:
        """A new channel on a login with room: (it, False); (None, False) when no login
        has room; (None, True) when the login refused it or broke."""
        login = self._reserve_channel()
        if login is None:
            return None, False
        try:
            session = login.open_channel()
        except SftpUnreachable as exc:
            log.info("%s; opening another connection", exc)
            return None, True
        finally:
            with self._lock:
                self._opening_on[id(login)] -= 1
        with self._lock:
            self._all.append(session)
        return session, False

    def _await_login_in_progress(self) -> bool:
        """Wait for a login another worker is opening, if it will have a channel to spare
        for this one; False (at once) if none will."""
        with self._login_done:
            spare = self._logins_opening * (self._max_channels - 1)
            if self._awaiting_logins >= spare:
                return False
            self._awaiting_logins += 1
            try:
                self._login_done.wait(timeout=1.0)
            finally:
                self._awaiting_logins -= 1
            return True

    def _has_room(self) -> bool:
        with self._lock:
            return self._login_with_room() is not None

    def _open_login(self) -> SftpSession | None:
        """A new login (the caller holds a login slot); None when capped."""
        with self._lock:
            logins = [s for s in self._all if s.owns_connection and s.connected]
            if self._capped and logins:
                return None
            self._logins_opening += 1
        session = None
        try:
            session = self._login(have_others=bool(logins))
        finally:
            with self._login_done:
                self._logins_opening -= 1
                if session is not None:
                    self._all.append(session)
                self._login_done.notify_all()
        return session

    def _reserve_channel(self) -> SftpSession | None:
        """A live login with a free channel slot, the slot counted as taken."""
        with self._lock:
            login = self._login_with_room()
            if login is not None:
                self._opening_on[id(login)] = self._opening_on.get(id(login), 0) + 1
            return login

    def _login_with_room(self) -> SftpSession | None:
        """A live login with a free channel slot (the caller holds ``_lock``)."""
        for login in self._all:
            if not (login.owns_connection and login.connected):
                continue
            used = sum(1 for s in self._all if s.same_connection(login))
            if used + self._opening_on.get(id(login), 0) < self._max_channels:
                return login
        return None

    def _login(self, *, have_others: bool) -> SftpSession | None:
        if not have_others:
            return self._first_login()
        for attempt in (1, 2):
            try:
                return self._connect()
            except SftpUnreachable as exc:
                # The server is up (we hold a login): it is refusing a burst of them.
                log.info("another SFTP login was refused (%s); attempt %d", exc, attempt)
                time.sleep(self._login_retry_delay * attempt)
        with self._lock:
            self._capped = True
        log.info("the SFTP server takes no more logins; sharing the sessions already open")
        return None

    def _first_login(self) -> SftpSession:
        """The run's first login: its failure is the run's, except a connection the server
        dropped before its banner (OpenSSH beyond MaxStartups, several runs or clients
        logging in at once), which is tried again after a short, jittered pause."""
        for attempt in (1, 2, 3):
            try:
                return self._connect()
            except SftpDropped as exc:
                if attempt == 3:
                    raise
                pause = self._login_retry_delay * attempt * random.uniform(0.5, 1.5)
                log.info("%s; trying again in %.1f s (attempt %d of 3)", exc, pause, attempt)
                time.sleep(pause)
        raise AssertionError("unreachable: the third attempt returns or raises")

    def _discard(self, session: SftpSession) -> None:
        with self._lock:
            if session in self._all:
                self._all.remove(session)
        session.close()


class ServerHealth:
    """Whether the SFTP server still takes files, as seen by all lanes of a run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unexplained_in_a_row = 0
        self.refusing: str | None = None  # why the run stopped uploading, once it did

    def halt(self, reason: str) -> None:
        with self._lock:
            self.refusing = self.refusing or reason

    def published(self) -> None:
        with self._lock:
            self._unexplained_in_a_row = 0

    def refused(self, failure_code: FailureCode) -> None:
        self.halt(f"the SFTP server refused writes ({failure_code})")

    def unexplained_failure(self, message: str) -> None:
        with self._lock:
            self._unexplained_in_a_row += 1
            if self._unexplained_in_a_row >= 2 and self.refusing is None:
                self.refusing = f"the SFTP server failed two writes in a row ({message})"


class InvoiceWorker:
    """Delivers one leased invoice. Stateless apart from the shared clients and journal."""

    def __init__(
        self,
        *,
        nuntiq: NuntiqClient,
        sessions: SessionPool,
        journal: Journal,
        plan: PushPlan,
        today: date,
        on_checkpoint: Checkpoint | None = None,
        health: ServerHealth | None = None,
        row_of: Callable[[str], int | None] | None = None,
    ) -> None:
        self.nuntiq = nuntiq
        self.sessions = sessions
        self.journal = journal
        self.plan = plan
        self.today = today
        self.health = health or ServerHealth()
        # Crash tests kill (or stall) the run at a named step, the pipeline's and
        # publish's alike: ``checkpoint`` unless a test passes its own.
        self.checkpoint = on_checkpoint or checkpoint
        # An invoice delivered in a batch file is reported with its row there.
        self.row_of = row_of or (lambda _token: None)

    def deliver(self, lease: Lease, entry: Entry) -> Outcome:
        """Take ``lease`` from wherever the journal says it got to, to a reported result."""
        token = lease.invoice_token
        try:
            if entry.failed:  # decided before: report it, even if it was acknowledged since
                outcome = self._failure(entry, entry.failure_code, entry.failure_message)
            elif entry.delivered:
                assert entry.remote_path is not None
                outcome = Outcome(
                    token,
                    Result.ALREADY_DELIVERED,
                    entry.invoice_number,
                    entry.remote_path,
                    row=self.row_of(token),
                )
            else:
                outcome = self._upload(lease, entry)
            return self._finish(lease, outcome)
        except (NuntiqAuthError, SftpError) as exc:
            raise RunStopped(exc) from exc

    def _upload(self, lease: Lease, entry: Entry) -> Outcome:
        token = lease.invoice_token
        if self._lease_too_short(lease):
            return Outcome(
                token, Result.PENDING, entry.invoice_number, message="lease too close to expiry"
            )
        # An invoice whose own data stops it (it does not fit the contract, cannot be
        # written safely, or trips a renderer bug) would stop every later run the same
        # way: it fails alone, with a code, rather than wait in the queue forever.
        try:
            detail = self.nuntiq.get_invoice(token)
        except NuntiqProtocolError as exc:  # also NuntiqReplyTooLarge, with its own code
            return self._fail_alone(token, exc.failure_code, str(exc))
        self.checkpoint("fetched")
        try:
            file = render_invoice(
                detail.invoice,
                keys=self.plan.field_keys,
                rules=self.plan.render_rules,
                today=self.today,
            )
        except RenderError as exc:
            # The number as Nuntiq holds it, if it is text: which invoice failed is the
            # first thing an operator reading the summary or the log asks.
            number = detail.invoice.field(self.plan.field_keys.invoice_number)
            number = number.strip() or None if isinstance(number, str) else None
            return self._fail_alone(token, exc.failure_code, str(exc), number)
        except Exception as exc:
            log.exception("rendering %s failed unexpectedly", token, extra={"invoice_token": token})
            return self._fail_alone(
                token, FailureCode.RENDER_FAILED, f"unexpected {type(exc).__name__} while rendering"
            )
        self.journal.record_rendered(
            token, invoice_number=file.invoice_number, file_name=file.file_name, sha256=file.sha256
        )
        if self._lease_too_short(lease):  # fetching may have taken long (retries)
            return Outcome(
                token, Result.PENDING, file.invoice_number, message="lease too close to expiry"
            )
        if self.health.refusing is not None:  # another lane found the server refusing
            return Outcome(
                token,
                Result.PENDING,
                file.invoice_number,
                message=f"not uploaded: {self.health.refusing}",
            )
        try:
            delivery = self._publish(file, lease, detail.invoice, resend=entry.resend)
        except (LeaseLapsing, NameTaken) as exc:
            return Outcome(token, Result.PENDING, file.invoice_number, message=str(exc))
        except AttachmentFailed as exc:  # this invoice's attachment: it fails alone
            return self._fail_alone(token, exc.failure_code, str(exc), file.invoice_number)
        except SftpOperationError as exc:
            if exc.failure_code == UNEXPLAINED_WRITE_FAILURE:
                self.health.unexplained_failure(str(exc))
                return Outcome(
                    token,
                    Result.PENDING,
                    file.invoice_number,
                    message=truncate(f"{exc}; left for the next run"),
                )
            if exc.failure_code in SERVER_REFUSALS:
                self.health.refused(exc.failure_code)
            return self._fail_alone(token, exc.failure_code, str(exc), file.invoice_number)
        self.health.published()
        if entry.resend:
            self.journal.record_resent(token, delivery.remote_path)  # the mark is used up
        else:
            self.journal.record_published(token, delivery.remote_path)
        self.checkpoint("published_recorded")
        result = Result.ALREADY_DELIVERED if delivery.already_delivered else Result.DELIVERED
        note = RESENT if entry.resend else None
        return Outcome(token, result, file.invoice_number, delivery.remote_path, message=note)

    @staticmethod
    def _lease_too_short(lease: Lease) -> bool:
        """Uploading on a lease about to lapse risks another run holding the invoice."""
        return lease.lease_expires_at - LEASE_SAFETY_MARGIN <= datetime.now(UTC)

    def _publish(
        self,
        file: RenderedFile,
        lease: Lease,
        invoice: Invoice | None = None,
        *,
        resend: bool = False,
    ) -> Delivery:
        """Publish ``file``, once: after a dropped connection, look before uploading again.

        ``publish`` itself first looks for an identical file under the invoice's names
        (outbox and sent/), so the retry on a fresh connection finds a file the server
        published just before the connection dropped, and uploads nothing. The lease is
        asked at the last moment before anything becomes visible to the ERP, on the
        first try and on the retry alike. With ``plan.attachments``, the invoice's
        attachments are downloaded first and published before the CSV (attachments.py).

        A deliberate re-send (``resend``) looks only for its own fresh file, where an
        earlier try was about to publish it (the journal has the name), and otherwise
        publishes beside the earlier files, never treating them as delivered. It sends
        the CSV alone: the attachments delivered with the first file stay where they are.
        """
        from erp_push import publish

        drop = publish.Drop(
            outbox=self.plan.outbox,
            sent=self.plan.sent,
            mode=self.plan.publish_mode,
        )
        files = None
        if self.plan.attachments is not None and invoice is not None and not resend:
            from erp_push.attachments import InvoiceFiles

            files = InvoiceFiles.fetch(
                self.nuntiq,
                invoice,
                file,
                self.plan.attachments,
                self.journal,
                must_end_by=lease.lease_expires_at - LEASE_SAFETY_MARGIN,
                on_checkpoint=self.checkpoint,
            )

        token = lease.invoice_token

        def attempt() -> Delivery:
            # One writer at a time per family of names, across lanes and runs: see
            # Journal.name_lock (two batch files named in the same second, say). The
            # session first: a lane waiting for one must not hold a family's turn.
            with self.sessions.session() as sftp, self.journal.name_lock(file.file_name):
                if resend:
                    target = self.journal.resend_target(token)
                    name = target.rpartition("/")[2] if target else None
                    landed = name and publish.find_at(sftp, drop, name, file)
                    if landed:  # an earlier try died after publishing, before journaling
                        return publish.Delivery(remote_path=landed, already_delivered=True)
                if files is not None:
                    return files.publish(
                        sftp,
                        drop,
                        traits=self.sessions.traits,
                        may_publish=lambda: not self._lease_too_short(lease),
                        on_checkpoint=self.checkpoint,
                    )
                return publish.publish(
                    sftp,
                    drop,
                    file,
                    traits=self.sessions.traits,
                    may_publish=lambda: not self._lease_too_short(lease),
                    on_checkpoint=self.checkpoint,
                    fresh=(lambda path: self.journal.record_resend_target(token, path))
                    if resend
                    else None,
                )

        try:
            return self._publish_retried(attempt, file, lease)
        finally:
            if files is not None:
                files.close()

    def _publish_retried(
        self, attempt: Callable[[], Delivery], file: RenderedFile, lease: Lease
    ) -> Delivery:
        retries_left = PUBLISH_RETRIES
        while True:
            try:
                return attempt()
            except SftpUnreachable as exc:
                if retries_left == 0:
                    raise
                retries_left -= 1
                log.warning(
                    "SFTP connection lost while publishing %s (%s); reconnecting",
                    file.file_name,
                    exc,
                    extra={"invoice_token": lease.invoice_token},
                )
                if self._lease_too_short(lease):
                    raise LeaseLapsing("lease too close to expiry to retry the upload") from None

    def _fail_alone(
        self, token: str, code: FailureCode, message: str, invoice_number: str | None = None
    ) -> Outcome:
        self.journal.record_failed(token, code, truncate(message), invoice_number)
        return Outcome(
            token, Result.FAILED, invoice_number, failure_code=code, message=truncate(message)
        )

    def _failure(self, entry: Entry, code: str | None, message: str | None) -> Outcome:
        return Outcome(
            entry.invoice_token,
            Result.FAILED,
            entry.invoice_number,
            failure_code=code or FailureCode.UNKNOWN_FAILURE,
            message=message,
        )

    def _finish(self, lease: Lease, outcome: Outcome) -> Outcome:
        """Acknowledge, then report. Any Nuntiq trouble leaves the journal to finish later."""
        if outcome.result is Result.PENDING:
            return outcome
        token, lease_token = lease.invoice_token, lease.lease_token
        try:
            self.nuntiq.acknowledge(token, lease_token)
            self.journal.record_acknowledged(token)
            self.checkpoint("acknowledged")
            self.nuntiq.report_result(token, lease_token, integration_result_for(outcome))
            self.journal.record_reported(token)
            self.checkpoint("reported")
            return outcome
        except InvalidTransition:
            return self._settle_conflict(outcome)
        except LeaseExpired:
            return replace(
                outcome,
                result=Result.PENDING,
                message=LEASE_LAPSED,
            )
        except NuntiqAuthError:
            raise
        except NuntiqError as exc:
            log.warning(
                "could not finish %s with Nuntiq: %s", token, exc, extra={"invoice_token": token}
            )
            return replace(
                outcome,
                result=Result.PENDING,
                message=f"Nuntiq did not take the result ({exc}); the next run finishes it",
            )

    def _settle_conflict(self, outcome: Outcome) -> Outcome:
        """Nuntiq refused the transition: find out whether the invoice is still ours."""
        token = outcome.invoice_token
        status = self.nuntiq.get_invoice(token).invoice.status
        if status in FINISHED_STATUSES:
            self.journal.record_reported(token)  # someone else finished it; nothing to do
        # Otherwise (a lapsed lease, or 95/96/98: not ours to touch) the row stays as it
        # is: its evidence of delivery is what keeps a later claim from uploading again.
        return replace(
            outcome,
            result=Result.PENDING if status not in FINISHED_STATUSES else outcome.result,
            message=f"Nuntiq reports status {status}; left as it is",
        )


# --- a whole run ----------------------------------------------------------------------


class Pusher:
    """One `erp-push push`: recover earlier runs, then claim and deliver batches."""

    def __init__(
        self,
        *,
        nuntiq: NuntiqClient,
        connect_sftp: Callable[[], SftpSession],
        journal: Journal,
        plan: PushPlan,
        today: date | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
        on_claimed: Callable[[int], None] | None = None,
        on_checkpoint: Checkpoint | None = None,
        helper_command: list[str] | None = None,
        link: HelperLink | None = None,
    ) -> None:
        self.nuntiq = nuntiq
        # A drain shared by processes (processes.py): the first process starts helpers
        # with helper_command; a helper talks to the first process through its link.
        self.helper_command = helper_command
        self.link = link
        self._helpers: Helpers | None = None
        self._told_to_stop = threading.Event()  # a helper: the first process stopped
        self._report_lock = threading.Lock()  # helpers' lines arrive on other threads
        self._claimed_here = 0  # by this process (report.claimed counts its helpers too)
        self.journal = journal
        self.plan = plan
        self.sessions = SessionPool(connect_sftp, max_channels=plan.max_channels)
        self.health = ServerHealth()
        ledger = BatchLedger(journal)
        self.worker = InvoiceWorker(
            nuntiq=nuntiq,
            sessions=self.sessions,
            journal=journal,
            plan=plan,
            today=today or datetime.now(UTC).date(),
            on_checkpoint=on_checkpoint,
            health=self.health,
            row_of=ledger.row_of,
        )
        # output_mode batch: each claimed batch is one file, delivered by one lane.
        self.batches: BatchWorker | None = None
        if plan.output_mode == "batch":
            from erp_push.batch import BatchWorker

            self.batches = BatchWorker(self.worker, ledger)
        # The run's deadline, by the monotonic clock: past it nothing new is claimed or
        # started; what is in flight finishes its steps (each bounded by its timeouts).
        # Nuntiq calls get a grace period past it to finish those steps, then none is
        # sent at all: a Nuntiq that hangs or throttles cannot keep the run past it.
        self._deadline = time.monotonic() + plan.max_run_seconds
        if nuntiq.deadline is None:
            nuntiq.deadline = self._deadline + DEADLINE_GRACE_SECONDS
        self.on_outcome = on_outcome or (lambda _o: None)
        self.on_claimed = on_claimed or (lambda _n: None)
        self.report = RunReport(command="push")
        self._stop: ErpPushError | None = None
        self._drain_stuck = False
        # Recovered invoices still pending: reported at the end unless claim finished them.
        self._recovery_pending: list[Outcome] = []
        # Invoices worked on at once (after the probe, which goes alone): concurrency, or
        # with concurrency auto as many as _choose_lanes finds are needed.
        self.lanes = 1 if plan.choose_lanes else plan.concurrency
        self._probe_cpu = 0.0  # CPU seconds the probe's lane spent (_timed_probe)
        self._delta_started = False  # the delta stream knows of this run (_delta_begin)

    def run(self) -> RunReport:
        self.journal.start_run()
        if self.link is None:  # a helper leaves the run's bookkeeping to the first process
            self._delta_begin()
        try:
            with ThreadPoolExecutor(max_workers=self.plan.concurrency) as pool:
                self._pool = pool
                try:
                    if self.link is None:
                        self._recover()
                    if self._stop is None:
                        self._claim_and_deliver()
                    if self._helpers is not None:
                        self._helpers.finish_into(self.report)
                except BaseException as exc:
                    # Ctrl-C, SIGTERM, a bug: invoices not started stay as they are (the
                    # journal and their leases bring them back); those in flight finish
                    # the step they are in, and publish nothing new. Helpers do the same.
                    self.health.halt(f"the run was stopped ({type(exc).__name__})")
                    if self._helpers is not None:
                        from erp_push.processes import signal_for

                        self._helpers.forward(signal_for(exc))
                    pool.shutdown(wait=True, cancel_futures=True)
                    if self._helpers is not None:
                        self._helpers.finish_into(self.report)
                    raise
            self._record_recovery_pending()
        except BaseException as exc:
            # Still say on the delta stream that this run failed (Ctrl-C, a bug).
            self.report.finish()
            self._delta_end(failure=f"{type(exc).__name__} ({self.report.summary_line()})")
            raise
        finally:
            self.sessions.close()
        self.report.error = self._stop
        self.report.finish()
        self._delta_end()
        return self.report

    # --- run bookkeeping on the delta stream: observability only, never fatal ----------

    def _delta_begin(self) -> None:
        self._delta_started = self._delta_call(
            "begin", lambda: self.nuntiq.delta_begin(self.plan.connector_name, DELTA_STREAM)
        )

    def _delta_end(self, failure: str | None = None) -> None:
        if not self._delta_started:
            return
        connector, report = self.plan.connector_name, self.report
        if failure is None and report.error is not None:
            failure = f"{type(report.error).__name__}: {report.error}"
        if failure is not None:
            summary = truncate(failure)
            self._delta_call(
                "fail", lambda: self.nuntiq.delta_fail(connector, DELTA_STREAM, summary)
            )
            return
        cursor = (report.finished_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        metadata = {
            "claimed": report.claimed,
            "recovered": report.recovered,
            **{r.value: report.count(r) for r in Result},
            "remote_outbox": self.plan.outbox,
        }
        self._delta_call(
            "complete",
            lambda: self.nuntiq.delta_complete(
                connector,
                DELTA_STREAM,
                new_cursor_value=cursor,
                records_processed=len(report.outcomes),
                metadata=metadata,
            ),
        )

    def _delta_call(self, what: str, call: Callable[[], object]) -> bool:
        try:
            call()
            return True
        except NuntiqError as exc:
            log.warning(
                "delta stream %s %s failed (deliveries are unaffected): %s", DELTA_STREAM, what, exc
            )
            return False

    # --- recovery -----------------------------------------------------------------------

    def _recover(self) -> None:
        """Acknowledge and report what dead runs delivered (or failed) while their leases live."""
        pruned = self.journal.prune()
        if pruned:
            log.info("journal: forgot %d invoices finished long ago", pruned)
        now = datetime.now(UTC)
        resumable: list[tuple[Lease, Entry]] = []
        for entry in self.journal.unfinished():
            if entry.step not in RESUMABLE or not entry.lease_alive(now):
                continue  # it comes back through claim, and its upload is checked then
            if self.journal.run_is_alive(entry.run_id):
                continue  # another run is working on it right now
            adopted = self.journal.adopt(entry)
            if adopted is not None:
                lease = Lease(
                    invoice_token=adopted.invoice_token,
                    lease_token=adopted.lease_token,
                    lease_expires_at=adopted.lease_expires_at,
                )
                resumable.append((lease, adopted))
        if not resumable:
            return
        log.info("recovering %d invoice(s) left unfinished by an earlier run", len(resumable))
        for outcome in self._deliver_all(resumable):
            if outcome.result is Result.PENDING:
                # Its lease may have lapsed at Nuntiq while it looked alive here: then claim
                # can hand it back to this very run, which finishes it. Reporting it now
                # would count it twice (pending, then delivered) and fail the exit code.
                if outcome.message != LEASE_LAPSED:
                    self._recovery_pending.append(outcome)
                continue  # a lapsed lease: it returns through claim in this or a later run
            self.report.recovered += 1
            self._record(outcome)

    def _record_recovery_pending(self) -> None:
        """Report recovered invoices that are still pending, unless claim finished them."""
        done = {o.invoice_token for o in self.report.outcomes}
        for outcome in self._recovery_pending:
            if outcome.invoice_token not in done:
                self._record(outcome)
        self._recovery_pending = []

    # --- claiming -----------------------------------------------------------------------

    def _claim_and_deliver(self) -> None:
        """Claim and deliver, keeping every lane busy: the next batch is claimed while
        the last one is still being delivered, never more than one batch ahead."""
        # One batch, or with --drain batches until the queue is empty; never more than
        # --max-invoices in all.
        budget = self.plan.max_invoices if self.plan.drain else self.plan.batch_size
        if self.plan.max_invoices is not None:
            budget = min(budget or self.plan.max_invoices, self.plan.max_invoices)
        if self.link is not None:
            # A helper: the first process's probe went through, so it claims full batches
            # at once, once its own login works and the first process says go (with the
            # lanes its probe chose). The first process may also no longer need it.
            if not self._warm_up_sftp([]):
                return
            lanes = self.link.wait_for_go(self._told_to_stop.set)
            if lanes is None:
                return
            if self.plan.choose_lanes:
                self.lanes = lanes
            probe: int | None = None
            leases = self._claim(
                self.plan.batch_size if budget is None else min(self.plan.batch_size, budget)
            )
        else:
            # A probe of one: idle runs stay fast and never log in to SFTP, and an
            # unreachable SFTP server strands at most this one lease. Helpers start
            # meanwhile, and claim once it went through.
            probe = 1
            leases = self._claim(1)
            if not leases:
                return
            budget = self._start_helpers(budget)
            if not self._warm_up_sftp(leases):
                return
        if self.batches is not None and probe is not None and budget != 1:
            # One file per claimed batch: the probe's batch is filled up to batch_size.
            more = (
                self.plan.batch_size - 1
                if budget is None
                else min(self.plan.batch_size, budget) - 1
            )
            leases += self._claim(more) if more > 0 else []
        in_flight: dict[Future[Outcome | list[Outcome]], int] = {}
        # Each future puts itself here when done: taking the next is O(1), where wait()
        # installs and removes a waiter on every future in flight at each completion.
        finished: queue.SimpleQueue[Future[Outcome | list[Outcome]]] = queue.SimpleQueue()
        # Claimed work not started yet: a lane takes the next as soon as it is free.
        waiting: deque[tuple[int, Callable[[], Outcome | list[Outcome]]]] = deque()
        batches: dict[int, list[Outcome]] = {}
        open_batches: dict[int, int] = {}  # batch number -> invoices not yet finished
        batch_no = 0
        queue_empty = False
        probe_started = time.monotonic()
        while True:
            if leases:
                batch_no += 1
                batches[batch_no], open_batches[batch_no] = [], len(leases)
                entries = [(lease, self.journal.record_claim(lease)) for lease in leases]
                self.worker.checkpoint("claimed")
                if self.batches is not None:
                    waiting.append((batch_no, partial(self._deliver_batch, entries)))
                else:
                    for lease, entry in entries:
                        waiting.append((batch_no, partial(self._deliver_one, lease, entry)))
                leases = []
            while waiting and len(in_flight) < self.lanes:
                number, deliver = waiting.popleft()
                if number == probe:
                    deliver = partial(self._timed_probe, deliver)
                future = self._pool.submit(deliver)
                in_flight[future] = number
                future.add_done_callback(finished.put)
            stop_reason = self._why_stop_claiming(queue_empty, budget)
            own_share_spent = budget is not None and self._claimed_here >= budget
            if stop_reason is not None and self._helpers is not None and not own_share_spent:
                self._helpers.stop_claiming()  # they stop too: empty, out of time, refused
            # The probe is finished before more is claimed: a server that refuses every
            # write, or a Nuntiq that refuses every result, then costs one invoice.
            probing = probe in open_batches
            in_flight_invoices = sum(open_batches.values())
            if stop_reason is None and not probing and in_flight_invoices < self.lanes:
                left = None if budget is None else budget - self._claimed_here
                limit = self.plan.batch_size if left is None else min(self.plan.batch_size, left)
                leases = self._claim(limit)
                queue_empty = not leases
                continue
            if not in_flight:
                if stop_reason:
                    self.report.notes.append(stop_reason)
                return
            done = [finished.get()]
            while not finished.empty():
                done.append(finished.get())
            for future in done:
                number = in_flight.pop(future)
                result = future.result()
                for outcome in result if isinstance(result, list) else [result]:
                    self._record(outcome)
                    batches[number].append(outcome)
                    open_batches[number] -= 1
                if open_batches[number] == 0:
                    if number == probe and self.plan.choose_lanes:
                        waited = time.monotonic() - probe_started - self._probe_cpu
                        self._choose_lanes(waited)
                    self._batch_finished(batches.pop(number))
                    del open_batches[number]
                    if number == probe and self._helpers is not None:
                        self._let_helpers_claim(queue_empty)

    def _timed_probe(
        self, deliver: Callable[[], Outcome | list[Outcome]]
    ) -> Outcome | list[Outcome]:
        """The probe's delivery, counting the CPU its lane spent (see _choose_lanes)."""
        started = time.thread_time()
        try:
            return deliver()
        finally:
            self._probe_cpu += time.thread_time() - started

    def _choose_lanes(self, waited: float) -> None:
        """Set how many invoices are worked on at once, from how long the probe waited.

        Lanes beyond what the round trips need do not go faster, they only take turns for
        the process's one core (the GIL): at 0 ms, 8 lanes cost about 8% more CPU per
        invoice than 4, 64 another 10%. The probe ran alone, so its wall time less the CPU
        its lane spent (first-time work included: imports, the first of each request) is
        one invoice's waiting on the network and the servers; by Little's law, keeping
        LANE_RATE invoices/s going then needs LANE_RATE × that many in flight (10 ms each
        way: ~0.15 s → 64; loopback: a few ms → MIN_LANES).
        """
        wanted = math.ceil(max(waited, 0.0) * LANE_RATE)
        self.lanes = max(min(MIN_LANES, self.plan.concurrency), min(wanted, self.plan.concurrency))
        logs.event(
            "lanes_chosen",
            f"lanes: {self.lanes} (the first invoice waited {waited * 1000:.0f} ms on the "
            f"network and the servers; concurrency {self.plan.concurrency})",
            lanes=self.lanes,
            probe_wait_ms=round(waited * 1000, 1),
            concurrency=self.plan.concurrency,
        )

    def _why_stop_claiming(self, queue_empty: bool, budget: int | None) -> str | None:
        """None while the run should claim more; else why it stops (a note, or "")."""
        if self._stop is not None:
            return ""
        if self.health.refusing is not None:
            # The server refuses writes (full disk, permissions, no rename): the invoices
            # it refused failed, each with its code; more would only fail the same way.
            return f"stopped claiming: {self.health.refusing}"
        if queue_empty or self._drain_stuck or self._told_to_stop.is_set():
            return ""
        if budget is not None and self._claimed_here >= budget:
            return ""
        if time.monotonic() >= self._deadline:
            return (
                f"stopped claiming: the run reached max_run_seconds "
                f"({self.plan.max_run_seconds:g} s); the rest waits for the next run"
            )
        return None

    def _batch_finished(self, outcomes: list[Outcome]) -> None:
        if self.plan.drain and all(o.result is Result.PENDING for o in outcomes):
            # Nothing in this batch could be finished (Nuntiq refusing results, say):
            # claiming more would only take leases that lapse and come back. Stop.
            if not self._drain_stuck:
                self.report.notes.append(
                    "stopped draining: no invoice of the last batch could be finished"
                )
            self._drain_stuck = True

    def _claim(self, limit: int) -> list[Lease]:
        ttl = self.plan.lease_ttl_seconds
        asked_at = datetime.now(UTC)
        try:
            leases = self.nuntiq.claim(limit=limit, lease_ttl_seconds=ttl)
        except NuntiqDeadlineReached:
            return []  # the run is out of time: not an error, the rest waits for the next
        except NuntiqError as exc:
            self._stop = exc
            return []
        # Lease deadlines are kept by our own clock: when we asked, plus the TTL we asked
        # for. That is never later than the real expiry, whatever Nuntiq's clock says, so
        # clock skew cannot make us upload on a lease that has already lapsed.
        deadline = asked_at + timedelta(seconds=ttl)
        leases = [lease.model_copy(update={"lease_expires_at": deadline}) for lease in leases]
        self._claimed_here += len(leases)
        self._count_claimed(len(leases))
        if self.link is not None and leases:
            self.link.claimed(leases)
        return leases

    def _start_helpers(self, budget: int | None) -> int | None:
        """Start the drain's helper processes (``processes``); return this one's budget.

        Only a drain, with something to claim, started from the command line (which
        knows how to start one: helper_command); with --max-invoices each process gets
        its share, and a budget too small to share keeps the drain in this process.
        """
        extra = self.plan.processes - 1
        if self.helper_command is None or extra < 1 or not self.plan.drain:
            return budget
        share = None if budget is None else budget // self.plan.processes
        if share is not None and share < self.plan.batch_size:
            return budget
        from erp_push.processes import Helpers

        try:
            self._helpers = Helpers(
                self.helper_command,
                extra,
                max_invoices=share,
                seconds_left=self._deadline - time.monotonic(),
                on_claimed=self._count_claimed,
                on_outcome=self._add_outcome,
            )
        except OSError as exc:  # cannot start a process: the drain goes on in this one
            log.warning("could not start helper processes, draining alone: %s", exc)
            return budget
        return None if budget is None or share is None else budget - extra * share

    def _let_helpers_claim(self, queue_empty: bool) -> None:
        """The probe is finished: helpers claim now, with the lanes it chose, unless the
        run stops claiming (a refusing server has then cost one invoice, not one each)."""
        assert self._helpers is not None
        if self._why_stop_claiming(queue_empty, budget=None) is None:
            self._helpers.go(self.lanes)

    def _count_claimed(self, count: int) -> None:
        """Invoices claimed by this process or a helper: into the report and progress."""
        with self._report_lock:
            self.report.claimed += count
            self.on_claimed(count)

    def _add_outcome(self, outcome: Outcome) -> None:
        """An invoice finished by this process or a helper (whichever logged it)."""
        with self._report_lock:
            self.report.add(outcome)
            self.on_outcome(outcome)

    def _warm_up_sftp(self, leases: list[Lease]) -> bool:
        try:
            self.sessions.warm_up()
            return True
        except ErpPushError as exc:  # unreachable, refused, or a broken known_hosts file
            self._stop = exc
            for lease in leases:
                self._record(
                    Outcome(
                        lease.invoice_token,
                        Result.PENDING,
                        message="SFTP unreachable; claimable again when its lease lapses",
                    )
                )
            return False

    def _deliver_all(self, work: list[tuple[Lease, Entry]]) -> Iterator[Outcome]:
        futures = [self._pool.submit(self._deliver_one, lease, entry) for lease, entry in work]
        for future in futures:
            yield future.result()

    def _deliver_one(self, lease: Lease, entry: Entry) -> Outcome:
        if self._stop is not None:
            return Outcome(
                lease.invoice_token,
                Result.PENDING,
                entry.invoice_number,
                message=f"run stopped: {self._stop}",
            )
        if time.monotonic() >= self._deadline and entry.step not in RESUMABLE:
            return Outcome(
                lease.invoice_token,
                Result.PENDING,
                entry.invoice_number,
                message="not started: the run reached max_run_seconds",
            )
        try:
            return self.worker.deliver(lease, entry)
        except RunStopped as stop:
            self._stop = self._stop or stop.error
            return Outcome(
                lease.invoice_token,
                Result.PENDING,
                entry.invoice_number,
                message=f"run stopped: {stop.error}",
            )
        except NuntiqError as exc:
            # get_invoice failed after its retries: the lease lapses and it comes back.
            return Outcome(
                lease.invoice_token, Result.PENDING, entry.invoice_number, message=f"Nuntiq: {exc}"
            )
        except Exception as exc:  # a bug must not lose the batch: journal keeps the state
            log.exception(
                "unexpected error delivering %s",
                lease.invoice_token,
                extra={"invoice_token": lease.invoice_token},
            )
            return Outcome(
                lease.invoice_token,
                Result.PENDING,
                entry.invoice_number,
                message=f"unexpected error: {type(exc).__name__}",
            )

    def _deliver_batch(self, work: list[tuple[Lease, Entry]]) -> list[Outcome]:
        """output_mode batch: the claimed batch as one file (``batch.BatchWorker``)."""
        assert self.batches is not None
        why = None
        if self._stop is not None:
            why = f"run stopped: {self._stop}"
        elif time.monotonic() >= self._deadline:
            why = "not started: the run reached max_run_seconds"
        if why is None:
            try:
                outcomes, stopped = self.batches.deliver(work)
                if stopped is not None:
                    self._stop = self._stop or stopped
                return outcomes
            except Exception as exc:  # a bug must not lose the batch: journal keeps the state
                log.exception("unexpected error delivering a batch")
                why = f"unexpected error: {type(exc).__name__}"
        return [
            Outcome(lease.invoice_token, Result.PENDING, entry.invoice_number, message=why)
            for lease, entry in work
        ]

    def _record(self, outcome: Outcome) -> None:
        logs.invoice(outcome)
        self._add_outcome(outcome)
        if self.link is not None:
            self.link.outcome(outcome)
