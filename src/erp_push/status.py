"""What the journal knows, for operators: `erp-push status` and `erp-push resend`.

``status`` answers the 3 a.m. questions from the journal alone (no network: it imports
neither the HTTP nor the SSH library, and changes nothing): which invoices are
unfinished, how far each got and what it waits for; which runs ran, what they did and
how they ended; when the last run succeeded. The push command records each run here
(``record_run_started`` / ``record_run_finished``); a run killed outright (SIGKILL, a
power cut) keeps its start and never gets an end, and its lock file tells it from a
run still going.

``resend`` marks an invoice for a deliberate re-send (``Journal.request_resend``); the
pipeline carries it out the next time a push claims that invoice.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from erp_push.errors import ErpPushError, ExitCode, JournalUnusable
from erp_push.journal import (
    RESEND_COLUMNS,
    Entry,
    Journal,
    Resend,
    RunRecord,
    Step,
    entry_from_row,
    resend_from_row,
    run_from_row,
    run_lock_held,
)
from erp_push.report import CommandReport, Result, RunReport, Screen, utc_iso
from erp_push.text import printable, shorten

log = logging.getLogger("erp_push.status")

RUNS_SHOWN = 10  # default of `status --runs`
# The steps a later push finishes from the journal alone: pipeline.RESUMABLE (not
# imported: the pipeline loads the HTTP library, and status must not).
FINISHED_FROM_JOURNAL = frozenset({Step.PUBLISHED, Step.ACKNOWLEDGED, Step.FAILED})
ERROR_TEXT_MAX = 500  # a run's error as the journal keeps it


# --- recording runs (the push command) -------------------------------------------------


def exit_code_of(exc: BaseException) -> int:
    """The exit code the command line ends with when ``exc`` ends a run (cli._guarded)."""
    if isinstance(exc, ErpPushError):
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    code = getattr(exc, "exit_code", None)  # cli.Terminated (SIGTERM): 143
    if isinstance(code, int):
        return code
    return int(ExitCode.INTERNAL_ERROR)


def _error_text(exc: BaseException | None) -> str | None:
    """What the journal keeps of why a run ended: erp-push's own message (already free of
    secrets, as printed on stderr), or only the type of anything else (a bug's text may
    hold anything, as the CLI's one line for it does not show either)."""
    if exc is None:
        return None
    if isinstance(exc, ErpPushError):
        return shorten(f"{type(exc).__name__}: {exc.message}", ERROR_TEXT_MAX)
    return type(exc).__name__


def record_run_started(journal: Journal, command: str) -> None:
    # Bookkeeping for `status`: never a reason to fail a run (nor to hide how it ended).
    try:
        journal.record_run_started(command)
    except sqlite3.Error as exc:
        log.warning("journal: could not record the start of this run: %s", exc)


def record_run_finished(
    journal: Journal, report: RunReport, exc: BaseException | None = None
) -> None:
    """The run's end: its counts, and its exit code (from ``exc`` when one ended it)."""
    try:
        journal.record_run_finished(
            exit_code=int(report.exit_code) if exc is None else exit_code_of(exc),
            claimed=report.claimed,
            recovered=report.recovered,
            counts={r.value: report.count(r) for r in Result},
            error=_error_text(exc if exc is not None else report.error),
        )
    except sqlite3.Error as error:
        log.warning("journal: could not record the end of this run: %s", error)


# --- status ------------------------------------------------------------------------------

# What an unfinished invoice waits for (``waiting_for`` in --json).
LIVE_RUN = "live_run"  # a run that is still going holds it
LEASE = "lease"  # a dead run held it before its file was journaled: its lease must lapse
NUNTIQ = "nuntiq"  # Nuntiq must take its result, or hand it back through claim


@dataclass(frozen=True)
class Waiting:
    entry: Entry
    run_alive: bool
    lease_alive: bool
    waiting_for: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        e = self.entry
        return {
            "invoice_token": e.invoice_token,
            "invoice_number": e.invoice_number,
            "step": e.step.value,
            "waiting_for": self.waiting_for,
            "reason": self.reason,
            "run_id": e.run_id,
            "run_alive": self.run_alive,
            "lease_expires_at": utc_iso(e.lease_expires_at),
            "lease_alive": self.lease_alive,
            "remote_path": e.remote_path,
            "failure_code": e.failure_code if e.failed else None,
            "updated_at": utc_iso(e.updated_at),
        }


def why_waiting(entry: Entry, *, run_alive: bool, now: datetime) -> Waiting:
    """What ``entry`` waits for, in the pipeline's own terms (see pipeline.RESUMABLE)."""
    lease_alive = entry.lease_alive(now, margin=timedelta(0))
    until = f"{_clock(entry.lease_expires_at)} ({_from_now(entry.lease_expires_at, now)})"
    if run_alive:
        return Waiting(
            entry,
            run_alive,
            lease_alive,
            LIVE_RUN,
            f"a run still going holds it (lease until {until}); hands off",
        )
    done = _done_so_far(entry)
    if entry.step in FINISHED_FROM_JOURNAL:
        if lease_alive:
            reason = f"{done}; the next push tells Nuntiq at once (its lease lives until {until})"
        else:
            reason = (
                f"{done}; its lease lapsed, so Nuntiq hands it back to the queue and the next "
                "push that claims it tells Nuntiq, without uploading it again"
            )
        return Waiting(entry, run_alive, lease_alive, NUNTIQ, reason)
    if lease_alive:
        return Waiting(
            entry,
            run_alive,
            lease_alive,
            LEASE,
            f"{done} when its run ended; it waits for its lease to lapse at {until}, then the "
            "next push claims it again (a file that landed is found, not uploaded twice)",
        )
    return Waiting(
        entry,
        run_alive,
        lease_alive,
        NUNTIQ,
        f"{done} when its run ended; its lease lapsed, so it waits for Nuntiq to hand it "
        "back: the next push that claims it finishes it",
    )


def _done_so_far(entry: Entry) -> str:
    if entry.step is Step.FAILED or entry.failed:
        return f"failed ({entry.failure_code}), not yet reported to Nuntiq"
    if entry.step is Step.ACKNOWLEDGED:
        return f"delivered as {entry.remote_path} and acknowledged; its result is not reported"
    if entry.step is Step.PUBLISHED:
        return f"delivered as {entry.remote_path}; not yet acknowledged"
    if entry.step is Step.RENDERED:
        return f"rendered as {entry.file_name}; its upload may have begun"
    return "claimed; nothing uploaded"


@dataclass(frozen=True)
class RunView:
    record: RunRecord
    alive: bool  # no end recorded and its process still holds its lock

    @property
    def state(self) -> str:
        if self.record.finished_at is not None:
            return "finished"
        return "running" if self.alive else "died"

    def to_dict(self) -> dict[str, Any]:
        r = self.record
        return {
            "run_id": r.run_id,
            "command": r.command,
            "pid": r.pid,
            "state": self.state,
            "started_at": utc_iso(r.started_at),
            "finished_at": utc_iso(r.finished_at) if r.finished_at else None,
            "exit_code": r.exit_code,
            "claimed": r.claimed,
            "recovered": r.recovered,
            "counts": r.counts,
            "error": r.error,
        }


@dataclass
class StatusReport(CommandReport):
    state_dir: Path
    journal_path: Path
    now: datetime
    journal_exists: bool = False
    runs_recorded: bool = False  # False: a journal from before runs were recorded
    unfinished: list[Waiting] = field(default_factory=list)
    resends: list[Resend] = field(default_factory=list)
    runs: list[RunView] = field(default_factory=list)
    last_success: RunRecord | None = None

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        success = self.last_success
        return {
            "state_dir": str(self.state_dir),
            "journal": str(self.journal_path),
            "journal_exists": self.journal_exists,
            "now": utc_iso(self.now),
            "unfinished": [w.to_dict() for w in self.unfinished],
            "resends": [
                {
                    "invoice_token": r.invoice_token,
                    "requested_at": utc_iso(r.requested_at),
                    "previous_path": r.previous_path,
                }
                for r in self.resends
            ],
            "runs_recorded": self.runs_recorded,
            "runs": [run.to_dict() for run in self.runs],
            "last_success": None
            if success is None
            else {
                "run_id": success.run_id,
                "started_at": utc_iso(success.started_at),
                "finished_at": utc_iso(success.finished_at) if success.finished_at else None,
            },
        }

    def show(self, screen: Screen) -> None:
        if not self.journal_exists:
            screen.say(
                f"no journal at {self.journal_path}: no push has run with this state_dir yet"
            )
            return
        if not self.unfinished:
            screen.say("unfinished invoices: none")
        else:
            screen.say(f"unfinished invoices: {len(self.unfinished)}")
            for w in self.unfinished:
                e = w.entry
                name = e.invoice_number or e.invoice_token
                screen.say(f"{name} [{e.invoice_token}] at step {e.step.value}: {w.reason}")
        for r in self.resends:
            was = f" (earlier file {r.previous_path})" if r.previous_path else ""
            screen.say(
                f"{r.invoice_token}: asked for {_clock(r.requested_at)}{was}; the next push "
                "that claims it uploads a fresh file under a new name",
                label="re-send:",
            )
        if not self.runs_recorded:
            screen.say(
                "runs: none recorded (a journal from an earlier erp-push: the next push "
                "starts recording them)"
            )
        elif not self.runs:
            screen.say("runs: none recorded yet")
        else:
            screen.say(f"last {len(self.runs)} run(s), newest first:")
            for run in self.runs:
                screen.say(_run_line(run, self.now))
        if self.last_success is not None:
            at = self.last_success.finished_at or self.last_success.started_at
            screen.say(f"last successful run: {_clock(at)} ({_from_now(at, self.now)})")
        elif self.runs_recorded:
            screen.say("last successful run: none recorded")


def _run_line(run: RunView, now: datetime) -> str:
    r = run.record
    start = _clock(r.started_at)
    if run.state == "running":
        return f"  {start}  running (pid {r.pid}, for {_duration(now - r.started_at)})"
    if run.state == "died":
        return f"  {start}  died: started, never finished (killed, or the machine stopped)"
    assert r.finished_at is not None
    counts = ", ".join(f"{n} {result.replace('_', ' ')}" for result, n in r.counts.items() if n)
    line = (
        f"  {start}  exit {r.exit_code}, {_duration(r.finished_at - r.started_at)}: "
        f"{r.claimed} claimed"
    )
    if r.recovered:
        line += f", {r.recovered} recovered"
    if counts:
        line += f"; {counts}"
    if r.error:
        line += f" ({printable(r.error)})"
    return line


def read_status(
    state_dir: Path, *, runs: int = RUNS_SHOWN, now: datetime | None = None
) -> StatusReport:
    """The journal in ``state_dir`` as ``status`` shows it. Reads only: a state_dir that
    does not exist yet is not created, an older journal is not migrated."""
    now = now or datetime.now(UTC)
    path = state_dir / Journal.FILE_NAME
    report = StatusReport(state_dir=state_dir, journal_path=path, now=now)
    if not path.is_file():
        return report
    report.journal_exists = True
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        raise JournalUnusable(f"cannot read the journal {path}: {exc}") from None
    try:
        _read(db, report, state_dir, runs, now)
    except sqlite3.Error as exc:
        raise JournalUnusable(f"cannot read the journal {path}: {exc}") from None
    finally:
        db.close()
    return report


def _read(
    db: sqlite3.Connection, report: StatusReport, state_dir: Path, runs: int, now: datetime
) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "invoices" in tables:
        rows = db.execute(
            "SELECT * FROM invoices WHERE step != 'reported' ORDER BY updated_at"
        ).fetchall()
        alive: dict[str, bool] = {}
        for row in rows:
            entry = entry_from_row(row)
            if entry.run_id not in alive:
                alive[entry.run_id] = run_lock_held(state_dir, entry.run_id)
            report.unfinished.append(why_waiting(entry, run_alive=alive[entry.run_id], now=now))
    if "resends" in tables:
        report.resends = [
            resend_from_row(row)
            for row in db.execute(
                f"SELECT {RESEND_COLUMNS} FROM resends WHERE done_at IS NULL ORDER BY id"
            )
        ]
    if "runs" not in tables:
        return
    report.runs_recorded = True
    recent = db.execute("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", (runs,)).fetchall()
    for row in recent:
        record = run_from_row(row)
        alive_now = record.finished_at is None and run_lock_held(state_dir, record.run_id)
        report.runs.append(RunView(record, alive_now))
    success = db.execute(
        "SELECT * FROM runs WHERE exit_code IN (0, 1)"
        " ORDER BY finished_at DESC, rowid DESC LIMIT 1"  # runs ending in one second: the later
    ).fetchone()
    report.last_success = run_from_row(success) if success else None


# --- resend ------------------------------------------------------------------------------

NOT_REQUEUED = (
    "this does not put the invoice back into Nuntiq's queue: do that in Nuntiq; the "
    "next push that claims it then uploads the fresh file"
)


@dataclass
class ResendReport(CommandReport):
    mark: Resend
    new: bool  # False: it was marked already, nothing changed
    delivered_before: list[str]  # paths earlier re-sends landed under

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoice_token": self.mark.invoice_token,
            "marked": True,
            "already_marked": not self.new,
            "requested_at": utc_iso(self.mark.requested_at),
            "previous_path": self.mark.previous_path,
            "earlier_resends": self.delivered_before,
            "requeued_in_nuntiq": False,
            "note": NOT_REQUEUED,
        }

    def show(self, screen: Screen) -> None:
        token = self.mark.invoice_token
        if self.new:
            screen.say(
                f"invoice {token} is marked for a re-send: the next push that claims it "
                "uploads a fresh file under a new name"
            )
        else:
            screen.say(
                f"invoice {token} was already marked for a re-send "
                f"({_clock(self.mark.requested_at)}); nothing changed"
            )
        if self.mark.previous_path:
            screen.say(f"the earlier file {self.mark.previous_path} stays as it is", label="note:")
        screen.say(NOT_REQUEUED, label="note:", style="yellow")


def request_resend(state_dir: Path, invoice_token: str) -> ResendReport:
    journal = Journal(state_dir)
    try:
        mark, new = journal.request_resend(invoice_token)
        before = [r.remote_path for r in journal.resends(invoice_token) if r.remote_path]
    finally:
        journal.close()
    return ResendReport(mark=mark, new=new, delivered_before=before)


def token_problem(invoice_token: str) -> str | None:
    """Why ``invoice_token`` cannot be an invoice token (a mark for a typo would never be
    used), or None."""
    if not invoice_token or len(invoice_token) > 200:
        return "an invoice token is 1 to 200 characters"
    if any(c.isspace() or not c.isprintable() for c in invoice_token):
        return "an invoice token has no spaces or control characters"
    return None


# --- small formatting helpers -------------------------------------------------------------


def _clock(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(span: timedelta) -> str:
    seconds = max(0.0, span.total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _from_now(value: datetime, now: datetime) -> str:
    span = value - now
    if span >= timedelta(0):
        return f"in {_duration(span)}"
    return f"{_duration(-span)} ago"
