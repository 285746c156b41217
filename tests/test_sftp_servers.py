"""The test servers themselves: each fact other tests rely on, checked with plain paramiko.

erp-push's tests assume things about real servers (ProFTPD drops the connection on an
11th channel, OpenSSH says only "Failure" on a full disk...). If a package update changes
one of them, these tests say which, instead of a push test failing for an obscure reason.
The asyncssh quirks that imitate a real server are checked against the same facts.
"""

from __future__ import annotations

from collections.abc import Callable

import paramiko
import pytest

from tests.sftp_servers import probe
from tests.sftp_servers.fixtures import SftpServerInfo
from tests.sftp_servers.probe import (
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    status_of,
)

Factory = Callable[..., SftpServerInfo]
DENIED = (FX_PERMISSION_DENIED, "Permission denied")
FAILURE = (FX_FAILURE, "Failure")  # OpenSSH's whole answer for ENOSPC, EROFS and more
OK = (FX_OK, "OK")


def open_channels(transport: paramiko.Transport, count: int) -> list[probe.ProbeClient]:
    return [probe.open_client(transport) for _ in range(count)]


def assert_one_channel_too_many_drops_the_connection(
    server: SftpServerInfo, limit: int = 10
) -> None:
    transport = probe.open_transport(server)
    try:
        clients = open_channels(transport, limit)
        assert clients[0].listdir("/outbox") == ["sent"]
        with pytest.raises(paramiko.ChannelException):
            probe.open_client(transport)
        transport.join(timeout=5)  # the server's disconnect ends paramiko's thread
        assert not transport.is_active()
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            clients[0].listdir("/outbox")  # every channel went down with it
    finally:
        transport.close()


def assert_a_closed_channel_frees_its_slot(server: SftpServerInfo, limit: int) -> None:
    transport = probe.open_transport(server)
    try:
        clients = open_channels(transport, limit)
        clients[-1].close()
        again = probe.open_client(transport)
        assert again.listdir("/outbox") == ["sent"]
        assert transport.is_active()
    finally:
        transport.close()


# --- ProFTPD mod_sftp ---------------------------------------------------------------------


def test_proftpd_logs_in_by_password_or_key_and_advertises_openssh_extensions(
    proftpd_sftp: SftpServerInfo,
) -> None:
    with probe.connect(proftpd_sftp) as sftp:
        for name in ("hardlink", "posix-rename", "fsync", "statvfs"):
            assert f"{name}@openssh.com" in sftp.extensions
        sftp.write_file("/outbox/a.csv", b"a")
    with probe.connect(proftpd_sftp, key=True) as sftp:
        assert sorted(sftp.listdir("/outbox")) == ["a.csv", "sent"]
    assert proftpd_sftp.read("/outbox/a.csv") == b"a"


def test_proftpd_plain_rename_never_overwrites_but_posix_rename_does(
    proftpd_sftp: SftpServerInfo,
) -> None:
    with probe.connect(proftpd_sftp) as sftp:
        sftp.write_file("/outbox/a", b"new")
        sftp.write_file("/outbox/b", b"old")
        # A v5 status code sent to a v3 client: not "Failure" as OpenSSH says.
        assert status_of(sftp.rename, "/outbox/a", "/outbox/b") == (
            FX_FILE_ALREADY_EXISTS,
            "File already exists",
        )
        assert status_of(sftp.hardlink, "/outbox/a", "/outbox/b") == (
            FX_FAILURE,
            "File already exists",
        )
        assert proftpd_sftp.read("/outbox/b") == b"old"
        assert status_of(sftp.posix_rename, "/outbox/a", "/outbox/b") == OK
    assert proftpd_sftp.files() == {"/outbox/b": b"new"}


def test_proftpd_never_reopens_an_existing_file_for_writing(
    proftpd_sftp: SftpServerInfo,
) -> None:
    """AllowOverwrite is off by default: truncating, and even an exclusive create of an
    existing name, is "Permission denied" (OpenSSH answers the latter with "Failure")."""
    proftpd_sftp.write("/outbox/a", b"old")
    with probe.connect(proftpd_sftp) as sftp:
        assert status_of(sftp.write_file, "/outbox/a", b"x", "w") == DENIED
        assert status_of(sftp.write_file, "/outbox/a", b"x", "wx") == DENIED
    assert proftpd_sftp.read("/outbox/a") == b"old"


