"""A throwaway ProFTPD (mod_sftp) server: another real SFTP server ERP hosts run.

ProFTPD 1.3.8 differs from OpenSSH in ways a client must survive
(tests/test_sftp_servers.py checks each one):

- plain RENAME onto an existing name is always refused with status 11 ("File already
  exists", a v5 code sent to a v3 client); ``posix-rename@openssh.com`` overwrites;
- ``AllowOverwrite`` is off by default: opening an existing file with O_TRUNC is
  "Permission denied";
- at most 10 channels per connection (``SFTPMaxChannels``): the 11th channel request
  drops the whole connection, where OpenSSH refuses only that channel.

``VARIANTS`` names the configurations the fixtures offer:

- ``normal``: the above, with hardlink, posix-rename, fsync and statvfs advertised;
- ``upload_only``: ``<Limit DELE> DenyAll`` on the outbox (and below it): files can be
  written and renamed but never deleted, as in many drop folders;
- ``no_rename``: ``<Limit RNFR RNTO> DenyAll`` on the outbox: rename and posix-rename are
  refused, hardlink still works;
- ``no_hardlink``: ``SFTPExtensions -hardlink``: the extension is neither advertised nor
  served.

Needs root (``DefaultRoot`` chroots each login) and ``/usr/sbin/proftpd`` with
``mod_sftp.so`` (Debian: ``proftpd-core`` and ``proftpd-mod-crypto``). The login is a
virtual user from an ``AuthUserFile``: no system account is created.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh

PROFTPD = Path("/usr/sbin/proftpd")
MOD_SFTP = Path("/usr/lib/proftpd/mod_sftp.so")
VARIANTS = ("normal", "upload_only", "no_rename", "no_hardlink")
# The uid/gid the virtual user's sessions run as: any unprivileged id works, as long as it
# owns the writable folders. 65534 is "nobody"/"nogroup" on Debian.
SESSION_ID = 65534


@dataclass(frozen=True)
class ProftpdServer:
    """A running ProFTPD and what a client needs to reach and trust it."""

    port: int
    user: str
    password: str
    root: Path  # served as "/" (DefaultRoot)
    host_key: asyncssh.SSHKey
    client_key_path: Path
    base: Path  # config, keys, logs (sftp.log explains refusals)

    @property
    def sftp_log(self) -> Path:
        return self.base / "sftp.log"


def unavailable_reason() -> str | None:
    """Why ProFTPD cannot run here, or None when it can."""
    if not PROFTPD.exists():
        return f"{PROFTPD} is not installed (apt-get install proftpd-core proftpd-mod-crypto)"
    if not MOD_SFTP.exists():
        return f"{MOD_SFTP} is missing (apt-get install proftpd-mod-crypto)"
    if os.geteuid() != 0:
        return "the ProFTPD fixture needs root (DefaultRoot chroots each login)"
    if _crypt is None:
        return "libcrypt is not available to hash the virtual user's password"
    return None


def _load_crypt() -> Callable[[bytes, bytes], bytes | None] | None:
    # Python's crypt module is deprecated (gone in 3.13); ProFTPD itself links libcrypt,
    # so wherever ProFTPD runs, libcrypt's crypt(3) is there too.
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    func = ctypes.CDLL(name).crypt
    func.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    func.restype = ctypes.c_char_p
    return func


_crypt = _load_crypt()


def password_hash(password: str) -> str:
    """A SHA-512 crypt(3) hash, the format AuthUserFile (like /etc/shadow) expects."""
    assert _crypt is not None
    salt = secrets.token_hex(8)
    result = _crypt(password.encode(), f"$6${salt}$".encode())
    if not result or not result.startswith(b"$6$"):
        raise RuntimeError("crypt(3) could not hash the password with SHA-512")
    return str(result.decode())


def _variant_config(variant: str, outbox: Path) -> str:
    if variant == "upload_only":
        limit = "DELE"
    elif variant == "no_rename":
        limit = "RNFR RNTO"
    elif variant == "no_hardlink":
        return "SFTPExtensions -hardlink\n"
    else:
        return ""
    # <Directory> takes the real path; ProFTPD maps it into each login's chroot. It also
    # covers every folder below (sent/).
    return f"<Directory {outbox}>\n  <Limit {limit}>\n    DenyAll\n  </Limit>\n</Directory>\n"


def server_config(base: Path, root: Path, port: int, variant: str) -> str:
    """A self-contained proftpd.conf (nothing from /etc/proftpd is read)."""
    import grp
    import pwd

    run_user = pwd.getpwuid(SESSION_ID).pw_name
    run_group = grp.getgrgid(SESSION_ID).gr_name
    return f"""\
