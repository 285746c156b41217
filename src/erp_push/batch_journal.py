"""The journal's memory of batch files (``output_mode: batch``), in the same SQLite file.

A batch file holds many invoices, so exactly-once is decided per batch: which invoices
went into which file, under which row, with which exact bytes, and how far the file got.
Each change is committed together with the member invoices' own rows (``journal``), so a
run killed between any two steps leaves a consistent picture:

    recorded ─► published      the file is under its final name: members are delivered
        │
        ├─────► void           it never landed and never will: members may be batched anew
        └─────► failed         the server refused it: members failed with its code

Only the run that recorded a batch ever uploads it, and only while that run lives. So once
the recording run is dead a ``recorded`` batch can be settled for good by looking at the
folders: its exact bytes under its names mean published, nothing means void. That is what
keeps an invoice out of two batch files.

``batch_files_seen`` remembers the rows of batch files read from the folders (by name and
size), so the lost-journal lookup (``batch.BatchIndex``) reads each file once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from erp_push.journal import Journal, Step

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id    TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    state       TEXT NOT NULL,
    file_name   TEXT NOT NULL,
    sha256      TEXT,
    body        BLOB,
    remote_path TEXT,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_members (
    batch_id      TEXT NOT NULL,
    invoice_token TEXT NOT NULL,
    row           INTEGER NOT NULL,
    PRIMARY KEY (batch_id, invoice_token)
);
CREATE INDEX IF NOT EXISTS batch_members_token ON batch_members (invoice_token);
CREATE TABLE IF NOT EXISTS batch_files_seen (
    name    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    rows    TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (name, size)
);
"""

RECORDED = "recorded"  # bytes and members journaled; the upload may be under way
PUBLISHED = "published"
VOID = "void"
FAILED = "failed"
# Batches and seen files are forgotten after this long, like finished invoices.
KEEP = timedelta(days=90)


@dataclass(frozen=True)
class Membership:
    """The batch an invoice was last put in (void and failed batches do not count)."""

    batch_id: str
    run_id: str
    state: str
    file_name: str
    body: bytes | None
    remote_path: str | None
    row: int