def test_proftpd_drops_the_whole_connection_on_the_11th_channel(
    proftpd_sftp: SftpServerInfo,
) -> None:
    assert_one_channel_too_many_drops_the_connection(proftpd_sftp)


def test_proftpd_counts_open_channels_only(proftpd_sftp: SftpServerInfo) -> None:
    assert_a_closed_channel_frees_its_slot(proftpd_sftp, limit=10)


def test_proftpd_upload_only_forbids_delete_but_not_rename_or_link(
    proftpd_factory: Factory,
) -> None:
    server = proftpd_factory("upload_only")
    with probe.connect(server) as sftp:
        sftp.write_file("/outbox/a.tmp", b"a")
        assert status_of(sftp.hardlink, "/outbox/a.tmp", "/outbox/a.csv") == OK
        assert status_of(sftp.remove, "/outbox/a.tmp") == DENIED
        assert status_of(sftp.rename, "/outbox/a.tmp", "/outbox/sent/a.csv") == OK
        assert status_of(sftp.remove, "/outbox/sent/a.csv") == DENIED
    assert server.files() == {"/outbox/a.csv": b"a", "/outbox/sent/a.csv": b"a"}


def test_proftpd_no_rename_forbids_both_renames_but_not_hardlink(
    proftpd_factory: Factory,
) -> None:
    server = proftpd_factory("no_rename")
    with probe.connect(server) as sftp:
        sftp.write_file("/outbox/a.tmp", b"a")
        assert status_of(sftp.rename, "/outbox/a.tmp", "/outbox/a.csv") == DENIED
        assert status_of(sftp.posix_rename, "/outbox/a.tmp", "/outbox/a.csv") == DENIED
        assert status_of(sftp.hardlink, "/outbox/a.tmp", "/outbox/a.csv") == OK
        assert status_of(sftp.remove, "/outbox/a.tmp") == OK
    assert server.files() == {"/outbox/a.csv": b"a"}


def test_proftpd_no_hardlink_neither_advertises_nor_serves_it(proftpd_factory: Factory) -> None:
    server = proftpd_factory("no_hardlink")
    with probe.connect(server) as sftp:
        assert "hardlink@openssh.com" not in sftp.extensions
        assert "posix-rename@openssh.com" in sftp.extensions
        sftp.write_file("/outbox/a.tmp", b"a")
        assert status_of(sftp.hardlink, "/outbox/a.tmp", "/outbox/a.csv") == (
            FX_OP_UNSUPPORTED,
            "Unsupported operation",
        )
        assert status_of(sftp.rename, "/outbox/a.tmp", "/outbox/a.csv") == OK


# --- asyncssh quirks that imitate them ------------------------------------------------------


def test_asyncssh_channel_limit_drops_the_connection_like_proftpd(
    sftp_server_factory: Factory,
) -> None:
    assert_one_channel_too_many_drops_the_connection(sftp_server_factory("channel_limit"))


def test_asyncssh_channel_limit_is_configurable_and_counts_open_channels(
    sftp_server_factory: Factory,
) -> None:
    server = sftp_server_factory("channel_limit", max_channels=3)
    assert_a_closed_channel_frees_its_slot(server, limit=3)
    assert_one_channel_too_many_drops_the_connection(server, limit=3)


def test_asyncssh_without_the_quirk_has_no_channel_limit(asyncssh_sftp: SftpServerInfo) -> None:
    transport = probe.open_transport(asyncssh_sftp)
    try:
        clients = open_channels(transport, 12)
        assert clients[-1].listdir("/outbox") == ["sent"]
    finally:
        transport.close()


def test_asyncssh_upload_only_forbids_delete_in_the_outbox(sftp_server_factory: Factory) -> None:
    server = sftp_server_factory("upload_only")
    with probe.connect(server) as sftp:
        sftp.write_file("/outbox/a.tmp", b"a")
        assert status_of(sftp.hardlink, "/outbox/a.tmp", "/outbox/a.csv") == OK
        assert status_of(sftp.remove, "/outbox/a.tmp") == DENIED
        assert status_of(sftp.rename, "/outbox/a.tmp", "/outbox/sent/a.csv") == OK
        assert status_of(sftp.remove, "/outbox/sent/a.csv") == DENIED
    assert server.files() == {"/outbox/a.csv": b"a", "/outbox/sent/a.csv": b"a"}


