"""The local journal: each invoice's progress, written durably before the next step.

Nuntiq's lease model cannot tell us whether a file already reached the ERP: a lease that
lapses sends an invoice back to the queue even after it was acknowledged (93 -> 91), and
there is no renew call. The journal is our own memory of what happened, so that

- a run that died is finished by the next one (acknowledge and report what landed),
- an invoice claimed again after its lease lapsed is not uploaded a second time.

One row per invoice token, in SQLite (WAL, synchronous=NORMAL: a committed row survives
any crash of the process, SIGKILL included, because the commit has reached the WAL file
in the OS before it returns; only a crash of the machine itself can lose the last few
commits. That is the same loss as a lost journal, which the folders' evidence covers
(an identical file under the invoice's names counts as delivered), and it spares every
lane an fsync per step.) Several push processes may share one
journal; each holds an advisory lock on its own run file while it runs, so a later run
can tell a dead run's rows (to be finished) from a live run's rows (hands off).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from erp_push.errors import JournalUnusable
from erp_push.models import Lease


class Step(StrEnum):
    """How far an invoice got. Ordered: each step is recorded before the next begins."""

    CLAIMED = "claimed"
    RENDERED = "rendered"  # file name and content hash known; upload may be under way
    PUBLISHED = "published"  # the file is under its final name (remote_path)
    FAILED = "failed"  # the invoice cannot be delivered; a failure is to be reported
    ACKNOWLEDGED = "acknowledged"
    REPORTED = "reported"  # Nuntiq has the result: nothing left to do


@dataclass(frozen=True)
class Entry:
    invoice_token: str
    lease_token: str
    lease_expires_at: datetime
    run_id: str
    step: Step
    invoice_number: str | None
    file_name: str | None
    sha256: str | None
    remote_path: str | None
    failure_code: str | None
    failure_message: str | None
    updated_at: datetime
    # A deliberate re-send was asked for (`erp-push resend`) and this claim carries it
    # out: earlier files, in the journal or the folders, do not count as delivered.
    resend: bool = False

    @property
    def failed(self) -> bool:
        """A failure was decided (and not since overtaken by a delivery)."""
        return self.failure_code is not None and self.remote_path is None

    @property
    def delivered(self) -> bool:
        """The file is known to be under its final name (maybe since moved to sent/)."""
        return self.remote_path is not None

    def lease_alive(self, now: datetime, margin: timedelta = timedelta(seconds=5)) -> bool:
        return self.lease_expires_at - margin > now


_SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    invoice_token    TEXT PRIMARY KEY,
    lease_token      TEXT NOT NULL,
    lease_expires_at TEXT NOT NULL,
    run_id           TEXT NOT NULL,
    step             TEXT NOT NULL,
    invoice_number   TEXT,
    file_name        TEXT,
    sha256           TEXT,
    remote_path      TEXT,
    failure_code     TEXT,
    failure_message  TEXT,
    updated_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS invoices_open ON invoices (step) WHERE step != 'reported';
-- Attachments pushed with an invoice (config.push_attachments), each journaled once it
-- is under its final name: a later try re-uses it, or removes it if its name changed.
CREATE TABLE IF NOT EXISTS attachments (
    invoice_token    TEXT NOT NULL,
    attachment_token TEXT NOT NULL,
    remote_path      TEXT NOT NULL,
    sha256           TEXT NOT NULL,
    size             INTEGER NOT NULL,
    created          INTEGER NOT NULL,  -- 1: erp-push wrote it (0: an identical file was there)
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (invoice_token, attachment_token)
);
"""