@dataclass(frozen=True)
class Member:
    invoice_token: str
    row: int
    invoice_number: str


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class BatchLedger:
    """Batch bookkeeping in ``journal``'s database; every write is one transaction."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        # Rows of batch files never change under one name and size: each lane of a run
        # asks for the same files batch after batch.
        self._seen: dict[tuple[str, int], list[str]] = {}
        with journal.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        self.prune()

    # --- reads --------------------------------------------------------------------------

    def membership(self, invoice_token: str) -> Membership | None:
        rows = self.journal.query(
            "SELECT b.batch_id, b.run_id, b.state, b.file_name, b.body, b.remote_path, m.row"
            " FROM batch_members m JOIN batches b ON b.batch_id = m.batch_id"
            " WHERE m.invoice_token = ? AND b.state IN (?, ?)"
            " ORDER BY b.updated_at DESC LIMIT 1",
            (invoice_token, RECORDED, PUBLISHED),
        )
        if not rows:
            return None
        batch_id, run_id, state, name, body, path, row = rows[0]
        return Membership(batch_id, run_id, state, name, body, path, int(row))

    def row_of(self, invoice_token: str) -> int | None:
        """The invoice's row in the published batch file that delivered it, if any."""
        found = self.membership(invoice_token)
        return found.row if found is not None and found.state == PUBLISHED else None

    def seen(self, name: str, size: int) -> list[str] | None:
        """Row digests of a batch file read before (None: not read yet)."""
        if (name, size) in self._seen:
            return self._seen[(name, size)]
        rows = self.journal.query(
            "SELECT rows FROM batch_files_seen WHERE name = ? AND size = ?", (name, size)
        )
        if not rows:
            return None
        digests: list[str] = json.loads(rows[0][0])
        self._seen[(name, size)] = digests
        return digests

    # --- writes -------------------------------------------------------------------------

    def record(self, file_name: str, body: bytes, sha256: str, members: list[Member]) -> str:
        """Journal a batch before any of it is uploaded; its id."""
        batch_id = uuid.uuid4().hex
        now = _now()
        with self.journal.transaction() as db:
            db.execute(
                "INSERT INTO batches (batch_id, run_id, state, file_name, sha256, body,"
                " remote_path, updated_at) VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (batch_id, self.journal.run_id, RECORDED, file_name, sha256, body, now),
            )
            for m in members:
                db.execute(
                    "INSERT INTO batch_members (batch_id, invoice_token, row) VALUES (?, ?, ?)",
                    (batch_id, m.invoice_token, m.row),
                )
                db.execute(
                    "UPDATE invoices SET step = ?, invoice_number = ?, file_name = ?,"
                    " sha256 = ?, updated_at = ? WHERE invoice_token = ?",
                    (Step.RENDERED, m.invoice_number, file_name, sha256, now, m.invoice_token),
                )
        return batch_id

    def published(self, batch_id: str, remote_path: str) -> None:
        """The file is under its final name: every member is delivered there."""
        now = _now()
        with self.journal.transaction() as db:
            db.execute(
                "UPDATE batches SET state = ?, remote_path = ?, updated_at = ? WHERE batch_id = ?",
                (PUBLISHED, remote_path, now, batch_id),
            )
            # A member already acknowledged or reported keeps its step.
            db.execute(
                "UPDATE invoices SET remote_path = ?, failure_code = NULL,"
                " failure_message = NULL, updated_at = ?,"
                " step = CASE WHEN step IN (?, ?) THEN ? ELSE step END"
                " WHERE invoice_token IN"
                " (SELECT invoice_token FROM batch_members WHERE batch_id = ?)",
                (remote_path, now, Step.CLAIMED, Step.RENDERED, Step.PUBLISHED, batch_id),
            )

    def void(self, batch_id: str) -> None:
        """The file never landed (and never will): its members start over."""
        now = _now()
        with self.journal.transaction() as db:
            db.execute(
                "UPDATE batches SET state = ?, updated_at = ? WHERE batch_id = ?",
                (VOID, now, batch_id),
            )
            db.execute(
                "UPDATE invoices SET step = ?, file_name = NULL, sha256 = NULL, updated_at = ?"
                " WHERE step = ? AND remote_path IS NULL AND invoice_token IN"
                " (SELECT invoice_token FROM batch_members WHERE batch_id = ?)",
                (Step.CLAIMED, now, Step.RENDERED, batch_id),
            )

    def failed(self, batch_id: str, failure_code: str, failure_message: str) -> None:
        """The server refused the file: every member fails with its code."""
        now = _now()
        with self.journal.transaction() as db:
            db.execute(
                "UPDATE batches SET state = ?, updated_at = ? WHERE batch_id = ?",
                (FAILED, now, batch_id),
            )
            db.execute(
                "UPDATE invoices SET step = ?, failure_code = ?, failure_message = ?,"
                " updated_at = ? WHERE invoice_token IN"
                " (SELECT invoice_token FROM batch_members WHERE batch_id = ?)",
                (Step.FAILED, failure_code, failure_message, now, batch_id),
            )

    def found(self, member: Member, remote_path: str) -> None:
        """Without the journal's word, the invoice's row was found in a batch file."""
        name = remote_path.rpartition("/")[2]
        batch_id = f"found-{uuid.uuid4().hex}"
        now = _now()
        with self.journal.transaction() as db:
            db.execute(
                "INSERT INTO batches (batch_id, run_id, state, file_name, sha256, body,"
                " remote_path, updated_at) VALUES (?, ?, ?, ?, NULL, NULL, ?, ?)",
                (batch_id, self.journal.run_id, PUBLISHED, name, remote_path, now),
            )
            db.execute(
                "INSERT INTO batch_members (batch_id, invoice_token, row) VALUES (?, ?, ?)",
                (batch_id, member.invoice_token, member.row),
            )
            db.execute(
                "UPDATE invoices SET step = ?, invoice_number = ?, file_name = ?,"
                " remote_path = ?, updated_at = ? WHERE invoice_token = ?",
                (
                    Step.PUBLISHED,
                    member.invoice_number,
                    name,
                    remote_path,
                    now,
                    member.invoice_token,
                ),
            )

    def remember(self, name: str, size: int, digests: list[str]) -> None:
        self._seen[(name, size)] = digests
        with self.journal.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO batch_files_seen (name, size, rows, seen_at)"
                " VALUES (?, ?, ?, ?)",
                (name, size, json.dumps(digests), _now()),
            )

    def prune(self) -> None:
        """Forget settled batches and seen files after KEEP; a recorded batch stays."""
        cutoff = (datetime.now(UTC) - KEEP).isoformat(timespec="microseconds")
        with self.journal.transaction() as db:
            db.execute(
                "DELETE FROM batch_members WHERE batch_id IN (SELECT batch_id FROM batches"
                " WHERE state != ? AND updated_at < ?)",
                (RECORDED, cutoff),
            )
            db.execute(
                "DELETE FROM batches WHERE state != ? AND updated_at < ?", (RECORDED, cutoff)
            )
            db.execute("DELETE FROM batch_files_seen WHERE seen_at < ?", (cutoff,))
