"""A plain paramiko client that shows what an SFTP server really answers.

For tests that pin down a server's behaviour independently of erp-push's own client:
paramiko drops the extension list of the server's VERSION packet and turns most status
replies into a bare IOError; ``ProbeClient`` keeps both, so a test can assert e.g. "status
4, message 'Failure'" instead of guessing from text.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_INIT, CMD_VERSION

if TYPE_CHECKING:
    from tests.sftp_servers.fixtures import SftpServerInfo

FX_OK = 0
FX_EOF = 1
FX_NO_SUCH_FILE = 2
FX_PERMISSION_DENIED = 3
FX_FAILURE = 4
FX_OP_UNSUPPORTED = 8
FX_FILE_ALREADY_EXISTS = 11  # SFTP v5+; ProFTPD sends it to v3 clients too


class SftpStatus(OSError):
    """A non-OK status reply, with the protocol's code and the server's own message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Vfs:
    """A ``statvfs@openssh.com`` reply (fields as in statvfs(3))."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int

    @property
    def read_only(self) -> bool:
        return bool(self.flag & 0x1)  # SSH_FXE_STATVFS_ST_RDONLY


class ProbeClient(paramiko.SFTPClient):
    extensions: dict[str, bytes]

    if TYPE_CHECKING:
        # paramiko's packet layer, which types-paramiko leaves out as private.
        def _send_packet(self, t: int, packet: paramiko.Message) -> None: ...
        def _read_packet(self) -> tuple[int, bytes]: ...
        def _request(self, t: int, *args: Any) -> tuple[int, paramiko.Message]: ...

    def _send_version(self) -> int:
        message = paramiko.Message()
        message.add_int(3)
        self._send_packet(CMD_INIT, message)
        kind, data = self._read_packet()
        if kind != CMD_VERSION:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        reply = paramiko.Message(data)
        version: int = reply.get_int()
        self.extensions = {}
        while reply.get_remainder():
            name = reply.get_text()
            self.extensions[name] = reply.get_string()
        return version

    def _convert_status(self, msg: Any) -> None:
        code = msg.get_int()
        text = msg.get_text()
        if code == FX_EOF:
            raise EOFError(text)  # paramiko's listdir and read loops stop on it
        if code != FX_OK:
            raise SftpStatus(code, text)

    def extended(self, name: str, *args: Any) -> paramiko.Message:
        """Send an extended request; returns paramiko's reply message (or raises)."""
        _kind, msg = self._request(CMD_EXTENDED, name, *args)
        return msg

    def hardlink(self, oldpath: str, newpath: str) -> None:
        self.extended("hardlink@openssh.com", oldpath, newpath)

    def statvfs(self, path: str) -> Vfs:
        msg = self.extended("statvfs@openssh.com", path)
        return Vfs(*struct.unpack(">11Q", msg.get_bytes(88)))

    def write_file(self, path: str, data: bytes, mode: str = "wx") -> None:
        with self.open(path, mode) as handle:
            handle.write(data)


def status_of(call: Callable[..., Any], *args: Any) -> tuple[int, str]:
    """``(code, message)`` of the reply to ``call(*args)``; ``(0, "OK")`` on success."""
    try:
        call(*args)
    except SftpStatus as exc:
        return exc.code, exc.message
    return FX_OK, "OK"


def open_transport(server: SftpServerInfo, *, key: bool = False) -> paramiko.Transport:
    """A logged-in SSH connection; the host key is checked against the fixture's."""
    from tests.sftp_servers.fixtures import sha256_fingerprint

    transport = paramiko.Transport(socket.create_connection((server.host, server.port), 5))
    try:
        transport.start_client(timeout=5)
        seen = sha256_fingerprint(transport.get_remote_server_key().asbytes())
        if seen != server.host_key_sha256:
            raise paramiko.SSHException(f"host key {seen} is not {server.host_key_sha256}")
        if key:
            assert server.client_key_path is not None
            pkey = paramiko.Ed25519Key.from_private_key_file(str(server.client_key_path))
            transport.auth_publickey(server.user, pkey)
        else:
            transport.auth_password(server.user, server.password)
    except BaseException:
        transport.close()
        raise
    return transport


def open_client(transport: paramiko.Transport) -> ProbeClient:
    client = ProbeClient.from_transport(transport)
    if client is None:
        raise paramiko.SSHException("the server refused an SFTP channel")
    return client


@contextlib.contextmanager
def connect(server: SftpServerInfo, *, key: bool = False) -> Iterator[ProbeClient]:
    """One SFTP session on its own connection, closed at the end."""
    transport = open_transport(server, key=key)
    try:
        yield open_client(transport)
    finally:
        transport.close()
