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

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from erp_push import __version__, logs
from erp_push.errors import ErpPushError, ExitCode
from erp_push.text import printable, printable_lines

if TYPE_CHECKING:
    from rich.console import Console

    from erp_push.metrics import Run
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
    # --install-completion / --show-completion: typer's, cheap (no shell is detected
    # unless one of them is given).
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

log = logging.getLogger("erp_push.cli")

INTERNAL_ERROR = int(ExitCode.INTERNAL_ERROR)  # a bug; unfinished invoices are in the journal
INTERRUPTED = int(ExitCode.INTERRUPTED)  # Ctrl-C
TERMINATED = int(ExitCode.TERMINATED)  # `kill`, `timeout` or `systemctl stop`
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


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="stderr as text for people (default), or json: one JSON object per line "
        "(time, level, event, invoice token and number), for log collectors. "
        "Overrides the log_format setting.",
        show_default=False,
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print nothing on success (errors still go to stderr)."),
]
MetricsFileOption = Annotated[
    Path | None,
    typer.Option(
        "--metrics-file",
        help="Rewrite this Prometheus textfile-collector file at the end of the run "
        "(push only; overrides the metrics_file setting).",
        show_default=False,
    ),
]


class _State:
    """The global options given before the command."""

    settings: Path | None = None
    verbose = False
    debug = False
    quiet = False
    log_format: LogFormat | None = None  # from the command line; else the setting's
    configured_log_format = "text"
    metrics_file: Path | None = None  # from the command line
    settings_used: Path | None = None  # the command's, else the global --settings
    helper = False  # this process is a drain's helper (push --helper): the first one speaks
    started = False  # start-up (imports, settings) is over: the command is at work


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
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
    metrics_file: MetricsFileOption = None,
) -> None:
    _State.settings, _State.verbose, _State.debug = settings, verbose, debug
    _State.log_format, _State.quiet, _State.metrics_file = log_format, quiet, metrics_file
    _State.configured_log_format, _State.settings_used = "text", settings
    _configure_logging()


def _options(
    settings: Path | None,
    *,
    verbose: bool,
    debug: bool,
    log_format: LogFormat | None = None,
    quiet: bool = False,
) -> Path | None:
    """Merge a command's own global options with those given before it; the settings
    file to read (its own --settings, else the global one, else None: the default)."""
    _State.verbose = _State.verbose or verbose
    _State.debug = _State.debug or debug
    _State.quiet = _State.quiet or quiet
    _State.log_format = log_format or _State.log_format
    _configure_logging()
    path = settings if settings is not None else _State.settings
    _State.settings_used = path
    return path


def _begin(
    settings: Path | None,
    needs: set[Need],
    *,
    verbose: bool,
    debug: bool,
    log_format: LogFormat | None = None,
    quiet: bool = False,
) -> Settings:
    """``_options``, then load the settings the command ``needs``."""
    path = _options(settings, verbose=verbose, debug=debug, log_format=log_format, quiet=quiet)
    from erp_push.settings import DEFAULT_SETTINGS_FILE, load_settings, peek

    def load() -> Settings:
        try:
            return load_settings(path, needs=needs)
        except ErpPushError:
            # The settings' log format still applies to the error that says they are bad.
            _State.configured_log_format = peek(path, "config.log_format") or "text"
            _configure_logging()
            raise

    loaded = _guarded(load)
    _collect_garbage_again()
    _State.started = True  # from here a stop signal unwinds the command (_on_stop_signal)
    _State.configured_log_format = loaded.config.log_format
    # Errors are built without secrets; this also keeps a library's echo out of the logs.
    secrets = (getattr(loaded.secrets, name) for name in type(loaded.secrets).model_fields)
    logs.hide(secret.get_secret_value() for secret in secrets if secret is not None)
    _configure_logging()
    # Which file a run read is the first question when it does not do what was expected.
    log.info("settings: %s and ERP_PUSH_* variables", path or DEFAULT_SETTINGS_FILE)
    return loaded


