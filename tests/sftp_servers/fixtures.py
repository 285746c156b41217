"""Real SFTP servers on loopback, as pytest fixtures (registered in tests/conftest.py).

- ``sftp_server_factory(quirk="normal", ...)``: an asyncssh server over a fresh temp dir,
  one per call, with the odd behaviour named by ``quirk`` (see ``asyncssh_server``);
- ``asyncssh_sftp``: the same with the default quirk;
- ``openssh_sftp``: a throwaway OpenSSH ``sshd`` (session-scoped; chroot, a real local
  user with a password and an ed25519 key), the server most ERPs run;
- ``proftpd_factory(variant="normal")``: a ProFTPD mod_sftp server per call (virtual
  user, DefaultRoot chroot; see ``proftpd_server`` for the variants); ``proftpd_sftp``:
  the same with the default variant;
- ``openssh_mounted_outbox(kind)``: a tmpfs in the ``openssh_sftp`` chroot that is full
  (16 KiB) or read-only, as the outbox (skipped where mounting is not permitted);
- ``sftpserver_sftp``: pytest-sftpserver's in-memory server (rename overwrites).

Each gives a ``SftpServerInfo``: where to connect, how to trust it (its host key is
always verified; nothing here turns verification off) and small helpers to look at or
tamper with the server's files directly, behind the client's back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest
from pydantic import SecretStr

from erp_push.transport import SftpOptions
from tests.sftp_servers import asyncssh_server, proftpd_server
from tests.sftp_servers.asyncssh_server import LoopThread, ServerConfig

SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class SftpServerInfo:
    """A running test server and how to reach, trust and inspect it.

    ``root`` is the directory the server serves (``/`` on the wire); for the in-memory
    pytest-sftpserver it is None and ``content`` is the dict it serves instead. Use the
    helpers (``write``, ``read``, ``listdir``...) to work with either.
    """

    kind: str  # "asyncssh", "openssh", "proftpd" or "sftpserver"
    host: str
    port: int
    user: str
    password: str
    root: Path | None
    host_key_sha256: str
    known_hosts_path: Path
    client_key_path: Path | None
    outbox: str = "/outbox"
    sent: str = "/outbox/sent"
    content: dict[str, Any] | None = field(default=None, repr=False)
    # asyncssh servers only: every SFTP request served, by kind ("stat", "list", ...)
    requests: Counter[str] | None = field(default=None, repr=False)

    def options(self, **overrides: Any) -> SftpOptions:
        """Client options that trust this server (via known_hosts) and log in by password."""
        base = SftpOptions(
            host=self.host,
            port=self.port,
            user=self.user,
            password=SecretStr(self.password),
            known_hosts=self.known_hosts_path,
            connect_timeout=5,
            operation_timeout=10,
            keepalive_interval=15,
            use_agent=False,
        )
        return replace(base, **overrides)

    # --- direct access to the served files (behind the client's back) ---------------

    def local(self, remote: str) -> Path:
        if self.root is None:
            raise TypeError("the in-memory server has no directory; use content")
        return self.root / remote.lstrip("/")

    def _node(self, remote: str) -> Any:
        node: Any = self.content
        for part in remote.strip("/").split("/"):
            if part:
                node = node[part]
        return node

    def write(self, remote: str, data: bytes) -> None:
        if self.root is None:
            folder, _, name = remote.rstrip("/").rpartition("/")
            self._node(folder)[name] = data
        else:
            self.local(remote).write_bytes(data)

    def read(self, remote: str) -> bytes:
        if self.root is None:
            data = self._node(remote)
            return data.encode() if isinstance(data, str) else bytes(data)
        return self.local(remote).read_bytes()

    def exists(self, remote: str) -> bool:
        if self.root is None:
            try:
                self._node(remote)
            except KeyError:
                return False
            return True
        return self.local(remote).exists()

    def listdir(self, remote: str) -> list[str]:
        """File names in a folder (sub-folders left out), sorted."""
        if self.root is None:
            folder = self._node(remote)
            return sorted(n for n, v in folder.items() if not isinstance(v, dict))
        return sorted(p.name for p in self.local(remote).iterdir() if not p.is_dir())

    def files(self) -> dict[str, bytes]:
        """Every file in outbox and sent, as ``{remote path: bytes}``."""
        return {
            f"{folder}/{name}": self.read(f"{folder}/{name}")
            for folder in (self.outbox, self.sent)
            for name in self.listdir(folder)
        }

    def clear(self) -> None:
        """Empty outbox and sent (for servers shared by several tests)."""
        for folder in (self.outbox, self.sent):
            for name in self.listdir(folder):
                if self.root is None:
                    del self._node(folder)[name]
                else:
                    self.local(f"{folder}/{name}").unlink()


# --- shared helpers -----------------------------------------------------------------


def sha256_fingerprint(public_blob: bytes) -> str:
    digest = hashlib.sha256(public_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_client_key(path: Path) -> asyncssh.SSHKey:
    """An unencrypted ed25519 client key in OpenSSH format (+ ``.pub``), as ssh-keygen."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    path.chmod(0o600)
    return key


