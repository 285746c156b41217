"""known_hosts read as OpenSSH reads it: markers, patterns, negation, hashed names.

Parser rules are unit-tested on text; what they mean for a connection is tested against
a real asyncssh server (its key trusted, revoked, or named by a pattern).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import asyncssh
import paramiko
import pytest

from erp_push import known_hosts
from erp_push.errors import ExitCode, HostKeyMismatch, HostKeyRevoked, HostKeyUnknown, SettingsError
from erp_push.known_hosts import host_matches, host_name, parse
from erp_push.transport import SftpSession
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

ED = paramiko.Ed25519Key(data=asyncssh.generate_private_key("ssh-ed25519").public_data)
OTHER = paramiko.ECDSAKey.generate()


def line(hosts: str, key: paramiko.PKey = ED, marker: str = "") -> str:
    return f"{marker} {hosts} {key.get_name()} {key.get_base64()} comment".strip()


def server_line(server: SftpServerInfo, hosts: str | None = None, marker: str = "") -> str:
    """The fixture's own known_hosts line, with other host patterns or a marker."""
    _name, key_type, key_b64 = server.known_hosts_path.read_text().split()[:3]
    return f"{marker} {hosts or _name} {key_type} {key_b64}".strip()


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- host patterns --------------------------------------------------------------------------


def test_host_name_is_bracketed_off_port_22_and_lower_case() -> None:
    assert host_name("SFTP.Example.com", 22) == "sftp.example.com"
    assert host_name("sftp.example.com", 2222) == "[sftp.example.com]:2222"
    assert host_name("::1", 2222) == "[::1]:2222"


@pytest.mark.parametrize(
    ("hosts", "name", "expected"),
    [
        ("sftp.example.com", "sftp.example.com", True),
        ("SFTP.example.COM", "sftp.example.com", True),  # host names ignore case
        ("other.example.com,sftp.example.com", "sftp.example.com", True),
        ("*.example.com", "sftp.example.com", True),
        ("*.example.com", "example.com", False),
        ("sftp?.example.com", "sftp1.example.com", True),
        ("sftp?.example.com", "sftp.example.com", False),
        ("[sftp.example.com]:2222", "[sftp.example.com]:2222", True),
        ("[sftp.example.com]:2222", "sftp.example.com", False),  # port 22 is another entry
        ("sftp.example.com", "[sftp.example.com]:2222", False),
        ("[s]:2222", "s", False),  # brackets are literal, not a character class
        ("[*.example.com]:*", "[sftp.example.com]:2222", True),
        # a negated pattern wins over every positive one, in any order
        ("*.example.com,!sftp.example.com", "sftp.example.com", False),
        ("!sftp.example.com,*.example.com", "sftp.example.com", False),
        ("*.example.com,!sftp.example.com", "www.example.com", True),
        ("!sftp.example.com", "www.example.com", False),  # negation alone never matches
        ("*", "anything", True),
    ],
)
def test_host_patterns_match_as_in_openssh(hosts: str, name: str, expected: bool) -> None:
    assert host_matches(name, hosts) is expected


def test_hashed_names_match_only_their_host() -> None:
    hashed = paramiko.HostKeys.hash_host("[127.0.0.1]:2222")
    assert host_matches("[127.0.0.1]:2222", hashed)
    assert not host_matches("[127.0.0.1]:2223", hashed)
    assert not host_matches("[127.0.0.1]:2222", "|1|not base64!|x")  # unreadable: no match


# --- parsing ------------------------------------------------------------------------------


def test_markers_comments_and_unsupported_key_types() -> None:
    text = "\n".join(
        [
            "# a comment",
            "",
            line("a.example.com"),
            line("*", OTHER, "@revoked"),
            line("*.example.com", marker="@cert-authority"),
            "b.example.com sk-ssh-ed25519@openssh.com "
            + base64.b64encode(b"\0\0\0\x1ask-ssh-ed25519@openssh.com").decode(),
        ]
    )
    entries = parse(text)
    assert [(e.line, e.marker, e.hosts) for e in entries] == [
        (3, None, "a.example.com"),
        (4, "@revoked", "*"),
    ]
    assert entries[0].key is not None
    assert entries[0].key.asbytes() == ED.asbytes()
    assert entries[1].blob == OTHER.asbytes()


