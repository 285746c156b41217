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
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
"""


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
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.RLock()  # one transaction at a time on the shared connection
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        self._db.executescript(_SCHEMA)
        _prove_writable(self._db, state_dir / "runs", self.path)
        self._run_lock: IO[str] | None = None
        self.run_id = uuid.uuid4().hex

    # --- run ownership ----------------------------------------------------------------

    def start_run(self) -> None:
        """Hold this run's lock file until close(): a live lock marks our rows as taken."""
        path = self.state_dir / "runs" / f"{self.run_id}.lock"
        lock = open(path, "w", opener=_private_opener)  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
        self._run_lock = lock

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
        with self._lock:
            self._db.close()

    # --- reads ------------------------------------------------------------------------

    def get(self, invoice_token: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM invoices WHERE invoice_token = ?", (invoice_token,)
            ).fetchone()
        return _entry(row) if row else None

    def unfinished(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM invoices WHERE step != 'reported' ORDER BY updated_at"
            ).fetchall()
        return [_entry(r) for r in rows]

    # --- writes: one committed row update per step ------------------------------------

    def record_claim(self, lease: Lease) -> Entry:
        """Take ``lease`` into this run. Evidence of an earlier delivery is kept.

        If the invoice was delivered under an earlier lease that lapsed, its step stays
        PUBLISHED (or later) and remote_path stays set: the pipeline then skips the upload.
        """
        with self._transaction():
            prior = self.get(lease.invoice_token)
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
                # A delivered file stays delivered; anything before that starts over.
                step = Step.PUBLISHED if prior.delivered else Step.CLAIMED
                self._db.execute(
                    "UPDATE invoices SET lease_token = ?, lease_expires_at = ?, run_id = ?,"
                    " step = ?, failure_code = NULL, failure_message = NULL, updated_at = ?"
                    " WHERE invoice_token = ?",
                    (
                        lease.lease_token,
                        _iso(lease.lease_expires_at),
                        self.run_id,
                        step,
                        _iso(_now()),
                        lease.invoice_token,
                    ),
                )
        entry = self.get(lease.invoice_token)
        assert entry is not None
        return entry

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

    def prune(self, older_than: timedelta = timedelta(days=90)) -> int:
        """Forget finished invoices after a while; unfinished ones are kept forever."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM invoices WHERE step = 'reported' AND updated_at < ?",
                (_iso(_now() - older_than),),
            )
        return cur.rowcount

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


# --- opening: folders, modes, the write probe -----------------------------------------


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


def _entry(row: tuple[object, ...]) -> Entry:
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
