"""The command line, tested like documentation, and each command against real servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erp_push import __version__
from erp_push.cli import app
from erp_push.errors import ExitCode
from erp_push.settings import SETTINGS_REFERENCE
from tests.helpers import MakeSettings, cli_fetching, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ["push", "dry-run", "render", "cleanup-tmp"]
runner = CliRunner()


# --- the surface, as documentation ----------------------------------------------------


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"erp-push {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_exit_codes(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # rich wraps to the terminal's width
    assert "Example:" in text
    assert "Exit codes:" in text and "5 SFTP" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"erp-push {command}" in README.read_text()


def test_readme_documents_every_setting_and_exit_code() -> None:
    text = README.read_text()
    for setting in SETTINGS_REFERENCE:
        assert f"`{setting.json_key}`" in text, setting.json_key
        assert f"`{setting.env_var}`" in text, setting.env_var
    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \|", text, flags=re.MULTILINE), code


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in README.read_text()
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def test_usage_error_exits_2() -> None:
    result = runner.invoke(app, ["push", "--no-such-option"])
    assert result.exit_code == ExitCode.USAGE
    assert runner.invoke(app, ["render"]).exit_code == ExitCode.USAGE  # token missing


def test_missing_settings_file_exits_3_naming_it(tmp_path: Path) -> None:
    result = run_cli("push", "--settings", str(tmp_path / "nope.json"))
    assert result.returncode == ExitCode.SETTINGS
    assert "nope.json" in result.stderr
    assert "Traceback" not in result.stderr


# --- render ----------------------------------------------------------------------------


def test_render_prints_exactly_the_bytes_push_uploads(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    (token,) = sandbox.control.seed(1)
    nuntiq_only = make_settings(None, name="nuntiq-only.json")  # render needs no SFTP settings
    shown = run_cli("render", token, "--settings", str(nuntiq_only))
    assert shown.returncode == 0, shown.stderr
    out = tmp_path / "preview.csv"
    written = run_cli("render", token, "--settings", str(nuntiq_only), "--output", str(out))
    assert written.returncode == 0
    assert sandbox.control.statuses()[token] == 90  # render changes nothing

    assert run_cli("push", "--settings", str(make_settings(asyncssh_sftp))).returncode == 0
    (uploaded,) = asyncssh_sftp.files().values()
    assert shown.stdout.encode() == uploaded == out.read_bytes()
    assert uploaded.startswith(b"\xef\xbb\xbfinvoice_number\tdate\t")


def test_render_of_an_unknown_token_exits_4(sandbox: Sandbox, make_settings: MakeSettings) -> None:
    result = run_cli(
        "render", "00000000-0000-4000-8000-000000000000", "--settings", str(make_settings(None))
    )
    assert result.returncode == ExitCode.NUNTIQ
    assert "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower()


# --- dry-run -----------------------------------------------------------------------------


def test_dry_run_shows_names_and_collisions_and_writes_nothing(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    tokens = sandbox.control.seed(3)
    rows = {r["invoice_token"]: r for r in sandbox.control.invoices()}
    day = time.strftime("%Y%m%d", time.gmtime())
    taken = f"{rows[tokens[1]]['invoice_number']}-{day}.csv"
    asyncssh_sftp.write(f"/outbox/sent/{taken}", b"older file\n")
    before = asyncssh_sftp.files()

    result = run_cli("dry-run", "--settings", str(make_settings(asyncssh_sftp)), "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lease_ttl_seconds"] == 60 and "60 s" in report["note"]
    planned = {p["invoice_token"]: p for p in report["invoices"]}
    assert planned[tokens[1]]["file_name"] == taken.replace(".csv", "-2.csv")
    assert planned[tokens[1]]["collision"]
    assert planned[tokens[0]]["collision"] is None
    assert asyncssh_sftp.files() == before  # nothing written on the server
    counts = sandbox.control.request_counts()
    assert counts.get("acknowledge", 0) == 0 and counts.get("integration_result", 0) == 0
    # it had to lease to look, with the shortest TTL: back in the queue a minute later
    assert set(sandbox.control.statuses().values()) == {92}
    sandbox.control.advance_clock(61)
    assert set(sandbox.control.statuses().values()) == {91}


# --- cleanup-tmp -----------------------------------------------------------------------------


def test_cleanup_tmp_removes_only_our_stale_tmp_files(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    old = time.time() - 3 * 3600
    ours_old = "/outbox/INV-1-20260101.csv.0a1b2c3d.erp-push.tmp"
    ours_new = "/outbox/INV-2-20260101.csv.4e5f6a7b.erp-push.tmp"
    strangers = ["/outbox/upload.tmp", "/outbox/INV-3-20260101.csv", "/outbox/x.erp-push.tmp"]
    for path in [ours_old, ours_new, *strangers]:
        asyncssh_sftp.write(path, b"data")
    for path in [ours_old, *strangers]:
        os.utime(asyncssh_sftp.local(path), (old, old))
    settings = str(make_settings(asyncssh_sftp))

    listed = run_cli("cleanup-tmp", "--settings", settings, "--dry-run", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [f["path"] for f in json.loads(listed.stdout)["stale"]] == [ours_old]
    assert asyncssh_sftp.exists(ours_old)

    removed = run_cli("cleanup-tmp", "--settings", settings)
    assert removed.returncode == 0
    assert ours_old in removed.stderr
    assert not asyncssh_sftp.exists(ours_old)
    assert asyncssh_sftp.exists(ours_new)  # younger than 60 minutes
    assert all(asyncssh_sftp.exists(p) for p in strangers)


# --- push on a terminal-less run: table on stderr, nothing on stdout ---------------------------


def test_push_prints_the_summary_to_stderr_only(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(2)
    result = run_cli("push", "--settings", str(make_settings(asyncssh_sftp)))
    assert result.returncode == 0
    assert result.stdout == ""
    assert "2 delivered" in result.stderr


def test_idle_push_says_so(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    result = run_cli("push", "--settings", str(make_settings(asyncssh_sftp)))
    assert result.returncode == 0
    assert "Nothing to push" in result.stderr


def test_an_unexpected_error_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch,
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
) -> None:
    """A bug must not spill a traceback (which could carry secrets) into cron mail.
    Nothing real produces a bug on demand, so this one test injects one (a stand-in)."""
    from erp_push import commands

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom with pw-SHOULD-NOT-SHOW")

    monkeypatch.setattr(commands, "push", broken)
    result = runner.invoke(app, ["push", "--settings", str(make_settings(asyncssh_sftp))])
    assert result.exit_code == 70
    assert "internal error: RuntimeError" in result.stderr
    assert "Traceback" not in result.stderr and "pw-SHOULD-NOT-SHOW" not in result.stderr


def test_every_test_the_readme_cites_exists() -> None:
    """The README names the tests behind each guarantee: none may go stale."""
    tests_dir = README.parent / "tests"
    defined = set(
        re.findall(r"^(?:async )?def (test_\w+)", "\n".join(
            p.read_text() for p in tests_dir.glob("test_*.py")
        ), flags=re.MULTILINE)
    )  # fmt: skip
    cited = set(re.findall(r"\b(test_\w+)`", README.read_text()))
    assert cited, "the README cites no tests"
    assert cited <= defined, sorted(cited - defined)


# --- global options on both sides of the command --------------------------------------------

GLOBAL_PLACEMENTS = {
    "before": lambda cmd, opts: [*opts, cmd],
    "after": lambda cmd, opts: [cmd, *opts],
}


@pytest.mark.parametrize("placement", GLOBAL_PLACEMENTS)
@pytest.mark.parametrize("command", ["push", "dry-run"])
def test_global_options_work_before_and_after_the_command(
    placement: str,
    command: str,
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
) -> None:
    """`erp-push --settings s.json dry-run` and `erp-push dry-run --settings s.json` (rclone
    style); --verbose shows which settings file was read, wherever it is written."""
    settings = str(make_settings(asyncssh_sftp))
    args = GLOBAL_PLACEMENTS[placement](command, ["--settings", settings, "--verbose"])
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"[INFO] erp_push.cli: settings: {settings}" in result.stderr
    assert "Nothing to push" in result.stderr

    quiet = run_cli(*GLOBAL_PLACEMENTS[placement](command, ["-s", settings]))
    assert quiet.returncode == 0, quiet.stderr
    assert "[INFO]" not in quiet.stderr


@pytest.mark.parametrize("placement", GLOBAL_PLACEMENTS)
def test_debug_works_before_and_after_the_command(
    placement: str, sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    settings = str(make_settings(asyncssh_sftp))
    result = run_cli(*GLOBAL_PLACEMENTS[placement]("push", ["--settings", settings, "--debug"]))
    assert result.returncode == 0, result.stderr
    assert "[DEBUG] httpcore" in result.stderr  # --debug lets the libraries speak


def test_the_option_after_the_command_wins(
    tmp_path: Path, sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    good, missing = str(make_settings(asyncssh_sftp)), str(tmp_path / "missing.json")
    env = {**os.environ, "ERP_PUSH_SETTINGS": missing}

    assert run_cli("--settings", missing, "push", "--settings", good).returncode == 0
    refused = run_cli("--settings", good, "push", "--settings", missing)
    assert refused.returncode == ExitCode.SETTINGS and "missing.json" in refused.stderr
    # a --settings on the command line, on either side, beats ERP_PUSH_SETTINGS
    assert run_cli("push", "--settings", good, env=env).returncode == 0
    assert run_cli("--settings", good, "push", env=env).returncode == 0
    from_env = run_cli("push", env={**os.environ, "ERP_PUSH_SETTINGS": good})
    assert from_env.returncode == 0, from_env.stderr


# --- library log records stay out of stderr without --debug -------------------------------


@contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung sshd)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_server_that_never_speaks_ssh_is_one_error_line(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """paramiko logs a failed handshake as a 20-line ERROR traceback from its own thread:
    not without --debug (not even with --verbose), which shows it."""
    sandbox.control.seed(3)  # each run leases one, to find out the server is down
    with silent_listener() as port:
        settings = str(
            make_settings(
                asyncssh_sftp, config={"sftp_port": port, "sftp_connect_timeout_seconds": 1}
            )
        )
        plain = run_cli("push", "--settings", settings)
        verbose = run_cli("push", "--settings", settings, "--verbose")
        debug = run_cli("push", "--settings", settings, "--debug")
    for result in (plain, verbose):
        assert result.returncode == ExitCode.SFTP, result.stderr
        assert "Traceback" not in result.stderr
        assert "paramiko" not in result.stderr
        # log records of anything but erp-push itself
        assert not re.search(r"\[(DEBUG|INFO|WARNING|ERROR)\] (?!erp_push)", result.stderr)
        (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert str(port) in error
    assert debug.returncode == ExitCode.SFTP
    assert "[ERROR] paramiko.transport: Traceback" in debug.stderr


@pytest.mark.sshd
def test_a_refused_channel_at_high_concurrency_prints_no_library_errors(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """OpenSSH refuses an 11th channel on one connection (MaxSessions 10); paramiko logs
    "Secsh channel N open FAILED" at ERROR. A run that copes with it prints none of that."""
    openssh_sftp.clear()
    sandbox.control.seed(24)
    settings = str(make_settings(openssh_sftp, config={"concurrency": 16}))
    result = run_cli("push", "--settings", settings, "--drain")
    assert result.returncode == 0, result.stderr
    assert "24 delivered" in result.stderr
    assert "[ERROR]" not in result.stderr and "open FAILED" not in result.stderr
    assert "paramiko" not in result.stderr
    assert len(openssh_sftp.files()) == 24
    openssh_sftp.clear()


# --- cleanup-tmp reports what it could not remove --------------------------------------------


@pytest.mark.sshd
def test_cleanup_tmp_reports_what_it_could_not_remove(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """A tmp file the server refuses to delete is listed as not removed (exit 1), never as
    removed. Here: a sticky folder owned by root, holding one stale tmp file the SFTP user
    owns (removable) and one it does not (OpenSSH answers "Permission denied")."""
    assert openssh_sftp.root is not None
    name = f"cleanup-{secrets.token_hex(4)}"
    folder = openssh_sftp.local(f"{openssh_sftp.outbox}/{name}")
    folder.mkdir()
    folder.chmod(0o1777)
    mine = f"{openssh_sftp.outbox}/{name}/INV-1-20260101.csv.0a1b2c3d.erp-push.tmp"
    theirs = f"{openssh_sftp.outbox}/{name}/INV-2-20260101.csv.4e5f6a7b.erp-push.tmp"
    old = time.time() - 3 * 3600
    try:
        for path in (mine, theirs):
            openssh_sftp.write(path, b"data")
            os.utime(openssh_sftp.local(path), (old, old))
        shutil.chown(openssh_sftp.local(mine), openssh_sftp.user, openssh_sftp.user)
        settings = str(
            make_settings(openssh_sftp, config={"remote_outbox": f"{openssh_sftp.outbox}/{name}"})
        )

        listed = run_cli("cleanup-tmp", "--settings", settings, "--dry-run")
        assert listed.returncode == 0, listed.stderr
        assert f"would remove {mine}" in listed.stderr and f"would remove {theirs}" in listed.stderr

        result = run_cli("cleanup-tmp", "--settings", settings, "--json")
        assert result.returncode == ExitCode.SOME_FAILED, result.stderr
        report = json.loads(result.stdout)
        assert [f["path"] for f in report["stale"]] == [mine, theirs]
        assert [f["path"] for f in report["removed"]] == [mine]
        assert [f["path"] for f in report["not_removed"]] == [theirs]
        assert "denied" in report["not_removed"][0]["error"].lower()
        assert not openssh_sftp.exists(mine) and openssh_sftp.exists(theirs)

        people = run_cli("cleanup-tmp", "--settings", settings)
        assert people.returncode == ExitCode.SOME_FAILED
        assert f"could not remove {theirs}: " in people.stderr
        assert f"removed {theirs}" not in people.stderr
        assert "0 stale tmp file(s) removed" in people.stderr
        assert "1 could not be removed" in people.stderr
    finally:
        shutil.rmtree(folder)


# --- SIGTERM: the run unwinds like Ctrl-C ---------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_ends_at_once_without_a_traceback(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, signum: int
) -> None:
    """A signal while the command line is still importing and loading settings (a drain's
    helper stopped by its first process, `timeout` on a slow machine): nothing was done,
    so the process ends at once, 143 or 130, with its one line. Raised as an exception
    there it could land in pydantic's schema builder: a panic and a traceback."""
    import subprocess
    import sys

    settings = str(make_settings(asyncssh_sftp))
    command = [sys.executable, "-m", "erp_push", "push", "--settings", settings, "--drain"]
    stopped_early = 0
    for delay in (0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.25):
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signum)
        _out, err = child.communicate(timeout=60)
        assert "Traceback" not in err and "panicked" not in err, err
        code = ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED
        # Before its handler is in place Python ends it by the signal itself; after the
        # run began (nothing to claim here) it may have finished.
        assert child.returncode in (code, -signum, ExitCode.OK), err
        if child.returncode == code:
            stopped_early += 1
            assert ("terminated:" if signum == signal.SIGTERM else "interrupted:") in err
    assert stopped_early > 0  # some signal did land while it was starting up


