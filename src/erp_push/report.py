"""What each command did, for people and for tools; and what an outcome means for Nuntiq.

Every command returns a ``CommandReport``: it shows itself to people (``show``), becomes
one JSON document (``to_json``) and names the exit code. The CLI only picks which:
``RunReport`` for push, ``DryRunReport`` for dry-run, ``CleanupReport`` for cleanup-tmp.

stdout is data, stderr is for people: ``--json`` writes exactly one JSON document to stdout;
the rich table goes to stderr so a cron job can pipe the JSON and still log the table.
Outside text (invoice numbers, paths, server messages) is shown escaped (``text``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from erp_push import wire
from erp_push.errors import ErpPushError, ExitCode
from erp_push.models import DELIVERED_MESSAGE, IntegrationResult
from erp_push.text import json_safe, printable

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console

    from erp_push.transport import RemoteFile

FULL_TABLE_MAX = 30  # longer runs list only the invoices that were not delivered
NOTHING_TO_PUSH = "Nothing to push: no invoices are pending integration."


class Screen(Protocol):
    """Where a report shows itself to people (stderr). ``say`` prints one plain line,
    escaped, with rich only on a terminal; ``console`` is rich's, for drawing tables: an
    idle run that only says one line never imports rich."""

    def say(self, text: str, *, label: str = "", style: str = "") -> None: ...

    @property
    def console(self) -> Console: ...


class CommandReport(ABC):
    """What a command did: it shows itself, becomes JSON and names the exit code."""

    # Why the command stopped early; the CLI prints it (one error printer for all).
    error: ErpPushError | None = None

    @property
    @abstractmethod
    def exit_code(self) -> ExitCode: ...

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def show(self, screen: Screen) -> None: ...

    def to_json(self) -> str:
        return "".join(self.json_chunks())

    def json_chunks(self) -> Iterator[str]:
        """``to_json()`` in pieces, for writing as they are made.

        One line: cron appends each run's report to a JSON Lines log. json_safe: a
        server's control characters stay escaped even for `| less -R` or a terminal.
        """
        yield _json_text(self.to_dict())


class Result(StrEnum):
    DELIVERED = "delivered"  # file published by this run, reported as success
    ALREADY_DELIVERED = "already_delivered"  # proof of an earlier delivery; reported as success
    FAILED = "failed"  # reported to Nuntiq as IntegrationFailed (97)
    PENDING = "pending"  # not finished; the journal keeps it and the next run completes it


@dataclass(frozen=True, slots=True)  # a 10,000-invoice drain keeps every one
class Outcome:
    invoice_token: str
    result: Result
    invoice_number: str | None = None
    remote_path: str | None = None
    failure_code: str | None = None
    message: str | None = None
    row: int | None = None  # output_mode batch: the invoice's row in the batch file (1 = first)

    @property
    def ok(self) -> bool:
        return self.result in (Result.DELIVERED, Result.ALREADY_DELIVERED)


def integration_result_for(outcome: Outcome) -> IntegrationResult:
    """What Nuntiq is told about one finished invoice."""
    if outcome.ok:
        assert outcome.remote_path is not None
        path = outcome.remote_path
        # A batch file holds many invoices: the row tells the ERP's people which is which.
        message = DELIVERED_MESSAGE if outcome.row is None else str(outcome.row)
        if wire.text_length(path) <= wire.EXTERNAL_TEXT_MAX:
            return IntegrationResult.delivered(path, message)
        # A long file name in a deep folder can pass Nuntiq's limit on external ids:
        # the name (at most 200 bytes, see render) goes first, its folder second.
        folder, _, name = path.rpartition("/")
        return IntegrationResult(
            success=True,
            external_ids=(name, folder[: wire.EXTERNAL_TEXT_MAX] or "/", None),
            external_messages=(message, None, None),
        )
    assert outcome.failure_code is not None
    return IntegrationResult.failed(
        outcome.failure_code, truncate(outcome.message or outcome.failure_code)
    )


def truncate(text: str) -> str:
    """A failure message cut to what Nuntiq accepts (counted as ``wire`` counts)."""
    return wire.truncate_text(text, wire.FAILURE_MESSAGE_MAX)


@dataclass
class RunReport(CommandReport):
    """Everything one push run did. ``error`` is set when the run stopped early."""

    command: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    claimed: int = 0
    recovered: int = 0  # unfinished invoices of earlier runs that this run completed
    outcomes: list[Outcome] = field(default_factory=list)
    error: ErpPushError | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def count(self, result: Result) -> int:
        return sum(1 for o in self.outcomes if o.result is result)

    @property
    def exit_code(self) -> ExitCode:
        if self.error is not None:
            return self.error.exit_code
        if any(not o.ok for o in self.outcomes):
            return ExitCode.SOME_FAILED
        return ExitCode.OK

    def finish(self) -> RunReport:
        self.finished_at = datetime.now(UTC)
        return self

    # --- output ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {**self.header(), "invoices": [outcome_dict(o) for o in self.outcomes]}

    def json_chunks(self) -> Iterator[str]:
        # A drain of many thousand invoices would otherwise hold every invoice's dict and
        # the whole document at once at its very end: its peak memory would grow with N.
        # The same text as to_dict's, written an invoice at a time ("invoices" is last).
        head = _json_text(self.header())
        yield head[:-1] + ', "invoices": ['  # the head is never empty: '{..., '

        for i, outcome in enumerate(self.outcomes):
            yield (", " if i else "") + _json_text(outcome_dict(outcome))
        yield "]}"

    def header(self) -> dict[str, Any]:
        """Everything but the invoices (each invoice is an event of its own in the logs)."""
        return {
            "command": self.command,
            "started_at": utc_iso(self.started_at),
            "finished_at": utc_iso(self.finished_at) if self.finished_at else None,
            "exit_code": int(self.exit_code),
            "claimed": self.claimed,
            "recovered": self.recovered,
            "counts": {r.value: self.count(r) for r in Result},
            "error": _error_dict(self.error),
            "notes": self.notes,
        }

    def show(self, screen: Screen) -> None:
        if self.outcomes or self.notes:
            self.render_table(screen.console)
        else:
            screen.say(self.summary_line())

    def render_table(self, console: Console) -> None:
        # rich only here, when a table is drawn: an idle run never imports it.
        from rich.table import Table
        from rich.text import Text

        shown = self.outcomes
        if len(shown) > FULL_TABLE_MAX:
            # On long runs the delivered invoices would bury the few that need attention.
            shown = [o for o in self.outcomes if not o.ok]
            console.print(
                f"[dim]{len(self.outcomes) - len(shown)} delivered invoices not listed "
                "(--json lists every invoice)[/dim]"
            )
        if shown:
            table = Table(title=f"erp-push {self.command}", title_justify="left")
            table.add_column("invoice")
            table.add_column("result")
            table.add_column("remote file / failure")
            for o in shown:
                style = {
                    Result.DELIVERED: "green",
                    Result.ALREADY_DELIVERED: "cyan",
                    Result.FAILED: "red",
                    Result.PENDING: "yellow",
                }[o.result]
                detail = o.remote_path or f"{o.failure_code or ''} {o.message or ''}".strip()
                if o.remote_path and o.row is not None:
                    detail = f"{o.remote_path} row {o.row}"
                # Numbers, paths and messages come from Nuntiq and the SFTP server: shown
                # as plain Text (no rich markup), control characters escaped.
                table.add_row(
                    Text(printable(o.invoice_number or o.invoice_token)),
                    f"[{style}]{o.result.value}[/{style}]",
                    Text(printable(detail)),
                )
            console.print(table)
        console.print(self.summary_line())
        for note in self.notes:
            console.print(Text("note: ", style="dim") + Text(printable(note)))

    def summary_line(self) -> str:
        if not self.outcomes and self.error is None:
            return NOTHING_TO_PUSH
        parts = [
            f"{self.count(Result.DELIVERED)} delivered",
            f"{self.count(Result.ALREADY_DELIVERED)} already delivered",
            f"{self.count(Result.FAILED)} failed",
        ]
        if pending := self.count(Result.PENDING):
            parts.append(f"{pending} pending (the next run finishes them)")
        if self.recovered:
            parts.append(f"{self.recovered} recovered from an earlier run")
        return f"{self.claimed} claimed: " + ", ".join(parts)


def outcome_dict(outcome: Outcome) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies every value, for nothing here.
    row = {name: getattr(outcome, name) for name in _OUTCOME_FIELDS}
    row["result"] = outcome.result.value
    return row


def outcome_from_dict(row: dict[str, Any]) -> Outcome:
    """``outcome_dict`` read back (a helper process's outcome, see ``processes``)."""
    optional = {name: row.get(name) for name in _OUTCOME_FIELDS[2:]}
    return Outcome(str(row["invoice_token"]), Result(row["result"]), **optional)


_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome))


