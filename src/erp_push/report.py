"""Per-invoice outcomes, what they mean for Nuntiq, and the run summary for people and tools.

stdout is data, stderr is for people: ``--json`` writes exactly one JSON document to stdout;
the rich table goes to stderr so a cron job can pipe the JSON and still log the table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from erp_push import wire
from erp_push.errors import ErpPushError, ExitCode
from erp_push.models import IntegrationResult
from erp_push.text import json_safe, printable

if TYPE_CHECKING:
    from rich.console import Console

FULL_TABLE_MAX = 30  # longer runs list only the invoices that were not delivered
DELIVERED_MESSAGE = "SFTP_DELIVERED"


class Result(StrEnum):
    DELIVERED = "delivered"  # file published by this run, reported as success
    ALREADY_DELIVERED = "already_delivered"  # proof of an earlier delivery; reported as success
    FAILED = "failed"  # reported to Nuntiq as IntegrationFailed (97)
    PENDING = "pending"  # not finished; the journal keeps it and the next run completes it


@dataclass(frozen=True)
class Outcome:
    invoice_token: str
    result: Result
    invoice_number: str | None = None
    remote_path: str | None = None
    failure_code: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.result in (Result.DELIVERED, Result.ALREADY_DELIVERED)


def integration_result_for(outcome: Outcome) -> IntegrationResult:
    """What Nuntiq is told about one finished invoice."""
    if outcome.ok:
        assert outcome.remote_path is not None
        path = outcome.remote_path
        if wire.text_length(path) <= wire.EXTERNAL_TEXT_MAX:
            return IntegrationResult.delivered(path, DELIVERED_MESSAGE)
        # A long file name in a deep folder can pass Nuntiq's limit on external ids:
        # the name (at most 200 bytes, see render) goes first, its folder second.
        folder, _, name = path.rpartition("/")
        return IntegrationResult(
            success=True,
            external_ids=(name, folder[: wire.EXTERNAL_TEXT_MAX] or "/", None),
            external_messages=(DELIVERED_MESSAGE, None, None),
        )
    assert outcome.failure_code is not None
    return IntegrationResult.failed(
        outcome.failure_code, truncate(outcome.message or outcome.failure_code)
    )


def truncate(text: str) -> str:
    """A failure message cut to what Nuntiq accepts (counted as ``wire`` counts)."""
    return wire.truncate_text(text, wire.FAILURE_MESSAGE_MAX)


@dataclass
class RunReport:
    """Everything one command run did. ``error`` is set when the run stopped early."""

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
        return {
            "command": self.command,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at) if self.finished_at else None,
            "exit_code": int(self.exit_code),
            "claimed": self.claimed,
            "recovered": self.recovered,
            "counts": {r.value: self.count(r) for r in Result},
            "error": _error_dict(self.error),
            "notes": self.notes,
            "invoices": [
                {k: (v.value if isinstance(v, Result) else v) for k, v in asdict(o).items()}
                for o in self.outcomes
            ],
        }

    def to_json(self) -> str:
        # One line: cron appends each run's report to a JSON Lines log. json_safe: a
        # server's control characters stay escaped even for `| less -R` or a terminal.
        return json_safe(json.dumps(self.to_dict(), ensure_ascii=False))

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
            return "Nothing to push: no invoices are pending integration."
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


def _iso(value: datetime) -> str:
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
