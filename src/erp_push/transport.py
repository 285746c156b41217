"""The SFTP connection: verified connect, login, and the file operations publishing uses.

This module knows how to talk to the server; ``publish.py`` knows what to say. It
connects (host key always verified before login, timeouts on every step), opens extra
SFTP channels on one login for parallel work, and offers the primitive operations the
exactly-once publishing rules are built from: stat, exclusive create, write, link,
rename, remove, read, statvfs.

Operations can be sent back to back and their replies read together
(``SftpSession.exchange``): one network round trip for a whole group, which is what
keeps a publish at a few round trips however far away the server is. Every reply keeps
the server's SFTP status code (paramiko throws it away), so callers decide from the
protocol, never from message text.

Paramiko is synchronous and a session is not meant to be shared between threads: run one
``SftpSession`` per worker when publishing concurrently.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_HANDLE,
    CMD_INIT,
    CMD_OPEN,
    CMD_READ,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_STAT,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_EOF,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_PERMISSION_DENIED,
    int64,
)
from pydantic import SecretStr

from erp_push import known_hosts
from erp_push.errors import (
    ErpPushError,
    FailureCode,
    HostKeyMismatch,
    HostKeyRevoked,
    HostKeyUnknown,
    RemoteFileMissing,
    SftpAuthError,
    SftpDropped,
    SftpFolderError,
    SftpOperationError,
    SftpUnreachable,
)
from erp_push.text import shorten

log = logging.getLogger(__name__)

# Our temporary files, and only ours: "<final name>.<8 hex>.erp-push.tmp".
TMP_PATTERN = re.compile(r"^.+\.[0-9a-f]{8}\.erp-push\.tmp$")
_MESSAGE_LIMIT = 500
# Files are written in requests of this size (paramiko's own; every server takes it).
_WRITE_CHUNK = 32768


class Status:
    """SFTP status codes. v3 defines 0-8; servers also send v5/v6 codes to v3 clients
    (ProFTPD answers 11 for an existing rename target), so those are named too."""

    OK = 0
    EOF = 1
    NO_SUCH_FILE = 2
    PERMISSION_DENIED = 3
    FAILURE = 4  # OpenSSH's answer for ENOSPC, EROFS, EEXIST on rename, ...
    BAD_MESSAGE = 5
    NO_CONNECTION = 6
    CONNECTION_LOST = 7
    OP_UNSUPPORTED = 8
    FILE_ALREADY_EXISTS = 11
    WRITE_PROTECT = 12
    NO_SPACE_ON_FILESYSTEM = 14
    QUOTA_EXCEEDED = 15


@dataclass(frozen=True, kw_only=True)
class SftpOptions:
    """Everything needed to reach the drop folder. Secrets stay ``SecretStr`` until auth.

    Built by ``Settings.sftp_options()``, which owns every default: none is restated here.
    The ``None`` fields are a login method or host-key check that is not used.
    """

    host: str
    port: int
    user: str
    connect_timeout: float  # TCP connect, SSH banner, handshake, auth
    operation_timeout: float  # each SFTP request; a hung server cannot hang cron
    keepalive_interval: int  # seconds; 0 turns it off
    use_agent: bool  # try the keys of a running ssh-agent (SSH_AUTH_SOCK) first
    password: SecretStr | None = None
    private_key_path: Path | None = None
    private_key_passphrase: SecretStr | None = None
    known_hosts: Path | None = None  # OpenSSH known_hosts file (plain or hashed entries)
    host_key_sha256: str | None = None  # "SHA256:<base64>", as `ssh-keygen -lf` prints

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    mtime: datetime  # UTC


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key, e.g. ``SHA256:abc...`` (no padding)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _reason(exc: BaseException) -> str:
    """A short human reason from a socket/SSH exception (these never carry secrets)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _dropped_before_banner(exc: BaseException) -> bool:
    """Did the server end the connection before saying who it is (OpenSSH beyond its
    MaxStartups: "Exceeded MaxStartups", then close)? Not a server that is merely slow
    to answer: paramiko words both alike, the cause tells them apart."""
    return (
        isinstance(exc, paramiko.SSHException)
        and str(exc).startswith("Error reading SSH protocol banner")
        and isinstance(exc.__context__, EOFError | ConnectionResetError | BrokenPipeError)
    )


# --- paramiko's SFTP client, with the two things it throws away ------------------------