# Each entry brings the schema from one version (PRAGMA user_version) to the next, in one
# transaction with the version bump, so a journal written by an older erp-push is
# migrated when a newer one opens it. The invoices table itself is never changed: an
# older erp-push can still open a migrated journal and finish what it holds.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: runs (for `erp-push status`) and deliberate re-sends (`erp-push resend`)
    (
        """CREATE TABLE IF NOT EXISTS runs (
            run_id      TEXT PRIMARY KEY,
            command     TEXT NOT NULL,
            pid         INTEGER NOT NULL,
            started_at  TEXT NOT NULL,
            finished_at TEXT,
            exit_code   INTEGER,
            claimed     INTEGER,
            recovered   INTEGER,
            counts      TEXT,
            error       TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at)",
        """CREATE TABLE IF NOT EXISTS resends (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            invoice_token TEXT NOT NULL,
            requested_at  TEXT NOT NULL,
            previous_path TEXT,
            target_path   TEXT,
            run_id        TEXT,
            remote_path   TEXT,
            done_at       TEXT
        )""",
        "CREATE UNIQUE INDEX IF NOT EXISTS resends_open ON resends (invoice_token)"
        " WHERE done_at IS NULL",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
# How long a process waits for another to let go of the journal (SQLite's busy timeout).
BUSY_TIMEOUT_SECONDS = 30.0
# Lock files that name families share (Journal.name_lock).
NAME_LOCK_STRIPES = 256
# Runs are kept as long as finished invoices are: what `status` can look back on.
KEEP_FINISHED = timedelta(days=90)


@dataclass(frozen=True)
class Resend:
    """A deliberate re-send an operator asked for, and what became of it."""

    invoice_token: str
    requested_at: datetime
    previous_path: str | None  # where the journal last knew the invoice's file
    target_path: str | None  # the fresh file's path, written just before it became visible
    remote_path: str | None  # where the fresh file landed (None while it is still open)
    done_at: datetime | None


@dataclass(frozen=True)
class RunRecord:
    """One `erp-push push` as the journal saw it: started, and (unless it was killed) ended."""

    run_id: str
    command: str
    pid: int
    started_at: datetime
    finished_at: datetime | None
    exit_code: int | None
    claimed: int | None
    recovered: int | None
    counts: dict[str, int]
    error: str | None


@dataclass(frozen=True)
class AttachmentEntry:
    """An attachment under its final name, as the journal last saw it."""

    attachment_token: str
    remote_path: str
    sha256: str
    size: int
    created: bool


def _now() -> datetime:
    return datetime.now(UTC)


class Journal:
    """SQLite journal in ``state_dir``. Safe to share between threads and processes."""

    FILE_NAME = "journal.sqlite3"

    def __init__(self, state_dir: Path) -> None:
        """Open (or create) the journal; ``JournalUnusable`` if it cannot be written.

        Everything that can fail is tried here, before a run claims anything: creating
        the folders, opening the file for writing and one committed write.
        """
        try:
            self._open(state_dir)
        except (JournalUnusable, OSError, sqlite3.Error) as exc:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
            if isinstance(exc, JournalUnusable):
                raise
            raise JournalUnusable(
                f"cannot write the journal {state_dir / self.FILE_NAME}: {_reason(exc)}"
            ) from None

    def _open(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / self.FILE_NAME
        _prepare(state_dir, self.path)
        # One connection shared by this process's worker threads, serialised by SQLite's
        # own mutex (check_same_thread=False); other processes wait on busy_timeout.
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.RLock()  # one transaction at a time on the shared connection
        _use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        self._db.executescript(_SCHEMA)
        _migrate(self._db)
        _prove_writable(self._db, state_dir / "runs", self.path)
        self._run_lock: IO[str] | None = None
        self.run_id = uuid.uuid4().hex
        self._name_locks = [threading.Lock() for _ in range(NAME_LOCK_STRIPES)]
        self._name_lock_files: dict[int, int] = {}  # stripe -> its lock file, kept open

    # --- run ownership ----------------------------------------------------------------

    def start_run(self) -> None:
        """Hold this run's lock file until close(): a live lock marks our rows as taken."""
        if self._run_lock is not None:
            return  # already held (the push command takes it before it records the run)
        path = self.state_dir / "runs" / f"{self.run_id}.lock"
        lock = open(path, "w", opener=_private_opener)  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
        self._run_lock = lock

    @contextmanager
    def name_lock(self, family: str) -> Iterator[None]:
        """Hold the publishing of one family of names (``X.csv``, ``X-2.csv``, ...)
        against every other lane and run sharing this state_dir.

        Choosing a free name and publishing under it are separate steps on the server.
        Two writers choosing from the same family at once (two runs' batch files named
        in the same second; two invoices with one number) could both see a name free;
        if one publishes it and the ERP moves it to sent/ before the other publishes the
        same name, the ERP's next move overwrites the first file in sent/. Taking turns
        per family closes that: the second writer looks after the first has published.
        Families share NAME_LOCK_STRIPES lock files, so an unrelated family sometimes
        waits a publish's length too. A killed holder's lock goes with its process.
        """
        stripe = zlib.crc32(family.encode()) % NAME_LOCK_STRIPES  # the same in every run
        with self._name_locks[stripe]:  # flock is per open file: threads take turns here
            fd = self._name_lock_files.get(stripe)
            if fd is None:
                path = self.state_dir / "runs" / f"publish-{stripe:02x}.lock"
                fd = self._name_lock_files[stripe] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def run_is_alive(self, run_id: str) -> bool:
        if run_id == self.run_id:
            return True
        path = self.state_dir / "runs" / f"{run_id}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False  # the run ended cleanly and removed its lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # its process still holds the lock
        else:
            # The kernel released the lock when that process died (even on SIGKILL).
            path.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._run_lock is not None:
            Path(self._run_lock.name).unlink(missing_ok=True)
            self._run_lock.close()  # releases the flock
            self._run_lock = None
        for fd in self._name_lock_files.values():
            os.close(fd)
        self._name_lock_files.clear()
        with self._lock:
            self._db.close()

    # --- reads ------------------------------------------------------------------------

    def get(self, invoice_token: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM invoices WHERE invoice_token = ?", (invoice_token,)
            ).fetchone()
        return entry_from_row(row) if row else None

    def unfinished(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM invoices WHERE step != 'reported' ORDER BY updated_at"
            ).fetchall()
        return [entry_from_row(r) for r in rows]

    # --- writes: one committed row update per step ------------------------------------

    def record_claim(self, lease: Lease) -> Entry:
        """Take ``lease`` into this run. Evidence of an earlier delivery is kept.

        If the invoice was delivered under an earlier lease that lapsed, its step stays
        PUBLISHED (or later) and remote_path stays set: the pipeline then skips the upload.
        Unless a re-send was asked for (``request_resend``): then it starts over from
        CLAIMED, and the entry returned says ``resend`` (the mark is used up only when
        the fresh file is in place, ``record_resent``).
        """
        with self._transaction():
            prior = self.get(lease.invoice_token)
            resend = self._open_resend(lease.invoice_token) is not None
            if prior is None:
                self._db.execute(
                    "INSERT INTO invoices (invoice_token, lease_token, lease_expires_at, run_id,"
                    " step, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        lease.invoice_token,
                        lease.lease_token,
                        _iso(lease.lease_expires_at),
                        self.run_id,
                        Step.CLAIMED,
                        _iso(_now()),
                    ),
                )
            else:
                # A delivered file stays delivered; anything before that starts over. A
                # re-send asked for starts over too: the earlier path is in its mark.
                step = Step.PUBLISHED if prior.delivered and not resend else Step.CLAIMED
                self._db.execute(
                    "UPDATE invoices SET lease_token = ?, lease_expires_at = ?, run_id = ?,"
                    " step = ?, failure_code = NULL, failure_message = NULL, updated_at = ?,"
                    " remote_path = CASE WHEN ? THEN NULL ELSE remote_path END"
                    " WHERE invoice_token = ?",
                    (
                        lease.lease_token,
                        _iso(lease.lease_expires_at),
                        self.run_id,
                        step,
                        _iso(_now()),
                        resend,
                        lease.invoice_token,
                    ),
                )
        entry = self.get(lease.invoice_token)
        assert entry is not None
        return replace(entry, resend=True) if resend else entry

    def adopt(self, entry: Entry) -> Entry | None:
        """Take over a dead run's row. None if another live run got there first."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE invoices SET run_id = ?, updated_at = ?"
                " WHERE invoice_token = ? AND run_id = ?",
                (self.run_id, _iso(_now()), entry.invoice_token, entry.run_id),
            )
        return self.get(entry.invoice_token) if cur.rowcount == 1 else None

    def record_rendered(
        self, invoice_token: str, *, invoice_number: str, file_name: str, sha256: str
    ) -> None:
        self._update(
            invoice_token,
            step=Step.RENDERED,
            invoice_number=invoice_number,
            sha256=sha256,
            file_name=file_name,
        )

    def record_published(self, invoice_token: str, remote_path: str) -> None:
        self._update(invoice_token, step=Step.PUBLISHED, remote_path=remote_path)

    def record_failed(
        self,
        invoice_token: str,
        failure_code: str,
        failure_message: str,
        invoice_number: str | None = None,
    ) -> None:
        fields: dict[str, str | None] = {
            "step": Step.FAILED,
            "failure_code": failure_code,
            "failure_message": failure_message,
        }
        if invoice_number is not None:
            fields["invoice_number"] = invoice_number
        self._update(invoice_token, **fields)

    def record_acknowledged(self, invoice_token: str) -> None:
        self._update(invoice_token, step=Step.ACKNOWLEDGED)

    def record_reported(self, invoice_token: str) -> None:
        self._update(invoice_token, step=Step.REPORTED)

    def prune(self, older_than: timedelta = KEEP_FINISHED) -> int:
        """Forget finished invoices after a while; unfinished ones are kept forever.

        Runs and done re-sends older than that go too (an open re-send is kept).
        """
        cutoff = _iso(_now() - older_than)
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM invoices WHERE step = 'reported' AND updated_at < ?", (cutoff,)
            )
            self._db.execute("DELETE FROM runs WHERE started_at < ?", (cutoff,))
            self._db.execute(
                "DELETE FROM resends WHERE done_at IS NOT NULL AND done_at < ?", (cutoff,)
            )
            self._db.execute(
                "DELETE FROM attachments WHERE invoice_token NOT IN"
                " (SELECT invoice_token FROM invoices)"
            )
        return cur.rowcount

    # --- runs: what `erp-push status` shows -------------------------------------------

    def record_run_started(self, command: str) -> None:
        """This run began. A run killed outright keeps this row without an end."""
        with self._lock:
            self._db.execute(
                "INSERT INTO runs (run_id, command, pid, started_at) VALUES (?, ?, ?, ?)",
                (self.run_id, command, os.getpid(), _iso(_now())),
            )

    def record_run_finished(
        self,
        *,
        exit_code: int,
        claimed: int,
        recovered: int,
        counts: dict[str, int],
        error: str | None,
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE runs SET finished_at = ?, exit_code = ?, claimed = ?, recovered = ?,"
                " counts = ?, error = ? WHERE run_id = ?",
                (
                    _iso(_now()),
                    exit_code,
                    claimed,
                    recovered,
                    json.dumps(counts, sort_keys=True),
                    error,
                    self.run_id,
                ),
            )

    # --- deliberate re-sends ------------------------------------------------------------

    def request_resend(self, invoice_token: str) -> tuple[Resend, bool]:
        """Mark ``invoice_token`` for a fresh upload by the next push that claims it.

        Returns the open mark and whether it is new (False: it was marked already).
        """
        with self._transaction():
            existing = self._open_resend(invoice_token)
            if existing is None:
                prior = self.get(invoice_token)
                self._db.execute(
                    "INSERT INTO resends (invoice_token, requested_at, previous_path)"
                    " VALUES (?, ?, ?)",
                    (invoice_token, _iso(_now()), prior.remote_path if prior else None),
                )
            mark = self._open_resend(invoice_token)
        assert mark is not None
        return mark, existing is None

    def open_resends(self) -> list[Resend]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {RESEND_COLUMNS} FROM resends WHERE done_at IS NULL ORDER BY id"
            ).fetchall()
        return [resend_from_row(r) for r in rows]

    def resends(self, invoice_token: str) -> list[Resend]:
        """Every re-send of ``invoice_token``, oldest first (done and open)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {RESEND_COLUMNS} FROM resends WHERE invoice_token = ? ORDER BY id",
                (invoice_token,),
            ).fetchall()
        return [resend_from_row(r) for r in rows]

    def resend_target(self, invoice_token: str) -> str | None:
        """Where an earlier attempt of the open re-send was about to publish, if any."""
        mark = self._open_resend(invoice_token)
        return mark.target_path if mark else None

    def record_resend_target(self, invoice_token: str, remote_path: str) -> None:
        """Committed just before the fresh file becomes visible as ``remote_path``: after a
        crash, a file there with the same bytes is this re-send's, not a reason for
        another."""
        with self._lock:
            self._db.execute(
                "UPDATE resends SET target_path = ?, run_id = ?"
                " WHERE invoice_token = ? AND done_at IS NULL",
                (remote_path, self.run_id, invoice_token),
            )

    def record_resent(self, invoice_token: str, remote_path: str) -> None:
        """The fresh file is in place: PUBLISHED and the mark consumed, in one commit."""
        now = _iso(_now())
        with self._transaction():
            self._db.execute(
                "UPDATE invoices SET step = ?, remote_path = ?, updated_at = ?"
                " WHERE invoice_token = ?",
                (Step.PUBLISHED, remote_path, now, invoice_token),
            )
            self._db.execute(
                "UPDATE resends SET remote_path = ?, done_at = ?, run_id = ?"
                " WHERE invoice_token = ? AND done_at IS NULL",
                (remote_path, now, self.run_id, invoice_token),
            )

    def _open_resend(self, invoice_token: str) -> Resend | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {RESEND_COLUMNS} FROM resends WHERE invoice_token = ? AND done_at IS NULL",
                (invoice_token,),
            ).fetchone()
        return resend_from_row(row) if row else None

    # --- attachments ------------------------------------------------------------------

    def attachments(self, invoice_token: str) -> dict[str, AttachmentEntry]:
        """The invoice's journaled attachments, by attachment token."""
        with self._lock:
            rows = self._db.execute(
                "SELECT attachment_token, remote_path, sha256, size, created FROM attachments"
                " WHERE invoice_token = ?",
                (invoice_token,),
            ).fetchall()
        return {
            str(t): AttachmentEntry(str(t), str(p), str(h), int(n), bool(c))
            for t, p, h, n, c in rows
        }

    def record_attachment(self, invoice_token: str, entry: AttachmentEntry) -> None:
        """Committed before the next file of the invoice is published."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO attachments (invoice_token, attachment_token,"
                " remote_path, sha256, size, created, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    invoice_token,
                    entry.attachment_token,
                    entry.remote_path,
                    entry.sha256,
                    entry.size,
                    int(entry.created),
                    _iso(_now()),
                ),
            )

    def forget_attachment(self, invoice_token: str, entry: AttachmentEntry) -> None:
        """Forget ``entry`` (removed from the server); a newer row for it stays."""
        with self._lock:
            self._db.execute(
                "DELETE FROM attachments WHERE invoice_token = ? AND attachment_token = ?"
                " AND remote_path = ?",
                (invoice_token, entry.attachment_token, entry.remote_path),
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction for modules that keep their own tables here
        (``batch_journal``): its rows and the invoices' rows change together."""
        with self._transaction():
            yield self._db

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read of this journal (``batch_journal``'s own tables)."""
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    # --- internals --------------------------------------------------------------------

    def _update(self, invoice_token: str, **fields: str | None) -> None:
        fields["updated_at"] = _iso(_now())
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE invoices SET {assignments} WHERE invoice_token = ?",  # names are ours
                (*fields.values(), invoice_token),
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


# --- opening: folders, modes, migrations, the write probe ------------------------------


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the journal in WAL mode (a no-op once it is).

    Switching a fresh journal to WAL needs the file to itself, and SQLite answers
    "database is locked" at once, without waiting out the busy timeout, while another
    connection holds it: runs started together on a new state_dir would all but one
    fail. So the switch is tried again, briefly, for as long as the busy timeout.
    """
    give_up = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= give_up:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older journal's schema up to SCHEMA_VERSION (see _MIGRATIONS)."""
    db.execute("BEGIN IMMEDIATE")  # two processes opening an old journal migrate it once
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for number in range(int(version), SCHEMA_VERSION):
            for statement in _MIGRATIONS[number]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number + 1}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def run_lock_held(state_dir: Path, run_id: str) -> bool:
    """Is run ``run_id``'s process alive (it holds its lock file)? Changes nothing, so
    a reader such as ``status`` can ask (``Journal.run_is_alive`` also tidies up)."""
    try:
        fd = os.open(state_dir / "runs" / f"{run_id}.lock", os.O_RDONLY)
    except OSError:
        return False  # ended cleanly (it removed its lock), or never took one
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases our shared lock, if we got it
    return False


