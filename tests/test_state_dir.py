"""An unusable state_dir is a settings problem (exit 3, nothing claimed); the journal is
private (0700 folders, 0600 files). Through the real command line in a child process.

Some cases need a read-only mount or a user without a passwd entry. The tests make them
in a private mount namespace of the child (``unshare -m``, root only), so nothing on the
machine changes and the mounts vanish with the child; without it they skip and say why.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from erp_push.errors import ExitCode
from erp_push.journal import Journal
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox

STATE_DIR_LABEL = "config.state_dir (env ERP_PUSH_STATE_DIR)"


@pytest.fixture
def push_settings(
    tmp_path: Path, sandbox: Sandbox, make_settings: MakeSettings
) -> Callable[..., Path]:
    """Settings push accepts, except for what a test overrides. The SFTP server is never
    contacted (a settings problem stops the run first), so a closed port will do."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")

    def make(**config: object) -> Path:
        sftp = {
            "sftp_host": "127.0.0.1",
            "sftp_port": 9,
            "sftp_user": "erp",
            "remote_outbox": "/outbox",
            "sftp_known_hosts": str(known_hosts),
        }
        return make_settings(None, config={**sftp, **config}, secrets={"sftp_password": "pw"})

    return make


def assert_settings_problem(
    result: subprocess.CompletedProcess[str], sandbox: Sandbox, *needles: str
) -> None:
    """Exit 3, the state_dir named with the reason, one message, and nothing claimed."""
    assert result.returncode == ExitCode.SETTINGS, result.stderr
    assert f"{STATE_DIR_LABEL}: " in result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert sandbox.control.request_counts().get("claim", 0) == 0
    assert set(sandbox.control.statuses().values()) <= {90}


# --- paths the kernel refuses ---------------------------------------------------------


@pytest.mark.parametrize("state_dir", ["/proc/erp-push-x", "/sys/erp-push-x"])
def test_state_dir_in_a_pseudo_file_system_is_a_settings_problem(
    sandbox: Sandbox, push_settings: Callable[..., Path], state_dir: str
) -> None:
    if not os.path.ismount(Path(state_dir).parent):
        pytest.skip(f"{Path(state_dir).parent} is not mounted here")
    sandbox.control.seed(2)

    result = run_cli("push", "--settings", str(push_settings(state_dir=state_dir)))

    assert_settings_problem(result, sandbox, f"cannot create the folder {state_dir}")
    assert not Path(state_dir).exists()


def test_state_dir_that_is_a_file_is_a_settings_problem(
    tmp_path: Path, sandbox: Sandbox, push_settings: Callable[..., Path]
) -> None:
    (tmp_path / "state").write_text("not a folder")
    result = run_cli("push", "--settings", str(push_settings(state_dir=str(tmp_path / "state"))))
    assert_settings_problem(result, sandbox, f"{tmp_path / 'state'} exists but is not a folder")


# --- tilde paths without a home -------------------------------------------------------


def test_unknown_user_in_state_dir_is_named_with_every_other_problem(
    sandbox: Sandbox, push_settings: Callable[..., Path]
) -> None:
    """It used to raise while resolving paths, which also hid every other problem."""
    bad = {
        "batch_size": 0,
        "concurrency": 99,
        "lease_ttl_seconds": 5,
        "sftp_port": "not-a-port",
        "nuntiq_timeout_seconds": -1,
        "sftp_connect_timeout_seconds": 0,
        "sftp_operation_timeout_seconds": 9999,
        "sftp_keepalive_seconds": -3,
        "publish_mode": "teleport",
    }
    path = push_settings(state_dir="~erp-push-no-such-user/state", **bad)

    result = run_cli("push", "--settings", str(path))

    assert_settings_problem(result, sandbox, "there is no user 'erp-push-no-such-user'")
    for key in bad:
        assert f"config.{key} (env ERP_PUSH_{key.upper()})" in result.stderr
    assert "10 settings problem(s)" in result.stderr


def test_unknown_user_in_a_path_push_does_not_use_is_not_a_problem(
    sandbox: Sandbox, make_settings: MakeSettings
) -> None:
    """render uses no state_dir: a ~user there must not stop it."""
    (token,) = sandbox.control.seed(1)
    path = make_settings(None, config={"state_dir": "~erp-push-no-such-user/state"})
    result = run_cli("render", token, "--settings", str(path))
    assert result.returncode == ExitCode.OK, result.stderr


# --- mount namespaces: read-only disks, no passwd entry --------------------------------


@functools.cache
def _can_unshare_mounts() -> str | None:
    """None if this process can make private mounts for a child; else why not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o ro,size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot mount in a private mount namespace: {probe.stderr.strip()}"
    return None


needs_mount_namespace = pytest.mark.skipif(
    _can_unshare_mounts() is not None, reason=str(_can_unshare_mounts())
)


def run_cli_after(setup: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``erp-push *args`` in a child that first runs the shell ``setup`` (mounts) in its
    own mount namespace: the mounts exist for that child only."""
    command = shlex.join([sys.executable, "-m", "erp_push", *args])
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f"set -e; {setup}; exec {command}"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@needs_mount_namespace
def test_state_dir_on_a_read_only_file_system_is_a_settings_problem(
    tmp_path: Path, sandbox: Sandbox, push_settings: Callable[..., Path]
) -> None:
    sandbox.control.seed(2)
    mount = tmp_path / "ro"
    mount.mkdir()
    ro_tmpfs = f"mount -t tmpfs -o ro,size=64k tmpfs {shlex.quote(str(mount))}"

    new_folder = push_settings(state_dir=str(mount / "state"))
    result = run_cli_after(ro_tmpfs, "push", "--settings", str(new_folder))
    assert_settings_problem(result, sandbox, f"{mount / 'state'}: Read-only file system")

    # The folder exists (it is the mount point) but nothing can be created in it.
    existing = push_settings(state_dir=str(mount))
    result = run_cli_after(ro_tmpfs, "push", "--settings", str(existing))
    assert_settings_problem(result, sandbox, "Read-only file system")