def _json_text(document: dict[str, Any]) -> str:
    return json_safe(json.dumps(document, ensure_ascii=False))


def utc_iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _error_dict(error: ErpPushError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {
        "type": type(error).__name__,
        "message": error.message,
        "exit_code": int(error.exit_code),
        "hint": error.hint,
    }


# --- dry-run --------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewedFile:
    """What a push would do with one invoice now (``publish.preview``)."""

    invoice_token: str
    invoice_number: str | None
    file_name: str | None  # the name it would get (after collision suffixes)
    collision: str | None = None  # what made the name differ from the rendered one
    already_delivered: str | None = None  # path of an identical file already there
    failure_code: str | None = None
    message: str | None = None
    attachments: list[str] = field(default_factory=list)  # uploaded before it, in order
    row: int | None = None  # output_mode batch: its row in the batch file


@dataclass
class DryRunReport(CommandReport):
    lease_ttl_seconds: int
    files: list[PreviewedFile] = field(default_factory=list)
    sftp_checked: bool = False

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK

    @property
    def note(self) -> str:
        return (
            f"dry-run leased these invoices for {self.lease_ttl_seconds} s to look at them "
            "(Nuntiq has no list call); they return to the queue after that"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "lease_ttl_seconds": self.lease_ttl_seconds,
            "note": self.note,
            "invoices": [asdict(p) for p in self.files],
        }

    def show(self, screen: Screen) -> None:
        if not self.files:
            screen.say(NOTHING_TO_PUSH)
            return
        from rich.markup import escape
        from rich.table import Table

        def cell(text: str) -> str:
            # Server text in cells: never read as markup, control characters escaped.
            return escape(printable(text))

        table = Table(title="erp-push dry-run (nothing written)", title_justify="left")
        for column in ("invoice", "file name", "note"):
            table.add_column(column)
        for p in self.files:
            if p.failure_code:
                table.add_row(
                    cell(p.invoice_number or p.invoice_token),
                    "-",
                    f"[red]{p.failure_code}[/red] {cell(p.message or '')}",
                )
            elif p.already_delivered:
                table.add_row(
                    cell(p.invoice_number or ""),
                    "-",
                    f"already delivered as {cell(p.already_delivered)}",
                )
            else:
                name = p.file_name or ""
                names = [
                    name if p.row is None else f"{name} row {p.row}",
                    *(f"+ {attachment}" for attachment in p.attachments),
                ]
                table.add_row(
                    cell(p.invoice_number or ""),
                    "\n".join(cell(n) for n in names),
                    cell(p.collision or ""),
                )
        screen.console.print(table)
        screen.say(self.note, label="note:", style="dim")


# --- cleanup-tmp ----------------------------------------------------------------------


@dataclass(frozen=True)
class NotRemoved:
    file: RemoteFile
    reason: str  # what the server said


@dataclass
class CleanupReport(CommandReport):
    older_than: timedelta
    dry_run: bool = False  # listed only, nothing removed
    stale: list[RemoteFile] = field(default_factory=list)
    removed: list[RemoteFile] = field(default_factory=list)  # only those really removed
    not_removed: list[NotRemoved] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.SOME_FAILED if self.not_removed else ExitCode.OK

    @property
    def older_than_minutes(self) -> int | float:
        minutes = self.older_than / timedelta(minutes=1)
        return int(minutes) if minutes.is_integer() else minutes

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "older_than_minutes": self.older_than_minutes,
            "stale": [_remote_file(f) for f in self.stale],
            "removed": [_remote_file(f) for f in self.removed],
            "not_removed": [{**_remote_file(n.file), "error": n.reason} for n in self.not_removed],
        }

    def show(self, screen: Screen) -> None:
        minutes = self.older_than_minutes
        if self.dry_run:
            for f in self.stale:
                screen.say(f.path, label="would remove")
            screen.say(f"{len(self.stale)} stale tmp file(s) older than {minutes} min (dry run)")
            return
        for f in self.removed:
            screen.say(f.path, label="removed")
        for n in self.not_removed:
            screen.say(f"{n.file.path}: {n.reason}", label="could not remove", style="bold red")
        summary = f"{len(self.removed)} stale tmp file(s) removed (older than {minutes} min)"
        if self.not_removed:
            summary += f"; {len(self.not_removed)} could not be removed"
        screen.say(summary)


def _remote_file(f: RemoteFile) -> dict[str, Any]:
    return {"path": f.path, "size": f.size, "mtime": f.mtime.astimezone(UTC).isoformat()}
