"""Log lines on stderr, as text for people or one JSON object per line for machines, and
the events a run reports.

Everything erp-push says on stderr in ``--log-format json`` is a log record, so both
formats carry the same records: erp-push's own log lines (``log``), the library records
``--debug`` lets through, and the *events* a run reports on the ``erp_push.events``
logger: one ``invoice`` event per invoice outcome, one ``<command>_finished`` event per
command (``run_finished`` for push), ``error``, ``interrupted``, ``terminated``. In text
format the events are what the summary table shows at the end, so they appear as lines
only with ``--verbose``; in JSON they are the point and always appear (with ``--quiet``
only those that say something went wrong).

A JSON line holds ``time`` (ISO-8601, UTC), ``level``, ``event``, ``logger``,
``message`` (the text line's words) and the event's fields: ``invoice_token`` and
``invoice_number`` where there is one. Secret values registered with ``hide`` (the API
key, passwords) are cut out of every line, text or JSON, whoever wrote it.

Cheap to import: ``cli`` imports it at start-up (no pydantic, rich or SSH library here).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from erp_push.text import json_safe, printable, printable_lines, redact

if TYPE_CHECKING:
    from erp_push.report import CommandReport, Outcome

LogFormat = Literal["text", "json"]
EVENTS = "erp_push.events"
# The libraries erp-push drives narrate in their own words: paramiko every packet, and its
# transport thread logs a failed handshake as an ERROR traceback and a refused channel as
# "Secsh channel N open FAILED"; httpx/httpcore every request and header. erp-push says
# what that means for the run in one line of its own, so their records are for --debug.
LIBRARY_LOGGERS = ("paramiko", "httpx", "httpcore")
OFF = logging.CRITICAL + 1  # above every level: records are not even made

_events = logging.getLogger(EVENTS)
# Attributes every LogRecord has; any other attribute came from ``extra`` and is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "event",
    "fields",
}
_secrets: tuple[str, ...] = ()


# --- secrets ----------------------------------------------------------------------------


def hide(secrets: Iterable[str]) -> None:
    """Cut these values out of every line from now on (the settings' secrets)."""
    global _secrets
    _secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def scrub(text: str) -> str:
    return redact(text, _secrets) if _secrets else text


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    return value


# --- events ----------------------------------------------------------------------------


def event(name: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Report one event: ``name`` is the JSON ``event``, ``message`` the text line, and
    ``fields`` (None values left out) the JSON object's other keys."""
    _emit(name, message, level, fields)


def _emit(name: str, message: str, level: int, fields: dict[str, Any]) -> None:
    # The fields travel as one attribute: a key such as "name" or "message" cannot clash
    # with the LogRecord's own attributes (logging refuses those in ``extra``).
    if not _events.isEnabledFor(level):
        return
    kept = {key: value for key, value in fields.items() if value is not None}
    _events.log(level, "%s", message, extra={"event": name, "fields": kept})


def invoice(outcome: Outcome) -> None:
    """One invoice's outcome, as the summary table's row says it."""
    from erp_push.report import Result

    level = (
        logging.INFO
        if outcome.ok
        else logging.WARNING
        if outcome.result is Result.PENDING
        else logging.ERROR
    )
    if not _events.isEnabledFor(level):  # once per invoice: build nothing nobody shows
        return
    detail = outcome.remote_path or " ".join(
        part for part in (outcome.failure_code, outcome.message) if part
    )
    event(
        "invoice",
        f"{outcome.invoice_number or outcome.invoice_token} {outcome.result.value}: {detail}",
        level=level,
        invoice_token=outcome.invoice_token,
        invoice_number=outcome.invoice_number,
        result=outcome.result.value,
        remote_path=outcome.remote_path,
        failure_code=outcome.failure_code,
        detail=outcome.message if not outcome.ok else None,
    )


def finished(report: CommandReport) -> None:
    """The end of a command: ``run_finished`` for push, ``<command>_finished`` for others,
    with the command's JSON report as fields (push's invoices were events of their own)."""
    from erp_push.report import RunReport

    kind = re.sub(r"(?<!^)(?=[A-Z])", "_", type(report).__name__.removesuffix("Report")).lower()
    if isinstance(report, RunReport):
        document = report.header()  # not to_dict(): a long drain's invoices stay unbuilt
        message = report.summary_line()
    else:
        document = report.to_dict()
        message = f"{kind.replace('_', '-')} finished"
    code = int(report.exit_code)
    level = logging.INFO if code == 0 else logging.WARNING if code == 1 else logging.ERROR
    _emit(f"{kind}_finished", message, level, document)


# --- formatters --------------------------------------------------------------------------


def _iso(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; control characters escaped, secrets cut."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extras = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}
        for key, value in {**extras, **getattr(record, "fields", {})}.items():
            document.setdefault(key, value)  # time, level and event stay what they are
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(_scrubbed(document), ensure_ascii=False, default=str)
        return json_safe(line)


class TextFormatter(logging.Formatter):
    """Log messages carry server text (error messages, banners): escaped like all output,
    and secrets cut."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s UTC [%(levelname)s] %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        )
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return printable_lines(super().formatStack(stack_info))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record arrives, not when it was made:
    paramiko logs from its own threads, possibly after a caller swapped stderr."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _own_records(record: logging.LogRecord) -> bool:
    return record.name == "erp_push" or record.name.startswith("erp_push.")


def configure(*, log_format: LogFormat, verbose: bool, debug: bool, quiet: bool) -> None:
    """Send records to stderr in ``log_format``.

    Levels: erp-push's own lines from WARNING (INFO with ``verbose``, everything with
    ``debug``, ERROR with ``quiet``). Events: in text only with ``verbose`` or ``debug``
    (the summary shows them otherwise); in JSON from INFO, from WARNING with ``quiet``
    (a successful quiet run says nothing).
    """
    quiet = quiet and not (verbose or debug)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if not debug:
        handler.addFilter(_own_records)  # any other library's records too
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if debug:
        root.setLevel(logging.DEBUG)
    else:
        root.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    if log_format == "json":
        _events.setLevel(logging.WARNING if quiet else logging.INFO)
    else:
        _events.setLevel(logging.INFO if verbose or debug else OFF)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else OFF)
