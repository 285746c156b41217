"""The SFTP side of a push: verified connect, no-clobber publish, proof of delivery.

The ERP polls the outbox, so three things must never happen there: a partial file under a
final name, an existing file overwritten, the same invoice delivered twice. This module
owns all three rules; the pipeline decides *when* to publish, never *how*.

How a file gets published (``publish_mode="rename"``)::

    list outbox + sent ─► identical file there? ─► yes: Delivery(already_delivered=True)
                               │ no
                               ▼
    first free name of <stem>.csv, <stem>-2.csv, ... (case-insensitive, outbox and sent)
                               ▼
    write <name>.<8 hex>.erp-push.tmp in the outbox (exclusive create), check its size
                               ▼
    re-check the name is free ─► hardlink@openssh.com (fails if the name exists), drop tmp
                                 or, without it, plain SFTP rename (never posix-rename)
                               ▼
    name taken meanwhile? identical bytes → already delivered; else try the next name

Paramiko is synchronous and a session is not meant to be shared between threads: run one
``SftpSession`` per worker when publishing concurrently.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import posixpath
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import paramiko  # type: ignore[import-untyped]
from paramiko.sftp import (  # type: ignore[import-untyped]
    CMD_EXTENDED,
    CMD_INIT,
    CMD_VERSION,
    SFTP_EOF,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_PERMISSION_DENIED,
)
from pydantic import SecretStr

from erp_push import known_hosts
from erp_push.errors import (
    ErpPushError,
    HostKeyMismatch,
    HostKeyRevoked,
    HostKeyUnknown,
    SftpAuthError,
    SftpFolderError,
    SftpOperationError,
    SftpUnreachable,
)

if TYPE_CHECKING:
    from erp_push.render import RenderedFile

log = logging.getLogger(__name__)

# Our temporary files, and only ours: "<final name>.<8 hex>.erp-push.tmp".
TMP_PATTERN = re.compile(r"^.+\.[0-9a-f]{8}\.erp-push\.tmp$")
# How many names (<stem>.csv, <stem>-2.csv, ...) publish tries before giving up.
MAX_CANDIDATES = 100
_MESSAGE_LIMIT = 500
_SFTP_FX_OP_UNSUPPORTED = 8  # SFTPv3 status code, not exported by paramiko


@dataclass(frozen=True, kw_only=True)
class SftpOptions:
    """Everything needed to reach the drop folder. Secrets stay ``SecretStr`` until auth."""

    host: str
    user: str
    port: int = 22
    password: SecretStr | None = None
    private_key_path: Path | None = None
    private_key_passphrase: SecretStr | None = None
    known_hosts: Path | None = None  # OpenSSH known_hosts file (plain or hashed entries)
    host_key_sha256: str | None = None  # "SHA256:<base64>", as `ssh-keygen -lf` prints
    connect_timeout: float = 10.0  # TCP connect, SSH banner, handshake, auth
    operation_timeout: float = 30.0  # each SFTP request; a hung server cannot hang cron
    keepalive_interval: int = 15
    # "direct" writes straight to the final name, for servers that forbid rename. It is
    # NOT atomic: the ERP may see a partial file.
    publish_mode: Literal["rename", "direct"] = "rename"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Delivery:
    remote_path: str  # where the file was published (outbox path)
    already_delivered: bool  # an identical file was already there: nothing written


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    mtime: datetime  # UTC


def fingerprint(key: Any) -> str:
    """OpenSSH's SHA256 fingerprint of a public key, e.g. ``SHA256:abc...`` (no padding)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names a server in known_hosts: ``host`` on 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def family_names(file_name: str) -> Iterator[str]:
    """``X.csv``, ``X-2.csv``, ``X-3.csv``, ...: the names one invoice's file may carry."""
    stem, ext = posixpath.splitext(file_name)
    yield file_name
    for n in range(2, MAX_CANDIDATES + 1):
        yield f"{stem}-{n}{ext}"


_DATED_STEM = re.compile(r"(?P<number>.+)-[0-9]{8}")


