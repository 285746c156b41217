"""OpenSSH known_hosts, read the way ssh(1) reads it (sshd(8), "SSH_KNOWN_HOSTS FILE FORMAT").

paramiko's own reader stops at the first line it does not understand (an ``@revoked`` or
``@cert-authority`` marker made the whole file fail) and knows no negated patterns, so
this module parses the file itself and uses paramiko only to decode keys:

- ``[@marker] hostnames keytype base64-key [comment]``; blank lines and ``#`` comments
  are skipped;
- hostnames are a comma list of patterns with ``*`` and ``?`` wildcards, matched without
  regard to case against ``host`` (port 22) or ``[host]:port``; a line applies when one
  pattern matches and no ``!``-negated pattern does (a negated match wins, as in
  OpenSSH); a hashed name ``|1|salt|hmac`` is one name, never a list;
- ``@revoked``: the key must never be accepted for the hosts the line names, even when
  another line trusts it;
- ``@cert-authority`` (host certificates) is not supported: such lines are skipped, with
  one warning per file, and so are unknown markers.

A line that cannot be read (missing fields, broken base64, a key that does not decode)
is a settings problem naming the file and line: a trust file that is only partly
understood must not be half-used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.pkey import UnknownKeyType

from erp_push.errors import SettingsError

log = logging.getLogger(__name__)

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
_HASH_MAGIC = "|1|"
_CERT_SUFFIX = "-cert-v01@openssh.com"
_SETTING = "config.sftp_known_hosts"

# Parsed files, keyed by path and the file's identity: a run opens several connections
# (and reconnects), the file is read and its warnings logged once per version.
_cache: dict[Path, tuple[tuple[int, int, int], list[Entry]]] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Entry:
    """One usable line: who it is for, and the key (raw blob; decoded when we can)."""

    line: int
    marker: str | None  # None or REVOKED
    hosts: str  # the hostnames field, as written
    key_type: str
    blob: bytes  # the public key as on the wire: what a server presents
    key: paramiko.PKey | None  # None for key types paramiko does not know

    def matches(self, name: str) -> bool:
        return host_matches(name, self.hosts)


@dataclass(frozen=True)
class HostKeys:
    """What a known_hosts file says about one server."""

    trusted: list[paramiko.PKey] = field(default_factory=list)
    revoked: list[Entry] = field(default_factory=list)

    @property
    def key_types(self) -> set[str]:
        """Key types we can verify, to ask the server for one of them."""
        return {key.get_name() for key in self.trusted}

    def revocation(self, blob: bytes) -> Entry | None:
        """The ``@revoked`` line that names this key, if any."""
        return next((entry for entry in self.revoked if entry.blob == blob), None)

    def trusts(self, blob: bytes) -> bool:
        return self.revocation(blob) is None and any(k.asbytes() == blob for k in self.trusted)


def host_name(host: str, port: int) -> str:
    """How OpenSSH names a server in known_hosts: ``host`` on 22, ``[host]:port`` otherwise."""
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Only * and ? are special (fnmatch would also treat "[...]" as a character class,
    # which "[host]:port" is not).
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _hashed_match(name: str, hashed: str) -> bool:
    try:
        salt_b64, digest_b64 = hashed[len(_HASH_MAGIC) :].split("|")
        salt = base64.b64decode(salt_b64, validate=True)
        digest = base64.b64decode(digest_b64, validate=True)
    except (ValueError, binascii.Error):
        return False  # OpenSSH skips a hashed name it cannot read
    ours = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(ours, digest)


def host_matches(name: str, hosts: str) -> bool:
    """Whether a known_hosts hostnames field applies to ``name`` (see module docstring)."""
    if hosts.startswith(_HASH_MAGIC):
        return _hashed_match(name, hosts)
    name = name.lower()
    positive = False
    for pattern in hosts.split(","):
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").lower()
        if pattern and _pattern_regex(pattern).fullmatch(name):
            if negated:
                return False
            positive = True
    return positive


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    raw = blob[4 : 4 + length]
    if len(raw) != length:
        return None
    return raw.decode("ascii", errors="replace")


def _decode(key_type: str, blob: bytes) -> paramiko.PKey | None:
    """A paramiko key, or None for a type paramiko cannot verify with (e.g. sk-*, DSA)."""
    if key_type.endswith(_CERT_SUFFIX):
        return None
    try:
        return paramiko.PKey.from_type_string(key_type, blob)
    except UnknownKeyType:
        return None


def parse(text: str, path: Path | str = "known_hosts") -> list[Entry]:
    """Every usable line (trusted and revoked); raises SettingsError on a broken line."""
    entries: list[Entry] = []
    skipped: dict[str, int] = {}

    def broken(number: int, why: str) -> SettingsError:
        return SettingsError([f"{_SETTING}: {path} line {number}: {why}"])

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = None
        if fields[0].startswith("@"):
            marker = fields.pop(0)
        if len(fields) < 3:
            raise broken(number, "expected [@marker] hostnames keytype key")
        hosts, key_type, key_b64 = fields[:3]
        if marker not in (None, REVOKED):
            skipped[marker] = skipped.get(marker, 0) + 1
            continue
        try:
            blob = base64.b64decode(key_b64, validate=True)
        except (ValueError, binascii.Error):
            raise broken(number, f"the {key_type} key is not valid base64") from None
        if _blob_type(blob) != key_type:
            raise broken(number, f"the key is not a {key_type} key")
        try:
            key = _decode(key_type, blob)
        except (paramiko.SSHException, ValueError, TypeError, struct.error):
            raise broken(number, f"the {key_type} key cannot be read") from None
        if key is None and marker is None:
            log.debug("%s line %d: %s keys are not supported; line skipped", path, number, key_type)
            continue
        # A revoked key stays revoked even when paramiko cannot decode its type: it is
        # compared as raw bytes.
        entries.append(Entry(number, marker, hosts, key_type, blob, key))

    for marker, count in skipped.items():
        what = (
            "host certificates are not supported; list the server's own host key"
            if marker == CERT_AUTHORITY
            else "unknown marker"
        )
        log.warning("%s: %d %s line(s) skipped: %s", path, count, marker, what)
    return entries


def _entries(path: Path) -> list[Entry]:
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            version = (info.st_ino, info.st_size, info.st_mtime_ns)
            with _cache_lock:
                cached = _cache.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        log.debug("known_hosts file %s does not exist; treating it as empty", path)
        return []
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SettingsError([f"{_SETTING}: cannot read {path}: {reason}"]) from None
    entries = parse(text, path)
    with _cache_lock:
        _cache[path] = (version, entries)
    return entries


def load(path: Path, host: str, port: int) -> HostKeys:
    """The keys ``path`` trusts and revokes for ``host:port``. A missing file is empty."""
    name = host_name(host, port)
    keys = HostKeys()
    for entry in _entries(path):
        if not entry.matches(name):
            continue
        if entry.marker == REVOKED:
            keys.revoked.append(entry)
        elif entry.key is not None:  # always: parse() keeps no trusted line it cannot read
            keys.trusted.append(entry.key)
    return keys