class _StatusError(OSError):
    """An SFTP status reply that keeps the protocol's status code (paramiko drops it)."""

    def __init__(self, code: int, err: int | None, text: str) -> None:
        if err is None:
            super().__init__(text)
        else:
            super().__init__(err, text)
        self.sftp_code = code


class _SftpClient(paramiko.SFTPClient):
    """paramiko's client, keeping the server's extension list and status codes.

    paramiko reads the server's VERSION packet but drops the extensions it lists, so
    there is no public way to learn whether ``hardlink@openssh.com`` is offered; and it
    turns every status but two into a bare IOError. Both overrides are small copies of
    paramiko's own code (stable since paramiko 1.x) that keep what we need.
    """

    extensions: dict[bytes, bytes]

    if TYPE_CHECKING:
        # paramiko's private helpers that this client and Exchange build on; the stubs
        # cover only the public API. Signatures as in paramiko's sftp.py/sftp_client.py.
        def _send_packet(self, t: int, packet: paramiko.Message) -> None: ...
        def _read_packet(self) -> tuple[int, bytes]: ...
        def _async_request(self, fileobj: object, t: int, *args: object) -> int: ...
        def _read_response(
            self, waitfor: int | None = None
        ) -> tuple[int, paramiko.Message] | tuple[None, None]: ...

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
            name = reply.get_string()
            self.extensions[name] = reply.get_string()
        return version

    def _convert_status(self, msg: paramiko.Message) -> None:
        code = msg.get_int()
        text = msg.get_text()
        if code == SFTP_OK:
            return
        if code == SFTP_EOF:
            raise EOFError(text)
        err = {SFTP_NO_SUCH_FILE: errno.ENOENT, SFTP_PERMISSION_DENIED: errno.EACCES}.get(code)
        raise _StatusError(code, err, text)

    @property
    def has_statvfs(self) -> bool:
        return b"statvfs@openssh.com" in self.extensions

    @property
    def has_hardlink(self) -> bool:
        return self.extensions.get(b"hardlink@openssh.com") == b"1"


# --- connecting -----------------------------------------------------------------------


def _verify_host_key(
    options: SftpOptions, server_key: paramiko.PKey, known: known_hosts.HostKeys
) -> None:
    """Accept the key only if a configured source vouches for it and none contradicts it."""
    name = known_hosts.host_name(options.host, options.port)
    seen = f"{server_key.get_name()} {fingerprint(server_key)}"
    pin = options.host_key_sha256
    revoked = known.revocation(server_key.asbytes())
    if revoked is not None:
        # Checked first: a revoked key stays refused whatever else vouches for it.
        raise HostKeyRevoked(
            f"host key of {options.address} is revoked: the server presented {seen}, which "
            f"line {revoked.line} of {options.known_hosts} marks @revoked. Do not connect "
            f"until the server's administrators have replaced the key",
            fingerprint=fingerprint(server_key),
        )
    if pin is not None and pin.strip().removeprefix("SHA256:").rstrip("=") != fingerprint(
        server_key
    ).removeprefix("SHA256:"):
        raise HostKeyMismatch(
            f"host key of {options.address} does not match sftp_host_key_sha256 ({pin}): "
            f"the server presented {seen}. If the server's key really changed, set "
            f"sftp_host_key_sha256 to {fingerprint(server_key)}",
            fingerprint=fingerprint(server_key),
        )
    if known.trusted:
        if known.trusts(server_key.asbytes()):
            return
        raise HostKeyMismatch(
            f"host key of {options.address} differs from the one in {options.known_hosts} "
            f"(possible interception): the server presented {seen}. If the change is "
            f"expected, replace the '{name}' line (ssh-keyscan -p {options.port} "
            f"{options.host}) after comparing the fingerprint",
            fingerprint=fingerprint(server_key),
        )
    if pin is not None:
        return
    raise HostKeyUnknown(
        f"host key of {options.address} is not trusted: the server presented {seen}. "
        f"To trust it, run `ssh-keyscan -p {options.port} {options.host} >> "
        f"{options.known_hosts or 'KNOWN_HOSTS'}` and compare the fingerprint, or set "
        f"sftp_host_key_sha256 to {fingerprint(server_key)}",
        fingerprint=fingerprint(server_key),
    )


