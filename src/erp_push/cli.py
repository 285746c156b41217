"""The command line: parse options, load settings, call one core function, print, exit.

No HTTP or SFTP here. stdout carries data only (the `render` bytes, `--json` reports);
everything meant for people (tables, progress, errors, logs) goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from erp_push import __version__, commands
from erp_push.errors import ErpPushError, ExitCode, SettingsError
from erp_push.report import Outcome, RunReport
from erp_push.settings import Need, Settings, load_settings
from erp_push.text import json_safe, printable, printable_lines

EXIT_CODES_HELP = (
    "Exit codes: 0 all delivered; 1 some invoices failed (each was reported to Nuntiq) or "
    "were left for the next run; 2 usage error; 3 bad settings (nothing was done); "
    "4 Nuntiq unreachable or refusing; 5 SFTP server unreachable or refusing; "
    "70 internal error (a bug)."
)

app = typer.Typer(
    name="erp-push",
    help="Move invoices from Nuntiq into an ERP's SFTP drop folder, exactly once.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

err = Console(stderr=True, soft_wrap=True)  # log lines stay whole in cron mail
INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in erp-push; unfinished invoices are in the journal
T = TypeVar("T")

SettingsOption = Annotated[
    Path | None,
    typer.Option(
        "--settings",
        "-s",
        help="Settings file (JSON, seed layout; default ./settings.json). "
        "Every key can be overridden by ERP_PUSH_<KEY>.",
        envvar="ERP_PUSH_SETTINGS",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Write one machine-readable JSON report to stdout.")
]


class _State:
    debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"erp-push {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log each step to stderr.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Log everything, and show tracebacks on errors.")
    ] = False,
) -> None:
    _State.debug = debug
    _configure_logging(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record arrives, not when it was made:
    paramiko logs from its own threads, possibly after a caller swapped stderr."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _PrintableFormatter(logging.Formatter):
    """Log messages carry server text (error messages, banners): escaped like all output."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return printable_lines(super().formatStack(stack_info))


def _configure_logging(level: int) -> None:
    handler = _StderrHandler()
    formatter = _PrintableFormatter(
        "%(asctime)s UTC [%(levelname)s] %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paramiko and httpx narrate every packet/request at INFO; keep them for --debug.
    for noisy in ("paramiko", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )


# --- the one error boundary -----------------------------------------------------------


def _guarded(call: Callable[[], T]) -> T:
    """Turn erp-push's errors into one red line, a hint and an exit code."""
    try:
        return call()
    except ErpPushError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted[/yellow]: unfinished invoices are in the journal; "
            "the next run finishes them"
        )
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: still one line (no secrets in tracebacks), --debug shows it
        if _State.debug:
            err.print(_traceback(exc), markup=False, highlight=False)
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__} "
            "(run with --debug for details)"
        )
        raise typer.Exit(INTERNAL_ERROR) from None


def _fail(exc: ErpPushError) -> NoReturn:
    if _State.debug:
        err.print(_traceback(exc), markup=False, highlight=False)
    _print_error(exc)
    raise typer.Exit(int(exc.exit_code))


def _print_error(exc: ErpPushError) -> None:
    # Only a settings error has line breaks of its own (one problem per line).
    text = printable_lines(str(exc)) if isinstance(exc, SettingsError) else printable(str(exc))
    err.print(f"[bold red]error:[/bold red] {escape(text)}")
    if exc.hint:
        err.print(f"[dim]hint:[/dim] {_show(exc.hint)}")


def _traceback(exc: BaseException) -> str:
    return printable_lines("".join(traceback.format_exception(exc)))


def _show(text: str) -> str:
    """Text that may come from outside (a server, an invoice, a remote folder), ready for
    ``err.print``: control characters escaped (see text.py), no rich markup. (rich's
    escape, not a blanket "[" -> "\\[": that left a visible backslash before "[2K".)"""
    return escape(printable(text))


def _settings(path: Path | None, needs: set[Need]) -> Settings:
    return _guarded(lambda: load_settings(path, needs=needs))