# --- asyncssh ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def _asyncssh_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def _asyncssh_host_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
def sftp_server_factory(
    _asyncssh_loop: LoopThread,
    _asyncssh_host_key: asyncssh.SSHKey,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SftpServerInfo]]:
    """Start asyncssh SFTP servers: ``factory(quirk="normal", *, hardlink=True,
    disk_full_after=16, client_keys=(), drop_after=1, max_channels=10)``;
    ``client_keys`` are extra ``.pub`` files to accept. Each server gets its own root
    with ``/outbox`` and ``/outbox/sent``."""
    servers: list[tuple[asyncssh.SSHAcceptor, ServerConfig]] = []

    def start(
        quirk: str = "normal",
        *,
        hardlink: bool = True,
        disk_full_after: int = 16,
        client_keys: tuple[Path, ...] | list[Path] = (),
        drop_after: int = 1,
        max_channels: int = 10,
        statvfs: bool = True,
    ) -> SftpServerInfo:
        base = tmp_path_factory.mktemp(f"asyncssh-{quirk}")
        root = base / "root"
        asyncssh_server.prepare_root(root)
        client_key_path = base / "client_ed25519"
        client_key = write_client_key(client_key_path)
        config = ServerConfig(
            root=root,
            user="erp",
            password=secrets.token_urlsafe(12),
            quirk=quirk,
            hardlink=hardlink,
            disk_full_after=disk_full_after,
            drop_after=drop_after,
            max_channels=max_channels,
            statvfs=statvfs,
            client_keys=[client_key, *asyncssh_server.load_public_keys(client_keys)],
        )
        acceptor = _asyncssh_loop.run(asyncssh_server.start_server(config, _asyncssh_host_key))
        servers.append((acceptor, config))
        port = asyncssh_server.bound_port(acceptor)
        known_hosts = base / "known_hosts"
        line = asyncssh_server.known_hosts_line("127.0.0.1", port, _asyncssh_host_key)
        known_hosts.write_text(line + "\n")
        return SftpServerInfo(
            kind="asyncssh",
            host="127.0.0.1",
            port=port,
            user=config.user,
            password=config.password,
            root=root,
            host_key_sha256=_asyncssh_host_key.get_fingerprint("sha256"),
            known_hosts_path=known_hosts,
            client_key_path=client_key_path,
            requests=config.requests,
        )

    yield start

    async def close_all() -> None:
        for acceptor, config in servers:
            await asyncssh_server.stop_server(acceptor, config)

    _asyncssh_loop.run(close_all())


@pytest.fixture
def asyncssh_sftp(sftp_server_factory: Callable[..., SftpServerInfo]) -> SftpServerInfo:
    return sftp_server_factory()


# --- OpenSSH sshd ------------------------------------------------------------------


def _server_unavailable(reason: str, server: str = "OpenSSH sshd") -> None:
    """Skip on a laptop without the server/root; in CI a missing server is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{server} is required in CI: {reason}")
    pytest.skip(reason)


def _sshd_config(base: Path, chroot: Path, port: int, user: str) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base}/hostkey_ed25519
PidFile none
UsePAM no
PasswordAuthentication yes
PubkeyAuthentication yes
KbdInteractiveAuthentication no
PermitRootLogin no
AuthorizedKeysFile {base}/authorized_keys/%u
AllowUsers {user}
LogLevel ERROR
Subsystem sftp internal-sftp
Match User {user}
    ChrootDirectory {chroot}
    ForceCommand internal-sftp
    AllowTcpForwarding no
    X11Forwarding no
"""


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"sshd exited with {proc.returncode}: {err.strip()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.01)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout}s")