def _collect_garbage_again() -> None:
    """Switch the garbage collector back on (``__main__`` keeps it off while the command
    line starts up), with what start-up built frozen: a long drain's collections then
    never walk the libraries' objects again."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _json_logs() -> bool:
    return (_State.log_format or _State.configured_log_format) == LogFormat.JSON


def _quiet() -> bool:
    """--quiet, unless --verbose or --debug asks for more."""
    return _State.quiet and not (_State.verbose or _State.debug)


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
    if _json_logs():  # every stderr line is a JSON object
        name = label.rstrip(":").replace(" ", "_") or "message"
        logs.event(name, text, level=logging.ERROR if "error" in label else logging.INFO)
        return
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
    """Show a command's report (JSON on stdout, or for people on stderr), then exit.

    The report is also the command's last event (shown as a line with --verbose; in
    --log-format json it stands for the table); --quiet shows nothing when all went well.
    """
    logs.finished(report)
    if as_json:
        for chunk in report.json_chunks():
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif not _json_logs() and not (_quiet() and report.exit_code == 0):
        report.show(_Stderr())
    if report.error is not None:
        _error(report.error)
    raise typer.Exit(int(report.exit_code))


# --- logging ----------------------------------------------------------------------------


def _configure_logging() -> None:
    logs.configure(
        log_format="json" if _json_logs() else "text",
        verbose=_State.verbose,
        debug=_State.debug,
        quiet=_State.quiet,
    )


# --- the one error boundary -----------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM (``systemctl stop``, ``timeout``, ``kill``): the run unwinds as it does on
    Ctrl-C. A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows
    it; not a KeyboardInterrupt, so click does not turn it into "Aborted!" and exit 1."""

    exit_code = TERMINATED  # what the journal records for the run (commands.push)


