"""transport.py against real SFTP servers on loopback (asyncssh, OpenSSH, pytest-sftpserver).

The rules under test: never overwrite, never a partial file under a final name, never
deliver twice, always verify the host key, never leak a secret.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import paramiko
import pytest
from paramiko.common import AUTH_SUCCESSFUL, OPEN_SUCCEEDED
from pydantic import SecretStr

from erp_push import publish as publishing
from erp_push.errors import (
    HostKeyMismatch,
    HostKeyUnknown,
    SftpAuthError,
    SftpDropped,
    SftpFolderError,
    SftpOperationError,
    SftpUnreachable,
)
from erp_push.publish import Checkpoint, Delivery, Drop
from erp_push.render import RenderedFile
from erp_push.transport import TMP_PATTERN, Exchange, SftpOptions, SftpSession, fingerprint
from tests.sftp_servers.fixtures import SftpServerInfo

NAME = "ABC-20260101.csv"
BODY = b"invoiceNumber\tinvoiceDate\ttotal\r\nABC\t2026-01-01\t12.50\r\n"

Factory = Callable[..., SftpServerInfo]


def rendered(body: bytes = BODY, name: str = NAME) -> RenderedFile:
    return RenderedFile(
        file_name=name,
        body=body,
        invoice_number=name.split("-")[0],
        sha256=hashlib.sha256(body).hexdigest(),
    )


def publish_on(
    session: SftpSession,
    outbox: str,
    sent: str | None,
    file: RenderedFile,
    on_checkpoint: Checkpoint | None = None,
    *,
    mode: Literal["rename", "direct"] = "rename",
) -> Delivery:
    """Publish as the pipeline does, in ``mode`` (the setting publish_mode)."""
    drop = Drop(outbox=outbox, sent=sent, mode=mode)
    return publishing.publish(session, drop, file, on_checkpoint=on_checkpoint)


def find_delivered(
    session: SftpSession, outbox: str, sent: str | None, file: RenderedFile
) -> str | None:
    return publishing.find_delivered(session, Drop(outbox=outbox, sent=sent), file)


def publish(
    info: SftpServerInfo,
    file: RenderedFile | None = None,
    on_checkpoint: Checkpoint | None = None,
) -> Delivery:
    with SftpSession.connect(info.options()) as session:
        return publish_on(session, info.outbox, info.sent, file or rendered(), on_checkpoint)


def tmp_files(info: SftpServerInfo) -> list[str]:
    return [n for n in info.listdir(info.outbox) if n.endswith(".erp-push.tmp")]


OPENSSH = pytest.param("openssh", marks=pytest.mark.sshd)


@pytest.fixture(params=["asyncssh", OPENSSH, "sftpserver"])
def server(request: pytest.FixtureRequest) -> Iterator[SftpServerInfo]:
    """Each of the three kinds of server, with an empty outbox and sent/."""
    info: SftpServerInfo = request.getfixturevalue(f"{request.param}_sftp")
    info.clear()
    yield info
    if request.param == "openssh":
        info.clear()


@pytest.fixture
def openssh(openssh_sftp: SftpServerInfo) -> Iterator[SftpServerInfo]:
    openssh_sftp.clear()
    yield openssh_sftp
    openssh_sftp.clear()


# --- publish on every server ------------------------------------------------------------


def test_publish_lands_exact_bytes_under_final_name(server: SftpServerInfo) -> None:
    delivery = publish(server)

    assert delivery == Delivery(remote_path=f"{server.outbox}/{NAME}", already_delivered=False)
    assert server.files() == {f"{server.outbox}/{NAME}": BODY}


def test_taken_names_get_the_next_free_suffix(server: SftpServerInfo) -> None:
    server.write(f"{server.outbox}/{NAME}", b"someone else's file")
    server.write(f"{server.sent}/ABC-20260101-2.csv", b"an older one, already picked up")

    delivery = publish(server)

    assert delivery.remote_path == f"{server.outbox}/ABC-20260101-3.csv"
    assert server.read(f"{server.outbox}/{NAME}") == b"someone else's file"
    assert server.read(f"{server.outbox}/ABC-20260101-3.csv") == BODY
    assert tmp_files(server) == []


def test_names_are_compared_case_insensitively_where_the_server_does(
    sftp_server_factory: Factory,
) -> None:
    # A stat of the exact name is answered under the server's own case rules: a
    # Windows-like server reports ABC-20260101.CSV as taken when asked for .csv.
    server = sftp_server_factory("case_insensitive")
    server.write(f"{server.outbox}/ABC-20260101.CSV", b"upper case, other bytes")

    delivery = publish(server)

    assert delivery.remote_path == f"{server.outbox}/ABC-20260101-2.csv"
    assert server.read(f"{server.outbox}/ABC-20260101.CSV") == b"upper case, other bytes"


@pytest.mark.parametrize("where", ["outbox", "sent", "sent-suffixed"])
def test_identical_file_already_there_counts_as_delivered(
    server: SftpServerInfo, where: str
) -> None:
    path = {
        "outbox": f"{server.outbox}/{NAME}",
        "sent": f"{server.sent}/{NAME}",
        "sent-suffixed": f"{server.sent}/ABC-20260101-4.csv",
    }[where]
    server.write(f"{server.outbox}/{NAME}" if where != "outbox" else path, b"x" * len(BODY))
    server.write(path, BODY)
    before = server.files()

    delivery = publish(server)

    assert delivery == Delivery(remote_path=path, already_delivered=True)
    assert server.files() == before


def test_identical_file_in_another_case_counts_where_the_server_ignores_case(
    sftp_server_factory: Factory,
) -> None:
    server = sftp_server_factory("case_insensitive")
    server.write(f"{server.outbox}/ABC-20260101.CSV", BODY)
    before = server.files()

    delivery = publish(server)

    # The server answers for the name we asked about, under its own case rules.
    assert delivery == Delivery(remote_path=f"{server.outbox}/{NAME}", already_delivered=True)
    assert server.files() == before


def test_find_delivered(server: SftpServerInfo) -> None:
    server.write(f"{server.outbox}/{NAME}", b"same size, other bytes!" + b"." * 30)
    with SftpSession.connect(server.options()) as session:
        assert find_delivered(session, server.outbox, server.sent, rendered()) is None
        server.write(f"{server.sent}/ABC-20260101-2.csv", BODY)
        found = find_delivered(session, server.outbox, server.sent, rendered())
    assert found == f"{server.sent}/ABC-20260101-2.csv"


# --- rename semantics: never overwrite -------------------------------------------------


@pytest.mark.parametrize("hardlink", [True, False], ids=["hardlink", "rename"])
@pytest.mark.parametrize("quirk", ["normal", "rename_overwrites", "generic_failure"])
def test_target_appearing_before_publish_is_never_overwritten(
    sftp_server_factory: Factory, quirk: str, hardlink: bool
) -> None:
    info = sftp_server_factory(quirk, hardlink=hardlink)

    def intruder(step: str) -> None:
        if step == "tmp_written":  # someone takes our name behind our back
            info.write(f"{info.outbox}/{NAME}", b"intruder")

    delivery = publish(info, on_checkpoint=intruder)

    assert delivery.remote_path == f"{info.outbox}/ABC-20260101-2.csv"
    assert info.files() == {
        f"{info.outbox}/{NAME}": b"intruder",
        f"{info.outbox}/ABC-20260101-2.csv": BODY,
    }


@pytest.mark.parametrize("hardlink", [True, False], ids=["hardlink", "rename"])
def test_identical_file_appearing_before_publish_means_delivered(
    sftp_server_factory: Factory, hardlink: bool
) -> None:
    info = sftp_server_factory("rename_overwrites", hardlink=hardlink)

    def concurrent_run(step: str) -> None:
        if step == "tmp_written":
            info.write(f"{info.sent}/{NAME}", BODY)

    delivery = publish(info, on_checkpoint=concurrent_run)

    assert delivery == Delivery(remote_path=f"{info.sent}/{NAME}", already_delivered=True)
    assert info.files() == {f"{info.sent}/{NAME}": BODY}


def test_generic_rename_failure_on_existing_target_tries_next_name(
    sftp_server_factory: Factory,
) -> None:
    # The re-check is bypassed here by taking the name in the outbox only after it ran
    # (at the lease check, the last moment before the rename): the server's own refusal
    # ("Failure", as OpenSSH says) must be understood too.
    info = sftp_server_factory("generic_failure", hardlink=False)
    taken = {"done": False}

    def lease_check_then_take() -> bool:
        if not taken["done"]:
            taken["done"] = True
            info.write(f"{info.outbox}/{NAME}", b"intruder")
        return True

    with SftpSession.connect(info.options()) as session:
        delivery = publishing.publish(
            session, Drop(info.outbox, info.sent), rendered(), may_publish=lease_check_then_take
        )

    assert delivery.remote_path == f"{info.outbox}/ABC-20260101-2.csv"
    assert info.read(f"{info.outbox}/{NAME}") == b"intruder"
    assert tmp_files(info) == []


@pytest.mark.sshd
def test_openssh_never_overwrites(openssh: SftpServerInfo) -> None:
    def intruder(step: str) -> None:
        if step == "tmp_written":
            openssh.write(f"{openssh.outbox}/{NAME}", b"intruder")

    delivery = publish(openssh, on_checkpoint=intruder)

    assert delivery.remote_path == f"{openssh.outbox}/ABC-20260101-2.csv"
    assert openssh.read(f"{openssh.outbox}/{NAME}") == b"intruder"
    assert tmp_files(openssh) == []


def test_sftpserver_rename_overwrites_but_recheck_prevents_it(
    sftpserver_sftp: SftpServerInfo,
) -> None:
    info = sftpserver_sftp

    def intruder(step: str) -> None:
        if step == "tmp_written":
            info.write(f"{info.outbox}/{NAME}", b"intruder")

    delivery = publish(info, on_checkpoint=intruder)

    assert delivery.remote_path == f"{info.outbox}/ABC-20260101-2.csv"
    assert info.read(f"{info.outbox}/{NAME}") == b"intruder"


def test_no_posix_rename(sftp_server_factory: Factory) -> None:
    info = sftp_server_factory("no_posix_rename", hardlink=False)

    assert publish(info).remote_path == f"{info.outbox}/{NAME}"
    assert info.files() == {f"{info.outbox}/{NAME}": BODY}


def test_no_rename_fails_cleanly_and_removes_the_tmp(sftp_server_factory: Factory) -> None:
    info = sftp_server_factory("no_rename")

    with pytest.raises(SftpOperationError) as failure:
        publish(info)

    assert failure.value.failure_code == "SFTP_PUBLISH_FAILED"
    assert info.files() == {}
    assert tmp_files(info) == []


def test_no_rename_with_direct_mode_writes_the_final_name(sftp_server_factory: Factory) -> None:
    info = sftp_server_factory("no_rename")
    info.write(f"{info.outbox}/{NAME}", b"taken")

    with SftpSession.connect(info.options()) as session:
        delivery = publish_on(session, info.outbox, info.sent, rendered(), mode="direct")

    assert delivery.remote_path == f"{info.outbox}/ABC-20260101-2.csv"
    assert info.files() == {
        f"{info.outbox}/{NAME}": b"taken",
        f"{info.outbox}/ABC-20260101-2.csv": BODY,
    }


# --- the ERP, connection loss, server refusals -------------------------------------------


@pytest.mark.parametrize("hardlink", [True, False], ids=["hardlink", "rename"])
def test_instant_pickup_by_the_erp(sftp_server_factory: Factory, hardlink: bool) -> None:
    info = sftp_server_factory("instant_pickup", hardlink=hardlink)

    delivery = publish(info)

    assert delivery == Delivery(remote_path=f"{info.outbox}/{NAME}", already_delivered=False)
    assert info.files() == {f"{info.sent}/{NAME}": BODY}
    assert info.listdir(info.outbox) == []


@pytest.mark.parametrize("hardlink", [True, False], ids=["hardlink", "rename"])
def test_connection_lost_after_rename_is_proved_by_find_delivered(
    sftp_server_factory: Factory, hardlink: bool
) -> None:
    info = sftp_server_factory("drop_after_rename", hardlink=hardlink)

    with pytest.raises(SftpUnreachable):
        publish(info)

    with SftpSession.connect(info.options()) as session:
        found = find_delivered(session, info.outbox, info.sent, rendered())
        again = publish_on(session, info.outbox, info.sent, rendered())

    assert found == f"{info.outbox}/{NAME}"
    assert again == Delivery(remote_path=found, already_delivered=True)
    csv_files = [n for n in info.listdir(info.outbox) if n.endswith(".csv")]
    assert csv_files == [NAME]
    # With hardlink the tmp's removal is sent with the link: a server that has read it
    # before the cut removes the tmp; otherwise it outlives the connection and
    # cleanup-tmp removes it.
    assert len(tmp_files(info)) <= (1 if hardlink else 0)


@pytest.mark.parametrize(
    ("quirk", "code"),
    [("permission_denied_write", "SFTP_PERMISSION_DENIED"), ("disk_full", "SFTP_DISK_FULL")],
)
def test_server_refusals_fail_the_file_and_leave_no_tmp(
    sftp_server_factory: Factory, quirk: str, code: str
) -> None:
    info = sftp_server_factory(quirk)

    with pytest.raises(SftpOperationError) as failure:
        publish(info)

    assert failure.value.failure_code == code
    assert len(str(failure.value)) <= 500
    assert info.listdir(info.outbox) == []


def test_failure_in_direct_mode_removes_the_partial_file(sftp_server_factory: Factory) -> None:
    info = sftp_server_factory("disk_full")

    with (
        SftpSession.connect(info.options()) as session,
        pytest.raises(SftpOperationError, match="No space left") as failure,
    ):
        publish_on(session, info.outbox, info.sent, rendered(), mode="direct")

    assert failure.value.failure_code == "SFTP_DISK_FULL"
    assert info.listdir(info.outbox) == []


# --- folders ------------------------------------------------------------------------------


def test_check_folders(asyncssh_sftp: SftpServerInfo) -> None:
    info = asyncssh_sftp
    info.write("/not-a-folder", b"x")
    with SftpSession.connect(info.options()) as session:
        session.check_folders(info.outbox, info.sent)
        session.check_folders(info.outbox, None)
        session.check_folders(info.outbox, "/outbox/missing-sent")  # missing sent: empty
        with pytest.raises(SftpFolderError, match="does not exist"):
            session.check_folders("/missing", info.sent)
        with pytest.raises(SftpFolderError, match="not a directory"):
            session.check_folders("/not-a-folder", info.sent)
        # and publishing with a missing sent folder works
        assert not publish_on(
            session, info.outbox, "/outbox/missing-sent", rendered()
        ).already_delivered


# --- host keys ----------------------------------------------------------------------------


def test_known_hosts_entry_for_non_default_port_is_accepted(asyncssh_sftp: SftpServerInfo) -> None:
    assert asyncssh_sftp.known_hosts_path.read_text().startswith(
        f"[127.0.0.1]:{asyncssh_sftp.port} "
    )
    with SftpSession.connect(asyncssh_sftp.options()):
        pass


def test_hashed_known_hosts_entry_is_accepted(
    asyncssh_sftp: SftpServerInfo, tmp_path: Path
) -> None:
    host_keys = paramiko.HostKeys(str(asyncssh_sftp.known_hosts_path))
    name = f"[127.0.0.1]:{asyncssh_sftp.port}"
    entry = host_keys.lookup(name)
    assert entry is not None
    ((key_type, key),) = entry.items()
    hashed = tmp_path / "known_hosts"
    hashed.write_text(f"{paramiko.HostKeys.hash_host(name)} {key_type} {key.get_base64()}\n")

    with SftpSession.connect(asyncssh_sftp.options(known_hosts=hashed)):
        pass


def test_pinned_fingerprint_is_accepted_without_known_hosts(server: SftpServerInfo) -> None:
    options = server.options(known_hosts=None, host_key_sha256=server.host_key_sha256)
    with SftpSession.connect(options):
        pass


def test_unknown_host_key_is_refused(server: SftpServerInfo, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")

    with pytest.raises(HostKeyUnknown) as refused:
        SftpSession.connect(server.options(known_hosts=empty))

    assert refused.value.fingerprint == server.host_key_sha256
    assert server.host_key_sha256 in str(refused.value)
    assert "ssh-keyscan" in str(refused.value)


def test_changed_host_key_is_refused(server: SftpServerInfo, tmp_path: Path) -> None:
    other = paramiko.ECDSAKey.generate()
    changed = tmp_path / "known_hosts"
    changed.write_text(f"[127.0.0.1]:{server.port} {other.get_name()} {other.get_base64()}\n")

    with pytest.raises(HostKeyMismatch) as refused:
        SftpSession.connect(server.options(known_hosts=changed))

    assert server.host_key_sha256 in str(refused.value)


def test_wrong_pin_is_refused_even_with_known_hosts(asyncssh_sftp: SftpServerInfo) -> None:
    wrong = "SHA256:" + "A" * 43
    with pytest.raises(HostKeyMismatch) as refused:
        SftpSession.connect(asyncssh_sftp.options(host_key_sha256=wrong))

    assert refused.value.fingerprint == asyncssh_sftp.host_key_sha256
    assert asyncssh_sftp.host_key_sha256 in str(refused.value)


# --- login --------------------------------------------------------------------------------


def _keygen(path: Path, key_type: str, passphrase: str = "") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-f", str(path)], check=True
    )
    return path


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
@pytest.mark.parametrize("passphrase", ["", "correct horse"], ids=["plain", "passphrase"])
def test_key_login(
    sftp_server_factory: Factory, tmp_path: Path, key_type: str, passphrase: str
) -> None:
    key = _keygen(tmp_path / f"id_{key_type}", key_type, passphrase)
    info = sftp_server_factory(client_keys=[Path(f"{key}.pub")])
    options = info.options(
        password=None,
        private_key_path=key,
        private_key_passphrase=SecretStr(passphrase) if passphrase else None,
    )
    with SftpSession.connect(options) as session:
        session.check_folders(info.outbox, info.sent)


def test_wrong_passphrase_is_an_auth_error_without_the_passphrase(
    asyncssh_sftp: SftpServerInfo, tmp_path: Path
) -> None:
    key = _keygen(tmp_path / "id_ed25519", "ed25519", "the right one")
    options = asyncssh_sftp.options(
        password=None, private_key_path=key, private_key_passphrase=SecretStr("s3cr3t-wrong")
    )
    with pytest.raises(SftpAuthError, match="wrong passphrase") as refused:
        SftpSession.connect(options)

    assert "s3cr3t-wrong" not in f"{refused.value} {refused.value!r}"


def test_encrypted_key_without_passphrase(asyncssh_sftp: SftpServerInfo, tmp_path: Path) -> None:
    key = _keygen(tmp_path / "id_rsa", "rsa", "secret")
    with pytest.raises(SftpAuthError, match="encrypted"):
        SftpSession.connect(asyncssh_sftp.options(password=None, private_key_path=key))


@pytest.mark.sshd
def test_openssh_password_and_key_login(openssh: SftpServerInfo) -> None:
    with SftpSession.connect(openssh.options()) as session:
        session.check_folders(openssh.outbox, openssh.sent)
    key_options = openssh.options(password=None, private_key_path=openssh.client_key_path)
    with SftpSession.connect(key_options) as session:
        session.check_folders(openssh.outbox, openssh.sent)


@pytest.mark.parametrize("kind", ["asyncssh", OPENSSH])
def test_wrong_password_never_shows_the_password(request: pytest.FixtureRequest, kind: str) -> None:
    info: SftpServerInfo = request.getfixturevalue(f"{kind}_sftp")
    secret = "hunter2-" + info.password[::-1]

    with pytest.raises(SftpAuthError) as refused:
        SftpSession.connect(info.options(password=SecretStr(secret)))

    error = refused.value
    assert secret not in f"{error} {error!r} {error.hint} {error.__cause__!r}"
    assert "refused" in str(error)


# --- unreachable and silent servers ------------------------------------------------------


def test_closed_port_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        info_options = _bare_options(port, tmp_path)
        with pytest.raises(SftpUnreachable, match=f"127.0.0.1:{port}"):
            SftpSession.connect(info_options)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never says a word (no SSH banner)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_server_that_never_speaks_times_out(silent_server: int, tmp_path: Path) -> None:
    options = _bare_options(silent_server, tmp_path)

    with pytest.raises(SftpUnreachable) as failure:
        SftpSession.connect(options)

    assert "\n" not in str(failure.value)
    # Slow to speak is not the same as hanging up at once: no quick retry for this one.
    assert not isinstance(failure.value, SftpDropped)


def test_server_that_stops_answering_mid_operation(sftp_server_factory: Factory) -> None:
    info = sftp_server_factory("hang_on_write")

    with SftpSession.connect(info.options(operation_timeout=1)) as session:
        with pytest.raises(SftpUnreachable, match="lost sftp"):
            publish_on(session, info.outbox, info.sent, rendered())
        # the session is unusable now; the next call says so instead of hanging
        with pytest.raises(SftpUnreachable):
            find_delivered(session, info.outbox, info.sent, rendered())


def _bare_options(port: int, tmp_path: Path) -> SftpOptions:
    return SftpOptions(
        host="127.0.0.1",
        port=port,
        user="erp",
        password=SecretStr("pw"),
        known_hosts=tmp_path / "known_hosts",
        connect_timeout=1,
        operation_timeout=1,
        keepalive_interval=15,
        use_agent=False,
    )


# --- cleanup of our own tmp files ---------------------------------------------------------


def test_list_stale_tmp_lists_only_our_old_tmp_files(asyncssh_sftp: SftpServerInfo) -> None:
    info = asyncssh_sftp
    old = time.time() - 3 * 3600
    names = {
        "ABC-20260101.csv.0123abcd.erp-push.tmp": old,  # ours, old: listed
        "ABC-20260102.csv.89abcdef.erp-push.tmp": time.time(),  # ours, fresh: kept
        "ABC-20260103.csv.tmp": old,  # someone else's tmp
        "ABC-20260104.csv.0123ABCD.erp-push.tmp": old,  # not our (lower-case) pattern
        "ABC-20260105.csv": old,
    }
    for name, mtime in names.items():
        info.write(f"{info.outbox}/{name}", b"x")
        os.utime(info.local(f"{info.outbox}/{name}"), (mtime, mtime))

    with SftpSession.connect(info.options()) as session:
        stale = session.list_stale_tmp(info.outbox, timedelta(hours=1))
        assert [f.path for f in stale] == [f"{info.outbox}/ABC-20260101.csv.0123abcd.erp-push.tmp"]
        assert stale[0].size == 1
        for path in (f"{info.outbox}/ABC-20260103.csv.tmp", f"{info.outbox}/ABC-20260105.csv"):
            with pytest.raises(ValueError, match="refusing"):
                session.remove(path)
        session.remove(stale[0].path)
        session.remove(stale[0].path)  # already gone: fine

    assert info.listdir(info.outbox) == sorted(set(names) - {stale[0].path.rsplit("/", 1)[1]})
    assert TMP_PATTERN.match("X.csv.0123abcd.erp-push.tmp")


class _NoSftpServer(paramiko.ServerInterface):
    """Logs anyone in, then never gets SFTP going: like sshd whose sftp-server hangs."""

    def __init__(self, mode: str, release: threading.Event) -> None:
        self.mode = mode
        self.release = release

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: object, name: str) -> bool:
        if self.mode == "no_reply":
            self.release.wait(60)  # the subsystem request is never answered in time
        return True  # "started", but nothing ever answers the SFTP version exchange


@pytest.mark.parametrize("mode", ["no_reply", "no_version"])
def test_a_server_whose_sftp_never_starts_cannot_hang_the_run(mode: str) -> None:
    host_key = paramiko.Ed25519Key.from_private_key_file(_ed25519_key_file())
    release = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_side: list[paramiko.Transport] = []

    def serve() -> None:
        sock, _ = listener.accept()
        transport = paramiko.Transport(sock)
        transport.add_server_key(host_key)
        server_side.append(transport)
        transport.start_server(server=_NoSftpServer(mode, release))

    threading.Thread(target=serve, daemon=True).start()
    options = SftpOptions(
        host="127.0.0.1", port=port, user="u", password=SecretStr("p"),
        host_key_sha256=fingerprint(host_key), connect_timeout=1, operation_timeout=1,
        keepalive_interval=15, use_agent=False,
    )  # fmt: skip
    outcome: list[BaseException] = []

    def connect() -> None:
        try:
            SftpSession.connect(options).close()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(30)  # a hang fails the test instead of hanging the suite
    release.set()
    for transport in server_side:
        transport.close()
    listener.close()
    assert not worker.is_alive(), "connect hung"
    assert len(outcome) == 1 and isinstance(outcome[0], SftpUnreachable)


def _ed25519_key_file() -> str:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


# --- cost: round trips and requests do not grow with the folders ------------------------


def test_a_fresh_file_costs_four_round_trips_whatever_the_folders_hold(
    sftp_server_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = sftp_server_factory("normal")
    assert info.root is not None and info.requests is not None
    # A year of the ERP's archive in sent/, and a backlog in the outbox.
    for n in range(3000):
        (info.root / "outbox" / "sent" / f"OLD-{n:05d}-20250101.csv").write_bytes(b"x")
    for n in range(300):
        (info.root / "outbox" / f"WAITING-{n:04d}-20260101.csv").write_bytes(b"y")
    round_trips = 0
    real_exchange = SftpSession.exchange

    def counting_exchange(self: SftpSession, what: str) -> Any:
        nonlocal round_trips
        round_trips += 1
        return real_exchange(self, what)

    monkeypatch.setattr(SftpSession, "exchange", counting_exchange)
    with SftpSession.connect(info.options()) as session:
        info.requests.clear()
        round_trips = 0
        for n in range(5):
            file = rendered(body=BODY + str(n).encode(), name=f"NEW{n}-20260101.csv")
            delivery = publish_on(session, info.outbox, info.sent, file)
            assert not delivery.already_delivered

    # Stat the names (8 days x 2 folders) + create the tmp; write + close; re-check the
    # name in sent/ (a link never replaces the outbox's); link + remove the tmp. Never a
    # listing.
    assert round_trips == 5 * 4
    assert info.requests["list"] == 0
    per_file = 2 * (publishing.LOOKBACK_DAYS + 1) + 1 + 2 + 1 + 2
    assert sum(info.requests.values()) == 5 * per_file


@pytest.mark.parametrize(
    ("hardlink", "sent", "rechecks", "round_trips"),
    [
        (True, True, ["sent"], 4),  # a link cannot replace the outbox's name
        (True, False, [], 3),  # ... so without sent/ there is nothing to re-check
        (False, True, ["outbox", "sent"], 4),  # a rename may replace it: ask
        (False, False, ["outbox"], 4),
    ],
    ids=["link+sent", "link", "rename+sent", "rename"],
)
def test_the_name_is_rechecked_only_where_publishing_could_replace_a_file(
    sftp_server_factory: Factory,
    monkeypatch: pytest.MonkeyPatch,
    hardlink: bool,
    sent: bool,
    rechecks: list[str],
    round_trips: int,
) -> None:
    """Between the look and the publish someone may take the name. A rename may replace
    what is there, so both folders are asked again; a hardlink fails on a taken name
    (and the link step then looks), so only sent/, where the ERP moves files, is."""
    info = sftp_server_factory("normal")
    file = replace(rendered(name="ABC-20260110.csv"), created_on=date(2026, 1, 10))
    exchanges: list[str] = []
    real_exchange = SftpSession.exchange

    def recording_exchange(self: SftpSession, what: str) -> Any:
        exchanges.append(what)
        return real_exchange(self, what)

    monkeypatch.setattr(SftpSession, "exchange", recording_exchange)
    stats: list[str] = []
    real_stat = Exchange.stat

    def recording_stat(self: Exchange, path: str) -> Any:
        stats.append(path)
        return real_stat(self, path)

    with SftpSession.connect(info.options()) as session:
        monkeypatch.setattr(Exchange, "stat", recording_stat)
        drop = Drop(info.outbox, info.sent if sent else None)
        # Without links: as the run knows once a link was refused (the server offers them).
        traits = publishing.ServerTraits(hardlink_broken=not hardlink)
        delivery = publishing.publish(session, drop, file, traits=traits)

    assert delivery == Delivery(f"{info.outbox}/ABC-20260110.csv", already_delivered=False)
    assert len(exchanges) == round_trips
    folders = 2 if sent else 1
    looked = stats[: 2 * folders]  # today's and the day before's names, in each folder
    assert {posixpath.dirname(path) for path in looked} == set(
        [info.outbox, info.sent] if sent else [info.outbox]
    )
    where = {info.outbox: "outbox", info.sent: "sent"}
    assert [where[posixpath.dirname(path)] for path in stats[2 * folders :]] == rechecks
    assert info.files() == {f"{info.outbox}/ABC-20260110.csv": BODY}


def test_an_invoice_is_looked_for_no_further_back_than_the_day_before_it_was_created(
    sftp_server_factory: Factory,
) -> None:
    """A file cannot be older than its invoice: publish looks back to the day before the
    invoice's creation (a day's slack for the clocks), not LOOKBACK_DAYS. An invoice
    created today costs 4 stats instead of 16, whatever LOOKBACK_DAYS says."""
    info = sftp_server_factory("normal")
    assert info.requests is not None
    file = replace(rendered(name="ABC-20260110.csv"), created_on=date(2026, 1, 9))
    assert publishing.day_names(file.file_name, not_before=date(2026, 1, 8)) == [
        "ABC-20260110.csv",
        "ABC-20260109.csv",
        "ABC-20260108.csv",
    ]
    assert publishing.day_names(file.file_name, not_before=date(2026, 1, 11)) == [
        "ABC-20260110.csv"  # a creation date ahead of ours (clocks): today's name still
    ]

    info.write(f"{info.sent}/ABC-20260108.csv", BODY)  # the day before creation: looked at
    assert publish(info, file) == Delivery(
        remote_path=f"{info.sent}/ABC-20260108.csv", already_delivered=True
    )

    info.clear()
    info.write(f"{info.sent}/ABC-20260107.csv", BODY)  # before that: cannot be this invoice's
    info.requests.clear()
    delivery = publish(info, file)
    assert delivery == Delivery(
        remote_path=f"{info.outbox}/ABC-20260110.csv", already_delivered=False
    )
    # 3 days (the 10th, 9th, 8th) x 2 folders + create; write + close; sent/'s stat; link
    # + remove
    assert sum(info.requests.values()) == 2 * 3 + 1 + 2 + 1 + 2


def test_an_identical_file_is_looked_for_up_to_lookback_days_back(server: SftpServerInfo) -> None:
    """The bound of the "identical file on any day" search (README, limits): a file dated
    LOOKBACK_DAYS before the push proves delivery; one a day older is not looked for."""
    days = publishing.LOOKBACK_DAYS
    assert days < 9  # the dates below stay within January
    today = "20260110"
    file = rendered(name=f"ABC-{today}.csv")
    seen_day = f"202601{10 - days:02d}"
    server.write(f"{server.sent}/ABC-{seen_day}.csv", BODY)

    assert publish(server, file) == Delivery(
        remote_path=f"{server.sent}/ABC-{seen_day}.csv", already_delivered=True
    )

    server.clear()
    unseen_day = f"202601{10 - days - 1:02d}"
    server.write(f"{server.sent}/ABC-{unseen_day}.csv", BODY)

    delivery = publish(server, file)

    assert delivery == Delivery(
        remote_path=f"{server.outbox}/{file.file_name}", already_delivered=False
    )


@pytest.mark.parametrize("server_name", ["openssh", "asyncssh_sftp", "proftpd_sftp"])
def test_one_exchange_larger_than_the_ssh_window_does_not_wait_on_itself(
    server_name: str, request: pytest.FixtureRequest
) -> None:
    """An exchange's packets are held back and sent together (the cork); a group bigger
    than the channel's send window (2 MB on OpenSSH) must still go out, since the server
    opens the window only for data it has received, not for data we still hold."""
    info: SftpServerInfo = request.getfixturevalue(server_name)
    body = os.urandom(5 * 1024 * 1024)
    path = f"{info.outbox}/big.bin"
    with SftpSession.connect(info.options(operation_timeout=10)) as session:
        with session.exchange("creating") as batch:
            created = batch.create(path)
        with session.exchange("writing a file bigger than the window") as batch:
            writes = batch.write(created.value, body, path)
            batch.close(created.value, path)
    assert all(w.ok for w in writes)
    assert hashlib.sha256(info.read(path)).digest() == hashlib.sha256(body).digest()