def test_sigterm_mid_run_unwinds_like_ctrl_c(
    tmp_path: Path, sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """systemd's stop or `timeout` mid-run: exit 143, the run lock released, the run recorded
    as failed on the delta stream, and nothing lost (the next run finishes every invoice)."""
    tokens = sandbox.control.seed(4)
    settings = str(make_settings(asyncssh_sftp))
    # GET answers after 2 s: the run is surely mid-invoice when the signal comes.
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 2000}])
    with cli_fetching(sandbox.control, "push", "--settings", settings, "--drain") as child:
        child.send_signal(signal.SIGTERM)
        _stdout, stderr = child.communicate(timeout=60)

    assert child.returncode == 143, stderr
    assert "terminated:" in stderr and "Traceback" not in stderr
    assert list((tmp_path / "state" / "runs").iterdir()) == []  # the run lock is gone
    from pydantic import SecretStr

    from erp_push.claim import NuntiqClient

    with NuntiqClient(sandbox.base_url, SecretStr(sandbox.api_key)) as client:
        delta = client.delta_get("acme_erp_push", "pushed_invoices")
    assert delta.status == "failed"
    assert "Terminated" in str(delta.model_dump())

    # Nothing lost: once any lease it held has lapsed, the next run finishes every invoice,
    # each with exactly one file.
    sandbox.control.clear_faults()
    sandbox.control.advance_clock(601)
    after = run_cli("push", "--settings", settings, "--drain")
    assert after.returncode == 0, after.stderr
    assert set(sandbox.control.statuses().values()) == {100}
    files = asyncssh_sftp.files()
    assert len(files) == len(tokens)
    assert not [p for p in asyncssh_sftp.listdir(asyncssh_sftp.outbox) if p.endswith(".tmp")]