def _prepare(state_dir: Path, journal: Path) -> None:
    """The folders and the journal file, private: lease tokens, invoice numbers and
    remote paths are nobody else's business (folders erp-push creates are 0700, the
    journal 0600). A folder that exists keeps its mode: it may be shared on purpose."""
    runs = state_dir / "runs"
    try:
        state_dir.parent.mkdir(parents=True, exist_ok=True)  # like mkdir -p
    except OSError as exc:
        raise JournalUnusable(f"cannot create the folder {state_dir}: {_reason(exc)}") from None
    for folder in (state_dir, runs):
        try:
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode went through the umask; chmod's does not
        except FileExistsError:
            if not folder.is_dir():
                raise JournalUnusable(f"{folder} exists but is not a folder") from None
        except OSError as exc:
            raise JournalUnusable(f"cannot create the folder {folder}: {_reason(exc)}") from None
    # Opened for writing here, because SQLite opens a read-only file read-only and says
    # so only at the first write.
    try:
        fd = os.open(journal, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise JournalUnusable(
            f"cannot open the journal {journal} for writing: {_reason(exc)}"
        ) from None
    try:
        # Also a journal left 0644 by an older version. One that another user owns is
        # not ours to change: being able to write it is what counts.
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _prove_writable(db: sqlite3.Connection, runs: Path, journal: Path) -> None:
    """One committed write to the journal and one file in runs/: a full disk, a
    read-only mount or an unwritable WAL shows up now, not after claiming."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"PRAGMA user_version = {int(version)}")  # its own value: no change
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    for suffix in ("-wal", "-shm"):  # SQLite gives them the journal's mode when it
        with contextlib.suppress(OSError):  # creates them; older ones may be 0644
            os.chmod(f"{journal}{suffix}", 0o600)
    probe = runs / f".probe-{uuid.uuid4().hex}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise JournalUnusable(f"cannot write to the folder {runs}: {_reason(exc)}") from None


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _reason(exc: OSError | sqlite3.Error) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


RESEND_COLUMNS = "invoice_token, requested_at, previous_path, target_path, remote_path, done_at"


def resend_from_row(row: tuple[object, ...]) -> Resend:
    """A ``resends`` row (``SELECT`` of RESEND_COLUMNS)."""
    token, requested, previous, target, path, done = row
    return Resend(
        invoice_token=str(token),
        requested_at=datetime.fromisoformat(str(requested)),
        previous_path=None if previous is None else str(previous),
        target_path=None if target is None else str(target),
        remote_path=None if path is None else str(path),
        done_at=None if done is None else datetime.fromisoformat(str(done)),
    )


def run_from_row(row: tuple[object, ...]) -> RunRecord:
    """A ``runs`` row (``SELECT *``)."""
    (run_id, command, pid, started, finished, code, claimed, recovered, counts, error) = row
    return RunRecord(
        run_id=str(run_id),
        command=str(command),
        pid=int(str(pid)),
        started_at=datetime.fromisoformat(str(started)),
        finished_at=None if finished is None else datetime.fromisoformat(str(finished)),
        exit_code=None if code is None else int(str(code)),
        claimed=None if claimed is None else int(str(claimed)),
        recovered=None if recovered is None else int(str(recovered)),
        counts={}
        if counts is None
        else {str(k): int(v) for k, v in json.loads(str(counts)).items()},
        error=None if error is None else str(error),
    )


def entry_from_row(row: tuple[object, ...]) -> Entry:
    """An ``invoices`` row (``SELECT *``)."""
    (token, lease, expires, run_id, step, number, name, sha, path, code, message, updated) = row
    return Entry(
        invoice_token=str(token),
        lease_token=str(lease),
        lease_expires_at=datetime.fromisoformat(str(expires)),
        run_id=str(run_id),
        step=Step(str(step)),
        invoice_number=None if number is None else str(number),
        file_name=None if name is None else str(name),
        sha256=None if sha is None else str(sha),
        remote_path=None if path is None else str(path),
        failure_code=None if code is None else str(code),
        failure_message=None if message is None else str(message),
        updated_at=datetime.fromisoformat(str(updated)),
    )
