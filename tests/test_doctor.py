"""`erp-push doctor` against the real sandbox and real SFTP servers: OpenSSH, the asyncssh
variants whose rename overwrites or is forbidden, an ERP that takes every new file, and
the ways a setup goes wrong (bad key, nothing listening, a changed host key). Every test
also checks that the probe files are gone afterwards and that no secret was printed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from erp_push import commands
from erp_push.doctor import PROBE_PREFIX, DoctorReport, Mark
from erp_push.errors import ExitCode
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo, free_port

# Short: the watch is tested on its own; the other tests need only the immediate look.
WATCH = "0.3"


def doctor_json(
    settings: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = run_cli(
        "doctor", "--json", "--watch", WATCH, "--settings", str(settings), *args, env=env
    )
    assert "Traceback" not in result.stderr
    return result, json.loads(result.stdout)


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in document["checks"]}


def in_process(settings: Path, watch: float = 0.3) -> DoctorReport:
    """The command's core, in this process (each CLI start costs a second on a busy box)."""
    return commands.doctor(settings, watch_seconds=watch)


def document(settings: Path) -> dict[str, Any]:
    """What ``doctor --json`` prints, from the core in this process."""
    doc: dict[str, Any] = json.loads(in_process(settings).to_json())
    return doc


def marks(report: DoctorReport) -> dict[str, Mark]:
    return {c.name: c.mark for c in report.checks}


def no_probes_left(server: SftpServerInfo) -> None:
    for folder in (server.outbox, server.sent):
        left = [n for n in server.listdir(folder) if n.lower().startswith(PROBE_PREFIX)]
        assert left == [], f"probe files left in {folder}: {left}"