def test_read_only_journal_file_is_a_settings_problem(
    tmp_path: Path, sandbox: Sandbox, push_settings: Callable[..., Path]
) -> None:
    """chmod 0444 is enough for a normal user. Root ignores file modes, so for root the
    file is bind-mounted read-only in the child's mount namespace, or else made
    immutable with chattr +i (undone afterwards)."""
    state = tmp_path / "state"
    Journal(state).close()
    journal = state / Journal.FILE_NAME
    path = push_settings(state_dir=str(state))
    sandbox.control.seed(2)
    quoted = shlex.quote(str(journal))

    if os.geteuid() != 0:
        journal.chmod(0o444)
        result = run_cli("push", "--settings", str(path))
    elif _can_unshare_mounts() is None:
        read_only = f"mount --bind {quoted} {quoted}; mount -o remount,ro,bind {quoted}"
        result = run_cli_after(read_only, "push", "--settings", str(path))
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(journal)]).returncode == 0:
        try:
            result = run_cli("push", "--settings", str(path))
        finally:
            subprocess.run(["chattr", "-i", str(journal)], check=True)
    else:
        pytest.skip("root without mount namespaces or chattr +i: root can write a 0444 file")

    assert_settings_problem(result, sandbox, f"cannot open the journal {journal} for writing")


@needs_mount_namespace
@pytest.mark.skipif(os.geteuid() != 0, reason="hiding the passwd entry needs root")
def test_unset_home_without_a_passwd_entry_is_a_settings_problem(
    tmp_path: Path, sandbox: Sandbox, push_settings: Callable[..., Path]
) -> None:
    """The default state_dir needs a home folder. A uid without a passwd entry is made by
    hiding this user's entry (and NSS modules that would invent one) from the child."""
    sandbox.control.seed(2)
    uid = str(os.getuid())
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "".join(
            line
            for line in Path("/etc/passwd").read_text().splitlines(keepends=True)
            if line.split(":")[2:3] != [uid]
        )
    )
    nsswitch = tmp_path / "nsswitch.conf"
    nsswitch.write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    hide = (
        f"mount --bind {shlex.quote(str(passwd))} /etc/passwd; "
        f"mount --bind {shlex.quote(str(nsswitch))} /etc/nsswitch.conf; "
        "unset HOME XDG_STATE_HOME"
    )
    # make_settings always writes a state_dir; null asks for the default.
    path = push_settings(state_dir=None)

    result = run_cli_after(hide, "push", "--settings", str(path))

    assert_settings_problem(
        result, sandbox, "the default ~/.local/state/erp-push needs a home folder"
    )


# --- permissions ----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_push_creates_a_private_state_dir_whatever_the_umask(
    tmp_path: Path, sandbox: Sandbox, push_settings: Callable[..., Path]
) -> None:
    state = tmp_path / "new" / "state"
    path = push_settings(state_dir=str(state), nuntiq_base_url="http://127.0.0.1:9/api")

    # umask 000 would make everything world-writable if erp-push relied on the umask.
    result = subprocess.run(
        ["sh", "-c", 'umask 000; exec "$@"', "sh", sys.executable, "-m", "erp_push"]
        + ["push", "--settings", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )

    assert result.returncode == ExitCode.NUNTIQ, result.stderr  # nothing listens on :9
    assert mode(state) == 0o700
    assert mode(state / "runs") == 0o700
    assert mode(state / Journal.FILE_NAME) == 0o600


def test_journal_files_are_0600_while_open_and_an_old_0644_journal_is_fixed(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # a folder the operator made: not ours to change
    old = os.umask(0)
    try:
        journal = Journal(state)
        journal.start_run()
        try:
            files = sorted(p.name for p in state.iterdir() if p.is_file())
            assert files == ["journal.sqlite3", "journal.sqlite3-shm", "journal.sqlite3-wal"]
            for name in files:
                assert mode(state / name) == 0o600, name
            (lock,) = (state / "runs").iterdir()
            assert mode(lock) == 0o600
        finally:
            journal.close()

        # A journal (and WAL files) left 0644 by an older version become 0600.
        for name in files:
            (state / name).touch()
            os.chmod(state / name, 0o644)
        journal = Journal(state)
        try:
            for name in files:
                assert mode(state / name) == 0o600, name
        finally:
            journal.close()
    finally:
        os.umask(old)

    assert mode(state) == 0o755
    assert mode(state / "runs") == 0o700  # created by erp-push


OPEN_AT = """
import sys, time
from pathlib import Path
from erp_push.errors import JournalUnusable
from erp_push.journal import Journal
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    Journal(Path(sys.argv[1])).close()
    print("ok")
except JournalUnusable as exc:
    print(exc)
"""


def test_runs_started_together_on_a_new_state_dir_all_open_the_journal(
    tmp_path: Path,
) -> None:
    """Cron and an operator (or four concurrent runs) starting at the same moment on a
    state_dir that has no journal yet: each opens it; none reports it unusable. (SQLite
    refuses the switch of a fresh file to WAL at once while another process holds it.)"""
    answers: list[str] = []
    for round_ in range(8):
        state = tmp_path / f"state{round_}"
        start = time.time() + 1.0  # every child has imported erp-push by then
        children = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_AT, str(state), repr(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        for child in children:
            out, err = child.communicate(timeout=60)
            answers.append(out.strip() or err.strip()[-300:])
    assert [a for a in answers if a != "ok"] == []