def _on_stop_signal(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM and Ctrl-C: unwind the command (``Terminated``, ``KeyboardInterrupt``), or
    while it is still starting up, end at once.

    Start-up (imports, settings) has done nothing yet, so there is nothing to unwind; and
    an exception raised there can land inside pydantic's schema builder, which turns it
    into a panic and a traceback. A drain's helper that its first process stops while it
    is still starting up is the usual case.
    """
    how, code = (
        ("terminated", TERMINATED) if signum == signal.SIGTERM else ("interrupted", INTERRUPTED)
    )
    if not _State.started:
        _stopped(how)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(code)
    if signum != signal.SIGTERM:
        raise KeyboardInterrupt
    # A second SIGTERM while the run winds down ends the process at once; a helper gets
    # one from the first process and maybe one more from `systemctl stop` (the whole
    # group): it winds down all the same.
    signal.signal(signal.SIGTERM, signal.SIG_IGN if _State.helper else signal.SIG_DFL)
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
        what = f"{type(exc).__name__} (run with --debug for details)"
        if _json_logs():
            logs.event(
                "internal_error",
                what,
                level=logging.ERROR,
                error_type=type(exc).__name__,
                exit_code=INTERNAL_ERROR,
            )
        else:
            _say(what, label="internal error:", style="bold red")
        raise typer.Exit(INTERNAL_ERROR) from None


def _stopped(how: str) -> None:
    if _State.helper:
        return  # the first process says it, once
    what = "unfinished invoices are in the journal; the next run finishes them"
    if _json_logs():
        code = INTERRUPTED if how == "interrupted" else TERMINATED
        logs.event(how, what, level=logging.WARNING, exit_code=code)
        return
    _say(what, label=f"{how}:", style="yellow")


def _fail(exc: ErpPushError) -> NoReturn:
    if _State.debug:
        _traceback(exc)
    _error(exc)
    raise typer.Exit(int(exc.exit_code))


def _error(exc: ErpPushError) -> None:
    # Only a settings error has line breaks of its own (one problem per line).
    from erp_push.errors import SettingsError

    multi_line = isinstance(exc, SettingsError)
    if _json_logs():
        logs.event(
            "error",
            str(exc),
            level=logging.ERROR,
            error_type=type(exc).__name__,
            exit_code=int(exc.exit_code),
            hint=exc.hint,
            problems=exc.problems if isinstance(exc, SettingsError) else None,
        )
        return
    _say(str(exc), label="error:", style="bold red", lines=multi_line)
    if exc.hint:
        _say(exc.hint, label="hint:", style="dim")


def _traceback(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    if _json_logs():
        logs.event("traceback", type(exc).__name__, level=logging.ERROR, traceback=text)
        return
    sys.stderr.write(logs.scrub(printable_lines(text)))


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
    metrics_file: MetricsFileOption = None,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
    helper: Annotated[
        bool,
        # Started by a drain's first process (see processes.py); not for people.
        typer.Option("--helper", hidden=True),
    ] = False,
) -> None:
    """Claim pending invoices, publish one file each on the SFTP server, report back.

    Example: [bold]erp-push push --settings /etc/erp-push/settings.json --drain[/bold]
    """
    from erp_push import commands

    if helper:
        _help_a_drain(settings, max_invoices, verbose, debug, log_format, quiet)
    with _run_metrics(metrics_file) as run:
        cfg = _begin_push(settings, verbose, debug, log_format, quiet)
        if _State.metrics_file is None:
            _State.metrics_file = cfg.config.metrics_file
        shown = not as_json and _is_terminal() and not _json_logs() and not _quiet()
        with _progress(enabled=shown) as (show_claimed, show_outcome):

            def on_claimed(count: int) -> None:
                run.claimed(count)
                show_claimed(count)

            def on_outcome(outcome: Outcome) -> None:
                run.outcome(outcome)
                show_outcome(outcome)

            report = _guarded(
                lambda: commands.push(
                    cfg,
                    drain=drain,
                    max_invoices=max_invoices,
                    on_claimed=on_claimed,
                    on_outcome=on_outcome,
                    helper_command=_helper_command(),
                )
            )
        run.take(report)
        _show_and_exit(report, as_json=as_json)


def _helper_command() -> list[str]:
    """How a drain starts a helper process: this command, with the same settings file
    and logging options (the environment and working folder are inherited)."""
    command = [sys.executable, "-m", "erp_push", "push", "--drain", "--helper"]
    if _State.settings_used is not None:
        command += ["--settings", str(_State.settings_used)]
    if _State.log_format is not None:
        command += ["--log-format", _State.log_format.value]
    command += ["--verbose"] * _State.verbose + ["--debug"] * _State.debug
    return command + ["--quiet"] * _State.quiet


def _begin_push(
    settings: Path | None,
    verbose: bool,
    debug: bool,
    log_format: LogFormat | None,
    quiet: bool,
) -> Settings:
    """``_begin`` with what a push needs (the first process and its helpers alike)."""
    from erp_push.settings import Need

    return _begin(
        settings,
        {Need.NUNTIQ, Need.SFTP, Need.STATE, Need.CONNECTOR},
        verbose=verbose,
        debug=debug,
        log_format=log_format,
        quiet=quiet,
    )


def _help_a_drain(
    settings: Path | None,
    max_invoices: int | None,
    verbose: bool,
    debug: bool,
    log_format: LogFormat | None,
    quiet: bool,
) -> NoReturn:
    """``push --drain --helper``: one of a drain's helper processes (``processes``).

    Its stdout is the first process's pipe (JSON lines, nothing for people); its log lines
    share the first process's stderr; the run's report, status, metrics and delta-stream
    entry are the first process's. Ctrl-C and SIGTERM come from the first process, once.
    """
    from erp_push import commands
    from erp_push.processes import HelperLink

    _State.helper = True
    cfg = _begin_push(settings, verbose, debug, log_format, quiet)
    report = _guarded(
        lambda: commands.push(cfg, drain=True, max_invoices=max_invoices, link=HelperLink())
    )
    raise typer.Exit(int(report.exit_code))


@contextmanager
def _run_metrics(option: Path | None) -> Iterator[Run]:
    """The metrics file (--metrics-file, else the setting), rewritten however the run
    ends: delivered, failed, refused by a server, stopped at bad settings, interrupted."""
    from erp_push import metrics

    if option is not None:  # the option after the command wins, as for --settings
        _State.metrics_file = option
    run = metrics.Run()
    exit_code = INTERNAL_ERROR
    try:
        yield run
    except typer.Exit as exc:
        exit_code = exc.exit_code
        raise
    except Terminated:
        exit_code = TERMINATED
        raise
    except KeyboardInterrupt:
        exit_code = INTERRUPTED
        raise
    finally:
        path = _State.metrics_file or _peeked_metrics_file()
        if path is not None:
            try:
                metrics.write(path, run, exit_code=exit_code)
            except OSError as exc:
                log.error("could not write the metrics file %s: %s", path, exc.strerror or exc)


def _peeked_metrics_file() -> Path | None:
    """A run stopped by bad settings still writes the metrics file they name, if any."""
    from erp_push.settings import peek

    value = peek(_State.settings_used, "config.metrics_file")
    return Path(value) if value else None


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
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
) -> None:
    """Show which invoices the next push would take and the file names they would get.

    Writes nothing on the SFTP server and acknowledges or reports nothing. Nuntiq has no
    way to list invoices without claiming them, so this takes leases with the shortest
    TTL (60 s): the invoices shown return to the queue after a minute.

    Example: [bold]erp-push dry-run --limit 5[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(
        settings,
        {Need.NUNTIQ, Need.SFTP},
        verbose=verbose,
        debug=debug,
        log_format=log_format,
        quiet=quiet,
    )
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
    attachments: Annotated[
        Path | None,
        typer.Option(
            "--attachments",
            help="Also save the invoice's attachments in this folder, under the names "
            "push would give them.",
        ),
    ] = None,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
) -> None:
    """Print exactly the bytes push would upload for one invoice. Needs only Nuntiq settings.

    Example: [bold]erp-push render 3f2b...-uuid --output preview.csv[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(
        settings, {Need.NUNTIQ}, verbose=verbose, debug=debug, log_format=log_format, quiet=quiet
    )
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
        if not _quiet():
            _say(
                f"wrote {output} ({len(rendered.body)} bytes); push would name it "
                f"{rendered.file_name}"
            )
    else:
        sys.stdout.buffer.write(rendered.body)
        sys.stdout.buffer.flush()
        if _is_terminal() and not _quiet():
            _say(f"file name: {rendered.file_name}", style="dim")
    if attachments is not None:
        folder = attachments
        saved = _guarded(
            lambda: commands.save_attachments(
                cfg, invoice_token, folder, file_name=rendered.file_name
            )
        )
        for path in saved:
            _say(f"saved attachment {path} ({path.stat().st_size} bytes)")
        if not saved:
            _say(f"the invoice has no attachments to save in {folder}")


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
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
) -> None:
    """Remove erp-push's own stale .tmp files from the outbox. Never touches any other file.

    Lists each file with what was done to it; exits 1 when some could not be removed.

    Example: [bold]erp-push cleanup-tmp --older-than 120 --dry-run[/bold]
    """
    from erp_push import commands
    from erp_push.settings import Need

    cfg = _begin(
        settings, {Need.SFTP}, verbose=verbose, debug=debug, log_format=log_format, quiet=quiet
    )
    report = _guarded(
        lambda: commands.cleanup_tmp(cfg, older_than=timedelta(minutes=older_than), dry_run=dry_run)
    )
    _show_and_exit(report, as_json=as_json)


# --- status and resend: the journal -----------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def status(
    runs: Annotated[
        int, typer.Option("--runs", min=1, max=1000, help="How many of the last runs to show.")
    ] = 10,
    as_json: JsonOption = False,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
) -> None:
    """Show what the journal knows: unfinished invoices (how far each got and what it
    waits for), the last runs and how they ended, the last successful run.

    Reads the journal in state_dir only: no network, changes nothing.

    Example: [bold]erp-push status --json[/bold]
    """
    from erp_push import status as journal_status

    cfg = _begin(settings, set(), verbose=verbose, debug=debug, log_format=log_format, quiet=quiet)
    state_dir = Path(cfg.config.state_dir)
    if not state_dir.is_absolute():  # a "~" that has no home folder to stand for
        from erp_push.settings import Need

        _begin(
            settings, {Need.STATE}, verbose=verbose, debug=debug, log_format=log_format, quiet=quiet
        )  # names the problem
    report = _guarded(lambda: journal_status.read_status(state_dir, runs=runs))
    _show_and_exit(report, as_json=as_json)


@app.command(epilog=EXIT_CODES_HELP)
def resend(
    invoice_token: Annotated[str, typer.Argument(help="The invoice's token (UUID).")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (needed when not on a terminal).")
    ] = False,
    as_json: JsonOption = False,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
) -> None:
    """Mark an invoice for a deliberate re-send: the next push that claims it uploads a
    fresh file under a new name, beside the earlier one (never over it).

    Does NOT put the invoice back into Nuntiq's queue: do that in Nuntiq. Asks first on
    a terminal; elsewhere it needs --yes.

    Example: [bold]erp-push resend 3f2b...-uuid --yes[/bold]
    """
    from erp_push import status as journal_status
    from erp_push.settings import Need

    problem = journal_status.token_problem(invoice_token)
    if problem is not None:
        _say(f"{printable(invoice_token)!r} is not an invoice token: {problem}", label="error:")
        raise typer.Exit(2)
    if not yes and not sys.stdin.isatty():
        _say(
            "resend changes what the next push uploads: confirm with --yes when not on a "
            "terminal (nothing was marked)",
            label="error:",
            style="bold red",
        )
        raise typer.Exit(2)
    cfg = _begin(
        settings, {Need.STATE}, verbose=verbose, debug=debug, log_format=log_format, quiet=quiet
    )
    if cfg.config.output_mode == "batch":
        from erp_push.errors import SettingsError

        _fail(
            SettingsError(
                [
                    "config.output_mode: resend works with per_invoice files; in batch mode "
                    "an invoice's row is part of a batch file (put it back in Nuntiq and "
                    "push it with output_mode per_invoice to send it alone)"
                ]
            )
        )
    if not yes:
        question = (
            f"Re-send invoice {printable(invoice_token)}? The next push that claims it uploads a "
            "fresh file under a new name. This does not re-queue it in Nuntiq (do that in "
            "Nuntiq)."
        )
        if not typer.confirm(question, default=False, err=True):
            _say("nothing was marked", label="cancelled:")
            raise typer.Exit(1)
    state_dir = Path(cfg.config.state_dir)
    report = _guarded(lambda: journal_status.request_resend(state_dir, invoice_token))
    _show_and_exit(report, as_json=as_json)


# --- doctor ---------------------------------------------------------------------------

# Long enough to catch an ERP that polls every few seconds; one that polls every minute
# needs --watch 70.
DOCTOR_WATCH_SECONDS = 5.0


@app.command(epilog=EXIT_CODES_HELP)
def doctor(
    watch: Annotated[
        float,
        typer.Option(
            "--watch",
            min=0,
            max=600,
            help="Seconds to watch a probe file for something on the server that takes "
            "every new file, .tmp included (0: look once).",
        ),
    ] = DOCTOR_WATCH_SECONDS,
    as_json: JsonOption = False,
    settings: SettingsOption = None,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
    log_format: LogFormatOption = None,
    quiet: QuietOption = False,
) -> None:
    """Check the whole setup: settings, Nuntiq, the SFTP server, the journal.

    Claims, acknowledges and uploads no invoice: Nuntiq is only read, and on the SFTP
    server a few probe files (erp-push-doctor-*.erp-push.tmp) are written and removed
    again. Prints a checklist (✓ works, ! works but look, ✗ a push would fail) with a
    hint for each problem; exits 0 when a push would work, else the code of the first
    failing area (3 settings or journal, 4 Nuntiq, 5 SFTP).

    Example: [bold]erp-push doctor --settings /etc/erp-push/settings.json[/bold]
    """
    from erp_push import commands
    from erp_push import doctor as _checks  # noqa: F401  (its models, built now: see below)

    path = _options(settings, verbose=verbose, debug=debug, log_format=log_format, quiet=quiet)
    # Its checks load the settings themselves; with their models built (the imports
    # above), a stop signal from here on unwinds the checks and removes the probes.
    _State.started = True
    report = _guarded(lambda: commands.doctor(path, watch_seconds=watch))
    _show_and_exit(report, as_json=as_json)


# --- erp-push --help: an example of each command ----------------------------------------


def _examples() -> str:
    """The ``Example:`` line of each command's help, for ``erp-push --help``: one place
    to write an example, and a new command's shows up on its own."""
    import inspect

    lines = []
    for info in app.registered_commands:
        for line in (inspect.getdoc(info.callback) or "").splitlines():
            if line.startswith("Example:"):
                lines.append(line.removeprefix("Example:").strip())
    return "Examples:\n\n" + "\n\n".join(lines)


app.info.epilog = f"{_examples()}\n\n{EXIT_CODES_HELP}"


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
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    threading.excepthook = _thread_crashed
    # A library's Python warnings become records (py.warnings): shown with --debug only.
    logging.captureWarnings(True)
    try:
        # The name completion scripts and usage lines use, also under `python -m erp_push`.
        app(prog_name="erp-push")
    except Terminated:  # between two steps of the command line itself, outside _guarded
        _stopped("terminated")
        _leave(TERMINATED)
    except SystemExit as done:  # how click ends every command, success included
        _leave(done.code)


def _leave(code: str | int | None) -> NoReturn:
    """Exit with ``code``, skipping the interpreter's teardown when nothing is left to do.

    Freeing every loaded module one at a time costs about 45 ms: a sixth of a cron run
    that finds nothing to claim (``make bench``, the idle run). By the time a command
    returns its work is finished: the lanes are joined, the sessions and the journal
    closed, every file written through ``with``. What is left is flushing the standard
    streams and the log handlers, done here. A non-daemon thread still alive (none
    should be), a stream that cannot be flushed (a closed pipe) or an exit code that is
    not a number take the ordinary exit, which handles each as Python always has.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if not (code is None or isinstance(code, int)) or any(not t.daemon for t in others):
        sys.exit(code)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code or 0)