def _need_sshd() -> None:
    """Skip (or, under CI, fail) a test when sshd cannot be run here."""
    if not SSHD.exists():
        _server_unavailable(f"{SSHD} is not installed (apt-get install openssh-server)")
    if os.geteuid() != 0:
        _server_unavailable("the sshd fixture needs root (useradd, chroot)")


@pytest.fixture(scope="session")
def openssh_sftp() -> Iterator[SftpServerInfo]:
    """A throwaway sshd on a free loopback port, chrooted, with its own local user."""
    _need_sshd()
    with run_openssh() as info:
        yield info


@pytest.fixture
def openssh_one_startup() -> Iterator[SftpServerInfo]:
    """A throwaway sshd that takes one unauthenticated connection at a time
    (``MaxStartups 1``): the next one is told "Exceeded MaxStartups" and closed, as
    OpenSSH's default (10:30:100) does at random to bursts beyond ten."""
    _need_sshd()
    with run_openssh(global_options="MaxStartups 1\n") as info:
        yield info


@contextlib.contextmanager
def run_openssh(global_options: str = "") -> Iterator[SftpServerInfo]:
    """Start a throwaway sshd (also used by the benchmark); needs root and /usr/sbin/sshd.
    ``global_options`` go first in its sshd_config (before any Match block).

    Needs root (a real user for password login, a root-owned chroot). Each session gets
    a unique user name and password, so parallel sessions on one machine do not collide.
    Stopped by PID and cleaned up (user, files) at the end.
    """
    # The chroot and all its parents must be root-owned and not group/world writable,
    # which rules out anything under /tmp (mode 1777).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="erp-push-sshd-", dir="/run"))
    base.chmod(0o755)
    user = "erpsftp" + secrets.token_hex(4)
    password = secrets.token_urlsafe(16)
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [
                "useradd",
                "--no-create-home",
                "--home-dir",
                "/",
                "--shell",
                "/usr/sbin/nologin",
                user,
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["chpasswd"], input=f"{user}:{password}".encode(), check=True)
        chroot = base / "root"
        chroot.mkdir(mode=0o755)
        (chroot / "outbox" / "sent").mkdir(parents=True)
        for folder in (chroot / "outbox", chroot / "outbox" / "sent"):
            shutil.chown(folder, user, user)
            folder.chmod(0o755)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "hostkey_ed25519")],
            check=True,
        )
        client_key_path = base / "client_ed25519"
        write_client_key(client_key_path)
        keys_dir = base / "authorized_keys"
        keys_dir.mkdir(mode=0o755)
        (keys_dir / user).write_bytes(Path(str(client_key_path) + ".pub").read_bytes())
        (keys_dir / user).chmod(0o644)
        port = free_port()
        config = base / "sshd_config"
        config.write_text(global_options + _sshd_config(base, chroot, port, user))
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait_for_port(port, proc)
        host_key = paramiko.Ed25519Key.from_private_key_file(str(base / "hostkey_ed25519"))
        known_hosts = base / "known_hosts"
        known_hosts.write_text(
            f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n"
        )
        yield SftpServerInfo(
            kind="openssh",
            host="127.0.0.1",
            port=port,
            user=user,
            password=password,
            root=chroot,
            host_key_sha256=sha256_fingerprint(host_key.asbytes()),
            known_hosts_path=known_hosts,
            client_key_path=client_key_path,
        )
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# --- OpenSSH with a full or read-only outbox ---------------------------------------------

MOUNT_KINDS = ("full", "read_only")