def _in_family(name: str, file_name: str) -> bool:
    """Could ``name`` hold this invoice's file? Its name on any day, with any suffix.

    The date in ``<number>-<YYYYMMDD>.csv`` is the day of the push: a run that crashed
    yesterday after publishing, and lost its journal, left the file under yesterday's
    name. Matching any date keeps that file as proof of delivery (only an identical
    file counts, so a wider family costs reads of same-sized candidates, nothing more).
    """
    stem, ext = posixpath.splitext(file_name)
    dated = _DATED_STEM.fullmatch(stem)
    head = re.escape(dated["number"]) + "-[0-9]{8}" if dated else re.escape(stem)
    pattern = rf"{head}(-[1-9][0-9]{{0,3}})?{re.escape(ext)}"
    return re.fullmatch(pattern, name, flags=re.IGNORECASE) is not None


def _short(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def _reason(exc: BaseException) -> str:
    """A short human reason from a socket/SSH exception (these never carry secrets)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --- paramiko's SFTP client, with the two things it throws away ------------------------


class _StatusError(OSError):
    """An SFTP status reply that keeps the protocol's status code (paramiko drops it)."""

    def __init__(self, code: int, err: int | None, text: str) -> None:
        if err is None:
            super().__init__(text)
        else:
            super().__init__(err, text)
        self.sftp_code = code


class RemoteFileMissing(SftpOperationError):
    """The server says the path does not exist. Callers decide whether that is a failure."""


class _SftpClient(paramiko.SFTPClient):  # type: ignore[misc]
    """paramiko's client, keeping the server's extension list and status codes.

    paramiko reads the server's VERSION packet but drops the extensions it lists, so
    there is no public way to learn whether ``hardlink@openssh.com`` is offered; and it
    turns every status but two into a bare IOError. Both overrides are small copies of
    paramiko's own code (stable since paramiko 1.x) that keep what we need.
    """

    extensions: dict[bytes, bytes]

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

    def _convert_status(self, msg: Any) -> None:
        code = msg.get_int()
        text = msg.get_text()
        if code == SFTP_OK:
            return
        if code == SFTP_EOF:
            raise EOFError(text)
        err = {SFTP_NO_SUCH_FILE: errno.ENOENT, SFTP_PERMISSION_DENIED: errno.EACCES}.get(code)
        raise _StatusError(code, err, text)

    @property
    def has_hardlink(self) -> bool:
        return self.extensions.get(b"hardlink@openssh.com") == b"1"

    def hardlink(self, oldpath: str, newpath: str) -> None:
        """OpenSSH's link(2): atomic, and fails when ``newpath`` exists."""
        self._request(CMD_EXTENDED, "hardlink@openssh.com", oldpath, newpath)


# --- connecting -----------------------------------------------------------------------


def _verify_host_key(options: SftpOptions, server_key: Any, known: known_hosts.HostKeys) -> None:
    """Accept the key only if a configured source vouches for it and none contradicts it."""
    name = known_hosts_name(options.host, options.port)
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


def _load_private_key(path: Path, passphrase: SecretStr | None) -> Any:
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


def _authenticate(transport: Any, options: SftpOptions) -> None:
    refused = f"login to {options.address} as {options.user!r} refused"
    try:
        if options.private_key_path is not None:
            key = _load_private_key(options.private_key_path, options.private_key_passphrase)
            try:
                transport.auth_publickey(options.user, key)
                return
            except paramiko.AuthenticationException:
                if options.password is None:
                    raise
                log.debug("key login refused by %s; trying the password", options.address)
        if options.password is None:
            raise SftpAuthError(f"{refused}: no password or private key configured")
        transport.auth_password(options.user, options.password.get_secret_value())
    except paramiko.BadAuthenticationType as exc:
        allowed = ", ".join(exc.allowed_types) or "none"
        raise SftpAuthError(f"{refused}: the server only allows {allowed}") from None
    except paramiko.AuthenticationException:
        raise SftpAuthError(f"{refused}: wrong user, password or key") from None


def _open_sftp(transport: Any, options: SftpOptions) -> _SftpClient:
    """Start the SFTP subsystem on a new channel, within ``connect_timeout``.

    paramiko waits up to an hour for the channel and without any limit for the subsystem
    to start: a server that logs us in but whose sftp-server hangs (a stuck mount) would
    hang the run, and cron's next runs behind it. A timer closes the channel at the
    deadline, which wakes paramiko's wait with an error instead.
    """
    channel = transport.open_session(timeout=options.connect_timeout)
    if channel is None:
        raise paramiko.SSHException("the server refused an SFTP channel")
    channel.settimeout(options.connect_timeout)  # the version exchange reads with this
    deadline = threading.Timer(options.connect_timeout, channel.close)
    deadline.daemon = True
    deadline.start()
    try:
        channel.invoke_subsystem("sftp")
        sftp = _SftpClient(channel)
    finally:
        deadline.cancel()
    channel.settimeout(options.operation_timeout)
    return sftp


def _open_transport(options: SftpOptions) -> Any:
    try:
        sock = socket.create_connection(
            (options.host, options.port), timeout=options.connect_timeout
        )
    except OSError as exc:
        raise SftpUnreachable(f"cannot reach sftp {options.address}: {_reason(exc)}") from None
    # SFTP is small request/reply packets, several channels' worth on one connection:
    # Nagle's algorithm would hold each one back until the previous is acknowledged.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    # Without these a server that accepts TCP but never speaks would block us forever.
    transport.banner_timeout = options.connect_timeout
    transport.handshake_timeout = options.connect_timeout
    transport.auth_timeout = options.connect_timeout
    return transport


def _prefer_key_types(transport: Any, trusted: set[str]) -> None:
    """Ask for a host key type we already trust, so a server with several keys shows it."""
    if not trusted:
        return
    ours = set(trusted)
    if "ssh-rsa" in ours:  # one RSA key, signed with SHA-2 first (SHA-1 is deprecated)
        ours |= {"rsa-sha2-512", "rsa-sha2-256"}
    security = transport.get_security_options()
    preferred = [t for t in security.key_types if t in ours and t != "ssh-rsa"]
    security.key_types = preferred + [t for t in security.key_types if t not in preferred]


# --- the session ----------------------------------------------------------------------


class SftpSession:
    """One verified, authenticated SFTP connection to the ERP's server."""

    def __init__(
        self,
        options: SftpOptions,
        transport: Any,
        sftp: _SftpClient,
        *,
        owns_connection: bool = True,
    ) -> None:
        self.options = options
        self._transport = transport
        self._sftp = sftp
        self.owns_connection = owns_connection  # False for extra channels (open_channel)
        # Servers may advertise hardlink yet fail it (e.g. a filesystem without links);
        # after the first such failure we use rename for the rest of the session.
        self._use_hardlink = sftp.has_hardlink

    @classmethod
    def connect(cls, options: SftpOptions) -> SftpSession:
        """Connect, verify the host key (always, before auth), log in, open SFTP.

        Raises HostKeyUnknown/HostKeyMismatch/HostKeyRevoked, SftpAuthError or
        SftpUnreachable; SettingsError for a known_hosts file that cannot be read.
        """
        known = known_hosts.HostKeys()
        if options.known_hosts is not None:
            known = known_hosts.load(options.known_hosts, options.host, options.port)
        transport = _open_transport(options)
        try:
            _prefer_key_types(transport, known.key_types)
            transport.start_client(timeout=options.connect_timeout)
            _verify_host_key(options, transport.get_remote_server_key(), known)
            _authenticate(transport, options)
            transport.set_keepalive(options.keepalive_interval)
            sftp = _open_sftp(transport, options)
        except ErpPushError:
            transport.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            transport.close()
            raise SftpUnreachable(
                _short(f"cannot reach sftp {options.address}: {_reason(exc)}")
            ) from None
        except BaseException:
            transport.close()
            raise
        log.debug("connected to %s (hardlink: %s)", options.address, sftp.has_hardlink)
        return cls(options, transport, sftp)

    def open_channel(self) -> SftpSession:
        """Another SFTP session over this same SSH connection: parallel work, one login.

        Each channel has its own request stream, so workers never share paramiko's
        client. Servers cap channels per connection (OpenSSH ``MaxSessions``, 10 by
        default): a refusal raises SftpUnreachable and the caller opens a new connection.
        """
        try:
            sftp = _open_sftp(self._transport, self.options)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpUnreachable(
                _short(
                    f"cannot open another SFTP channel to {self.options.address}: {_reason(exc)}"
                )
            ) from None
        return SftpSession(self.options, self._transport, sftp, owns_connection=False)

    @property
    def connected(self) -> bool:
        return bool(self._transport.is_active())

    def close(self) -> None:
        """Never raises: closing a channel whose connection already died is a no-op."""
        try:
            if self.owns_connection:
                self._transport.close()  # closes every channel on it too
            else:
                self._sftp.close()  # sends a close message: fails on a dead connection
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- error mapping ----------------------------------------------------------------

    def _lost(self, exc: BaseException) -> bool:
        """Is this the connection dying (run-level), rather than one operation failing?"""
        if isinstance(exc, _StatusError):
            return not self._transport.is_active()
        return (
            isinstance(exc, EOFError | TimeoutError | ConnectionError | paramiko.SSHException)
            or not self._transport.is_active()
        )

    @contextmanager
    def _guard(self, what: str, failure_code: str = "SFTP_UPLOAD_FAILED") -> Iterator[None]:
        """Turn paramiko/socket errors into our tree; ``what`` names the step and path."""
        try:
            yield
        except ErpPushError:
            raise
        except (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError) as exc:
            if self._lost(exc):
                # A timed-out request leaves the SFTP channel out of step: drop it.
                self.close()
                raise SftpUnreachable(
                    _short(f"lost sftp {self.options.address} while {what}: {_reason(exc)}")
                ) from None
            message = _short(f"sftp {what} failed: {_reason(exc)}")
            if getattr(exc, "errno", None) == errno.ENOENT:
                raise RemoteFileMissing(message, failure_code=failure_code) from None
            raise SftpOperationError(
                message, failure_code=_failure_code(exc, failure_code)
            ) from None

    # --- folders and listings ---------------------------------------------------------

    def check_folders(self, outbox: str, sent: str | None) -> None:
        """The outbox must be a directory; a missing ``sent`` folder counts as empty."""
        self._check_folder(outbox, "remote_outbox", missing_ok=False)
        if sent is not None:
            self._check_folder(sent, "remote_sent", missing_ok=True)

    def _check_folder(self, path: str, setting: str, *, missing_ok: bool) -> None:
        try:
            with self._guard(f"checking {path}"):
                attrs = self._sftp.stat(path)
        except RemoteFileMissing:
            if missing_ok:
                log.debug("%s %s does not exist; treating it as empty", setting, path)
                return
            raise SftpFolderError(f"{setting} {path} does not exist") from None
        except SftpOperationError as exc:
            raise SftpFolderError(f"{setting} {path} is not usable: {exc.message}") from None
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise SftpFolderError(f"{setting} {path} is not a directory")

    def _listing(self, folder: str | None) -> list[str]:
        """Paths of every entry in ``folder``, sorted; a missing folder is empty."""
        if folder is None:
            return []
        try:
            with self._guard(f"listing {folder}"):
                entries = self._sftp.listdir_attr(folder)
        except RemoteFileMissing:
            return []
        return sorted(posixpath.join(folder, e.filename) for e in entries)

    def _exists(self, path: str) -> bool:
        try:
            with self._guard(f"checking {path}"):
                self._sftp.stat(path)
        except RemoteFileMissing:
            return False
        return True

    def _holds(self, path: str, body: bytes) -> bool:
        """Does ``path`` hold exactly ``body``? Size first, so most mismatches cost no read."""
        try:
            with self._guard(f"reading {path}"):
                if self._sftp.stat(path).st_size != len(body):
                    return False
                with self._sftp.open(path, "rb") as remote:
                    data: bytes = remote.read()
        except SftpOperationError as exc:
            # Vanished (the ERP took it) or unreadable: not provably ours, so not identical.
            log.debug("cannot compare %s: %s", path, exc.message)
            return False
        # Comparing the bytes is the sha256 comparison without the hashing.
        return data == body

    def _identical_in(self, listing: list[str], file: RenderedFile) -> str | None:
        for path in listing:
            if _in_family(posixpath.basename(path), file.file_name) and self._holds(
                path, file.body
            ):
                return path
        return None

    def find_delivered(self, outbox: str, sent: str | None, file: RenderedFile) -> str | None:
        """Path of a file with the same bytes under the file's name family, or None.

        Read-only and safe to repeat; proves delivery after a crash or reconnect.
        """
        for folder in (outbox, sent):
            found = self._identical_in(self._listing(folder), file)
            if found is not None:
                return found
        return None

    # --- publishing -------------------------------------------------------------------

    def publish(
        self,
        outbox: str,
        sent: str | None,
        file: RenderedFile,
        *,
        fault: Callable[[str], None] | None = None,
    ) -> Delivery:
        """Put ``file`` into the outbox under a free name, never overwriting anything.

        An identical file already in the outbox or sent/ counts as delivered (nothing is
        written). Raises SftpOperationError for this file alone, SftpUnreachable when the
        connection is lost: the file may or may not have been published, so call
        ``publish`` again on a new session; it looks for the identical file before
        writing anything. ``fault`` is a test hook called at each step.
        """
        step = fault or _no_fault
        listing = self._listing(outbox) + self._listing(sent)
        existing = self._identical_in(listing, file)
        if existing is not None:
            return Delivery(remote_path=existing, already_delivered=True)
        free = _free_names(listing, file.file_name, outbox)
        if self.options.publish_mode == "direct":
            return self._publish_direct(outbox, sent, file, free, step)
        return self._publish_via_tmp(outbox, sent, file, free, step)

    def plan(self, outbox: str, sent: str | None, file: RenderedFile) -> Delivery:
        """What ``publish`` would do now, without writing anything (for dry-run).

        ``already_delivered`` with the identical file's path, or the outbox path the file
        would be published under. Another writer may take that name before a real push.
        """
        listing = self._listing(outbox) + self._listing(sent)
        existing = self._identical_in(listing, file)
        if existing is not None:
            return Delivery(remote_path=existing, already_delivered=True)
        name = _free_names(listing, file.file_name, outbox)[0]
        return Delivery(remote_path=posixpath.join(outbox, name), already_delivered=False)

    def _publish_via_tmp(
        self,
        outbox: str,
        sent: str | None,
        file: RenderedFile,
        free: list[str],
        step: Callable[[str], None],
    ) -> Delivery:
        tmp = posixpath.join(outbox, f"{free[0]}.{secrets.token_hex(4)}.erp-push.tmp")
        created = False
        try:
            with self._guard(f"writing {tmp}"):
                # "x": exclusive create, so even a (practically impossible) tmp name clash
                # cannot truncate another writer's file.
                handle = self._sftp.open(tmp, "wbx", bufsize=0)
                created = True
                self._write_all(handle, file.body, tmp, step)
            step("tmp_written")
            delivery = self._move_into_place(tmp, outbox, sent, file, free)
            step("published")
            return delivery
        except SftpUnreachable:
            raise  # the connection is gone: the tmp stays for cleanup-tmp
        except BaseException:
            if created:
                self._discard_tmp(tmp)
            raise

    def _write_all(self, handle: Any, body: bytes, path: str, step: Callable[[str], None]) -> None:
        # Deliberately not pipelined: paramiko never reads the replies to pipelined
        # writes, so a full disk or a quota would go unnoticed until the size check. An
        # invoice file fits in one or two 32 KiB write requests anyway. Unbuffered
        # (bufsize=0 at open), so a failing write raises here, not inside close().
        with handle:
            step("tmp_open")
            handle.write(body)
        size = self._sftp.stat(path).st_size
        if size != len(body):
            raise SftpOperationError(
                f"sftp wrote {size} of {len(body)} bytes to {path}",
                failure_code="SFTP_UPLOAD_FAILED",
            )

    def _move_into_place(
        self, tmp: str, outbox: str, sent: str | None, file: RenderedFile, free: list[str]
    ) -> Delivery:
        for name in free:
            final = posixpath.join(outbox, name)
            # Someone (a concurrent run, the ERP, an operator) may have taken the name
            # since we listed: the rename must not be what finds out, as it may overwrite.
            rival = self._taken_by(name, outbox, sent)
            if rival is None and self._link_or_rename(tmp, final):
                return Delivery(remote_path=final, already_delivered=False)
            rival = rival or final
            if self._holds(rival, file.body):
                # A concurrent run delivered the same invoice first.
                self._discard_tmp(tmp)
                return Delivery(remote_path=rival, already_delivered=True)
            log.debug("%s was taken meanwhile; trying the next name", name)
        raise SftpOperationError(
            f"no free name for {file.file_name} in {outbox} after {len(free)} tries",
            failure_code="SFTP_PUBLISH_FAILED",
        )

    def _taken_by(self, name: str, outbox: str, sent: str | None) -> str | None:
        for folder in (outbox, sent):
            if folder is not None and self._exists(posixpath.join(folder, name)):
                return posixpath.join(folder, name)
        return None

    def _link_or_rename(self, tmp: str, final: str) -> bool:
        """Publish ``tmp`` as ``final``. False when ``final`` turned out to exist."""
        if self._use_hardlink:
            try:
                with self._guard(f"linking {final}", "SFTP_PUBLISH_FAILED"):
                    # link(2) refuses an existing target atomically: no window at all.
                    self._sftp.hardlink(tmp, final)
            except SftpOperationError as exc:
                if self._exists(final):
                    return False
                log.debug("hardlink failed on %s (%s); using rename", final, exc.message)
                self._use_hardlink = False
            else:
                self._discard_tmp(tmp)
                return True
        try:
            with self._guard(f"renaming {tmp} to {final}", "SFTP_PUBLISH_FAILED"):
                # Plain SFTP rename, never posix-rename: posix-rename overwrites by
                # definition, plain rename at least refuses on OpenSSH and asyncssh.
                self._sftp.rename(tmp, final)
        except SftpOperationError:
            # OpenSSH answers a plain "Failure" when the target exists: look, don't guess.
            if self._exists(final):
                return False
            raise
        return True

    def _publish_direct(
        self,
        outbox: str,
        sent: str | None,
        file: RenderedFile,
        free: list[str],
        step: Callable[[str], None],
    ) -> Delivery:
        """For servers that forbid rename: write the final name itself. NOT atomic."""
        for name in free:
            final = posixpath.join(outbox, name)
            if self._taken_by(name, outbox, sent) is not None:
                continue
            created = False
            try:
                with self._guard(f"writing {final}"):
                    # Exclusive create: if the name appeared since the check, open fails
                    # instead of truncating someone else's file (where the server honours it).
                    handle = self._sftp.open(final, "wbx", bufsize=0)
                    created = True
                    self._write_all(handle, file.body, final, step)
                step("tmp_written")
                step("published")
                return Delivery(remote_path=final, already_delivered=False)
            except SftpOperationError:
                if created:
                    self._discard_tmp(final, ours=True)  # a partial file we created
                    raise
                if not self._exists(final):
                    raise
        raise SftpOperationError(
            f"no free name for {file.file_name} in {outbox}", failure_code="SFTP_PUBLISH_FAILED"
        )

    def _discard_tmp(self, path: str, *, ours: bool = False) -> None:
        """Best effort removal of a file this publish created; never anything else."""
        if not (ours or TMP_PATTERN.match(posixpath.basename(path))):
            return
        try:
            with self._guard(f"removing {path}"):
                self._sftp.remove(path)
        except ErpPushError as exc:
            log.debug("could not remove %s: %s", path, exc.message)

    # --- cleanup of our own tmp files -------------------------------------------------

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

    def remove(self, path: str) -> None:
        """Remove one of our tmp files. Refuses any other name; a missing file is fine."""
        if not TMP_PATTERN.match(posixpath.basename(path)):
            raise ValueError(f"refusing to remove {path}: not an erp-push tmp file")
        try:
            with self._guard(f"removing {path}"):
                self._sftp.remove(path)
        except RemoteFileMissing:
            pass  # already gone: another cleanup got there first


def _free_names(listing: list[str], file_name: str, outbox: str) -> list[str]:
    """The file's name family minus every name taken in ``listing``, in order."""
    # Windows servers treat ABC.csv and abc.CSV as one name: so do we, everywhere.
    taken = {posixpath.basename(p).lower() for p in listing}
    free = [n for n in family_names(file_name) if n.lower() not in taken]
    if not free:
        raise SftpOperationError(
            f"no free name for {file_name} in {outbox}: {MAX_CANDIDATES} taken",
            failure_code="SFTP_PUBLISH_FAILED",
        )
    return free


def _no_fault(step: str) -> None:
    return None


def _failure_code(exc: BaseException, default: str) -> str:
    """Map a server's refusal to the failure code the invoice is reported with."""
    if default == "SFTP_PUBLISH_FAILED":
        return default  # the publish step itself was refused: say so, whatever the cause
    text = str(exc).lower()
    err = getattr(exc, "errno", None)
    if err in (errno.EACCES, errno.EPERM) or "permission denied" in text:
        return "SFTP_PERMISSION_DENIED"
    if err in (errno.ENOSPC, errno.EDQUOT) or "no space" in text or "quota" in text:
        return "SFTP_DISK_FULL"
    return default
