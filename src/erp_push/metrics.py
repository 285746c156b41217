"""A Prometheus textfile-collector file about the last push run, for monitoring cron runs.

node_exporter's textfile collector reads every ``*.prom`` file in its folder on each
scrape, so the file is replaced atomically (a tmp file in the same folder, then
``os.replace``): a scrape sees the last run's file or this run's, never half of one. The
tmp name ends in ``.tmp``, which the collector ignores. Written at the end of every run,
failed runs included (bad settings, a server unreachable, Ctrl-C), so an alert can tell
"did not run" (``erp_push_last_run_timestamp_seconds`` old) from "ran and failed"
(``erp_push_exit_code``) from "has not succeeded for a while"
(``erp_push_last_success_timestamp_seconds``, carried over from the previous file when
this run failed).

Only the standard library: the file is written by the CLI at exit, also when the settings
could not be read.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from erp_push.report import Outcome, RunReport

PREFIX = "erp_push_"
# Every result an invoice can end with (report.Result), always written (0 when none), so
# a series never vanishes between runs.
RESULTS = ("delivered", "already_delivered", "failed", "pending")
# Exit codes of a run that went through (1: some invoices failed or wait for the next
# run, each counted in erp_push_invoices); any other code is a run that did not.
COMPLETED = frozenset({0, 1})
_LAST_SUCCESS = re.compile(
    rf"^{PREFIX}last_success_timestamp_seconds(?:\{{\}})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE
)


@dataclass
class Run:
    """What one push run did, counted as it goes (``claimed``, ``outcome``) so that a run
    that is interrupted still has its numbers; ``report`` replaces them when there is one."""

    started: float = field(default_factory=time.monotonic)  # by the monotonic clock
    claimed_count: int = 0
    recovered: int = 0
    results: Counter[str] = field(default_factory=Counter)

    def claimed(self, count: int) -> None:
        self.claimed_count += count

    def outcome(self, outcome: Outcome) -> None:
        self.results[outcome.result.value] += 1

    def take(self, report: RunReport) -> None:
        self.claimed_count, self.recovered = report.claimed, report.recovered
        self.results = Counter(outcome.result.value for outcome in report.outcomes)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


def render(run: Run, *, exit_code: int, finished: float, last_success: float | None) -> str:
    """The file's text (Prometheus text exposition format 0.0.4)."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} gauge")
        lines.extend(f"{PREFIX}{name}{labels} {_number(value)}" for labels, value in samples)

    gauge(
        "last_run_timestamp_seconds",
        "When the last erp-push push run ended (Unix time), whatever its exit code.",
        [("", finished)],
    )
    gauge(
        "last_success_timestamp_seconds",
        "When the last push run that went through (exit code 0 or 1) ended (Unix time); "
        "0 if none has yet.",
        [("", last_success or 0)],
    )
    gauge("run_duration_seconds", "How long the last push run took.", [("", run.duration)])
    gauge(
        "invoices",
        "Invoices the last push run finished or left, by result.",
        [(f'{{result="{result}"}}', run.results.get(result, 0)) for result in RESULTS],
    )
    gauge("claimed", "Invoices the last push run claimed from Nuntiq.", [("", run.claimed_count)])
    gauge(
        "recovered",
        "Invoices left unfinished by earlier runs that the last push run completed.",
        [("", run.recovered)],
    )
    gauge(
        "exit_code",
        "Exit code of the last push run (0 all delivered, 1 some failed or pending, "
        "3 settings, 4 Nuntiq, 5 SFTP, 70 internal error, 130/143 interrupted).",
        [("", exit_code)],
    )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def previous_success(path: Path) -> float | None:
    """The last success the file at ``path`` recorded, if it is there and readable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = _LAST_SUCCESS.search(text)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return value if value > 0 else None


def write(path: Path, run: Run, *, exit_code: int) -> None:
    """Replace the file at ``path`` atomically (mode 0644: node_exporter runs as another
    user). Raises ``OSError`` when the folder cannot take it; no tmp file is left then."""
    finished = time.time()
    last_success = finished if exit_code in COMPLETED else previous_success(path)
    text = render(run, exit_code=exit_code, finished=finished, last_success=last_success)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
