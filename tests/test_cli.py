"""The command line, tested like documentation, and each command against real servers."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erp_push import __version__
from erp_push.cli import app
from erp_push.errors import ExitCode
from erp_push.settings import SETTINGS_REFERENCE
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo
from tests.test_push import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ["push", "dry-run", "render", "cleanup-tmp"]
MakeSettings = Callable[..., Path]
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
