"""An asyncssh SFTP server over a local directory, with deliberately odd behaviours.

Real SFTP servers disagree about the one operation erp-push depends on most: what a
rename does when the target exists. ``QuirkyServer`` serves a chrooted temp directory
and can imitate each family of behaviour (``quirk``):

- ``normal``: asyncssh's own: plain rename refuses an existing target ("File already
  exists"; check-then-rename, not atomic), posix-rename overwrites, hardlink works.
- ``rename_overwrites``: plain rename silently replaces the target (SFTPGo,
  pytest-sftpserver, several Windows servers).
- ``generic_failure``: rename onto an existing name fails with a bare FX_FAILURE
  (OpenSSH), so the client cannot tell "exists" from any other failure.
- ``no_posix_rename``: the posix-rename extension is refused as unsupported.
- ``no_rename``: rename, posix-rename and hardlink are all permission denied.
- ``instant_pickup``: the ERP: a file appearing under a final ``.csv`` name in the
  outbox is moved into ``sent/`` before the client even gets the reply.
- ``drop_after_rename``: the rename (or hardlink) happens, then the connection is cut
  before the reply is sent; once per server.
- ``permission_denied_write``: opening any file for writing is permission denied.
- ``disk_full``: writes fail with FX_FAILURE "No space left on device" once the
  server has taken ``disk_full_after`` bytes; statvfs then reports no space left.
- ``hang_on_write``: opening a file for writing never gets an answer (a hung server).
- ``case_insensitive``: names resolve as on a Windows server: ``ABC.CSV`` and
  ``abc.csv`` are one name, and so are ``ÄBC.csv`` and ``äbc.csv`` (NTFS folds every
  script's case, not only ASCII; the existing spelling wins).
- ``channel_limit``: ProFTPD's ``SFTPMaxChannels``: opening a channel beyond
  ``max_channels`` (default 10) open on one connection is refused and the server then
  drops the whole connection (OpenSSH refuses only that channel).
- ``upload_only``: ``remove()`` in the outbox (and below it) is permission denied, as in
  drop folders that forbid deletion (ProFTPD ``<Limit DELE> DenyAll``).
- ``disk_full_generic``: OpenSSH on a full disk: writes fail with a bare FX_FAILURE
  ("Failure", nothing about space) once ``disk_full_after`` bytes have been taken (0:
  from the first byte); ``statvfs@openssh.com`` reports the free blocks left (0 when full).
- ``read_only_generic``: OpenSSH on a read-only filesystem: opening for writing and
  every change (remove, rename, link, mkdir...) fail with a bare FX_FAILURE; reads work;
  ``statvfs@openssh.com`` reports the read-only flag.
- ``pickup_everything``: an ERP that takes every new file, ``.tmp`` included: a file
  created by an open (it did not exist before) is deleted as soon as it is closed,
  before the client gets the reply.
- ``clock_ahead``: a server whose clock runs an hour fast: every file written gets a
  modification time one hour ahead of the real time.

``hardlink=False`` makes ``hardlink@openssh.com`` fail as unsupported. asyncssh
advertises its extensions per class, not per server, so it is still *listed*; the client
must cope with an advertised extension that fails anyway, which real servers also do
(filesystems without hard links).

The server runs on an event loop owned by ``LoopThread``, so synchronous tests and
paramiko clients can talk to it from the main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
from asyncssh.constants import FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_WRITE
from asyncssh.sftp import MIN_SFTP_VERSION
from asyncssh.stream import SSHServerStreamSession

QUIRKS = (
    "normal",
    "rename_overwrites",
    "generic_failure",
    "no_posix_rename",
    "no_rename",
    "instant_pickup",
    "drop_after_rename",
    "permission_denied_write",
    "disk_full",
    "hang_on_write",
    "case_insensitive",
    "channel_limit",
    "upload_only",
    "disk_full_generic",
    "read_only_generic",
    "pickup_everything",
    "clock_ahead",
)
CLOCK_AHEAD_SECONDS = 3600

OUTBOX = "outbox"
SENT = "outbox/sent"
_WRITE_FLAGS = FXF_WRITE | FXF_CREAT | FXF_TRUNC | FXF_APPEND
_BLOCK = 4096  # block size statvfs reports for the imitated disks
_ST_RDONLY = 0x1  # statvfs@openssh.com flag bit for a read-only filesystem

T = TypeVar("T")


@dataclass
class ServerConfig:
    root: Path
    user: str
    password: str
    quirk: str = "normal"
    hardlink: bool = True
    statvfs: bool = True  # False: statvfs@openssh.com is listed but fails (no way to ask)
    disk_full_after: int = 16  # disk_full, disk_full_generic: bytes taken before ENOSPC
    max_channels: int = 10  # channel_limit: channels open at once on one connection
    drop_after: int = 1  # drop_after_rename: cut the connection at this publish (once)
    client_keys: list[asyncssh.SSHKey] = field(default_factory=list)
    # mutable state shared by all sessions of one server
    dropped: bool = False
    publishes: int = 0
    bytes_written: int = 0
    connections: list[asyncssh.SSHServerConnection] = field(default_factory=list)
    # every SFTP request served, by kind ("stat", "open", "list", ...): tests count them
    requests: Counter[str] = field(default_factory=Counter)


async def _disconnect(reason: str) -> None:
    # A task that raises DisconnectError makes asyncssh send DISCONNECT and drop the
    # connection, after the packet being handled has been answered.
    raise asyncssh.DisconnectError(asyncssh.DISC_BY_APPLICATION, reason)


class _CountedSession(SSHServerStreamSession):  # type: ignore[type-arg]
    """asyncssh's own session (serving SFTP only) that tells its connection when it ends."""

    def __init__(self, owner: _Auth, config: ServerConfig) -> None:
        super().__init__(
            None, functools.partial(QuirkyServer, config=config), MIN_SFTP_VERSION, False
        )
        self._owner = owner
        self._counted = True

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._owner.open_channels -= 1

    def eof_received(self) -> bool:
        # A client closing a channel sends EOF and CLOSE together; asyncssh finishes the
        # close only on a later loop turn, after it may already have read the client's
        # next channel request. Counting the channel as gone from its EOF keeps "close
        # one, open one" within the limit, as on ProFTPD, which handles packets in order.
        self._release()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)


