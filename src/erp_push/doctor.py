"""``erp-push doctor``: check a setup end to end without touching any invoice.

What a new operator wants to know before the first cron run, and what support asks
first: are the settings whole, does Nuntiq take the key, does the SFTP server take the
login, and how does *this* server behave where servers disagree (rename onto a taken
name, hard links, case, clock, an ERP that grabs every file). Each answer is one
``Check``: ✓ works, ! works but deserves a look, ✗ a push would not work, - not checked
(an earlier step failed). A ✗ ends the command with its area's exit code (settings and
journal 3, Nuntiq 4, SFTP 5: the codes a push would end with), the first in that order.

Nothing here claims, acknowledges or uploads an invoice. Nuntiq is asked only the read
of the connector's ``pushed_invoices`` delta stream. On the SFTP server the probes are
files named as erp-push's own tmp files (``erp-push-doctor-<role>.<8 hex>.erp-push.tmp``):
no invoice file ever has that name, ``cleanup-tmp`` would recognise one left behind, and
every probe is removed before the command ends, on errors, Ctrl-C and SIGTERM too (a
lost connection is re-opened for it); a server that forbids deletion is reported with the
names it kept.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from erp_push.claim import NuntiqClient
from erp_push.errors import (
    ErpPushError,
    ExitCode,
    HostKeyError,
    JournalUnusable,
    NuntiqAuthError,
    NuntiqError,
    NuntiqNotFound,
    RemoteFileMissing,
    SettingsError,
    SftpAuthError,
    SftpError,
    SftpFolderError,
    SftpOperationError,
)
from erp_push.journal import Journal
from erp_push.pipeline import DELTA_STREAM
from erp_push.report import CommandReport, Screen
from erp_push.settings import DEFAULT_SETTINGS_FILE, Need, Settings, load_settings
from erp_push.transport import TMP_PATTERN, SftpSession, Status

log = logging.getLogger(__name__)

# More than this between the server's clock and ours is worth saying (file dates look off).
CLOCK_SKEW_LIMIT_SECONDS = 60
# Less free space than this in the outbox's filesystem is worth a warning.
LOW_SPACE_BYTES = 10_000_000
# How often the watched probe is looked at while waiting for something to take it.
WATCH_POLL_SECONDS = 0.5
PROBE_PREFIX = "erp-push-doctor-"
HARDLINK = "hardlink@openssh.com"
POSIX_RENAME = "posix-rename@openssh.com"


class Mark(StrEnum):
    OK = "ok"  # works
    WARN = "warn"  # works, but deserves a look
    FAIL = "fail"  # a push would not work
    SKIP = "skip"  # not checked: an earlier step failed

    @property
    def symbol(self) -> str:
        return {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}[self.value]

    @property
    def style(self) -> str:
        return {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}[self.value]


class Area(StrEnum):
    SETTINGS = "settings"
    NUNTIQ = "nuntiq"
    SFTP = "sftp"
    JOURNAL = "journal"

    @property
    def exit_code(self) -> ExitCode:
        # The code a push would end with: a state_dir it cannot use is a settings problem.
        return {
            "settings": ExitCode.SETTINGS,
            "nuntiq": ExitCode.NUNTIQ,
            "sftp": ExitCode.SFTP,
            "journal": ExitCode.SETTINGS,
        }[self.value]


# What each area needs from the settings; doctor as a whole needs what push needs.
AREA_NEEDS = {
    Area.NUNTIQ: {Need.NUNTIQ, Need.CONNECTOR},
    Area.SFTP: {Need.SFTP},
    Area.JOURNAL: {Need.STATE},
}
PUSH_NEEDS = {Need.NUNTIQ, Need.SFTP, Need.STATE, Need.CONNECTOR}


@dataclass
class Check:
    """One line of the checklist. ``hint`` says what to do (shown for ! and ✗)."""

    area: Area
    name: str  # stable id for --json, e.g. "sftp.rename_existing"
    mark: Mark
    summary: str
    hint: str | None = None
    details: list[str] = field(default_factory=list)  # more lines (each settings problem)
    data: dict[str, Any] = field(default_factory=dict)  # measured values, for --json

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "area": self.area.value,
            "status": self.mark.value,
            "summary": self.summary,
            "hint": self.hint,
            "details": self.details,
            **({"data": self.data} if self.data else {}),
        }


@dataclass
class DoctorReport(CommandReport):
    settings_source: str
    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def exit_code(self) -> ExitCode:
        for area in Area:
            if any(c.area is area and c.mark is Mark.FAIL for c in self.checks):
                return area.exit_code
        return ExitCode.OK

    @property
    def advice(self) -> list[str]:
        """What to do, most pressing first: the hints of ✗ lines, then of ! lines."""
        seen: list[str] = []
        for mark in (Mark.FAIL, Mark.WARN):
            for c in self.checks:
                if c.mark is mark and c.hint and c.hint not in seen:
                    seen.append(c.hint)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "doctor",
            "ok": self.exit_code is ExitCode.OK,
            "exit_code": int(self.exit_code),
            "settings": self.settings_source,
            "checks": [c.to_dict() for c in self.checks],
            "advice": self.advice,
        }

    def show(self, screen: Screen) -> None:
        for c in self.checks:
            screen.say(c.summary, label=c.mark.symbol, style=c.mark.style)
            for line in c.details:
                screen.say(f"    {line}")
            if c.hint and c.mark in (Mark.FAIL, Mark.WARN):
                screen.say(c.hint, label="    hint:", style="dim")
        failed = sum(1 for c in self.checks if c.mark is Mark.FAIL)
        if failed:
            screen.say(
                f"{failed} problem(s): a push would not work; fix the ✗ lines above "
                f"(exit {int(self.exit_code)})",
                label="doctor:",
                style="bold red",
            )
        else:
            warned = sum(1 for c in self.checks if c.mark is Mark.WARN)
            extra = f" ({warned} thing(s) to look at: the ! lines)" if warned else ""
            screen.say(f"a push would work with these settings{extra}", label="doctor:")


def run(settings_path: Path | None, *, watch_seconds: float) -> DoctorReport:
    """Check everything a push needs. ``watch_seconds``: how long to watch a probe file
    for something on the server that takes every new file (0: only look once)."""
    source = str(settings_path or DEFAULT_SETTINGS_FILE)
    report = DoctorReport(settings_source=source)
    loaded = _check_settings(report, settings_path)

    nuntiq = loaded[Area.NUNTIQ]
    if nuntiq is None:
        report.add(_skipped(Area.NUNTIQ, "nuntiq", "Nuntiq not checked: fix its settings first"))
    else:
        report.add(_check_nuntiq(nuntiq))

    sftp = loaded[Area.SFTP]
    if sftp is None:
        report.add(_skipped(Area.SFTP, "sftp", "SFTP not checked: fix its settings first"))
    else:
        SftpProbe(sftp, report, watch_seconds=watch_seconds).run()

    state = loaded[Area.JOURNAL]
    if state is None:
        report.add(
            _skipped(Area.JOURNAL, "journal", "journal not checked: fix config.state_dir first")
        )
    else:
        _check_journal(report, state)
    return report


def _skipped(area: Area, name: str, summary: str) -> Check:
    return Check(area, name, Mark.SKIP, summary)


# --- settings ---------------------------------------------------------------------------


def _check_settings(report: DoctorReport, path: Path | None) -> dict[Area, Settings | None]:
    """Every settings problem at once (as push reports them); then, if there were any,
    the settings each area needs on their own, so the areas that can be checked are."""
    try:
        settings = load_settings(path, needs=PUSH_NEEDS)
    except SettingsError as exc:
        report.settings_source = exc.source or report.settings_source
        report.add(
            Check(
                Area.SETTINGS,
                "settings",
                Mark.FAIL,
                f"{len(exc.problems)} settings problem(s) in {report.settings_source}",
                hint=exc.hint,
                details=exc.problems,
            )
        )
        return {area: _load_quietly(path, needs) for area, needs in AREA_NEEDS.items()}
    where = f"{path or DEFAULT_SETTINGS_FILE} and ERP_PUSH_* variables"
    report.add(Check(Area.SETTINGS, "settings", Mark.OK, f"settings valid ({where})"))
    return dict.fromkeys(AREA_NEEDS, settings)


def _load_quietly(path: Path | None, needs: set[Need]) -> Settings | None:
    try:
        return load_settings(path, needs=needs)
    except SettingsError:
        return None


# --- Nuntiq -------------------------------------------------------------------------------


def _check_nuntiq(settings: Settings) -> Check:
    """The delta stream's GET: a read that needs the API key and changes nothing."""
    options = settings.nuntiq_client_options()
    connector = settings.config.connector_name or ""
    base_url = options["base_url"]
    try:
        client = NuntiqClient(**options)
    except SettingsError as exc:
        return Check(Area.SETTINGS, "nuntiq", Mark.FAIL, "; ".join(exc.problems), hint=exc.hint)
    try:
        started = time.monotonic()
        state = client.delta_get(connector, DELTA_STREAM)
        first = time.monotonic() - started
        # The first call also connects (TCP, TLS); the second is one round trip.
        started = time.monotonic()
        client.delta_get(connector, DELTA_STREAM)
        round_trip = time.monotonic() - started
    except NuntiqAuthError as exc:
        return Check(
            Area.NUNTIQ,
            "nuntiq",
            Mark.FAIL,
            f"Nuntiq {base_url} refused the API key: {exc.message}",
            hint=exc.hint,
        )
    except NuntiqNotFound as exc:
        return Check(
            Area.NUNTIQ,
            "nuntiq",
            Mark.FAIL,
            f"Nuntiq {base_url} has no delta stream API there: {exc.message}",
            hint="Check config.nuntiq_base_url: it ends in /api (e.g. "
            "https://api.apreceiving.com/api), without /v1.",
        )
    except NuntiqError as exc:
        return Check(
            Area.NUNTIQ,
            "nuntiq",
            Mark.FAIL,
            exc.message,
            hint=exc.hint or "Check config.nuntiq_base_url and that Nuntiq is reachable from here.",
        )
    finally:
        client.close()
    data: dict[str, Any] = {
        "base_url": base_url,
        "round_trip_ms": round(round_trip * 1000, 1),
        "first_call_ms": round(first * 1000, 1),
        "last_run_status": state.status,
        "last_run_completed_at": state.completed_at_utc.isoformat()
        if state.completed_at_utc
        else None,
    }
    return Check(
        Area.NUNTIQ,
        "nuntiq",
        Mark.OK,
        f"Nuntiq {base_url} reachable, API key accepted (read of the {DELTA_STREAM} delta "
        f"stream): {data['round_trip_ms']:g} ms a round trip "
        f"({data['first_call_ms']:g} ms with connecting)",
        data=data,
    )


