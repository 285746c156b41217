"""The sandbox's database and the Nuntiq state machine (no HTTP in here).

Everything lives in one SQLite file so that several server processes (or a test and a
server) sharing the file agree on invoices, leases and the clock; nothing is cached in
memory. Every write runs in one ``BEGIN IMMEDIATE`` transaction: IMMEDIATE takes the write
lock up front, so two concurrent claims are serialised by SQLite itself and can never pick
the same invoice. Within one process, writers first queue on a lock for the one write
connection (SQLite's own busy handler would make them sleep and poll instead); reads (get,
attachment, delta GET) take pooled connections and see the last commit (WAL).

Lease expiry is applied lazily, by the sandbox clock (real UTC + an offset stored in the
database), and only where a request can see it, so that the cost of a request does not
grow with the number of leases held: a request about one invoice lapses that invoice only;
claim and the invoice listing first lapse every due lease through an index on
``lease_expires_at`` (the cost is the number of leases that lapsed, not the number held).
A lapsed row gets the ``updated_at`` of the request that lapsed it.

Errors are raised as ``ApiError`` carrying the HTTP status and the contract's machine
code; the HTTP layer turns them into ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.sandbox import seeding


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def validation_error(message: str) -> ApiError:
    return ApiError(400, "VALIDATION_ERROR", message)


# --- statuses -------------------------------------------------------------------------

CLAIMABLE = (90, 91)
LEASED = (92, 93)

# code -> (group, key, label, description), per the contract's status table.
STATUSES: dict[int, tuple[str, str, str, str | None]] = {
    90: (
        "PendingIntegration",
        "PENDING_INTEGRATION_FIRST",
        "Pending integration",
        "Ready for integration; never claimed.",
    ),
    91: (
        "PendingIntegration",
        "PENDING_INTEGRATION_RETRY",
        "Pending integration (retry)",
        "Claimable again after a lease lapsed.",
    ),
    92: (
        "PendingAcknowledgement",
        "PENDING_ACKNOWLEDGEMENT",
        "Pending acknowledgement",
        "Leased by an integration, not yet acknowledged.",
    ),
    93: (
        "PendingResult",
        "PENDING_RESULT",
        "Pending result",
        "Acknowledged by the integration, waiting for its result.",
    ),
    95: ("Status95", "STATUS_95", "Status 95", None),
    96: ("Status96", "STATUS_96", "Status 96", None),
    97: (
        "IntegrationFailed",
        "INTEGRATION_FAILED",
        "Integration failed",
        "The integration reported a failure.",
    ),
    98: ("Status98", "STATUS_98", "Status 98", None),
    100: ("Processed", "PROCESSED", "Processed", "The integration reported success."),
}


def group(code: int) -> str:
    return STATUSES[code][0] if code in STATUSES else f"Status{code}"


def status_info(code: int) -> dict[str, Any]:
    _, key, label, description = STATUSES.get(code, ("", f"STATUS_{code}", f"Status {code}", None))
    return {"code": code, "key": key, "label": label, "description": description}


# --- time -----------------------------------------------------------------------------


def iso(dt: datetime) -> str:
    """Fixed-width ISO-8601 UTC with ``Z``: lexical order equals time order in SQL."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invoices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order = "oldest first"
    invoice_token TEXT NOT NULL UNIQUE,
    email_token TEXT,
    invoice_number TEXT,
    status INTEGER NOT NULL,
    lease_token TEXT,
    lease_expires_at TEXT,
    finished_lease_token TEXT,              -- the lease that moved it to 97/100
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    ext_reference_1 TEXT, ext_reference_2 TEXT, ext_reference_3 TEXT,
    ext_reference_4 TEXT, ext_reference_5 TEXT,
    doc TEXT NOT NULL,                      -- JSON: fields, lines, addresses, ...
    email TEXT,                             -- JSON or NULL
    external_id_1 TEXT, external_id_2 TEXT, external_id_3 TEXT,
    external_message_1 TEXT, external_message_2 TEXT, external_message_3 TEXT,
    failure_code TEXT, failure_message TEXT,
    claim_count INTEGER NOT NULL DEFAULT 0,
    ack_count INTEGER NOT NULL DEFAULT 0,
    result_count INTEGER NOT NULL DEFAULT 0,
    seed_case TEXT
);
CREATE INDEX IF NOT EXISTS invoices_status ON invoices (status, id);
-- Only leased rows (92/93) carry lease_expires_at: the due ones are found without a scan.
CREATE INDEX IF NOT EXISTS invoices_lease_expiry ON invoices (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
-- Every lease ever granted: tells "your lease lapsed" apart from "never leased".
CREATE TABLE IF NOT EXISTS leases (
    lease_token TEXT PRIMARY KEY,
    invoice_id INTEGER NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    expires_at TEXT NOT NULL,
    leases TEXT NOT NULL                    -- JSON: the response's lease list
);
CREATE TABLE IF NOT EXISTS attachments (
    attachment_token TEXT PRIMARY KEY,
    invoice_id INTEGER NOT NULL,
    file_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    data BLOB,                              -- NULL: generated as served (seeding)
    size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS delta_streams (
    connector_name TEXT NOT NULL,
    stream_name TEXT NOT NULL,
    cursor_type TEXT,
    committed_cursor_value TEXT,
    committed_at_utc TEXT,
    status TEXT NOT NULL,
    started_at_utc TEXT,
    completed_at_utc TEXT,
    records_processed INTEGER,
    error_summary TEXT,
    metadata TEXT,
    updated_at_utc TEXT,
    updated_by TEXT,
    PRIMARY KEY (connector_name, stream_name)
);
"""

RESET_TABLES = ("invoices", "leases", "idempotency_keys", "attachments", "delta_streams", "meta")

CURSOR_TYPES = ("timestamp_utc", "numeric_id", "opaque_token")
FAILURE_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
API_USER = "sandbox-api-user"  # what delta streams record as ``updated_by``


@dataclass
class Tx:
    conn: sqlite3.Connection
    now: datetime

    @property
    def now_iso(self) -> str:
        return iso(self.now)


@dataclass
class AttachmentFile:
    file_name: str
    content_type: str
    size: int
    data: bytes | None  # None: generated block by block (seeding.attachment_content)
    token: str

    def chunks(self, chunk: int) -> Iterator[bytes]:
        if self.data is None:
            yield from seeding.attachment_content(self.token, self.size)
            return
        view = memoryview(self.data)
        for start in range(0, len(view), chunk):
            yield bytes(view[start : start + chunk])


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self._write_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        self._writer.executescript(SCHEMA)

    def close(self) -> None:
        with self._write_lock, self._readers_lock:
            for conn in (self._writer, *self._readers):
                conn.close()
            self._readers.clear()

    # --- plumbing -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        # No fsync at all: this is a test double on a throw-away file. A power cut may lose
        # or corrupt it, which no test or benchmark cares about; a crashed *process* still
        # loses nothing, because every commit is in the OS page cache before it returns.
        conn.execute("PRAGMA synchronous=OFF")
        # Case-insensitive equality for ext_reference filters, beyond SQLite's ASCII NOCASE.
        conn.create_function(
            "casefold", 1, lambda s: s.casefold() if isinstance(s, str) else s, deterministic=True
        )
        return conn

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction on the write connection. Lapsing leases is up to the
        caller: ``_invoice`` lapses the row it reads, ``_lapse_due`` every due lease."""
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(conn, self._now(conn))
            except ApiError:
                # Refusals happen before any write of their own: keep the lapse we applied.
                conn.execute("COMMIT")
                raise
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:  # a failed COMMIT must not poison the connection
                    conn.execute("ROLLBACK")

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection for one read statement (autocommit: it sees the last commit)."""
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            with self._readers_lock:
                self._readers.append(conn)

    @staticmethod
    def _now(conn: sqlite3.Connection) -> datetime:
        row = conn.execute("SELECT value FROM meta WHERE key = 'clock_offset'").fetchone()
        return _clock(row[0] if row else None)

    @staticmethod
    def _lapse_due(t: Tx) -> None:
        # A lease lapses at 92 *and* 93 (contract): back to 91, claimable by anyone.
        # "+status" keeps the planner on the lease_expires_at index.
        t.conn.execute(
            "UPDATE invoices SET status = 91, lease_token = NULL, lease_expires_at = NULL,"
            " updated_at = ? WHERE lease_expires_at <= ? AND +status IN (92, 93)",
            (t.now_iso, t.now_iso),
        )

    @staticmethod
    def _invoice(t: Tx, token: str) -> sqlite3.Row:
        """The invoice's row, its own lease lapsed first if it is due."""
        row = t.conn.execute("SELECT * FROM invoices WHERE invoice_token = ?", (token,)).fetchone()
        if row is None:
            raise ApiError(404, "NOT_FOUND", f"no invoice with token {token}")
        if _lapsed(row, t.now_iso):
            t.conn.execute(
                "UPDATE invoices SET status = 91, lease_token = NULL, lease_expires_at = NULL,"
                " updated_at = ? WHERE id = ?",
                (t.now_iso, row["id"]),
            )
            row = t.conn.execute("SELECT * FROM invoices WHERE id = ?", (row["id"],)).fetchone()
        found: sqlite3.Row = row
        return found

    @staticmethod
    def _was_leased_by(t: Tx, invoice_id: int, lease_token: str) -> bool:
        row = t.conn.execute(
            "SELECT 1 FROM leases WHERE lease_token = ? AND invoice_id = ?",
            (lease_token, invoice_id),
        ).fetchone()
        return row is not None

    # --- claim ----------------------------------------------------------------------

    def claim(self, body: dict[str, Any]) -> dict[str, Any]:
        allowed = {"state", "limit", "lease_ttl_seconds", "idempotency_key"} | {
            f"ext_reference_{n}" for n in range(1, 6)
        }
        _reject_unknown(body, allowed)
        if body.get("state") != "PendingIntegration":
            raise validation_error('state must be "PendingIntegration"')
        limit = _int(body, "limit", 1, 50)
        ttl = _int(body, "lease_ttl_seconds", 60, 1800, default=300)
        key = _opt_str(body, "idempotency_key", 255)
        if key == "":
            raise validation_error("idempotency_key must not be empty")
        filters = {n: _opt_str(body, f"ext_reference_{n}", 255) for n in range(1, 6)}

        with self.tx() as t:
            self._lapse_due(t)  # lapsed invoices are claimable in this very call
            if key is not None:
                row = t.conn.execute(
                    "SELECT leases FROM idempotency_keys WHERE key = ? AND expires_at > ?",
                    (key, t.now_iso),
                ).fetchone()
                if row is not None:
                    return {"leases": json.loads(row["leases"])}

            where = ""
            params: list[Any] = []
            for n, value in filters.items():
                if value is not None:
                    where += f" AND casefold(ext_reference_{n}) = ?"
                    params.append(value.casefold())
            # Oldest first across 90 and 91. "status IN (90, 91) ORDER BY id" would read and
            # sort every claimable row; each status walked along the (status, id) index
            # stops after `limit` rows instead.
            per_status = f"SELECT id, invoice_token FROM invoices WHERE status = ?{where}"
            rows = t.conn.execute(
                f"SELECT * FROM ({per_status} ORDER BY id LIMIT ?) UNION ALL"
                f" SELECT * FROM ({per_status} ORDER BY id LIMIT ?) ORDER BY id LIMIT ?",
                (90, *params, limit, 91, *params, limit, limit),
            ).fetchall()

            expires = iso(t.now + timedelta(seconds=ttl))
            leases = []
            for row in rows:
                lease_token = str(uuid.uuid4())
                t.conn.execute(
                    "UPDATE invoices SET status = 92, lease_token = ?, lease_expires_at = ?,"
                    " updated_at = ?, claim_count = claim_count + 1 WHERE id = ?",
                    (lease_token, expires, t.now_iso, row["id"]),
                )
                t.conn.execute(
                    "INSERT INTO leases (lease_token, invoice_id, expires_at) VALUES (?, ?, ?)",
                    (lease_token, row["id"], expires),
                )
                leases.append(
                    {
                        "invoice_token": row["invoice_token"],
                        "lease_token": lease_token,
                        "lease_expires_at": expires,
                    }
                )
            if key is not None:
                # An expired entry for the same key is simply replaced.
                t.conn.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (key, expires_at, leases)"
                    " VALUES (?, ?, ?)",
                    (key, expires, json.dumps(leases)),
                )
            return {"leases": leases}

    # --- get ------------------------------------------------------------------------

    def get_invoice(self, token: str, *, include_null: bool) -> dict[str, Any]:
        with self._reader() as conn:
            # One statement, so the row and the clock come from the same snapshot.
            row = conn.execute(
                "SELECT *, (SELECT value FROM meta WHERE key = 'clock_offset') AS clock_offset"
                " FROM invoices WHERE invoice_token = ?",
                (token,),
            ).fetchone()
        if row is None:
            raise ApiError(404, "NOT_FOUND", f"no invoice with token {token}")
        if _lapsed(row, iso(_clock(row["clock_offset"]))):
            with self.tx() as t:  # rare: its lease is due, so lapse it before showing it
                row = self._invoice(t, token)
        doc = json.loads(row["doc"])
        fields = doc["fields"]
        if not include_null:
            fields = [f for f in fields if f["value"] is not None]
        invoice = {
            "id": row["id"],
            "invoice_token": row["invoice_token"],
            "email_token": row["email_token"],
            "status": row["status"],
            "status_info": status_info(row["status"]),
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "fields": fields,
            "lines": doc["lines"],
            "addresses": doc["addresses"],
            "taxes": doc["taxes"],
            "charges": doc["charges"],
            "discounts": doc["discounts"],
            "attachments": doc["attachments"],
        }
        return {"email": json.loads(row["email"]) if row["email"] else None, "invoice": invoice}

    # --- acknowledge ----------------------------------------------------------------

    def acknowledge(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(body, {"lease_token"})
        lease_token = _req_str(body, "lease_token", 255)
        with self.tx() as t:
            row = self._invoice(t, token)
            status = row["status"]
            if status in LEASED:
                if row["lease_token"] != lease_token:
                    raise ApiError(
                        409,
                        "LEASE_EXPIRED",
                        "the lease has lapsed or the invoice is held by another lease",
                    )
                changed = status == 92
                if changed:
                    t.conn.execute(
                        "UPDATE invoices SET status = 93, updated_at = ?,"
                        " ack_count = ack_count + 1 WHERE id = ?",
                        (t.now_iso, row["id"]),
                    )
                else:
                    t.conn.execute(
                        "UPDATE invoices SET ack_count = ack_count + 1 WHERE id = ?", (row["id"],)
                    )
                return {
                    "ok": True,
                    "previous_status": group(status),
                    "new_status": group(93),
                    "invoice_id": row["id"],
                    "status_changed": changed,
                    "idempotent": not changed,
                }
            if status in CLAIMABLE and self._was_leased_by(t, row["id"], lease_token):
                raise ApiError(409, "LEASE_EXPIRED", "the lease has lapsed")
            raise ApiError(
                409,
                "INVALID_TRANSITION",
                f"cannot acknowledge an invoice at status {status} ({group(status)})",
            )

    # --- integration result ---------------------------------------------------------

    def integration_result(
        self, token: str, body: dict[str, Any], *, debug: bool
    ) -> dict[str, Any]:
        allowed = {"lease_token", "success", "failure_code", "failure_message"}
        allowed |= {f"external_id_{n}" for n in range(1, 4)}
        allowed |= {f"external_message_{n}" for n in range(1, 4)}
        _reject_unknown(body, allowed)
        lease_token = _req_str(body, "lease_token", 255)
        success = body.get("success")
        if not isinstance(success, bool):
            raise validation_error("success is required and must be a boolean")
        externals = {
            name: _opt_str(body, name, 255)
            for name in (
                *(f"external_id_{n}" for n in range(1, 4)),
                *(f"external_message_{n}" for n in range(1, 4)),
            )
        }
        failure_code = _opt_str(body, "failure_code", 64)
        failure_message = _opt_str(body, "failure_message", 500)
        if not success and failure_code is None:
            raise validation_error("failure_code is required when success is false")
        if failure_code is not None and not FAILURE_CODE.match(failure_code):
            raise validation_error("failure_code must match ^[A-Z][A-Z0-9_]{0,63}$")

        with self.tx() as t:
            row = self._invoice(t, token)
            status = row["status"]
            target = 100 if success else 97

            if status in LEASED:
                if row["lease_token"] != lease_token:
                    raise ApiError(
                        409,
                        "LEASE_EXPIRED",
                        "the lease has lapsed or the invoice is held by another lease",
                    )
                t.conn.execute(
                    "UPDATE invoices SET status = ?, lease_token = NULL, lease_expires_at = NULL,"
                    " finished_lease_token = ?, updated_at = ?, result_count = result_count + 1,"
                    " external_id_1 = ?, external_id_2 = ?, external_id_3 = ?,"
                    " external_message_1 = ?, external_message_2 = ?, external_message_3 = ?,"
                    " failure_code = ?, failure_message = ? WHERE id = ?",
                    (
                        target,
                        lease_token,
                        t.now_iso,
                        *externals.values(),
                        failure_code,
                        failure_message,
                        row["id"],
                    ),
                )
                return _result_response(token, status, target, changed=True, debug=debug)

            if status in (97, 100):
                same_outcome = status == target and (success or row["failure_code"] == failure_code)
                if not same_outcome:
                    raise ApiError(
                        409,
                        "INVALID_TRANSITION",
                        f"invoice is already {group(status)} ({status}); cannot report "
                        + ("success" if success else f"failure {failure_code}"),
                    )
                if row["finished_lease_token"] != lease_token:
                    raise ApiError(
                        409, "LEASE_EXPIRED", "the result was reported under another lease"
                    )
                t.conn.execute(
                    "UPDATE invoices SET result_count = result_count + 1 WHERE id = ?",
                    (row["id"],),
                )
                return _result_response(token, status, status, changed=False, debug=debug)

            if status in CLAIMABLE and self._was_leased_by(t, row["id"], lease_token):
                raise ApiError(409, "LEASE_EXPIRED", "the lease has lapsed")
            raise ApiError(
                409,
                "INVALID_TRANSITION",
                f"cannot report a result for an invoice at status {status} ({group(status)})",
            )

    # --- attachment -----------------------------------------------------------------

    def attachment(self, token: str) -> AttachmentFile:
        with self._reader() as conn:
            row = conn.execute(
                "SELECT file_name, content_type, data, size FROM attachments"
                " WHERE attachment_token = ?",
                (token,),
            ).fetchone()
        if row is None:
            raise ApiError(404, "NOT_FOUND", f"no attachment with token {token}")
        data = None if row["data"] is None else bytes(row["data"])
        size = row["size"] if data is None else len(data)
        return AttachmentFile(row["file_name"], row["content_type"], size, data, token)

    def delete_attachment(self, token: str) -> dict[str, Any]:
        """Make an attachment vanish (404 from then on), as Nuntiq may (sandbox extra)."""
        with self.tx() as t:
            cur = t.conn.execute("DELETE FROM attachments WHERE attachment_token = ?", (token,))
        if cur.rowcount == 0:
            raise ApiError(404, "NOT_FOUND", f"no attachment with token {token}")
        return {"attachment_token": token, "deleted": True}

    # --- delta streams --------------------------------------------------------------

    @staticmethod
    def _stream_row(conn: sqlite3.Connection, connector: str, stream: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM delta_streams WHERE connector_name = ? AND stream_name = ?",
            (connector, stream),
        ).fetchone()
        return row

    @staticmethod
    def _stream_json(row: sqlite3.Row) -> dict[str, Any]:
        state = dict(row)
        state["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
        return state

    def delta_get(self, connector: str, stream: str) -> dict[str, Any]:
        with self._reader() as conn:
            row = self._stream_row(conn, connector, stream)
        if row is not None:
            return self._stream_json(row)
        # No row yet: the documented synthetic idle state.
        return {
            "connector_name": connector,
            "stream_name": stream,
            "cursor_type": None,
            "committed_cursor_value": None,
            "committed_at_utc": None,
            "status": "idle",
            "started_at_utc": None,
            "completed_at_utc": None,
            "records_processed": None,
            "error_summary": None,
            "metadata": None,
            "updated_at_utc": None,
            "updated_by": None,
        }

    def delta_begin(self, connector: str, stream: str, body: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(body, {"cursor_type"})
        cursor_type = body.get("cursor_type")
        if not isinstance(cursor_type, str):
            raise validation_error("cursor_type is required")
        if cursor_type not in CURSOR_TYPES:
            raise ApiError(
                422, "INVALID_CURSOR_TYPE", f"cursor_type must be one of {', '.join(CURSOR_TYPES)}"
            )
        with self.tx() as t:
            row = self._stream_row(t.conn, connector, stream)
            if (
                row is not None
                and row["committed_cursor_value"] is not None
                and row["cursor_type"] != cursor_type
            ):
                raise ApiError(
                    422,
                    "INVALID_CURSOR_TYPE",
                    f"stream has a committed {row['cursor_type']} cursor",
                )
            # begin overwrites the run-state fields and never refuses a running stream.
            t.conn.execute(
                "INSERT INTO delta_streams (connector_name, stream_name, cursor_type, status,"
                " started_at_utc, completed_at_utc, records_processed, error_summary,"
                " updated_at_utc, updated_by) VALUES (?, ?, ?, 'running', ?, NULL, 0, NULL, ?, ?)"
                " ON CONFLICT (connector_name, stream_name) DO UPDATE SET"
                " cursor_type = excluded.cursor_type, status = 'running',"
                " started_at_utc = excluded.started_at_utc, completed_at_utc = NULL,"
                " records_processed = 0, error_summary = NULL,"
                " updated_at_utc = excluded.updated_at_utc, updated_by = excluded.updated_by",
                (connector, stream, cursor_type, t.now_iso, t.now_iso, API_USER),
            )
            row = self._stream_row(t.conn, connector, stream)
            assert row is not None
            return self._stream_json(row)

    def delta_complete(self, connector: str, stream: str, body: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(body, {"new_cursor_value", "records_processed", "metadata"})
        new_value = _req_str(body, "new_cursor_value", 1000)
        records = _int(body, "records_processed", 0, 2**53)
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise validation_error("metadata must be an object")
        with self.tx() as t:
            row = self._stream_row(t.conn, connector, stream)
            if row is None:
                raise ApiError(404, "NOT_FOUND", "no run on this stream: call begin first")
            _check_monotonic(row["cursor_type"], row["committed_cursor_value"], new_value)
            t.conn.execute(
                "UPDATE delta_streams SET committed_cursor_value = ?, committed_at_utc = ?,"
                " status = 'succeeded', completed_at_utc = ?, records_processed = ?,"
                " metadata = ?, updated_at_utc = ?, updated_by = ?"
                " WHERE connector_name = ? AND stream_name = ?",
                (
                    new_value,
                    t.now_iso,
                    t.now_iso,
                    records,
                    json.dumps(metadata) if metadata is not None else None,
                    t.now_iso,
                    API_USER,
                    connector,
                    stream,
                ),
            )
            row = self._stream_row(t.conn, connector, stream)
            assert row is not None
            return self._stream_json(row)

    def delta_fail(self, connector: str, stream: str, body: dict[str, Any]) -> dict[str, Any]:
        _reject_unknown(body, {"error_summary"})
        summary = _opt_str(body, "error_summary", 4000)
        with self.tx() as t:
            row = self._stream_row(t.conn, connector, stream)
            if row is None:
                raise ApiError(404, "NOT_FOUND", "no run on this stream: call begin first")
            t.conn.execute(
                "UPDATE delta_streams SET status = 'failed', error_summary = ?,"
                " completed_at_utc = ?, updated_at_utc = ?, updated_by = ?"
                " WHERE connector_name = ? AND stream_name = ?",
                (summary, t.now_iso, t.now_iso, API_USER, connector, stream),
            )
            row = self._stream_row(t.conn, connector, stream)
            assert row is not None
            return self._stream_json(row)

    # --- test controls --------------------------------------------------------------

    def seed(
        self,
        count: int,
        *,
        seed: int,
        awkward: bool,
        attachments_per_invoice: int = 0,
        attachment_bytes: int = 2048,
    ) -> list[str]:
        with self.tx() as t:
            row = t.conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'invoices'"
            ).fetchone()
            first_id = (row[0] if row else 0) + 1
            tokens: list[str] = []
            attachments: list[tuple[Any, ...]] = []
            dumps = json.dumps

            def rows() -> Iterator[tuple[Any, ...]]:
                # Streamed into executemany: one invoice exists as Python objects at a time.
                invoices = seeding.generate(
                    count,
                    seed=seed,
                    first_id=first_id,
                    awkward=awkward,
                    attachments_per_invoice=attachments_per_invoice,
                    attachment_bytes=attachment_bytes,
                )
                for offset, inv in enumerate(invoices):
                    invoice_id = first_id + offset
                    # Distinct created_at per invoice (1 ms apart) keeps "oldest first" readable.
                    created = iso(t.now + timedelta(milliseconds=offset)) if offset else t.now_iso
                    tokens.append(inv.invoice_token)
                    attachments.extend(
                        (a["attachment_token"], invoice_id, a["file_name"], a["content_type"],
                         a.get("data"), a.get("size", 0))
                        for a in inv.attachments
                    )  # fmt: skip
                    yield (
                        invoice_id,
                        inv.invoice_token,
                        inv.email_token,
                        inv.invoice_number,
                        created,
                        created,
                        *inv.ext_references,
                        dumps(inv.doc),
                        dumps(inv.email) if inv.email else None,
                        inv.case,
                    )

            t.conn.executemany(
                "INSERT INTO invoices (id, invoice_token, email_token, invoice_number,"
                " status, created_at, updated_at, ext_reference_1, ext_reference_2,"
                " ext_reference_3, ext_reference_4, ext_reference_5, doc, email, seed_case)"
                " VALUES (?, ?, ?, ?, 90, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows(),
            )
            t.conn.executemany(
                "INSERT INTO attachments (attachment_token, invoice_id, file_name,"
                " content_type, data, size) VALUES (?, ?, ?, ?, ?, ?)",
                attachments,
            )
            return tokens

    def list_invoices(self) -> list[dict[str, Any]]:
        with self.tx() as t:
            self._lapse_due(t)
            rows = t.conn.execute(
                "SELECT id, invoice_token, invoice_number, status, lease_token, lease_expires_at,"
                " finished_lease_token, created_at, updated_at,"
                " ext_reference_1, ext_reference_2, ext_reference_3, ext_reference_4,"
                " ext_reference_5, external_id_1, external_id_2, external_id_3,"
                " external_message_1, external_message_2, external_message_3,"
                " failure_code, failure_message, claim_count, ack_count, result_count,"
                " seed_case FROM invoices ORDER BY id"
            ).fetchall()
        return [dict(r) for r in rows]

    def set_status(self, token: str, status: int) -> dict[str, Any]:
        """Force a status (e.g. the undocumented 95/96/98) — clears any lease."""
        with self.tx() as t:
            row = self._invoice(t, token)
            t.conn.execute(
                "UPDATE invoices SET status = ?, lease_token = NULL, lease_expires_at = NULL,"
                " updated_at = ? WHERE id = ?",
                (status, t.now_iso, row["id"]),
            )
        return {"invoice_token": token, "status": status}

    def advance_clock(self, seconds: float) -> str:
        # Moving the clock lapses nothing by itself: whoever looks next sees the lapse.
        with self.tx() as t:
            row = t.conn.execute("SELECT value FROM meta WHERE key = 'clock_offset'").fetchone()
            offset = (float(row[0]) if row else 0.0) + seconds
            t.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('clock_offset', ?)",
                (repr(offset),),
            )
            now = self._now(t.conn)
        return iso(now)

    def now(self) -> str:
        with self._reader() as conn:
            return iso(self._now(conn))

    def reset(self) -> None:
        with self.tx() as t:
            for table in RESET_TABLES:
                t.conn.execute(f"DELETE FROM {table}")
            # Restart ids so a reset database reproduces the same numbers and tokens.
            t.conn.execute("DELETE FROM sqlite_sequence")


# --- helpers --------------------------------------------------------------------------


def _clock(offset: str | None) -> datetime:
    """The sandbox clock: real UTC plus the offset stored in ``meta``."""
    return datetime.now(UTC) + timedelta(seconds=float(offset) if offset else 0.0)


def _lapsed(row: sqlite3.Row, now_iso: str) -> bool:
    expires = row["lease_expires_at"]
    return row["status"] in LEASED and expires is not None and expires <= now_iso


def _result_response(
    token: str, previous: int, new: int, *, changed: bool, debug: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": True,
        "previous_status": group(previous),
        "new_status": group(new),
        "invoice_token": token,
        "status_changed": changed,
        "previous_status_info": status_info(previous),
        "new_status_info": status_info(new),
    }
    if debug:
        out["previous_status_code"] = previous
        out["new_status_code"] = new
    return out


def _check_monotonic(cursor_type: str | None, old: str | None, new: str) -> None:
    """The documented rules: timestamps and numbers must not go backwards; an opaque token
    may change to anything. Equal values are accepted (a run with nothing new)."""
    if cursor_type == "timestamp_utc":
        try:
            new_dt = parse_iso(new)
        except ValueError:
            raise validation_error("new_cursor_value is not an ISO-8601 timestamp") from None
        if old is not None and new_dt < parse_iso(old):
            raise ApiError(
                422, "CURSOR_REGRESSION", f"new cursor {new} is before the committed cursor {old}"
            )
    elif cursor_type == "numeric_id":
        try:
            new_n = int(new)
        except ValueError:
            raise validation_error("new_cursor_value is not an integer") from None
        if old is not None and new_n < int(old):
            raise ApiError(
                422, "CURSOR_REGRESSION", f"new cursor {new} is below the committed cursor {old}"
            )


def _reject_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    # Strict on purpose: a misspelt field in the client must fail loudly here rather than
    # be silently ignored (e.g. a TTL that never reaches the server).
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise validation_error(f"unknown field(s): {', '.join(unknown)}")


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        if default is None:
            raise validation_error(f"{name} is required")
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise validation_error(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise validation_error(f"{name} must be between {lo} and {hi}")
    return value


def text_length(text: str) -> int:
    """Length in UTF-16 code units, as a JavaScript server counts (an emoji counts 2).

    The contract says "chars" without saying which; the stricter reading makes the sandbox
    catch a client that counts code points.
    """
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _opt_str(body: dict[str, Any], name: str, max_len: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise validation_error(f"{name} must be a string")
    if text_length(value) > max_len:
        raise validation_error(f"{name} must be at most {max_len} characters")
    return value


def _req_str(body: dict[str, Any], name: str, max_len: int) -> str:
    value = _opt_str(body, name, max_len)
    if not value:
        raise validation_error(f"{name} is required")
    return value
