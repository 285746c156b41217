"""Text from outside never drives the operator's terminal: control characters in server
messages, remote file names and invoice data are printed as visible escapes.

ESC starts terminal escape sequences (ESC[2K erases the line, ESC]0;...BEL sets the window
title) and CR moves back to the start of the line, so a hostile or broken server could
hide or rewrite what erp-push says. Checked on stderr of the real command line.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from erp_push.errors import ExitCode, NuntiqTransientError
from erp_push.report import Outcome, Result, RunReport
from erp_push.text import json_safe, printable, printable_lines, shorten
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

# Erase the line, return to its start, set the window title, ring the bell.
HOSTILE = "\x1b[2K\rall invoices delivered\x1b]0;pwned\x07"
RAW_CONTROLS = ("\x1b", "\r", "\x07", "\x9b", "\u202e")


def assert_no_raw_controls(text: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in text, f"raw U+{ord(char):04X} reached the output"


# --- the helper -------------------------------------------------------------------------


def test_printable_escapes_controls_and_leaves_other_unicode_alone() -> None:
    assert printable("a\x1b[2K\rb\tc\nd\x07") == "a\\x1b[2K\\rb\\tc\\nd\\x07"
    assert printable("\x7f\x85\x9b") == "\\x7f\\x85\\x9b"  # DEL and C1 (NEL, CSI)
    assert printable("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # right-to-left override
    text = "Müller & Søn – 請求書 №7 ✓ \u00a0"
    assert printable(text) == text


def test_printable_lines_keeps_only_the_line_breaks() -> None:
    assert printable_lines("one\x1b[2K\ntwo\r") == "one\\x1b[2K\ntwo\\r"


def test_json_safe_means_the_same_document_without_raw_controls() -> None:
    data = {"message": "x\x1b\x85\x9b\u202e\x7fé", "n": [1, 2]}
    for indent in (None, 2):
        document = json_safe(json.dumps(data, ensure_ascii=False, indent=indent))
        assert json.loads(document) == data
        assert_no_raw_controls(document)
        assert "é" in document


def test_shorten_cuts_to_the_bound_with_an_ellipsis() -> None:
    assert shorten("abc", 3) == "abc"
    assert shorten("abcdef", 4) == "abc…"
    assert len(shorten("x" * 900, 500)) == 500
    # Counted as the caller's reader counts: an emoji is 2 UTF-16 units, never split.
    utf16 = shorten("🙂" * 10, 6, measure=lambda t: len(t.encode("utf-16-le")) // 2)
    assert utf16 == "🙂🙂…"


# --- a Nuntiq server with control characters in its answers -----------------------------


class _HostileNuntiq(BaseHTTPRequestHandler):
    """First answer: 503 whose error code is hostile (logged as a retry warning). Then:
    404 whose message is hostile (the run's error line)."""

    calls = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).calls += 1
        if type(self).calls == 1:
            self._answer(503, {"error": f"BUSY{HOSTILE}", "message": "try later"})
        else:
            self._answer(404, {"error": "NOT_FOUND", "message": f"{HOSTILE} [bold]x[/bold]"})

    def _answer(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile_nuntiq() -> Iterator[str]:
    _HostileNuntiq.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileNuntiq)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def test_server_text_in_the_error_line_and_log_warnings_is_escaped(
    hostile_nuntiq: str, make_settings: MakeSettings
) -> None:
    path = make_settings(None, config={"nuntiq_base_url": hostile_nuntiq})

    result = run_cli("render", str(uuid.uuid4()), "--settings", str(path))

    assert result.returncode == ExitCode.NUNTIQ, result.stderr
    assert_no_raw_controls(result.stderr)
    escaped = printable(HOSTILE)
    assert "attempt 1/" in result.stderr and f"BUSY{escaped}" in result.stderr  # log line
    assert f"error: Nuntiq get_invoice: HTTP 404 NOT_FOUND: {escaped} [bold]x[/bold]" in (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 2  # the warning and the error


def test_control_characters_in_a_settings_problem_are_escaped(
    make_settings: MakeSettings,
) -> None:
    path = make_settings(None, config={"state_dir": f"/proc/erp-push{HOSTILE}"})
    result = run_cli("push", "--settings", str(path))
    assert result.returncode == ExitCode.SETTINGS
    assert_no_raw_controls(result.stderr)
    assert f"/proc/erp-push{printable(HOSTILE)}" in result.stderr


# --- a remote folder with a hostile file name -------------------------------------------


def test_cleanup_tmp_prints_hostile_remote_names_escaped(
    asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, sandbox: Sandbox
) -> None:
    name = f"/outbox/x{HOSTILE}.0a1b2c3d.erp-push.tmp"
    asyncssh_sftp.write(name, b"data")
    old = time.time() - 3 * 3600
    os.utime(asyncssh_sftp.local(name), (old, old))
    settings = str(make_settings(asyncssh_sftp))

    shown = run_cli("cleanup-tmp", "--settings", settings, "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert_no_raw_controls(shown.stderr)
    assert f"would remove /outbox/x{printable(HOSTILE)}.0a1b2c3d.erp-push.tmp" in shown.stderr

    listed = run_cli("cleanup-tmp", "--settings", settings, "--dry-run", "--json")
    assert_no_raw_controls(listed.stdout)
    assert [f["path"] for f in json.loads(listed.stdout)["stale"]] == [name]


def test_cleanup_tmp_json_escapes_c1_and_bidi_controls_too(
    asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, sandbox: Sandbox
) -> None:
    """json.dumps escapes C0 itself, not CSI (U+009B) or a right-to-left override: the
    JSON of cleanup-tmp goes through the same json_safe as every other report."""
    name = "/outbox/x\x9b2K\u202egnp.0a1b2c3d.erp-push.tmp"
    asyncssh_sftp.write(name, b"data")
    old = time.time() - 3 * 3600
    os.utime(asyncssh_sftp.local(name), (old, old))

    listed = run_cli(
        "cleanup-tmp", "--settings", str(make_settings(asyncssh_sftp)), "--dry-run", "--json"
    )

    assert listed.returncode == 0, listed.stderr
    assert_no_raw_controls(listed.stdout)
    assert [f["path"] for f in json.loads(listed.stdout)["stale"]] == [name]


# --- the run report ---------------------------------------------------------------------


def hostile_report() -> RunReport:
    report = RunReport("push", claimed=2)
    report.add(Outcome("tok-1", Result.DELIVERED, "INV-1", f"/outbox/INV-1{HOSTILE}.csv"))
    report.add(
        Outcome(
            "tok-2",
            Result.PENDING,
            f"INV-2{HOSTILE}",
            message=f"Nuntiq did not take the result ([bold]{HOSTILE}\x9b\u202e)",
        )
    )
    report.notes.append(f"server said {HOSTILE}")
    report.error = NuntiqTransientError(f"Nuntiq claim: HTTP 503 {HOSTILE}")
    return report.finish()


def test_run_table_escapes_server_text_and_ignores_markup_in_it() -> None:
    out = io.StringIO()
    hostile_report().render_table(Console(file=out, width=400, color_system=None))

    text = out.getvalue()
    assert_no_raw_controls(text)
    assert f"INV-2{printable(HOSTILE)}" in text
    assert "[bold]" in text  # a server's "markup" is shown as text, not obeyed
    assert f"note: server said {printable(HOSTILE)}" in text


def test_json_report_has_no_raw_control_characters() -> None:
    report = hostile_report()
    document = report.to_json()
    assert_no_raw_controls(document)
    assert json.loads(document) == json.loads(json.dumps(report.to_dict()))