# --- the journal --------------------------------------------------------------------------


def _check_journal(report: DoctorReport, settings: Settings) -> None:
    state_dir = Path(settings.config.state_dir)
    try:
        journal = Journal(state_dir)  # opening it proves it writable (one committed write)
    except JournalUnusable as exc:
        report.add(Check(Area.JOURNAL, "journal.state_dir", Mark.FAIL, exc.message, hint=exc.hint))
        return
    try:
        unfinished = journal.unfinished()
        live = sum(1 for e in unfinished if journal.run_is_alive(e.run_id))
    finally:
        journal.close()
    report.add(
        Check(
            Area.JOURNAL,
            "journal.state_dir",
            Mark.OK,
            f"state_dir {state_dir} is writable (journal {journal.path.name})",
        )
    )
    data = {"unfinished": len(unfinished), "held_by_running_push": live}
    if not unfinished:
        report.add(
            Check(
                Area.JOURNAL,
                "journal.unfinished",
                Mark.OK,
                "no invoice waits unfinished",
                data=data,
            )
        )
        return
    held = f" ({live} held by a push running now)" if live else ""
    report.add(
        Check(
            Area.JOURNAL,
            "journal.unfinished",
            Mark.WARN,
            f"{len(unfinished)} invoice(s) wait unfinished in the journal{held}",
            hint="An earlier run stopped before finishing them; the next push finishes "
            "each (at once while its lease lives, else once it comes back through claim).",
            data=data,
        )
    )


