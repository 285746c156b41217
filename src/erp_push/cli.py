"""The command line: parse options, load settings, call one core function, print, exit.

No HTTP or SFTP here. stdout carries data only (the `render` bytes, `--json` reports);
everything meant for people (tables, progress, errors, logs) goes to stderr.

Start-up is kept cheap, because cron runs `erp-push push` every few minutes and most of
those runs find nothing to do: the commands (and with them pydantic, httpx and the
journal) are imported when a command runs, the SSH library only when there is something
to upload (see ``commands.sftp_connector``), and rich only when something is drawn (a
table, a progress bar, colour on a terminal). ``tests/test_startup.py`` holds this.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from erp_push import __version__
from erp_push.errors import ErpPushError
from erp_push.text import printable, printable_lines

if TYPE_CHECKING:
    from rich.console import Console

    from erp_push.report import CommandReport, Outcome
    from erp_push.settings import Need, Settings

EXIT_CODES_HELP = (
    "Exit codes: 0 all delivered; 1 some invoices failed (each was reported to Nuntiq) or "
    "were left for the next run; 2 usage error; 3 bad settings (nothing was done); "
    "4 Nuntiq unreachable or refusing; 5 SFTP server unreachable or refusing; "
    "70 internal error (a bug); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
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

log = logging.getLogger("erp_push.cli")

INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in erp-push; unfinished invoices are in the journal
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED = 143  # 128 + SIGTERM, as a shell reports `kill`, `timeout` or `systemctl stop`
T = TypeVar("T")

# The global options are accepted before and after the command (`erp-push --settings s.json
# push` and `erp-push push --settings s.json`), as rclone does; given on both sides, the
# one after the command wins. Only the global --settings reads ERP_PUSH_SETTINGS, so an
# option on the command line always beats the environment.
SETTINGS_HELP = (
    "Settings file (JSON, seed layout; default ./settings.json, or ERP_PUSH_SETTINGS). "
    "Every key can be overridden by ERP_PUSH_<KEY>."
)
SettingsOption = Annotated[
    Path | None, typer.Option("--settings", "-s", help=SETTINGS_HELP, show_default=False)
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Log each step (erp-push's own) to stderr.")
]
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug",
        help="Log everything, the SSH and HTTP libraries' own records included, and show "
        "tracebacks on errors.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Write one machine-readable JSON report to stdout.")
]


class _State:
    """The global options given before the command."""

    settings: Path | None = None
    verbose = False
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
    settings: Annotated[
        Path | None,
        typer.Option(
            "--settings", "-s", help=SETTINGS_HELP, envvar="ERP_PUSH_SETTINGS", show_envvar=False
        ),
    ] = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    _State.settings, _State.verbose, _State.debug = settings, verbose, debug
    _configure_logging(verbose=verbose, debug=debug)


def _begin(settings: Path | None, needs: set[Need], *, verbose: bool, debug: bool) -> Settings:
    """Merge a command's own global options with those given before it, then load the
    settings the command ``needs`` (from its own --settings, else the global one, else
    the default file)."""
    _State.verbose = _State.verbose or verbose
    _State.debug = _State.debug or debug
    _configure_logging(verbose=_State.verbose, debug=_State.debug)
    path = settings if settings is not None else _State.settings
    from erp_push.settings import DEFAULT_SETTINGS_FILE, load_settings

    loaded = _guarded(lambda: load_settings(path, needs=needs))
    # Which file a run read is the first question when it does not do what was expected.
    log.info("settings: %s and ERP_PUSH_* variables", path or DEFAULT_SETTINGS_FILE)
    return loaded


# --- output for people: plain lines, rich only when something is drawn -----------------


@cache
def _console() -> Console:
    """Rich, for tables, the progress bar and colour on a terminal. Imported on first
    use: an idle run from cron prints one plain line and never pays for it."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # log lines stay whole in cron mail


def _is_terminal() -> bool:
    return sys.stderr.isatty()


def _say(text: str, *, label: str = "", style: str = "", lines: bool = False) -> None:
    """One line for people on stderr, ``text`` as it is (no markup, control characters
    escaped: it may come from a server); ``label`` (``error:``, ``note:``...) is coloured
    with ``style`` on a terminal. ``lines`` keeps the text's own line breaks."""
    text = printable_lines(text) if lines else printable(text)
    if _is_terminal():
        from rich.text import Text

        line = Text.assemble((label, style), " ", text) if label else Text(text, style=style)
        _console().print(line)
        return
    sys.stderr.write(f"{label} {text}\n" if label else f"{text}\n")
    sys.stderr.flush()