def assert_no_secrets(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr


# --- a good setup ------------------------------------------------------------------------


def test_doctor_on_openssh_passes_shows_the_checklist_and_removes_its_probes(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    settings = make_settings(openssh_sftp)
    result, doc = doctor_json(settings)
    assert result.returncode == 0, result.stdout
    assert doc["ok"] is True and doc["exit_code"] == 0
    checks = by_name(doc)
    # (free space depends on this machine's /run: anything but a failure will do)
    assert {c["status"] for n, c in checks.items() if n != "sftp.space"} == {"ok"}, checks
    assert checks["sftp.space"]["status"] in ("ok", "warn")
    assert checks["sftp.host_key"]["data"]["fingerprint"] == openssh_sftp.host_key_sha256
    assert checks["sftp.login"]["data"]["login"] == "password"
    assert "hardlink@openssh.com" in checks["sftp.extensions"]["summary"]
    assert "posix-rename@openssh.com" in checks["sftp.extensions"]["summary"]
    # OpenSSH: rename onto a taken name fails with a bare Failure; hardlink publishes.
    assert checks["sftp.rename_existing"]["data"]["status"] == 4
    assert "hardlink" in checks["sftp.publish"]["summary"]
    assert checks["sftp.case"]["data"]["case_insensitive"] is False
    assert abs(checks["sftp.clock"]["data"]["skew_seconds"]) <= 2
    assert checks["nuntiq"]["data"]["round_trip_ms"] > 0
    assert checks["journal.unfinished"]["data"]["unfinished"] == 0
    no_probes_left(openssh_sftp)
    # Nothing was claimed or reported: only the delta stream was read.
    counts = sandbox.control.request_counts()
    assert not any(counts.get(k) for k in ("claim", "acknowledge", "integration_result"))

    # For people: the checklist on stderr, nothing on stdout.
    shown = run_cli("doctor", "--watch", WATCH, "--settings", str(settings))
    assert shown.returncode == 0 and shown.stdout == ""
    assert f"✓ host key ssh-ed25519 {openssh_sftp.host_key_sha256}" in shown.stderr
    assert "a push would work with these settings" in shown.stderr
    assert_no_secrets(shown, openssh_sftp.password, sandbox.api_key)
    assert_no_secrets(result, openssh_sftp.password, sandbox.api_key)
    no_probes_left(openssh_sftp)


# --- servers that disagree -----------------------------------------------------------------


def test_proftpd_refuses_a_taken_name_with_its_own_status(
    sandbox: Sandbox, proftpd_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    report = in_process(make_settings(proftpd_sftp))
    assert report.exit_code == ExitCode.OK
    checks = {c.name: c for c in report.checks}
    assert checks["sftp.rename_existing"].data["status"] == 11  # FILE_ALREADY_EXISTS
    assert checks["sftp.publish"].mark is Mark.OK
    no_probes_left(proftpd_sftp)


def test_a_server_without_hardlink_whose_rename_overwrites(
    sandbox: Sandbox, sftpserver_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """pytest-sftpserver lists no extension at all, and its rename replaces the target."""
    report = in_process(make_settings(sftpserver_sftp))
    assert report.exit_code == ExitCode.OK
    checks = {c.name: c for c in report.checks}
    assert "neither hardlink@openssh.com nor posix-rename" in checks["sftp.extensions"].summary
    assert "sftp.hardlink" not in checks
    assert checks["sftp.publish"].mark is Mark.WARN
    assert report.advice[0].startswith("This server's rename overwrites and it offers no hardlink")
    no_probes_left(sftpserver_sftp)


def test_a_rename_that_overwrites_is_covered_by_hardlink(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("rename_overwrites")
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.OK
    checks = {c.name: c for c in report.checks}
    assert checks["sftp.rename_existing"].mark is Mark.WARN
    assert "overwrites" in checks["sftp.rename_existing"].summary
    assert checks["sftp.publish"].mark is Mark.OK and "hardlink" in checks["sftp.publish"].summary
    no_probes_left(server)


def test_a_rename_that_overwrites_without_hardlink_points_at_the_limits(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("rename_overwrites", hardlink=False)
    doc = document(make_settings(server))
    assert doc["exit_code"] == 0  # push works, with a window the README names
    checks = by_name(doc)
    assert checks["sftp.hardlink"]["status"] == "warn"  # listed, but fails
    assert checks["sftp.publish"]["status"] == "warn"
    assert any("rename overwrites and it offers no hardlink" in a for a in doc["advice"])
    assert any("README" in a for a in doc["advice"])
    no_probes_left(server)


def test_a_server_that_forbids_rename_fails_with_exit_5_and_says_set_direct(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("no_rename")
    settings = make_settings(server)
    result, doc = doctor_json(settings)
    assert result.returncode == ExitCode.SFTP
    checks = by_name(doc)
    assert checks["sftp.rename"]["status"] == "warn"
    assert checks["sftp.publish"]["status"] == "fail"
    assert doc["advice"][0].startswith("Rename is forbidden here: set publish_mode direct")
    no_probes_left(server)

    shown = run_cli("doctor", "--watch", "0", "--settings", str(settings))
    assert shown.returncode == ExitCode.SFTP
    assert "✗ rename is forbidden here" in shown.stderr
    assert "hint: Rename is forbidden here: set publish_mode direct" in shown.stderr
    assert_no_secrets(shown, server.password, sandbox.api_key)

    # Once publish_mode is direct, the same server is fine.
    direct = in_process(make_settings(server, config={"publish_mode": "direct"}))
    assert direct.exit_code == ExitCode.OK
    assert marks(direct)["sftp.publish"] is Mark.OK
    no_probes_left(server)


def test_direct_mode_on_a_server_that_can_rename_suggests_rename(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    report = in_process(make_settings(asyncssh_sftp, config={"publish_mode": "direct"}))
    assert report.exit_code == ExitCode.OK
    assert marks(report)["sftp.publish"] is Mark.WARN
    assert any("Set publish_mode rename" in a for a in report.advice)
    no_probes_left(asyncssh_sftp)


def test_an_erp_that_takes_every_new_file_is_caught(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("pickup_everything")
    doc = document(make_settings(server))
    assert doc["exit_code"] == ExitCode.SFTP
    checks = by_name(doc)
    assert checks["sftp.pickup"]["status"] == "fail"
    assert any("ignore names ending in .tmp" in a for a in doc["advice"])
    assert checks["sftp.publish"]["status"] == "skip"
    no_probes_left(server)


def test_an_erp_that_takes_only_final_names_leaves_the_probe_alone(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """The existing instant-pickup server moves *.csv at once: tmp names are not taken."""
    server = sftp_server_factory("instant_pickup")
    report = in_process(make_settings(server), watch=1.0)
    assert report.exit_code == ExitCode.OK
    pickup = next(c for c in report.checks if c.name == "sftp.pickup")
    assert pickup.mark is Mark.OK and pickup.data["seconds"] >= 1.0
    no_probes_left(server)


def test_case_insensitive_names_are_reported(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("case_insensitive")
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.OK
    case = next(c for c in report.checks if c.name == "sftp.case")
    assert case.data["case_insensitive"] is True and "case-insensitive" in case.summary
    no_probes_left(server)


@pytest.mark.parametrize(
    ("quirk", "failure_code"),
    [("permission_denied_write", "SFTP_PERMISSION_DENIED"), ("disk_full", "SFTP_UPLOAD_FAILED")],
)
def test_a_server_that_refuses_writes_fails_with_exit_5(
    quirk: str,
    failure_code: str,
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory(quirk, disk_full_after=0)
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.SFTP
    write = next(c for c in report.checks if c.name == "sftp.write")
    assert write.mark is Mark.FAIL and write.data["failure_code"] == failure_code
    assert "cannot write in remote_outbox /outbox" in write.summary
    no_probes_left(server)


@pytest.mark.parametrize(
    ("quirk", "says"), [("disk_full_generic", "is full"), ("read_only_generic", "is read-only")]
)
def test_a_full_or_read_only_outbox_is_named_from_statvfs(
    quirk: str,
    says: str,
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """OpenSSH answers both with a bare "Failure"; statvfs@openssh.com tells them apart."""
    server = sftp_server_factory(quirk, disk_full_after=0)
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.SFTP
    space = next(c for c in report.checks if c.name == "sftp.space")
    assert space.mark is Mark.FAIL and says in space.summary
    no_probes_left(server)


@pytest.mark.parametrize("kind", ["full", "read_only"])
def test_openssh_on_a_really_full_or_read_only_outbox(
    kind: str,
    sandbox: Sandbox,
    openssh_mounted_outbox: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """Real kernel errors (a 16 KiB tmpfs filled up, or remounted read-only) through the
    real sftp-server, which answers both with a bare "Failure"."""
    server = openssh_mounted_outbox(kind)
    if kind == "full":
        with contextlib.suppress(OSError), server.local(f"{server.outbox}/filler").open("wb") as f:
            while True:  # until ENOSPC
                f.write(b"x" * 4096)
                f.flush()
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.SFTP
    checks = {c.name: c for c in report.checks}
    assert checks["sftp.space"].mark is Mark.FAIL
    assert ("is full" if kind == "full" else "is read-only") in checks["sftp.space"].summary
    assert checks["sftp.write"].mark is Mark.FAIL
    no_probes_left(server)


def test_a_server_clock_an_hour_fast_is_a_warning_not_a_failure(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("clock_ahead")
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.OK
    clock = next(c for c in report.checks if c.name == "sftp.clock")
    assert clock.mark is Mark.WARN
    assert abs(clock.data["skew_seconds"] - 3600) <= 2
    assert "s ahead of ours" in clock.summary
    no_probes_left(server)


def test_a_folder_that_forbids_deletion_names_the_probes_it_kept(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    server = sftp_server_factory("upload_only")
    report = in_process(make_settings(server))
    cleanup = next(c for c in report.checks if c.name == "sftp.cleanup")
    assert cleanup.mark is Mark.WARN and "deletion is forbidden" in cleanup.summary
    left = {f"{server.outbox}/{n}" for n in server.listdir(server.outbox)}
    assert left and set(cleanup.data["kept"]) == left  # exactly what it says it kept
    assert all(n.startswith(f"{server.outbox}/{PROBE_PREFIX}") for n in left)


# --- setups that do not work ------------------------------------------------------------------


def test_a_wrong_api_key_exits_4_and_the_sftp_checks_still_run(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    wrong = "wrong-key-" + "x" * 20
    result, doc = doctor_json(make_settings(asyncssh_sftp, secrets={"nuntiq_api_key": wrong}))
    assert result.returncode == ExitCode.NUNTIQ
    checks = by_name(doc)
    assert checks["nuntiq"]["status"] == "fail" and "API key" in checks["nuntiq"]["summary"]
    assert "nuntiq_api_key" in checks["nuntiq"]["hint"]
    assert checks["sftp.publish"]["status"] == "ok"  # the rest was still checked
    assert_no_secrets(result, wrong, asyncssh_sftp.password)
    no_probes_left(asyncssh_sftp)


def test_unreachable_nuntiq_exits_4(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    settings = make_settings(
        asyncssh_sftp, config={"nuntiq_base_url": f"http://127.0.0.1:{free_port()}/api"}
    )
    doc = document(settings)
    assert doc["exit_code"] == ExitCode.NUNTIQ
    assert by_name(doc)["nuntiq"]["status"] == "fail"


def test_unreachable_sftp_exits_5(
    sandbox: Sandbox, make_settings: MakeSettings, asyncssh_sftp: SftpServerInfo
) -> None:
    settings = make_settings(asyncssh_sftp, config={"sftp_port": free_port()})
    doc = document(settings)
    assert doc["exit_code"] == ExitCode.SFTP
    checks = by_name(doc)
    assert checks["sftp.connect"]["status"] == "fail"
    assert "cannot reach sftp" in checks["sftp.connect"]["summary"]
    assert checks["nuntiq"]["status"] == "ok"


def test_a_wrong_host_key_exits_5_and_shows_the_servers_fingerprint(
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    openssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
) -> None:
    # The asyncssh server, pinned to the OpenSSH server's key: a changed key.
    settings = make_settings(
        asyncssh_sftp,
        config={"sftp_known_hosts": None, "sftp_host_key_sha256": openssh_sftp.host_key_sha256},
    )
    shown = run_cli("doctor", "--watch", "0", "--settings", str(settings))
    assert shown.returncode == ExitCode.SFTP
    assert "✗ host key of" in shown.stderr
    assert asyncssh_sftp.host_key_sha256 in shown.stderr
    assert "hint:" in shown.stderr
    assert asyncssh_sftp.listdir(asyncssh_sftp.outbox) == []  # never logged in


def test_a_wrong_password_fails_the_login_after_a_verified_host_key(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    wrong = "not-the-password-123"
    result, doc = doctor_json(make_settings(asyncssh_sftp, secrets={"sftp_password": wrong}))
    assert result.returncode == ExitCode.SFTP
    checks = by_name(doc)
    assert checks["sftp.host_key"]["status"] == "ok"
    assert checks["sftp.host_key"]["data"]["fingerprint"] == asyncssh_sftp.host_key_sha256
    assert checks["sftp.login"]["status"] == "fail"
    assert_no_secrets(result, wrong, sandbox.api_key)


def test_bad_settings_exit_3_naming_every_problem_and_check_what_they_can(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    settings = make_settings(
        asyncssh_sftp, config={"connector_name": None, "sftp_host": None, "sftp_user": None}
    )
    doc = document(settings)
    assert doc["exit_code"] == ExitCode.SETTINGS
    checks = by_name(doc)
    problems = " ".join(checks["settings"]["details"])
    for key in ("config.connector_name", "config.sftp_host", "config.sftp_user"):
        assert key in problems
    assert checks["nuntiq"]["status"] == "skip"  # needs the connector name
    assert checks["sftp"]["status"] == "skip"
    assert checks["journal.state_dir"]["status"] == "ok"  # its own settings are fine


def test_the_first_failing_area_sets_the_exit_code(
    sandbox: Sandbox, make_settings: MakeSettings, asyncssh_sftp: SftpServerInfo
) -> None:
    settings = make_settings(
        asyncssh_sftp,
        config={"sftp_port": free_port()},
        secrets={"nuntiq_api_key": "wrong-key-1234567890"},
    )
    doc = document(settings)
    assert doc["exit_code"] == ExitCode.NUNTIQ  # Nuntiq before SFTP


# --- the journal ---------------------------------------------------------------------------


def test_unfinished_invoices_of_a_killed_run_are_counted(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    sandbox.control.seed(1)
    settings = make_settings(asyncssh_sftp)
    env = {**os.environ, "_ERP_PUSH_KILL_AT": "published"}
    killed = run_cli("push", "--settings", str(settings), env=env)
    assert killed.returncode == -signal.SIGKILL
    report = in_process(settings)
    unfinished = next(c for c in report.checks if c.name == "journal.unfinished")
    assert unfinished.mark is Mark.WARN
    assert unfinished.data == {"unfinished": 1, "held_by_running_push": 0}
    assert report.exit_code == ExitCode.OK  # the next push finishes it: not a failure


# --- probes are always removed ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_probes_are_removed_when_doctor_is_stopped_mid_way(
    sig: signal.Signals,
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(asyncssh_sftp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "erp_push", "doctor", "--watch", "60", "--settings", str(settings)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not asyncssh_sftp.listdir(asyncssh_sftp.outbox):  # the watched probe is there
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)  # into the watch
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143)
    assert "Traceback" not in stderr
    assert asyncssh_sftp.listdir(asyncssh_sftp.outbox) == []


def test_probes_are_removed_through_a_new_connection_when_the_first_dies(
    sandbox: Sandbox,
    sftp_server_factory: Callable[..., SftpServerInfo],
    make_settings: MakeSettings,
) -> None:
    """The server cuts the connection right after the probe's first rename (its reply
    never arrives): the probes are on the server, and only a new login can remove them."""
    server = sftp_server_factory("drop_after_rename")
    report = in_process(make_settings(server))
    assert report.exit_code == ExitCode.SFTP
    checks = {c.name: c for c in report.checks}
    assert checks["sftp.connection"].mark is Mark.FAIL
    assert "lost sftp" in checks["sftp.connection"].summary
    assert checks["sftp.cleanup"].mark is Mark.OK
    no_probes_left(server)


def test_no_secret_in_any_doctor_output_even_with_debug(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    wrong_password, wrong_key = "Sftp-Pw-Never-Shown-4711", "Api-Key-Never-Shown-4711"
    wrong = make_settings(
        asyncssh_sftp,
        secrets={"sftp_password": wrong_password, "nuntiq_api_key": wrong_key},
        name="wrong.json",
    )
    outputs = [
        run_cli(
            "--debug", "doctor", "--watch", "0", "--settings", str(make_settings(asyncssh_sftp))
        ),
        run_cli("--debug", "doctor", "--json", "--watch", "0", "--settings", str(wrong)),
    ]
    assert [o.returncode for o in outputs] == [0, ExitCode.NUNTIQ]
    everything = "\n".join(o.stdout + o.stderr for o in outputs)
    assert "DEBUG" in everything  # the libraries' own records were produced and searched
    for secret in (wrong_password, wrong_key, asyncssh_sftp.password, sandbox.api_key):
        assert secret not in everything
    no_probes_left(asyncssh_sftp)