# --- SFTP ---------------------------------------------------------------------------------


@dataclass
class _Findings:
    """What the probes showed about the server, for the verdict on publishing."""

    rename_free: bool | None = None  # a plain rename onto a free name works
    rename_existing: str | None = None  # "refuses" or "overwrites"
    hardlink_works: bool | None = None
    gone: bool = False  # the probes vanished: nothing more could be learned from them


class SftpProbe:
    """The SFTP checks: connect, folders, then probe files that are always removed."""

    def __init__(self, settings: Settings, report: DoctorReport, *, watch_seconds: float) -> None:
        self.options = settings.sftp_options()
        self.outbox, self.sent = settings.remote_folders()
        self.publish_mode = settings.config.publish_mode
        self.report = report
        self.watch_seconds = watch_seconds
        self.session: SftpSession | None = None
        self.probes: list[str] = []  # every name a probe may have on the server
        self.found = _Findings()

    def add(
        self, name: str, mark: Mark, summary: str, hint: str | None = None, **data: Any
    ) -> None:
        self.report.add(Check(Area.SFTP, f"sftp.{name}", mark, summary, hint=hint, data=data))

    def run(self) -> None:
        if not self._connect():
            return
        try:
            if self._check_folders():
                self._check_space()
                self._probe()
        except SftpError as exc:  # the connection died or hung mid-way
            self.add("connection", Mark.FAIL, exc.message, exc.hint)
        except SftpOperationError as exc:  # e.g. a stat refused
            self.add("probe", Mark.FAIL, f"probing the server failed: {exc.message}")
        finally:
            self._remove_probes()
            if self.session is not None:
                self.session.close()

    # --- connecting -----------------------------------------------------------------------

    def _connect(self) -> bool:
        o = self.options
        seen: list[str] = []
        try:
            self.session = SftpSession.connect(o, on_host_key=seen.append)
        except HostKeyError as exc:
            self.add("host_key", Mark.FAIL, exc.message, exc.hint, fingerprint=exc.fingerprint)
            return False
        except SettingsError as exc:  # a known_hosts file that cannot be read
            self.report.add(
                Check(Area.SETTINGS, "sftp.host_key", Mark.FAIL, "; ".join(exc.problems), exc.hint)
            )
            return False
        except SftpAuthError as exc:
            self._host_key_ok(seen)
            self.add("login", Mark.FAIL, exc.message, exc.hint)
            return False
        except SftpError as exc:
            if seen:  # the key was verified: the connection broke at login or SFTP start
                self._host_key_ok(seen)
            self.add("connect", Mark.FAIL, exc.message, exc.hint)
            return False
        self._host_key_ok(seen)
        self.add(
            "login",
            Mark.OK,
            f"logged in to {o.address} as {o.user!r} ({self.session.login})",
            login=self.session.login,
        )
        return True

    def _host_key_ok(self, seen: list[str]) -> None:
        o = self.options
        trusted_by = f"known_hosts {o.known_hosts}" if o.known_hosts else "sftp_host_key_sha256"
        key = seen[0] if seen else "?"
        self.add(
            "host_key",
            Mark.OK,
            f"host key {key} of {o.address} matches {trusted_by}",
            fingerprint=key.rpartition(" ")[2],
        )

    def _check_folders(self) -> bool:
        session = self._session()
        try:
            outbox = session.stat(self.outbox)
            sent = session.stat(self.sent) if self.sent is not None else None
        except SftpOperationError as exc:
            self.add("outbox", Mark.FAIL, exc.message, SftpFolderError.hint)
            return False
        if outbox is None or not outbox.is_dir:
            why = "does not exist" if outbox is None else "is not a directory"
            self.add(
                "outbox", Mark.FAIL, f"remote_outbox {self.outbox} {why}", SftpFolderError.hint
            )
            return False
        self.add("outbox", Mark.OK, f"remote_outbox {self.outbox} exists")
        if self.sent is None:
            self.add(
                "sent",
                Mark.WARN,
                "remote_sent is not set: files the ERP has moved away are not looked at",
                "Set config.remote_sent to the folder the ERP moves picked-up files to: "
                "without the journal (a second machine, a lost state_dir) a file there is "
                "the only proof of an earlier delivery.",
            )
        elif sent is None or not sent.is_dir:
            why = "does not exist" if sent is None else "is not a directory"
            self.add(
                "sent",
                Mark.WARN,
                f"remote_sent {self.sent} {why} (push treats it as empty)",
                "Check config.remote_sent: it should name the folder the ERP moves "
                "picked-up files to.",
            )
        else:
            self.add("sent", Mark.OK, f"remote_sent {self.sent} exists")
        return True

    def _check_space(self) -> None:
        """Free space and a read-only filesystem, where the server can tell (statvfs)."""
        session = self._session()
        if not session.has_statvfs:
            return
        with session.exchange(f"statvfs {self.outbox}") as batch:
            reply = batch.statvfs(self.outbox)
        if reply.error is not None:
            return  # listed but refused: nothing to say
        fs = reply.value
        free = f"{fs.bytes_free / 1e6:.1f} MB"
        if fs.read_only:
            self.add(
                "space",
                Mark.FAIL,
                f"the filesystem of remote_outbox {self.outbox} is read-only",
                "Ask the server's administrators: nothing can be written there.",
            )
        elif fs.bytes_free == 0 or (fs.files_total > 0 and fs.files_free == 0):
            self.add(
                "space",
                Mark.FAIL,
                f"the filesystem of remote_outbox {self.outbox} is full "
                f"({fs.bytes_free} bytes, {fs.files_free} files free)",
                "Ask the server's administrators for space: every file would fail.",
                bytes_free=fs.bytes_free,
            )
        elif fs.bytes_free < LOW_SPACE_BYTES:
            self.add(
                "space",
                Mark.WARN,
                f"only {free} free in the filesystem of remote_outbox {self.outbox}",
                "Ask the server's administrators for space before it runs out.",
                bytes_free=fs.bytes_free,
            )
        else:
            self.add(
                "space",
                Mark.OK,
                f"{free} free in remote_outbox {self.outbox}",
                bytes_free=fs.bytes_free,
            )

    def _session(self) -> SftpSession:
        assert self.session is not None
        return self.session

    # --- the probes -----------------------------------------------------------------------

    def _probe_name(self, role: str) -> str:
        """erp-push's tmp naming (``<name>.<8 hex>.erp-push.tmp``) under a name no invoice
        file has: it cannot collide with a real file, and cleanup-tmp knows it."""
        name = f"{PROBE_PREFIX}{role}.{secrets.token_hex(4)}.erp-push.tmp"
        assert TMP_PATTERN.match(name)
        path = posixpath.join(self.outbox, name)
        self.probes.append(path)
        return path

    def _write(self, path: str, body: bytes) -> None:
        session = self._session()
        with session.exchange(f"creating {path}") as batch:
            created = batch.create(path)
        handle = created.value
        with session.exchange(f"writing {path}") as batch:
            writes = batch.write(handle, body, path)
            closed = batch.close(handle, path)
        for reply in [*writes, closed]:
            if reply.error is not None:
                raise reply.error

    def _exists(self, path: str) -> bool:
        return self._session().stat(path) is not None

    def _probe(self) -> None:
        session = self._session()
        watched = self._probe_name("watch")
        before = time.time()
        try:
            self._write(watched, b"erp-push doctor: a probe file, removed again at once\n")
        except SftpOperationError as exc:
            self.add(
                "write",
                Mark.FAIL,
                f"cannot write in remote_outbox {self.outbox}: {exc.message}",
                f"sftp_user must be allowed to create, write, rename and remove files in "
                f"{self.outbox} (and the server needs room for them).",
                failure_code=exc.failure_code.value,
            )
            return
        written = time.monotonic()
        after = time.time()
        landed = session.stat(watched)
        self.add(
            "write",
            Mark.OK,
            f"wrote probe files in {self.outbox} "
            f"({PROBE_PREFIX}*.erp-push.tmp, removed again at the end)",
        )
        self._check_extensions()
        if landed is None:
            self.found.gone = True
        else:
            self._check_publishing()
        self._check_case(watched)
        if landed is None:
            self.add("clock", Mark.SKIP, "server clock not checked: the probe file vanished")
        else:
            self._check_clock(landed.mtime, (before + after) / 2)
        self._verdict()
        self._watch(watched, written)

    def _check_extensions(self) -> None:
        offered = self._session().extensions
        listed = [name for name in (HARDLINK, POSIX_RENAME) if name in offered]
        missing = [name for name in (HARDLINK, POSIX_RENAME) if name not in offered]
        summary = "server offers " + (", ".join(listed) if listed else "neither")
        if listed and missing:
            summary += f", not {missing[0]}"
        elif missing:
            summary += f" {HARDLINK} nor {POSIX_RENAME}"
        # posix-rename is only reported: it overwrites by definition, so push never uses it.
        self.add("extensions", Mark.OK, summary, extensions=sorted(offered))

    def _check_publishing(self) -> None:
        """A rename onto a free name, then onto a taken one (two probes); a hard link."""
        session = self._session()
        first, second = self._probe_name("a"), self._probe_name("b")
        moved = self._probe_name("renamed")
        try:
            self._write(first, b"erp-push doctor probe a: the longer one\n")
            self._write(second, b"probe b\n")
        except SftpOperationError as exc:
            self.add("rename", Mark.FAIL, f"cannot write a second probe file: {exc.message}")
            return
        if not (self._exists(first) and self._exists(second)):
            self.found.gone = True
            return
        with session.exchange("renaming a probe") as batch:
            free = batch.rename(first, moved)
        self.found.rename_free = free.ok
        if free.error is not None:
            self.add(
                "rename",
                Mark.WARN,
                f"a plain rename onto a free name is refused here ({_refusal(free.error)})",
            )
        else:
            self.add("rename", Mark.OK, "a plain rename onto a free name works")
            with session.exchange("renaming a probe onto another") as batch:
                onto = batch.rename(moved, second)
            if onto.error is not None:
                code = onto.error.sftp_code
                self.found.rename_existing = "refuses"
                self.add(
                    "rename_existing",
                    Mark.OK,
                    f"a plain rename onto an existing name fails, as it should "
                    f"({_refusal(onto.error)})",
                    status=code,
                )
            else:
                self.found.rename_existing = "overwrites"
                self.add(
                    "rename_existing",
                    Mark.WARN,
                    "a plain rename onto an existing name overwrites it here",
                )
        if HARDLINK in session.extensions:
            with session.exchange("linking a probe") as batch:
                link = batch.hardlink(second, self._probe_name("linked"))
            self.found.hardlink_works = link.ok
            if link.error is not None:
                self.add(
                    "hardlink",
                    Mark.WARN,
                    f"{HARDLINK} is offered but fails here ({_refusal(link.error)})",
                    status=link.error.sftp_code,
                )
            else:
                self.add("hardlink", Mark.OK, f"{HARDLINK} works (atomic, never overwrites)")
        else:
            self.found.hardlink_works = False

    def _verdict(self) -> None:
        """Can push make a file visible here, and how safely?"""
        f = self.found
        if f.gone:
            self.add("publish", Mark.SKIP, "publishing not checked: the probe files vanished")
            return
        if f.rename_free is None:
            self.add("publish", Mark.SKIP, "publishing not checked: see the line above")
            return
        can_rename = bool(f.hardlink_works or f.rename_free)
        if self.publish_mode == "direct":
            if can_rename:
                self.add(
                    "publish",
                    Mark.WARN,
                    "publish_mode is direct, but this server allows rename",
                    "Set publish_mode rename: the ERP then never sees a partial file.",
                )
            else:
                self.add(
                    "publish",
                    Mark.OK,
                    "publish_mode direct: files are written under their final name "
                    "(rename is forbidden here)",
                )
            return
        if not can_rename:
            self.add(
                "publish",
                Mark.FAIL,
                "rename is forbidden here (and no working hardlink): a push cannot publish",
                "Rename is forbidden here: set publish_mode direct (not atomic: the ERP may "
                "see a partial file; see the README's limits).",
            )
        elif f.hardlink_works:
            self.add(
                "publish", Mark.OK, f"push publishes with {HARDLINK}: atomic, never overwrites"
            )
        elif f.rename_existing == "overwrites":
            self.add(
                "publish",
                Mark.WARN,
                "push publishes by plain rename, which overwrites here, and there is no hardlink",
                "This server's rename overwrites and it offers no hardlink: see the README's "
                "limits (a one-round-trip window in which a file someone else creates under "
                "the same name would be replaced).",
            )
        else:
            self.add(
                "publish",
                Mark.OK,
                "push publishes by plain rename, which refuses a taken name here",
            )

    def _check_case(self, path: str) -> None:
        """Does the server find the probe under its name in another case?"""
        folder, _, name = path.rpartition("/")
        other = f"{folder}/{name.swapcase()}"
        if self.found.gone or not self._exists(path):
            self.add("case", Mark.SKIP, "case not checked: the probe file vanished")
            return
        if self._exists(other):
            self.add(
                "case",
                Mark.OK,
                "names are case-insensitive here (as on Windows): ABC.CSV and abc.csv are "
                "one name; push counts a name taken as the server does",
                case_insensitive=True,
            )
        else:
            self.add("case", Mark.OK, "names are case-sensitive here", case_insensitive=False)

    def _check_clock(self, mtime: float | None, ours: float) -> None:
        if mtime is None:
            self.add("clock", Mark.SKIP, "server clock not checked: it gave the probe no time")
            return
        # SFTP v3 times are whole seconds: a second of difference is rounding.
        skew = round(mtime - ours)
        if abs(skew) <= CLOCK_SKEW_LIMIT_SECONDS:
            self.add(
                "clock",
                Mark.OK,
                f"the server's clock is within {CLOCK_SKEW_LIMIT_SECONDS} s of ours ({skew:+d} s)",
                skew_seconds=skew,
            )
            return
        way = "ahead of" if skew > 0 else "behind"
        self.add(
            "clock",
            Mark.WARN,
            f"the server's clock is {abs(skew)} s {way} ours",
            "File times on the server will look off; push dates file names and keeps "
            "leases by this machine's clock, so it still works. Ask the server's "
            "administrators to run NTP (and check this machine's clock too).",
            skew_seconds=skew,
        )

    def _watch(self, path: str, written: float) -> None:
        """Something that takes every new file (an ERP not skipping .tmp) takes the probe."""
        deadline = written + self.watch_seconds
        gone = self.found.gone or not self._exists(path)
        while not gone and time.monotonic() < deadline:
            time.sleep(min(WATCH_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            gone = not self._exists(path)
        waited = round(time.monotonic() - written, 1)
        if gone:
            self.add(
                "pickup",
                Mark.FAIL,
                f"a probe file vanished within {waited:g} s of being written: something on "
                "the server takes every new file, .tmp files included",
                "Make the ERP ignore names ending in .tmp (erp-push writes <name>.<hex>."
                "erp-push.tmp, then renames it): otherwise it reads files before they are "
                "whole, and push cannot publish them.",
                seconds=waited,
            )
        else:
            self.add(
                "pickup",
                Mark.OK,
                f"the probe file stayed for {waited:g} s (--watch): nothing takes .tmp files",
                seconds=waited,
            )

    # --- cleaning up ---------------------------------------------------------------------

    def _remove_probes(self) -> None:
        """Remove every probe, whatever happened; on a lost connection through a new one."""
        if not self.probes:
            return
        kept: list[str] = []
        reasons: list[str] = []
        try:
            with self._cleanup_session() as session:
                with session.exchange("removing the probe files") as batch:
                    replies = [(path, batch.remove(path)) for path in self.probes]
                refused = [
                    (path, reply.error)
                    for path, reply in replies
                    if reply.error is not None and not isinstance(reply.error, RemoteFileMissing)
                ]
                looks = []
                if refused:
                    # A server that forbids deletion may say so for a name that is gone
                    # (renamed away): only the names still there were kept.
                    with session.exchange("looking at the probe files") as batch:
                        looks = [(path, error, batch.stat(path)) for path, error in refused]
                for path, error, look in looks:
                    if isinstance(look.error, RemoteFileMissing):
                        continue
                    kept.append(path)
                    if error.sftp_code in (Status.PERMISSION_DENIED, Status.WRITE_PROTECT):
                        reasons.append("deletion is forbidden")
                    else:
                        reasons.append(error.message)
        except ErpPushError as exc:
            kept, reasons = list(self.probes), [exc.message]
        if not kept:
            self.add("cleanup", Mark.OK, f"probe files removed ({len(self.probes)} names used)")
            return
        self.add(
            "cleanup",
            Mark.WARN,
            f"{len(kept)} probe file(s) could not be removed ({reasons[0]}): {', '.join(kept)}",
            "Remove them by hand, or with erp-push cleanup-tmp --older-than 0 where the "
            "server allows it. A folder that forbids deletion (an upload-only drop folder) "
            "keeps each tmp name; push notices and publishes by rename there.",
            kept=kept,
        )

    @contextlib.contextmanager
    def _cleanup_session(self) -> Iterator[SftpSession]:
        if self.session is not None and self.session.connected:
            yield self.session
            return
        log.info("reconnecting to remove the doctor's probe files")
        session = SftpSession.connect(self.options)
        try:
            yield session
        finally:
            session.close()


def _refusal(error: SftpOperationError) -> str:
    """``status 4: Failure``: the server's own code and words, without our paths."""
    said = error.message.rpartition(" failed: ")[2]
    return f"status {error.sftp_code}: {said}" if error.sftp_code is not None else said


__all__ = ["Area", "Check", "DoctorReport", "Mark", "run"]