class _Stderr:
    """The ``report.Screen`` every command's report shows itself on."""

    def say(self, text: str, *, label: str = "", style: str = "") -> None:
        _say(text, label=label, style=style)

    @property
    def console(self) -> Console:
        return _console()


def _show_and_exit(report: CommandReport, *, as_json: bool) -> NoReturn:
    """Show a command's report (JSON on stdout, or for people on stderr), then exit."""
    if as_json:
        typer.echo(report.to_json())
    else:
        report.show(_Stderr())
    if report.error is not None:
        _error(report.error)
    raise typer.Exit(int(report.exit_code))


# --- logging ----------------------------------------------------------------------------


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


def _own_records(record: logging.LogRecord) -> bool:
    return record.name == "erp_push" or record.name.startswith("erp_push.")


# The libraries erp-push drives narrate in their own words: paramiko every packet, and its
# transport thread logs a failed handshake as an ERROR traceback and a refused channel as
# "Secsh channel N open FAILED"; httpx/httpcore every request and header. erp-push says
# what that means for the run in one line of its own, so their records are for --debug.
LIBRARY_LOGGERS = ("paramiko", "httpx", "httpcore")


def _configure_logging(*, verbose: bool, debug: bool) -> None:
    handler = _StderrHandler()
    formatter = _PrintableFormatter(
        "%(asctime)s UTC [%(levelname)s] %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    if not debug:
        handler.addFilter(_own_records)  # any other library's records too
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    for name in LIBRARY_LOGGERS:
        # Above CRITICAL: without --debug their records are not even made.
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL + 1)


# --- the one error boundary -----------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM (``systemctl stop``, ``timeout``, ``kill``): the run unwinds as it does on
    Ctrl-C. A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows
    it; not a KeyboardInterrupt, so click does not turn it into "Aborted!" and exit 1."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # A second SIGTERM while the run winds down ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def _guarded(call: Callable[[], T]) -> T:
    """Turn erp-push's errors into one red line, a hint and an exit code."""
    try:
        return call()
    except ErpPushError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _stopped("interrupted")
        raise typer.Exit(INTERRUPTED) from None
    except Terminated:
        _stopped("terminated")
        raise typer.Exit(TERMINATED) from None
    except Exception as exc:  # a bug: still one line (no secrets in tracebacks), --debug shows it
        if _State.debug:
            _traceback(exc)
        _say(
            f"{type(exc).__name__} (run with --debug for details)",
            label="internal error:",
            style="bold red",
        )
        raise typer.Exit(INTERNAL_ERROR) from None


def _stopped(how: str) -> None:
    _say(
        "unfinished invoices are in the journal; the next run finishes them",
        label=f"{how}:",
        style="yellow",
    )


def _fail(exc: ErpPushError) -> NoReturn:
    if _State.debug:
        _traceback(exc)
    _error(exc)
    raise typer.Exit(int(exc.exit_code))


def _error(exc: ErpPushError) -> None:
    # Only a settings error has line breaks of its own (one problem per line).
    from erp_push.errors import SettingsError

    multi_line = isinstance(exc, SettingsError)
    _say(str(exc), label="error:", style="bold red", lines=multi_line)
    if exc.hint:
        _say(exc.hint, label="hint:", style="dim")


def _traceback(exc: BaseException) -> None:
    sys.stderr.write(printable_lines("".join(traceback.format_exception(exc))))