ModulePath /usr/lib/proftpd
LoadModule mod_sftp.c
ServerType standalone
ServerName "erp-push test ProFTPD"
Port {port}
DefaultAddress 127.0.0.1
SocketBindTight on
UseIPv6 off
User {run_user}
Group {run_group}
PidFile {base}/proftpd.pid
ScoreboardFile {base}/proftpd.scoreboard
DelayEngine off
WtmpLog off
UseReverseDNS off
TransferLog none
SystemLog {base}/system.log
AuthOrder mod_auth_file.c
AuthUserFile {base}/passwd
RequireValidShell off
DefaultRoot ~
Umask 022
MaxInstances 64
SFTPEngine on
SFTPLog {base}/sftp.log
SFTPHostKey {base}/hostkey_ed25519
SFTPAuthMethods publickey password
SFTPAuthorizedUserKeys file:{base}/authorized_keys/%u
{_variant_config(variant, root / "outbox")}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], base: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (base / "stderr.log").read_text(errors="replace").strip()
            raise RuntimeError(f"proftpd exited with {proc.returncode}: {err}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.01)
    raise RuntimeError(f"proftpd did not listen on port {port} within {timeout}s (see {base})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the master and every session process it forked (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Sessions still open when the master went away end with it; make sure none linger.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stderr:
        proc.stderr.close()


@contextlib.contextmanager
def run_proftpd(variant: str = "normal", port: int = 0) -> Iterator[ProftpdServer]:
    """Start ProFTPD in the foreground (``-n``) on a loopback port; stop it at the end.

    Serves a fresh root with ``/outbox`` and ``/outbox/sent`` (owned by the session id),
    to a virtual user with a random password and an ed25519 client key.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ProFTPD variant {variant!r}; one of {', '.join(VARIANTS)}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    base = Path(tempfile.mkdtemp(prefix=f"erp-push-proftpd-{variant}-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        base.chmod(0o755)
        root = base / "root"
        root.mkdir(mode=0o755)
        for folder in (root / "outbox", root / "outbox" / "sent"):
            folder.mkdir(mode=0o755)
            os.chown(folder, SESSION_ID, SESSION_ID)
        user = "erp"
        password = secrets.token_urlsafe(16)
        passwd = base / "passwd"
        passwd.write_text(
            f"{user}:{password_hash(password)}:{SESSION_ID}:{SESSION_ID}::{root}:/bin/false\n"
        )
        passwd.chmod(0o600)  # ProFTPD refuses a world-readable AuthUserFile
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(base / "hostkey_ed25519"))
        (base / "hostkey_ed25519").chmod(0o600)
        client_key_path = base / "client_ed25519"
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(str(client_key_path))
        client_key.write_public_key(str(client_key_path) + ".pub")
        client_key_path.chmod(0o600)
        keys_dir = base / "authorized_keys"
        keys_dir.mkdir(mode=0o755)
        # mod_sftp reads RFC 4716 public keys, not OpenSSH's one-line format.
        (keys_dir / user).write_bytes(client_key.export_public_key("rfc4716"))
        port = port or _free_port()
        config = base / "proftpd.conf"
        config.write_text(server_config(base, root, port, variant))
        # -n logs to stderr as well: into a file, so a full pipe can never stall it.
        with (base / "stderr.log").open("wb") as stderr:
            proc = subprocess.Popen(
                [str(PROFTPD), "-n", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: sessions stop with it
            )
        _wait_for_port(port, proc, base, timeout=10)
        yield ProftpdServer(
            port=port,
            user=user,
            password=password,
            root=root,
            host_key=host_key,
            client_key_path=client_key_path,
            base=base,
        )
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)