def test_cert_authority_and_unknown_markers_are_skipped_with_one_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = "\n".join(
        [
            line("*.example.com", marker="@cert-authority"),
            line("*.example.org", OTHER, "@cert-authority"),
            line("a.example.com", marker="@future-marker"),
            line("a.example.com"),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="erp_push.known_hosts"):
        entries = parse(text, "kh")
    assert [e.hosts for e in entries] == ["a.example.com"]
    # Only this module's records: a record of another's (asyncio reporting a test
    # server's task collected late) may land in the capture too.
    ours = [r for r in caplog.records if r.name == "erp_push.known_hosts"]
    assert [r.getMessage() for r in ours] == [
        "kh: 2 @cert-authority line(s) skipped: host certificates are not supported; "
        "list the server's own host key",
        "kh: 1 @future-marker line(s) skipped: unknown marker",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a.example.com ssh-ed25519 %%%%", "line 1: the ssh-ed25519 key is not valid base64"),
        ("a.example.com ssh-ed25519", "line 1: expected [@marker] hostnames keytype key"),
        ("@revoked ssh-ed25519 " + ED.get_base64(), "expected [@marker] hostnames keytype key"),
        (f"a.example.com ssh-rsa {ED.get_base64()}", "line 1: the key is not a ssh-rsa key"),
        ("a ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519\0").decode(), "cannot be"),
    ],
)
def test_a_broken_line_is_one_clear_settings_problem(text: str, problem: str) -> None:
    with pytest.raises(SettingsError) as broken:
        parse(text, "/etc/kh")
    (message,) = broken.value.problems
    assert message.startswith("config.sftp_known_hosts: /etc/kh line 1: ")
    assert problem in message
    assert "(" not in message.split(": ", 2)[2]  # no Python tuple or repr in the text


def test_load_returns_trusted_and_revoked_keys_for_one_host(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        line("[sftp.example.com]:2222"),
        line("*", OTHER, "@revoked"),
        line("other.example.com", OTHER),
        line("*.example.com,![sftp.example.com]:2222", OTHER),
    )
    keys = known_hosts.load(path, "sftp.example.com", 2222)
    assert [k.asbytes() for k in keys.trusted] == [ED.asbytes()]
    assert [e.line for e in keys.revoked] == [2]
    assert keys.trusts(ED.asbytes())
    assert not keys.trusts(OTHER.asbytes())
    assert keys.key_types == {"ssh-ed25519"}
    assert known_hosts.load(tmp_path / "missing", "sftp.example.com", 2222).trusted == []


def test_a_revoked_key_is_never_trusted_even_when_listed(tmp_path: Path) -> None:
    path = write(tmp_path, line("sftp.example.com"), line("sftp.example.com", marker="@revoked"))
    keys = known_hosts.load(path, "sftp.example.com", 22)
    assert keys.revocation(ED.asbytes()) is not None
    assert not keys.trusts(ED.asbytes())


def test_the_file_is_read_and_warned_about_once_per_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, line("*", marker="@cert-authority"), line("a.example.com"))
    with caplog.at_level(logging.WARNING, logger="erp_push.known_hosts"):
        for _ in range(3):  # e.g. a run's first connection, more workers, a reconnect
            assert len(known_hosts.load(path, "a.example.com", 22).trusted) == 1
        assert len([r for r in caplog.records if r.name == "erp_push.known_hosts"]) == 1
        path.write_text(line("b.example.com") + "\n")  # edited: read again
        assert known_hosts.load(path, "a.example.com", 22).trusted == []
        assert known_hosts.load(path, "b.example.com", 22).trusted != []


# --- against a real server -----------------------------------------------------------------


def test_cert_authority_lines_no_longer_break_the_file(
    asyncssh_sftp: SftpServerInfo, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        line("*", OTHER, "@cert-authority"),
        line("*.example.com", marker="@revoked"),
        server_line(asyncssh_sftp),
    )
    with SftpSession.connect(asyncssh_sftp.options(known_hosts=path)):
        pass


def test_a_revoked_server_key_is_refused_even_when_also_trusted(
    asyncssh_sftp: SftpServerInfo, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        server_line(asyncssh_sftp),
        server_line(asyncssh_sftp, hosts="*", marker="@revoked"),
    )
    with pytest.raises(HostKeyRevoked) as refused:
        SftpSession.connect(asyncssh_sftp.options(known_hosts=path))
    assert isinstance(refused.value, HostKeyMismatch)  # same exit code and handling
    message = str(refused.value)
    assert "revoked" in message and f"line 2 of {path}" in message
    assert asyncssh_sftp.host_key_sha256 in message


def test_a_revoked_key_refuses_the_run_with_exit_5(
    asyncssh_sftp: SftpServerInfo, tmp_path: Path, sandbox: Sandbox, make_settings: MakeSettings
) -> None:
    path = write(tmp_path, server_line(asyncssh_sftp, marker="@revoked"))
    settings = make_settings(asyncssh_sftp, config={"sftp_known_hosts": str(path)})
    sandbox.control.seed(1)
    result = run_cli("push", "--settings", str(settings))
    assert result.returncode == ExitCode.SFTP
    assert "revoked" in result.stderr and "Traceback" not in result.stderr
    assert asyncssh_sftp.files() == {}


def test_a_negated_pattern_excludes_the_server(
    asyncssh_sftp: SftpServerInfo, tmp_path: Path
) -> None:
    name = f"[127.0.0.1]:{asyncssh_sftp.port}"
    path = write(tmp_path, server_line(asyncssh_sftp, hosts=f"{name},!{name}"))
    with pytest.raises(HostKeyUnknown):
        SftpSession.connect(asyncssh_sftp.options(known_hosts=path))


def test_a_wildcard_pattern_names_the_server(asyncssh_sftp: SftpServerInfo, tmp_path: Path) -> None:
    path = write(tmp_path, server_line(asyncssh_sftp, hosts="[127.0.0.*]:*"))
    with SftpSession.connect(asyncssh_sftp.options(known_hosts=path)):
        pass