# --- push -----------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def push(
    drain: Annotated[
        bool, typer.Option("--drain", help="Keep claiming batches until the queue is empty.")
    ] = False,
    max_invoices: Annotated[
        int | None,
        typer.Option("--max-invoices", min=1, help="Stop after this many invoices (with --drain)."),
    ] = None,
    as_json: JsonOption = False,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Claim pending invoices, publish one file each on the SFTP server, report back.

    Example: [bold]erp-push push --settings /etc/erp-push/settings.json --drain[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(
        settings, {Need.NUNTIQ, Need.SFTP, Need.STATE, Need.CONNECTOR}, verbose=verbose, debug=debug
    )
    with _progress(enabled=not as_json and _is_terminal()) as (on_claimed, on_outcome):
        report = _guarded(
            lambda: commands.push(
                cfg,
                drain=drain,
                max_invoices=max_invoices,
                on_claimed=on_claimed,
                on_outcome=on_outcome,
            )
        )
    _show_and_exit(report, as_json=as_json)


@contextmanager
def _progress(
    *, enabled: bool
) -> Iterator[tuple[Callable[[int], None], Callable[[Outcome], None]]]:
    if not enabled:
        yield (lambda _n: None), (lambda _o: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("pushing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console(),
        transient=True,
    )
    task = progress.add_task("push", total=0)
    with progress:
        yield (
            lambda n: progress.update(task, total=(progress.tasks[0].total or 0) + n),
            lambda _o: progress.advance(task),
        )


# --- dry-run --------------------------------------------------------------------------


@app.command("dry-run", epilog=EXIT_CODES_HELP)
def dry_run(
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, max=50, help="How many to look at (default: batch_size)."),
    ] = None,
    as_json: JsonOption = False,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Show which invoices the next push would take and the file names they would get.

    Writes nothing on the SFTP server and acknowledges or reports nothing. Nuntiq has no
    way to list invoices without claiming them, so this takes leases with the shortest
    TTL (60 s): the invoices shown return to the queue after a minute.

    Example: [bold]erp-push dry-run --limit 5[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(settings, {Need.NUNTIQ, Need.SFTP}, verbose=verbose, debug=debug)
    report = _guarded(lambda: commands.dry_run(cfg, limit=limit))
    _show_and_exit(report, as_json=as_json)


# --- render ---------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def render(
    invoice_token: Annotated[str, typer.Argument(help="The invoice's token (UUID).")],
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
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Print exactly the bytes push would upload for one invoice. Needs only Nuntiq settings.

    Example: [bold]erp-push render 3f2b...-uuid --output preview.csv[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(settings, {Need.NUNTIQ}, verbose=verbose, debug=debug)
    today: date | None = on_date.date() if on_date else None
    rendered = _guarded(lambda: commands.render_one(cfg, invoice_token, today=today))
    if cfg.config.output_mode == "batch":
        # The invoice alone: push writes its data row into the batch file instead.
        _say(
            "output_mode is batch: push writes this invoice as one row (the second line) "
            "of a batch file invoices-<YYYYMMDDTHHMMSSZ>.csv, under the same header"
        )
    if output is not None:
        output.write_bytes(rendered.body)
        _say(
            f"wrote {output} ({len(rendered.body)} bytes); push would name it {rendered.file_name}"
        )
    else:
        sys.stdout.buffer.write(rendered.body)
        sys.stdout.buffer.flush()
        if _is_terminal():
            _say(f"file name: {rendered.file_name}", style="dim")


# --- cleanup-tmp ----------------------------------------------------------------------


@app.command("cleanup-tmp", epilog=EXIT_CODES_HELP)
def cleanup_tmp(
    older_than: Annotated[
        int,
        typer.Option("--older-than", min=0, help="Only tmp files older than this many minutes."),
    ] = 60,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list, remove nothing.")] = False,
    as_json: JsonOption = False,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove erp-push's own stale .tmp files from the outbox. Never touches any other file.

    Lists each file with what was done to it; exits 1 when some could not be removed.

    Example: [bold]erp-push cleanup-tmp --older-than 120 --dry-run[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(settings, {Need.SFTP}, verbose=verbose, debug=debug)
    report = _guarded(
        lambda: commands.cleanup_tmp(cfg, older_than=timedelta(minutes=older_than), dry_run=dry_run)
    )
    _show_and_exit(report, as_json=as_json)


# --- entry point ----------------------------------------------------------------------


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    """An exception no thread caught: one line (a traceback only with --debug)."""
    if args.exc_type is SystemExit:
        return
    logging.getLogger("erp_push").error(
        "internal error in thread %s: %s",
        args.thread.name if args.thread else "?",
        args.exc_type.__name__,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback)  # type: ignore[arg-type]
        if _State.debug
        else None,
    )


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.excepthook = _thread_crashed
    # A library's Python warnings become records (py.warnings): shown with --debug only.
    logging.captureWarnings(True)
    try:
        app()
    except Terminated:  # between two steps of the command line itself, outside _guarded
        _stopped("terminated")
        sys.exit(TERMINATED)