@pytest.fixture
def openssh_mounted_outbox(
    openssh_sftp: SftpServerInfo,
) -> Iterator[Callable[..., SftpServerInfo]]:
    """``factory(kind="full", *, size="16k")``: the ``openssh_sftp`` server with a tmpfs
    mounted inside its chroot as the outbox (``/<mount>/`` with ``sent/`` in it).

    ``full``: a tmpfs of ``size`` bytes, so writes soon fail with ENOSPC; ``read_only``:
    the tmpfs remounted read-only (EROFS). Real kernel errors, reported by the real
    sftp-server. Skipped with the reason where mounting is not permitted (containers
    without CAP_SYS_ADMIN); unmounted at teardown.
    """
    import pwd

    assert openssh_sftp.root is not None
    chroot = openssh_sftp.root
    user = pwd.getpwnam(openssh_sftp.user)
    mounts: list[Path] = []

    def mount(*args: str) -> None:
        try:
            subprocess.run(["mount", *args], check=True, capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here: cannot build a full or read-only outbox")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"mount is not permitted here ({exc.stderr.strip() or exc})")

    def start(kind: str = "full", *, size: str = "16k") -> SftpServerInfo:
        if kind not in MOUNT_KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {', '.join(MOUNT_KINDS)}")
        name = f"{kind}-{secrets.token_hex(4)}"
        point = chroot / name
        point.mkdir(mode=0o755)
        options = f"size={size},mode=0755,uid={user.pw_uid},gid={user.pw_gid}"
        try:
            mount("-t", "tmpfs", "-o", options, "erp-push-test", str(point))
        except BaseException:
            point.rmdir()
            raise
        mounts.append(point)
        (point / "sent").mkdir(mode=0o755)
        shutil.chown(point / "sent", user.pw_uid, user.pw_gid)
        if kind == "read_only":
            mount("-o", "remount,ro", str(point))
        return replace(openssh_sftp, outbox=f"/{name}", sent=f"/{name}/sent")

    yield start

    for point in reversed(mounts):
        # Lazy: a session the test left open may still hold the folder.
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
        with contextlib.suppress(OSError):
            point.rmdir()


# --- ProFTPD mod_sftp ----------------------------------------------------------------


@pytest.fixture
def proftpd_factory() -> Iterator[Callable[..., SftpServerInfo]]:
    """Start ProFTPD servers: ``factory(variant="normal")``, one process per call, each
    with its own root holding ``/outbox`` and ``/outbox/sent``; variants in
    ``proftpd_server.VARIANTS``. Skipped without proftpd/root, a failure in CI."""
    reason = proftpd_server.unavailable_reason()
    if reason is not None:
        _server_unavailable(reason, "ProFTPD")
    with contextlib.ExitStack() as stack:

        def start(variant: str = "normal") -> SftpServerInfo:
            server = stack.enter_context(proftpd_server.run_proftpd(variant))
            known_hosts = server.base / "known_hosts"
            line = asyncssh_server.known_hosts_line("127.0.0.1", server.port, server.host_key)
            known_hosts.write_text(line + "\n")
            return SftpServerInfo(
                kind="proftpd",
                host="127.0.0.1",
                port=server.port,
                user=server.user,
                password=server.password,
                root=server.root,
                host_key_sha256=server.host_key.get_fingerprint("sha256"),
                known_hosts_path=known_hosts,
                client_key_path=server.client_key_path,
            )

        yield start


@pytest.fixture
def proftpd_sftp(proftpd_factory: Callable[..., SftpServerInfo]) -> SftpServerInfo:
    return proftpd_factory()


# --- pytest-sftpserver ---------------------------------------------------------------


@pytest.fixture(scope="session")
def _sftpserver_closed(sftpserver: Any) -> Iterator[Any]:
    """The plugin's server, with its listening socket closed at the end (it never is)."""
    # Tests that refuse the host key hang up mid-handshake on purpose; socketserver would
    # print a traceback for each. A real server-side failure still fails the client.
    sftpserver.handle_error = lambda request, client_address: None
    yield sftpserver
    if sftpserver.is_alive():
        sftpserver.shutdown()
    sftpserver.server_close()


@pytest.fixture
def sftpserver_sftp(_sftpserver_closed: Any, tmp_path: Path) -> Iterator[SftpServerInfo]:
    """pytest-sftpserver serving ``{"outbox": {"sent": {}}}`` (any user/password works).

    Its host key is the RSA key shipped inside the plugin; we pin it like any other.
    Folders are dicts, files bytes; an empty root ``{}`` could not be written to.
    """
    from pytest_sftpserver.consts import SERVER_KEY_PRIVATE

    sftpserver = _sftpserver_closed
    host_key = paramiko.RSAKey.from_private_key_file(SERVER_KEY_PRIVATE)
    known_hosts = tmp_path / "known_hosts_sftpserver"
    known_hosts.write_text(
        f"[{sftpserver.host}]:{sftpserver.port} {host_key.get_name()} {host_key.get_base64()}\n"
    )
    content: dict[str, Any] = {"outbox": {"sent": {}}}
    with sftpserver.serve_content(content):
        yield SftpServerInfo(
            kind="sftpserver",
            host=sftpserver.host,
            port=sftpserver.port,
            user="erp",
            password="anything",
            root=None,
            host_key_sha256=sha256_fingerprint(host_key.asbytes()),
            known_hosts_path=known_hosts,
            client_key_path=None,
            content=content,
        )