def test_asyncssh_disk_full_generic_says_only_failure_and_statvfs_shows_no_room(
    sftp_server_factory: Factory,
) -> None:
    server = sftp_server_factory("disk_full_generic", disk_full_after=5000)
    with probe.connect(server) as sftp:
        assert sftp.extensions["statvfs@openssh.com"] == b"2"
        assert sftp.statvfs("/outbox").bavail == 1  # 5000 bytes: one whole 4 KiB block
        assert status_of(sftp.write_file, "/outbox/a", b"a" * 4000) == OK
        assert status_of(sftp.write_file, "/outbox/b", b"b" * 4000) == FAILURE
        vfs = sftp.statvfs("/outbox")
        assert (vfs.bfree, vfs.bavail, vfs.read_only) == (0, 0, False)
        assert status_of(sftp.write_file, "/outbox/c", b"c") == FAILURE
        assert sftp.open("/outbox/a").read() == b"a" * 4000
    # As on a real disk: the failed files exist, cut where the space ran out.
    assert server.files() == {"/outbox/a": b"a" * 4000, "/outbox/b": b"b" * 1000, "/outbox/c": b""}


def test_asyncssh_disk_full_generic_from_the_first_byte(sftp_server_factory: Factory) -> None:
    server = sftp_server_factory("disk_full_generic", disk_full_after=0)
    with probe.connect(server) as sftp:
        assert status_of(sftp.write_file, "/outbox/a", b"a") == FAILURE
        assert sftp.statvfs("/outbox").bavail == 0


def test_asyncssh_read_only_generic_fails_every_change_with_failure(
    sftp_server_factory: Factory,
) -> None:
    server = sftp_server_factory("read_only_generic")
    server.write("/outbox/old.csv", b"old")
    with probe.connect(server) as sftp:
        assert status_of(sftp.write_file, "/outbox/a", b"a") == FAILURE
        assert status_of(sftp.remove, "/outbox/old.csv") == FAILURE
        assert status_of(sftp.rename, "/outbox/old.csv", "/outbox/sent/old.csv") == FAILURE
        assert status_of(sftp.hardlink, "/outbox/old.csv", "/outbox/new.csv") == FAILURE
        assert status_of(sftp.mkdir, "/outbox/d") == FAILURE
        assert sftp.open("/outbox/old.csv").read() == b"old"
        assert sftp.statvfs("/outbox").read_only
    assert server.files() == {"/outbox/old.csv": b"old"}


# --- OpenSSH on a really full or read-only filesystem ----------------------------------------


@pytest.mark.sshd
def test_openssh_full_disk_says_only_failure_and_statvfs_shows_no_room(
    openssh_mounted_outbox: Factory,
) -> None:
    server = openssh_mounted_outbox("full", size="16k")  # 4 pages of 4 KiB
    outbox = server.outbox
    with probe.connect(server) as sftp:
        assert sftp.extensions["statvfs@openssh.com"] == b"2"
        before = sftp.statvfs(outbox)
        assert (before.blocks, before.bavail, before.read_only) == (4, 4, False)
        for n in range(4):  # each small file takes a whole page
            assert status_of(sftp.write_file, f"{outbox}/f{n}", b"x" * 3000) == OK
        assert status_of(sftp.write_file, f"{outbox}/f4", b"x" * 3000) == FAILURE
        assert sftp.statvfs(outbox).bavail == 0
    # ENOSPC comes at the write, not the open: an empty file is left behind.
    assert server.read(f"{outbox}/f4") == b""


@pytest.mark.sshd
def test_openssh_full_disk_cuts_a_write_that_only_partly_fits(
    openssh_mounted_outbox: Factory,
) -> None:
    server = openssh_mounted_outbox("full", size="16k")
    with probe.connect(server) as sftp:
        assert status_of(sftp.write_file, f"{server.outbox}/big", b"x" * 20000) == FAILURE
    assert server.read(f"{server.outbox}/big") == b"x" * 16384


@pytest.mark.sshd
def test_openssh_read_only_filesystem_says_only_failure(
    openssh_mounted_outbox: Factory,
) -> None:
    server = openssh_mounted_outbox("read_only")
    outbox = server.outbox
    with probe.connect(server) as sftp:
        assert sftp.statvfs(outbox).read_only
        assert status_of(sftp.write_file, f"{outbox}/a", b"a") == FAILURE
        assert status_of(sftp.mkdir, f"{outbox}/d") == FAILURE
        assert status_of(sftp.rename, f"{outbox}/sent", f"{outbox}/s2") == FAILURE
        assert sorted(sftp.listdir(outbox)) == ["sent"]