# --- push -----------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def push(
    settings: SettingsOption = None,
    drain: Annotated[
        bool, typer.Option("--drain", help="Keep claiming batches until the queue is empty.")
    ] = False,
    max_invoices: Annotated[
        int | None,
        typer.Option("--max-invoices", min=1, help="Stop after this many invoices (with --drain)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Claim pending invoices, publish one file each on the SFTP server, report back.

    Example: [bold]erp-push push --settings /etc/erp-push/settings.json --drain[/bold]
    """
    cfg = _settings(settings, {Need.NUNTIQ, Need.SFTP, Need.STATE, Need.CONNECTOR})
    with _progress(enabled=not as_json and err.is_terminal) as (on_claimed, on_outcome):
        report = _guarded(
            lambda: commands.push(
                cfg,
                drain=drain,
                max_invoices=max_invoices,
                on_claimed=on_claimed,
                on_outcome=on_outcome,
            )
        )
    _print_run(report, as_json=as_json)
    raise typer.Exit(int(report.exit_code))


@contextmanager
def _progress(
    *, enabled: bool
) -> Iterator[tuple[Callable[[int], None], Callable[[Outcome], None]]]:
    if not enabled:
        yield (lambda _n: None), (lambda _o: None)
        return
    progress = Progress(
        TextColumn("pushing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task("push", total=0)
    with progress:
        yield (
            lambda n: progress.update(task, total=(progress.tasks[0].total or 0) + n),
            lambda _o: progress.advance(task),
        )


def _print_run(report: RunReport, *, as_json: bool) -> None:
    if as_json:
        typer.echo(report.to_json())
    else:
        report.render_table(err)
    if report.error is not None:
        _print_error(report.error)


# --- dry-run --------------------------------------------------------------------------


@app.command("dry-run", epilog=EXIT_CODES_HELP)
def dry_run(
    settings: SettingsOption = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, max=50, help="How many to look at (default: batch_size)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show which invoices the next push would take and the file names they would get.

    Writes nothing on the SFTP server and acknowledges or reports nothing. Nuntiq has no
    way to list invoices without claiming them, so this takes leases with the shortest
    TTL (60 s): the invoices shown return to the queue after a minute.

    Example: [bold]erp-push dry-run --limit 5[/bold]
    """
    cfg = _settings(settings, {Need.NUNTIQ, Need.SFTP})
    report = _guarded(lambda: commands.dry_run(cfg, limit=limit))
    note = (
        f"dry-run leased these invoices for {report.lease_ttl_seconds} s to look at them "
        "(Nuntiq has no list call); they return to the queue after that"
    )
    if as_json:
        typer.echo(
            json_safe(
                json.dumps(
                    {
                        "lease_ttl_seconds": report.lease_ttl_seconds,
                        "note": note,
                        "invoices": [p.__dict__ for p in report.planned],
                    },
                    ensure_ascii=False,
                )
            )
        )
        return
    if not report.planned:
        err.print("Nothing to push: no invoices are pending integration.")
        return
    table = Table(title="erp-push dry-run (nothing written)", title_justify="left")
    for column in ("invoice", "file name", "note"):
        table.add_column(column)
    for p in report.planned:
        invoice = _show(p.invoice_number or p.invoice_token)
        if p.failure_code:
            table.add_row(
                invoice, "-", f"[red]{_show(p.failure_code)}[/red] {_show(p.message or '')}"
            )
        elif p.already_delivered:
            table.add_row(invoice, "-", f"already delivered as {_show(p.already_delivered)}")
        else:
            table.add_row(invoice, _show(p.file_name or ""), _show(p.collision or ""))
    err.print(table)
    err.print(f"[dim]note:[/dim] {note}")


# --- render ---------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def render(
    invoice_token: Annotated[str, typer.Argument(help="The invoice's token (UUID).")],
    settings: SettingsOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    on_date: Annotated[
        datetime | None,
        typer.Option(
            "--date",
            formats=["%Y-%m-%d"],
            help="Push date for the file name (default: today, UTC).",
        ),
    ] = None,
) -> None:
    """Print exactly the bytes push would upload for one invoice. Needs only Nuntiq settings.

    Example: [bold]erp-push render 3f2b...-uuid --output preview.csv[/bold]
    """
    cfg = _settings(settings, {Need.NUNTIQ})
    today: date | None = on_date.date() if on_date else None
    rendered = _guarded(lambda: commands.render_one(cfg, invoice_token, today=today))
    if output is not None:
        output.write_bytes(rendered.body)
        err.print(
            f"wrote {output} ({len(rendered.body)} bytes); push would name it {rendered.file_name}"
        )
    else:
        sys.stdout.buffer.write(rendered.body)
        sys.stdout.buffer.flush()
        if err.is_terminal:
            err.print(f"[dim]file name: {rendered.file_name}[/dim]")


# --- cleanup-tmp ----------------------------------------------------------------------


@app.command("cleanup-tmp", epilog=EXIT_CODES_HELP)
def cleanup_tmp(
    settings: SettingsOption = None,
    older_than: Annotated[
        int,
        typer.Option("--older-than", min=0, help="Only tmp files older than this many minutes."),
    ] = 60,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list, remove nothing.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Remove erp-push's own stale .tmp files from the outbox. Never touches any other file.

    Example: [bold]erp-push cleanup-tmp --older-than 120 --dry-run[/bold]
    """
    cfg = _settings(settings, {Need.SFTP})
    report = _guarded(
        lambda: commands.cleanup_tmp(cfg, older_than=timedelta(minutes=older_than), dry_run=dry_run)
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "stale": [_remote(f) for f in report.stale],
                    "removed": [_remote(f) for f in report.removed],
                    "errors": report.errors,
                },
            )
        )
    else:
        verb = "would remove" if dry_run else "removed"
        for f in report.stale:
            err.print(f"{verb} {_show(f.path)}")
        done = len(report.stale) if dry_run else len(report.removed)
        err.print(f"{done} stale tmp file(s) {verb} (older than {older_than} min)")
        for e in report.errors:
            err.print(f"[red]could not remove[/red] {_show(e)}")
    raise typer.Exit(ExitCode.SOME_FAILED if report.errors else ExitCode.OK)


def _remote(f: Any) -> dict[str, Any]:
    mtime = getattr(f, "mtime", None)
    if isinstance(mtime, datetime):
        mtime = mtime.astimezone(UTC).isoformat()
    return {"path": f.path, "size": getattr(f, "size", None), "mtime": mtime}


def main() -> None:
    app()