class _Auth(asyncssh.SSHServer):
    """One per connection: logins, and the channels open on it (for ``channel_limit``)."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._conn: asyncssh.SSHServerConnection | None = None
        self.open_channels = 0

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._config.connections.append(conn)
        self._conn = conn

    def session_requested(self) -> _CountedSession:
        config = self._config
        if config.quirk == "channel_limit" and self.open_channels >= config.max_channels:
            # What ProFTPD's mod_sftp does: refuse the channel ("unknown channel type"),
            # then send DISCONNECT, taking every open channel with it. Not
            # conn.disconnect(): that closes each channel first, which ProFTPD does not.
            assert self._conn is not None
            self._conn.create_task(_disconnect("Application disconnected"))
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE,
                f"maximum number of channels ({config.max_channels}) open",
            )
        self.open_channels += 1
        return _CountedSession(self, config)

    def begin_auth(self, username: str) -> bool:
        return True  # always ask for credentials

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == self._config.user and password == self._config.password

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        wanted = key.public_data
        return username == self._config.user and any(
            k.public_data == wanted for k in self._config.client_keys
        )


class QuirkyServer(asyncssh.SFTPServer):
    """asyncssh's chrooted SFTPServer plus the behaviour selected by ``config.quirk``."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], config: ServerConfig) -> None:
        super().__init__(chan, chroot=str(config.root).encode())
        self._config = config
        # Files open for writing (pickup_everything: only those the open created), by id.
        self._written: dict[int, str] = {}

    # -- helpers ---------------------------------------------------------------------

    def _local(self, path: bytes) -> str:
        return os.fsdecode(self.map_path(path))

    def map_path(self, path: bytes) -> bytes:
        local: bytes = super().map_path(path)
        if self._config.quirk != "case_insensitive":
            return local
        return _fold_case(local, os.fsencode(self._config.root))

    def _in_outbox(self, path: bytes) -> bool:
        local = Path(self._local(path))
        outbox = self._config.root / OUTBOX
        return local == outbox or outbox in local.parents

    def _refuse_if_read_only(self) -> None:
        if self._config.quirk == "read_only_generic":
            # OpenSSH maps EROFS (like any errno it has no code for) to a bare failure.
            raise asyncssh.SFTPFailure("Failure")

    def _after_publish(self, newpath: bytes) -> None:
        quirk = self._config.quirk
        if quirk == "instant_pickup":
            local = Path(self._local(newpath))
            outbox = self._config.root / OUTBOX
            if local.parent == outbox and local.suffix.lower() == ".csv":
                local.rename(self._config.root / SENT / local.name)
        elif quirk == "drop_after_rename" and not self._config.dropped:
            self._config.publishes += 1
            if self._config.publishes < self._config.drop_after:
                return
            self._config.dropped = True
            # Cut the connection before asyncssh can send the reply: the client cannot
            # know whether the rename happened.
            self.connection.abort()

    # -- quirky operations -----------------------------------------------------------

    # -- counted operations (tests assert how many requests a publish costs) ------------

    def stat(self, path: bytes) -> Any:
        self._config.requests["stat"] += 1
        return super().stat(path)

    def lstat(self, path: bytes) -> Any:
        self._config.requests["stat"] += 1
        return super().lstat(path)

    def scandir(self, path: bytes) -> Any:
        self._config.requests["list"] += 1
        return super().scandir(path)

    def close(self, file_obj: object) -> Any:
        self._config.requests["close"] += 1
        result = super().close(file_obj)
        written = self._written.pop(id(file_obj), None)
        if written is not None and self._config.quirk == "pickup_everything":
            with contextlib.suppress(FileNotFoundError):
                os.remove(written)
        elif written is not None:  # clock_ahead
            ahead = time.time() + CLOCK_AHEAD_SECONDS
            os.utime(written, (ahead, ahead))
        return result

    def read(self, file_obj: object, offset: int, size: int) -> Any:
        self._config.requests["read"] += 1
        return super().read(file_obj, offset, size)

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        self._config.requests["open"] += 1
        if pflags & _WRITE_FLAGS:
            self._refuse_if_read_only()
        if self._config.quirk == "permission_denied_write" and pflags & FXF_WRITE:
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        if self._config.quirk == "hang_on_write" and pflags & FXF_WRITE:
            return asyncio.Event().wait()  # asyncssh awaits it: an answer that never comes
        if self._config.quirk in ("pickup_everything", "clock_ahead") and pflags & FXF_WRITE:
            local = self._local(path)
            new = not os.path.lexists(local)
            file_obj = super().open(path, pflags, attrs)
            if new or self._config.quirk == "clock_ahead":
                self._written[id(file_obj)] = local
            return file_obj
        return super().open(path, pflags, attrs)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        self._config.requests["write"] += 1
        quirk = self._config.quirk
        if quirk in ("disk_full", "disk_full_generic"):
            room = self._config.disk_full_after - self._config.bytes_written
            if len(data) > room:
                if room > 0:
                    super().write(file_obj, offset, data[:room])
                    self._config.bytes_written += room
                # OpenSSH's sftp-server says only "Failure" for ENOSPC (and for a short
                # write); asyncssh's own server passes the OS message on.
                raise asyncssh.SFTPFailure(
                    "No space left on device" if quirk == "disk_full" else "Failure"
                )
            self._config.bytes_written += len(data)
        return super().write(file_obj, offset, data)  # type: ignore[return-value]

    def _vfs(self, real: os.statvfs_result) -> os.statvfs_result | asyncssh.SFTPVFSAttrs:
        quirk = self._config.quirk
        if quirk == "disk_full_generic":
            total = self._config.disk_full_after
            free = max(0, total - self._config.bytes_written) // _BLOCK
            blocks = max(1, -(-total // _BLOCK))
            return asyncssh.SFTPVFSAttrs(
                _BLOCK, _BLOCK, blocks, free, free, 1024, 1000, 1000, 0, 0, 255
            )
        if quirk == "disk_full" and self._config.bytes_written >= self._config.disk_full_after:
            # A full server tells the truth here, as OpenSSH's statvfs@openssh.com does.
            return asyncssh.SFTPVFSAttrs(_BLOCK, _BLOCK, 4, 0, 0, 64, 0, 0, 0, 0, 255)
        if quirk == "read_only_generic":
            vfs = asyncssh.SFTPVFSAttrs.from_local(real)
            vfs.flags |= _ST_RDONLY
            return vfs
        return real

    def statvfs(self, path: bytes) -> os.statvfs_result | asyncssh.SFTPVFSAttrs:
        if not self._config.statvfs:
            raise asyncssh.SFTPOpUnsupported("statvfs not supported")
        return self._vfs(os.statvfs(self._local(path)))

    def fstatvfs(self, file_obj: object) -> os.statvfs_result | asyncssh.SFTPVFSAttrs:
        return self._vfs(os.statvfs(file_obj.fileno()))  # type: ignore[attr-defined]

    def remove(self, path: bytes) -> None:
        self._config.requests["remove"] += 1
        self._refuse_if_read_only()
        if self._config.quirk == "upload_only" and self._in_outbox(path):
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        super().remove(path)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse_if_read_only()
        super().mkdir(path, attrs)

    def rmdir(self, path: bytes) -> None:
        self._refuse_if_read_only()
        super().rmdir(path)

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse_if_read_only()
        super().setstat(path, attrs)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._config.requests["rename"] += 1
        self._refuse_if_read_only()
        quirk = self._config.quirk
        if quirk == "no_rename":
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        if quirk == "rename_overwrites":
            os.replace(self._local(oldpath), self._local(newpath))
        elif quirk == "generic_failure" and os.path.lexists(self._local(newpath)):
            raise asyncssh.SFTPFailure("Failure")
        else:
            super().rename(oldpath, newpath)
        self._after_publish(newpath)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse_if_read_only()
        if self._config.quirk in ("no_posix_rename", "no_rename"):
            raise asyncssh.SFTPOpUnsupported("posix-rename not supported")
        super().posix_rename(oldpath, newpath)
        self._after_publish(newpath)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._config.requests["link"] += 1
        self._refuse_if_read_only()
        if self._config.quirk == "no_rename":
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        if not self._config.hardlink:
            raise asyncssh.SFTPOpUnsupported("hardlink not supported")
        super().link(oldpath, newpath)
        self._after_publish(newpath)


def _fold_case(local: bytes, root: bytes) -> bytes:
    """Resolve each name under ``root`` as a Windows server does: case-preserving, but
    ``ABC.CSV`` and ``abc.csv`` are one name (the existing entry's spelling wins)."""
    resolved = root
    for part in os.path.relpath(local, root).split(os.sep.encode()):
        candidate = os.path.join(resolved, part)
        if part not in (b".", b"..") and not os.path.lexists(candidate):
            with contextlib.suppress(OSError):
                for entry in os.listdir(resolved):
                    if _upcase(entry) == _upcase(part):
                        candidate = os.path.join(resolved, entry)
                        break
        resolved = candidate
    return resolved


def _upcase(name: bytes) -> str:
    """NTFS's comparison key: each character upper-cased on its own (its upcase table is
    one character to one, so 'ß' stays 'ß' where Python's upper() makes 'SS')."""
    return "".join(c if len(c.upper()) != 1 else c.upper() for c in os.fsdecode(name))


async def _cancel_pending() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoopThread:
    """An asyncio event loop running in a daemon thread, for servers used by sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(_cancel_pending())  # e.g. a "hang_on_write" handler still waiting
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


async def stop_server(acceptor: asyncssh.SSHAcceptor, config: ServerConfig) -> None:
    """Stop listening and close every connection still open (no leaked transports)."""
    acceptor.close()
    await acceptor.wait_closed()
    for conn in config.connections:
        conn.close()
        await conn.wait_closed()


def prepare_root(root: Path) -> None:
    (root / SENT).mkdir(parents=True, exist_ok=True)


async def start_server(
    config: ServerConfig,
    host_key: asyncssh.SSHKey,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> asyncssh.SSHAcceptor:
    """Listen on ``host:port`` (0: a free port); ``acceptor.sockets[0]`` says which."""
    if config.quirk not in QUIRKS:
        raise ValueError(f"unknown quirk {config.quirk!r}; one of {', '.join(QUIRKS)}")
    return await asyncssh.listen(
        host,
        port,
        server_host_keys=[host_key],
        # No sftp_factory: sessions come from _Auth.session_requested, which counts the
        # channels open on each connection (channel_limit) and serves SFTP only.
        server_factory=functools.partial(_Auth, config),
        # One process serves many short test sessions; no need to wait for them.
        login_timeout=30,
    )


def bound_port(acceptor: asyncssh.SSHAcceptor) -> int:
    return int(acceptor.sockets[0].getsockname()[1])


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.export_public_key('openssh').decode().strip()}"


def load_public_keys(paths: Iterable[Path]) -> list[asyncssh.SSHKey]:
    return [asyncssh.read_public_key(str(p)) for p in paths]