_KEY_CLASSES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def _load_private_key(path: Path, passphrase: SecretStr | None) -> paramiko.PKey:
    """Try each key type paramiko knows. Messages name the file, never the passphrase."""
    secret = passphrase.get_secret_value() if passphrase is not None else None
    problems: list[str] = []
    for key_class in _KEY_CLASSES:
        try:
            return key_class.from_private_key_file(str(path), password=secret)
        except paramiko.PasswordRequiredException:
            raise SftpAuthError(
                f"private key {path} is encrypted: set sftp_private_key_passphrase"
            ) from None
        except paramiko.SSHException as exc:
            problems.append(str(exc))
        except OSError as exc:
            raise SftpAuthError(f"cannot read private key {path}: {_reason(exc)}") from None
    if secret is not None and any("checkints" in p or "Bad password" in p for p in problems):
        raise SftpAuthError(f"cannot decrypt private key {path}: wrong passphrase")
    raise SftpAuthError(f"{path} is not a readable Ed25519, ECDSA or RSA private key")


def _agent_login(ssh: paramiko.Transport, options: SftpOptions) -> str | None:
    """Log in with the first key of the running ssh-agent the server accepts, as OpenSSH
    does; None when there is no agent or it holds no key the server takes (the other
    configured methods are tried next). The agent signs; no key ever leaves it."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        log.debug("sftp_use_agent is set, but SSH_AUTH_SOCK is not: no ssh-agent to ask")
        return None
    try:
        agent = paramiko.Agent()
    except (OSError, paramiko.SSHException) as exc:
        log.warning("cannot talk to the ssh-agent: %s", _reason(exc))
        return None
    try:
        keys = agent.get_keys()
        if not keys:
            log.debug("the ssh-agent holds no keys (or SSH_AUTH_SOCK names no live agent)")
        for key in keys:
            try:
                ssh.auth_publickey(options.user, key)
            except paramiko.BadAuthenticationType:
                return None  # the server takes no keys at all: let the password try
            except paramiko.AuthenticationException:
                continue
            return f"ssh-agent key {key.get_name()} {fingerprint(key)}"
        return None
    finally:
        agent.close()


def _authenticate(ssh: paramiko.Transport, options: SftpOptions) -> str:
    """Log in; returns how (``password``, ``key PATH``, ``ssh-agent key ...``)."""
    refused = f"login to {options.address} as {options.user!r} refused"
    try:
        if options.use_agent and (used := _agent_login(ssh, options)) is not None:
            return used
        if options.private_key_path is not None:
            key = _load_private_key(options.private_key_path, options.private_key_passphrase)
            try:
                ssh.auth_publickey(options.user, key)
                return f"key {options.private_key_path}"
            except paramiko.AuthenticationException:
                if options.password is None:
                    raise
                log.debug("key login refused by %s; trying the password", options.address)
        if options.password is None:
            if options.use_agent:
                raise SftpAuthError(
                    f"{refused}: the ssh-agent offered no key the server accepts "
                    f"({_agent_state()}), and no password or private key is configured"
                )
            raise SftpAuthError(f"{refused}: no password or private key configured")
        ssh.auth_password(options.user, options.password.get_secret_value())
        return "password"
    except paramiko.BadAuthenticationType as exc:
        allowed = ", ".join(exc.allowed_types) or "none"
        raise SftpAuthError(f"{refused}: the server only allows {allowed}") from None
    except paramiko.AuthenticationException:
        raise SftpAuthError(f"{refused}: wrong user, password or key") from None


def _agent_state() -> str:
    return "SSH_AUTH_SOCK is set" if os.environ.get("SSH_AUTH_SOCK") else "SSH_AUTH_SOCK is not set"


def _open_sftp(ssh: paramiko.Transport, options: SftpOptions) -> _SftpClient:
    """Start the SFTP subsystem on a new channel, within ``connect_timeout``.

    paramiko waits up to an hour for the channel and without any limit for the subsystem
    to start: a server that logs us in but whose sftp-server hangs (a stuck mount) would
    hang the run, and cron's next runs behind it. A timer closes the channel at the
    deadline, which wakes paramiko's wait with an error instead.
    """
    channel = ssh.open_session(timeout=options.connect_timeout)
    if channel is None:
        raise paramiko.SSHException("the server refused an SFTP channel")
    channel.settimeout(options.connect_timeout)  # the version exchange reads with this

    def give_up() -> None:
        # Runs in the timer's thread: a connection that died meanwhile must not raise there.
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            channel.close()

    deadline = threading.Timer(options.connect_timeout, give_up)
    deadline.daemon = True
    deadline.start()
    try:
        channel.invoke_subsystem("sftp")
        sftp = _SftpClient(channel)
    finally:
        deadline.cancel()
    channel.settimeout(options.operation_timeout)
    return sftp


def _open_ssh(options: SftpOptions) -> paramiko.Transport:
    """The SSH connection (paramiko's ``Transport``, named ``ssh`` throughout), not yet
    started: TCP connected, every wait of the handshake bounded."""
    try:
        sock = socket.create_connection(
            (options.host, options.port), timeout=options.connect_timeout
        )
    except OSError as exc:
        raise SftpUnreachable(f"cannot reach sftp {options.address}: {_reason(exc)}") from None
    # SFTP is small request/reply packets, several channels' worth on one connection:
    # Nagle's algorithm would hold each one back until the previous is acknowledged.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ssh = paramiko.Transport(_CorkableSocket(sock))  # type: ignore[arg-type]  # socket-like
    # Without these a server that accepts TCP but never speaks would block us forever.
    ssh.banner_timeout = options.connect_timeout
    ssh.handshake_timeout = options.connect_timeout
    ssh.auth_timeout = options.connect_timeout
    return ssh


class _CorkableSocket:
    """The SSH connection's socket, which can hold packets back and send them as one.

    Each SFTP request is its own SSH packet and, with TCP_NODELAY, its own send and TCP
    segment: on a busy run that is most of the client's CPU (a send, and a wakeup of the
    server, per packet). While an exchange is corked, paramiko's packets for this
    connection are kept here and leave in one ``send`` when it is uncorked.

    Not the kernel's TCP_CORK: uncorking that with ``setsockopt`` pushes the data through
    the TCP stack (on loopback, up to the receiver) while holding the GIL, which measured
    at a fifth of a busy run's GIL time; ``send`` releases it. Every write to the real
    socket happens under one lock, held packets first, so the SSH packets keep the order
    paramiko numbered them in, whichever thread sends or uncorks.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._held: list[bytes] = []
        self._corks = 0  # exchanges being sent right now, on any of the channels

    def __getattr__(self, name: str) -> Any:  # recv, settimeout, close, fileno, ...
        return getattr(self._sock, name)

    def send(self, data: bytes) -> int:
        with self._lock:
            if self._corks:
                self._held.append(bytes(data))
                return len(data)
            # Nothing is held here: every uncork sends what was held, under this lock.
            return self._sock.send(data)

    def cork(self) -> None:
        with self._lock:
            self._corks += 1

    def uncork(self) -> None:
        """Send everything held (also other channels' packets, as TCP_CORK would)."""
        with self._lock:
            self._corks -= 1
            self._flush()

    def flush(self) -> None:
        """Send what is held now, staying corked (see Exchange._send: the SSH window)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        try:
            self._send_all(data)
        except OSError:
            # Packets paramiko counts as sent are lost: the connection cannot go on.
            # Shut down, so its reader (and every exchange waiting on it) sees it end.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except (TimeoutError, BlockingIOError):
                # paramiko's socket waits 0.1 s at a time; a full send buffer is not an
                # error (paramiko's own write loop retries the same way).
                if self._sock.fileno() < 0:
                    raise
                continue
            view = view[sent:]


# AES-GCM first: an authenticated cipher needs no separate MAC, and paramiko computes and
# compares MACs in Python for every packet (a measurable share of a busy run's CPU).
# The rest of paramiko's list follows unchanged, for servers without GCM.
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _prefer_fast_ciphers(ssh: paramiko.Transport) -> None:
    security = ssh.get_security_options()
    offered = list(security.ciphers)
    preferred = [c for c in _FAST_CIPHERS if c in offered]
    security.ciphers = preferred + [c for c in offered if c not in preferred]


def _prefer_key_types(ssh: paramiko.Transport, trusted: set[str]) -> None:
    """Ask for a host key type we already trust, so a server with several keys shows it."""
    if not trusted:
        return
    ours = set(trusted)
    if "ssh-rsa" in ours:  # one RSA key, signed with SHA-2 first (SHA-1 is deprecated)
        ours |= {"rsa-sha2-512", "rsa-sha2-256"}
    security = ssh.get_security_options()
    preferred = [t for t in security.key_types if t in ours and t != "ssh-rsa"]
    security.key_types = preferred + [t for t in security.key_types if t not in preferred]


# --- one round trip for a group of operations -----------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteStat:
    size: int
    mtime: float | None
    is_dir: bool


@dataclass(frozen=True)
class FsStats:
    """What ``statvfs@openssh.com`` says about the filesystem holding a path."""

    bytes_free: int  # available to unprivileged users
    files_total: int  # 0 where the filesystem does not count inodes (btrfs)
    files_free: int
    read_only: bool


class Reply(Generic[T]):
    """The answer to one operation of an exchange, available once the exchange ends.

    ``value`` returns it, or raises the operation's own error (SftpOperationError with
    the server's status code; RemoteFileMissing for a missing path).
    """

    def __init__(self, what: str, parse: Callable[[int, paramiko.Message], T] | None) -> None:
        self.what = what
        self._parse = parse
        self._value: T | None = None
        self._error: SftpOperationError | None = None
        self._done = False

    def _resolve(self, kind: int, msg: paramiko.Message) -> None:
        self._done = True
        if kind == CMD_STATUS:
            code, text = msg.get_int(), msg.get_text()
            if code == Status.OK:
                return
            self._error = _status_error(code, text, self.what)
            return
        if self._parse is None:  # as the parsers below do for a reply of the wrong kind
            raise paramiko.SFTPError(f"expected a status, got packet type {kind}")
        self._value = self._parse(kind, msg)

    @property
    def ok(self) -> bool:
        return self._done and self._error is None

    @property
    def error(self) -> SftpOperationError | None:
        return self._error

    @property
    def value(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _status_error(code: int, text: str, what: str) -> SftpOperationError:
    message = shorten(f"sftp {what} failed: {text or 'status ' + str(code)}", _MESSAGE_LIMIT)
    if code == Status.NO_SUCH_FILE:
        return RemoteFileMissing(message, sftp_code=code)
    return SftpOperationError(message, failure_code=failure_code_for(code), sftp_code=code)


def failure_code_for(code: int) -> FailureCode:
    """The failure code an invoice gets when the server refuses its file with ``code``."""
    if code in (Status.PERMISSION_DENIED, Status.WRITE_PROTECT):
        return FailureCode.SFTP_PERMISSION_DENIED
    if code in (Status.NO_SPACE_ON_FILESYSTEM, Status.QUOTA_EXCEEDED):
        return FailureCode.SFTP_DISK_FULL
    return FailureCode.SFTP_UPLOAD_FAILED  # a bare Failure says nothing: publish asks statvfs


# paramiko's parser of an ATTRS reply is private (its stubs leave it out).
_attributes_from: Callable[[paramiko.Message], paramiko.SFTPAttributes] = (
    paramiko.SFTPAttributes._from_msg  # type: ignore[attr-defined]
)


def _attrs(kind: int, msg: paramiko.Message) -> RemoteStat:
    if kind != CMD_ATTRS:
        raise paramiko.SFTPError(f"expected attributes, got packet type {kind}")
    attrs = _attributes_from(msg)
    return RemoteStat(
        size=attrs.st_size or 0,
        mtime=attrs.st_mtime,
        is_dir=stat.S_ISDIR(attrs.st_mode or 0),
    )


def _handle(kind: int, msg: paramiko.Message) -> bytes:
    if kind != CMD_HANDLE:
        raise paramiko.SFTPError(f"expected a handle, got packet type {kind}")
    handle: bytes = msg.get_binary()
    return handle


def _data(kind: int, msg: paramiko.Message) -> bytes:
    if kind != CMD_DATA:
        raise paramiko.SFTPError(f"expected data, got packet type {kind}")
    data: bytes = msg.get_binary()
    return data


def _fs_stats(kind: int, msg: paramiko.Message) -> FsStats:
    if kind != CMD_EXTENDED_REPLY:
        raise paramiko.SFTPError(f"expected statvfs data, got packet type {kind}")
    _bsize, frsize, _blocks, _bfree, bavail, files, _ffree, favail, _fsid, flag = (
        msg.get_int64() for _ in range(10)
    )
    return FsStats(
        bytes_free=bavail * frsize, files_total=files, files_free=favail, read_only=bool(flag & 1)
    )


# Room for the largest request (a 32 KB write) and its framing, in the SSH channel's
# send window: with less, held packets are sent before the next request (Exchange._send).
_WINDOW_ROOM = 64 * 1024


class Exchange:
    """Operations sent back to back on one channel; replies read together at the end.

    The server answers requests in order, and none of them waits for another's reply,
    so a group costs one round trip instead of one per operation.
    """

    def __init__(self, session: SftpSession) -> None:
        self._sftp = session._sftp
        self._pending: dict[int, Reply[Any]] = {}
        wire = getattr(session._ssh, "sock", None)
        self._wire = wire if isinstance(wire, _CorkableSocket) else None

    # paramiko calls this for each reply to a request we sent with ourselves as owner.
    def _async_response(self, kind: int, msg: paramiko.Message, num: int) -> None:
        self._pending.pop(num)._resolve(kind, msg)

    def _send(self, reply: Reply[T], kind: int, *args: object) -> Reply[T]:
        if self._wire is not None and self._sftp.sock.out_window_size < _WINDOW_ROOM:
            # paramiko is about to wait for the server to open the channel's window,
            # which it does only for data it received: send what the cork holds first.
            self._wire.flush()
        num = self._sftp._async_request(self, kind, *args)
        self._pending[num] = reply
        return reply

    def stat(self, path: str) -> Reply[RemoteStat]:
        return self._send(Reply(f"stat {path}", _attrs), CMD_STAT, path)

    def create(self, path: str) -> Reply[bytes]:
        """Open a new file for writing; refused if ``path`` exists (never truncates)."""
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
        return self._send(
            Reply(f"creating {path}", _handle), CMD_OPEN, path, flags, paramiko.SFTPAttributes()
        )

    def open_read(self, path: str) -> Reply[bytes]:
        return self._send(
            Reply(f"opening {path}", _handle),
            CMD_OPEN,
            path,
            SFTP_FLAG_READ,
            paramiko.SFTPAttributes(),
        )

    def write(self, handle: bytes, body: bytes, path: str, *, start: int = 0) -> list[Reply[None]]:
        """Write ``body`` at offset ``start`` of the file (a window of a larger one)."""
        return [
            self._send(
                Reply(f"writing {path}", None),
                CMD_WRITE,
                handle,
                int64(start + offset),
                body[offset : offset + _WRITE_CHUNK],
            )
            for offset in range(0, len(body), _WRITE_CHUNK)
        ]

    def read(self, handle: bytes, offset: int, length: int, path: str) -> Reply[bytes]:
        return self._send(Reply(f"reading {path}", _data), CMD_READ, handle, int64(offset), length)

    def close(self, handle: bytes, path: str) -> Reply[None]:
        return self._send(Reply(f"closing {path}", None), CMD_CLOSE, handle)

    def remove(self, path: str) -> Reply[None]:
        return self._send(Reply(f"removing {path}", None), CMD_REMOVE, path)

    def rename(self, old: str, new: str) -> Reply[None]:
        # Plain SFTP rename, never posix-rename@openssh.com: posix-rename overwrites by
        # definition; plain rename at least refuses an existing target on most servers.
        return self._send(Reply(f"renaming {old} to {new}", None), CMD_RENAME, old, new)

    def hardlink(self, old: str, new: str) -> Reply[None]:
        """OpenSSH's link(2): atomic, and refused when ``new`` exists."""
        return self._send(
            Reply(f"linking {new}", None), CMD_EXTENDED, "hardlink@openssh.com", old, new
        )

    def statvfs(self, path: str) -> Reply[FsStats]:
        return self._send(
            Reply(f"statvfs {path}", _fs_stats), CMD_EXTENDED, "statvfs@openssh.com", path
        )

    def _collect(self) -> None:
        while self._pending:
            self._sftp._read_response()


