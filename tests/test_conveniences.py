"""What people expect of a command-line tool: shell completion, examples in `--help`, and
logging in through a running ssh-agent (a real `ssh-agent` + `ssh-add`, OpenSSH sshd)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erp_push.cli import app
from erp_push.errors import ExitCode
from erp_push.settings import Need, load_settings
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = [
    info.name or (info.callback.__name__ if info.callback else "")
    for info in app.registered_commands
]
runner = CliRunner()


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


# --- shell completion ---------------------------------------------------------------------


def _from_bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """erp-push typed into bash: typer finds the shell among the process's ancestors
    (which a test run started from cron or CI may not have), so bash is made the parent."""
    script = '"$@"; status=$?; exit $status'  # not the last command: bash must not exec it
    return subprocess.run(
        ["bash", "-c", script, "bash", sys.executable, "-m", "erp_push", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_show_completion_prints_a_bash_script_for_erp_push() -> None:
    result = _from_bash("--show-completion")
    assert result.returncode == 0, result.stderr
    assert "_ERP_PUSH_COMPLETE=complete_bash" in result.stdout
    assert "complete -o default -F _erp_push_completion erp-push" in result.stdout


def test_the_completion_script_completes_commands_and_options() -> None:
    """What the installed script asks the program when Tab is pressed."""
    words = run_cli(
        env=_env(_ERP_PUSH_COMPLETE="complete_bash", COMP_WORDS="erp-push do", COMP_CWORD="1")
    )
    assert words.stdout.split() == ["doctor"]
    option = run_cli(
        env=_env(
            _ERP_PUSH_COMPLETE="complete_bash", COMP_WORDS="erp-push doctor --wa", COMP_CWORD="2"
        )
    )
    assert option.stdout.split() == ["--watch"]


def test_install_completion_writes_the_script_and_sources_it(tmp_path: Path) -> None:
    result = _from_bash("--install-completion", env=_env(HOME=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    script = tmp_path / ".bash_completions" / "erp-push.sh"
    assert "_erp_push_completion" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


# --- examples in --help ---------------------------------------------------------------------


def test_erp_push_help_shows_an_example_of_every_command() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Examples:" in text and "Exit codes:" in text
    for info in app.registered_commands:
        (example,) = [
            line.removeprefix("Example:").strip()
            for line in (inspect.getdoc(info.callback) or "").splitlines()
            if line.startswith("Example:")
        ]
        shown = example.replace("[bold]", "").replace("[/bold]", "")
        assert shown.startswith(f"erp-push {COMMANDS[app.registered_commands.index(info)]}")
        assert shown in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example_and_is_in_the_readme(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert f"Example: erp-push {command}" in " ".join(result.stdout.split())
    assert f"erp-push {command}" in README.read_text()


# --- ssh-agent ---------------------------------------------------------------------------------


@contextlib.contextmanager
def ssh_agent(tmp_path: Path) -> Iterator[str]:
    """A real ssh-agent on a socket of its own; yields its SSH_AUTH_SOCK."""
    binary = shutil.which("ssh-agent")
    if binary is None or shutil.which("ssh-add") is None:
        if os.environ.get("CI"):
            pytest.fail("ssh-agent and ssh-add are required in CI (apt-get install openssh-client)")
        pytest.skip("ssh-agent is not installed")
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([binary, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ssh_add(sock: str, *args: str) -> None:
    subprocess.run(
        ["ssh-add", *args], env=_env(SSH_AUTH_SOCK=sock), check=True, capture_output=True
    )


def test_login_through_a_running_ssh_agent(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    assert openssh_sftp.client_key_path is not None
    # No password and no key file: the agent is the only way in.
    settings = make_settings(
        openssh_sftp, config={"sftp_use_agent": True}, secrets={"sftp_password": None}
    )
    load_settings(settings, needs={Need.SFTP})  # a login method on its own
    with ssh_agent(tmp_path) as sock:
        ssh_add(sock, str(openssh_sftp.client_key_path))
        result = run_cli(
            "doctor",
            "--json",
            "--watch",
            "0",
            "--settings",
            str(settings),
            env=_env(SSH_AUTH_SOCK=sock),
        )
        assert result.returncode == 0, result.stdout
        checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
        assert checks["sftp.login"]["data"]["login"].startswith("ssh-agent key ssh-ed25519 SHA256:")

        # A push logs in the same way (each login of the run asks the agent).
        sandbox.control.seed(2)
        pushed = run_cli(
            "push", "--json", "--settings", str(settings), env=_env(SSH_AUTH_SOCK=sock)
        )
        assert pushed.returncode == 0, pushed.stderr
        assert len(openssh_sftp.listdir(openssh_sftp.outbox)) == 2

        # An agent without the key: refused, exit 5, and the message says why.
        ssh_add(sock, "-D")
        refused = run_cli(
            "doctor", "--watch", "0", "--settings", str(settings), env=_env(SSH_AUTH_SOCK=sock)
        )
    openssh_sftp.clear()
    assert refused.returncode == ExitCode.SFTP
    assert "the ssh-agent offered no key the server accepts" in refused.stderr


def test_without_the_setting_the_agent_is_not_used(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    assert openssh_sftp.client_key_path is not None
    settings = make_settings(openssh_sftp, secrets={"sftp_password": "not-the-password"})
    with ssh_agent(tmp_path) as sock:
        ssh_add(sock, str(openssh_sftp.client_key_path))
        result = run_cli(
            "doctor", "--watch", "0", "--settings", str(settings), env=_env(SSH_AUTH_SOCK=sock)
        )
    assert result.returncode == ExitCode.SFTP  # the agent held a good key, unasked
    assert "not-the-password" not in result.stderr


def test_an_agent_setting_without_an_agent_says_so(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    settings = make_settings(
        asyncssh_sftp, config={"sftp_use_agent": True}, secrets={"sftp_password": None}
    )
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    result = run_cli("doctor", "--watch", "0", "--settings", str(settings), env=env)
    assert result.returncode == ExitCode.SFTP
    assert "SSH_AUTH_SOCK is not set" in result.stderr