# --- the session ----------------------------------------------------------------------


class SftpSession:
    """One verified, authenticated SFTP channel to the ERP's server.

    ``ssh`` is the SSH connection the channel runs on (paramiko's ``Transport``), shared
    with the extra channels ``open_channel`` opens on it.
    """

    def __init__(
        self,
        options: SftpOptions,
        ssh: paramiko.Transport,
        sftp: _SftpClient,
        *,
        owns_connection: bool = True,
    ) -> None:
        self.options = options
        self._ssh = ssh
        self._sftp = sftp
        self.owns_connection = owns_connection  # False for extra channels (open_channel)
        self.login = ""  # how connect() logged in (password, key, ssh-agent key)

    @property
    def has_hardlink(self) -> bool:
        return self._sftp.has_hardlink

    @property
    def extensions(self) -> dict[str, str]:
        """The SFTP extensions the server lists (name: version), e.g. hardlink@openssh.com."""
        return {
            name.decode(errors="replace"): value.decode(errors="replace")
            for name, value in self._sftp.extensions.items()
        }

    @property
    def has_statvfs(self) -> bool:
        return self._sftp.has_statvfs

    @classmethod
    def connect(
        cls, options: SftpOptions, *, on_host_key: Callable[[str], None] | None = None
    ) -> SftpSession:
        """Connect, verify the host key (always, before auth), log in, open SFTP.

        Raises HostKeyUnknown/HostKeyMismatch/HostKeyRevoked, SftpAuthError or
        SftpUnreachable; SettingsError for a known_hosts file that cannot be read.
        ``on_host_key`` is told the verified key (``ssh-ed25519 SHA256:...``) before login.
        """
        known = known_hosts.HostKeys()
        if options.known_hosts is not None:
            known = known_hosts.load(options.known_hosts, options.host, options.port)
        ssh = _open_ssh(options)
        try:
            _prefer_key_types(ssh, known.key_types)
            _prefer_fast_ciphers(ssh)
            ssh.start_client(timeout=options.connect_timeout)
            server_key = ssh.get_remote_server_key()
            _verify_host_key(options, server_key, known)
            if on_host_key is not None:
                on_host_key(f"{server_key.get_name()} {fingerprint(server_key)}")
            login = _authenticate(ssh, options)
            ssh.set_keepalive(options.keepalive_interval)
            sftp = _open_sftp(ssh, options)
        except ErpPushError:
            ssh.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            ssh.close()
            if _dropped_before_banner(exc):
                raise SftpDropped(
                    f"cannot reach sftp {options.address}: the server closed the connection "
                    "before its SSH banner"
                ) from None
            raise SftpUnreachable(
                shorten(f"cannot reach sftp {options.address}: {_reason(exc)}", _MESSAGE_LIMIT)
            ) from None
        except BaseException:
            ssh.close()
            raise
        log.debug("connected to %s (hardlink: %s)", options.address, sftp.has_hardlink)
        session = cls(options, ssh, sftp)
        session.login = login
        return session

    def open_channel(self) -> SftpSession:
        """Another SFTP session over this same SSH connection: parallel work, one login.

        Each channel has its own request stream, so workers never share paramiko's
        client. Servers cap channels per connection (OpenSSH ``MaxSessions`` 10, ProFTPD
        ``SFTPMaxChannels`` 10, and ProFTPD drops the whole connection on the 11th): the
        pool never asks for more than ``max_channels``. A refusal raises SftpUnreachable.
        """
        try:
            sftp = _open_sftp(self._ssh, self.options)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpUnreachable(
                shorten(
                    f"cannot open another SFTP channel to {self.options.address}: {_reason(exc)}",
                    _MESSAGE_LIMIT,
                )
            ) from None
        return SftpSession(self.options, self._ssh, sftp, owns_connection=False)

    def same_connection(self, other: SftpSession) -> bool:
        return self._ssh is other._ssh

    @property
    def connected(self) -> bool:
        return bool(self._ssh.is_active())

    def close(self) -> None:
        """Never raises: closing a channel whose connection already died is a no-op."""
        try:
            if self.owns_connection:
                self._ssh.close()  # closes every channel on it too
            else:
                self._sftp.close()  # sends a close message: fails on a dead connection
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- error mapping ----------------------------------------------------------------

    def _lost(self, exc: BaseException) -> bool:
        """Is this the connection dying (run-level), rather than one operation failing?"""
        if isinstance(exc, _StatusError):
            return not self._ssh.is_active()
        return (
            isinstance(exc, EOFError | TimeoutError | ConnectionError | paramiko.SSHException)
            or not self._ssh.is_active()
        )

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn paramiko/socket errors into our tree; ``what`` names the step and path."""
        try:
            yield
        except ErpPushError:
            raise
        except (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError) as exc:
            if self._lost(exc):
                # A timed-out request leaves the SFTP channel out of step: drop it. A
                # connection that died takes every channel on it along: close it at
                # once, so no other worker is handed a sibling channel before paramiko
                # has noticed.
                if not isinstance(exc, TimeoutError):
                    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                        self._ssh.close()
                self.close()
                raise SftpUnreachable(
                    shorten(
                        f"lost sftp {self.options.address} while {what}: {_reason(exc)}",
                        _MESSAGE_LIMIT,
                    )
                ) from None
            code = getattr(exc, "sftp_code", None)
            if code is not None:
                raise _status_error(code, _reason(exc), what) from None
            raise SftpOperationError(
                shorten(f"sftp {what} failed: {_reason(exc)}", _MESSAGE_LIMIT)
            ) from None

    @contextmanager
    def exchange(self, what: str) -> Iterator[Exchange]:
        """Send operations back to back inside the block; on leaving it, read every reply.

        Each operation's result is in its ``Reply`` afterwards: one failing operation
        does not raise here. A lost or timed-out connection raises SftpUnreachable
        (and closes this session: its request stream is out of step).
        """
        batch = Exchange(self)
        with self._guard(what):
            with self._corked():
                yield batch
            batch._collect()

    @contextmanager
    def _corked(self) -> Iterator[None]:
        """Hold the group's packets back and send them as one (see _CorkableSocket);
        other channels' packets on the same connection wait at most until it is out."""
        sock = getattr(self._ssh, "sock", None)
        if not isinstance(sock, _CorkableSocket):
            yield
            return
        sock.cork()
        try:
            yield
        finally:
            sock.uncork()

    # --- single operations, each one round trip ---------------------------------------

    def stat(self, path: str) -> RemoteStat | None:
        """The path's size and type, or None when it does not exist."""
        with self.exchange(f"checking {path}") as batch:
            reply = batch.stat(path)
        try:
            return reply.value
        except RemoteFileMissing:
            return None

    def read(self, path: str, limit: int) -> bytes | None:
        """The file's bytes (at most ``limit``), or None when it is gone."""
        with self.exchange(f"opening {path}") as batch:
            opened = batch.open_read(path)
        try:
            handle = opened.value
        except RemoteFileMissing:
            return None
        chunks: list[bytes] = []
        with self.exchange(f"reading {path}") as batch:
            reads = [
                batch.read(handle, offset, _WRITE_CHUNK, path)
                for offset in range(0, limit + 1, _WRITE_CHUNK)
            ]
            batch.close(handle, path)
        for reply in reads:
            if reply.error is not None:
                if reply.error.sftp_code == Status.EOF:
                    break
                raise reply.error
            chunks.append(reply.value)
            if len(reply.value) < _WRITE_CHUNK:
                break
        return b"".join(chunks)

    def remove(self, path: str) -> None:
        """Remove one of our tmp files. Refuses any other name; a missing file is fine."""
        if not TMP_PATTERN.match(posixpath.basename(path)):
            raise ValueError(f"refusing to remove {path}: not an erp-push tmp file")
        with self.exchange(f"removing {path}") as batch:
            reply = batch.remove(path)
        if reply.error is not None and not isinstance(reply.error, RemoteFileMissing):
            raise reply.error  # a missing file: another cleanup got there first

    # --- folders ------------------------------------------------------------------------

    def check_folders(self, outbox: str, sent: str | None) -> None:
        """The outbox must be a directory; a missing ``sent`` folder counts as empty."""
        self._check_folder(outbox, "remote_outbox", missing_ok=False)
        if sent is not None:
            self._check_folder(sent, "remote_sent", missing_ok=True)

    def _check_folder(self, path: str, setting: str, *, missing_ok: bool) -> None:
        try:
            found = self.stat(path)
        except SftpOperationError as exc:
            raise SftpFolderError(f"{setting} {path} is not usable: {exc.message}") from None
        if found is None:
            if missing_ok:
                log.debug("%s %s does not exist; treating it as empty", setting, path)
                return
            raise SftpFolderError(f"{setting} {path} does not exist")
        if not found.is_dir:
            raise SftpFolderError(f"{setting} {path} is not a directory")

    def list_stale_tmp(self, outbox: str, older_than: timedelta) -> list[RemoteFile]:
        """erp-push's own tmp files in ``outbox`` last modified before now - older_than."""
        cutoff = time.time() - older_than.total_seconds()
        with self._guard(f"listing {outbox}"):
            entries = self._sftp.listdir_attr(outbox)
        return [
            RemoteFile(
                path=posixpath.join(outbox, e.filename),
                size=e.st_size or 0,
                mtime=datetime.fromtimestamp(e.st_mtime or 0, tz=UTC),
            )
            for e in sorted(entries, key=lambda e: e.filename)
            if TMP_PATTERN.match(e.filename) and (e.st_mtime or 0) < cutoff
        ]

    def list_files(self, folder: str) -> list[RemoteFile]:
        """Every entry of ``folder`` with its size and time; a missing folder is empty.

        Batch mode's lost-journal lookup is the only caller: batch files are named by
        time, so they cannot be looked up by name as per-invoice files are.
        """
        try:
            with self._guard(f"listing {folder}"):
                entries = self._sftp.listdir_attr(folder)
        except RemoteFileMissing:
            return []
        return [
            RemoteFile(
                path=posixpath.join(folder, e.filename),
                size=e.st_size or 0,
                mtime=datetime.fromtimestamp(e.st_mtime or 0, tz=UTC),
            )
            for e in entries
        ]
