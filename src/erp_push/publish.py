"""Exactly-once publishing: a whole file, under a free name, never over anything.

The ERP polls the outbox, so three things must never happen there: a partial file under a
final name, an existing file overwritten, the same invoice delivered twice. This module
owns those rules; ``transport`` only carries out the operations, and the pipeline decides
*when* to publish, never *how*.

How a file gets published (``publish_mode="rename"``), in round trips::

    1  stat the invoice's names (today's and the last LOOKBACK_DAYS days', outbox and
       sent/) + create <name>.<8 hex>.erp-push.tmp          (all sent back to back)
         └─ an identical file under one of them? ─► already delivered, tmp dropped
    2  write the tmp + close it
    3  stat the chosen name in outbox and sent/ again (someone may have taken it)
    4  hardlink@openssh.com tmp → name (atomic: refused if the name exists) + remove tmp,
       or, without hardlink, a plain SFTP rename (never posix-rename, which overwrites)
         └─ name taken meanwhile? identical bytes → already delivered; else the next name

No folder is ever listed: the cost of a publish does not grow with the outbox or the
ERP's archive in sent/. A name is looked up by ``stat``, which the server answers under
its own case rules (a Windows server reports ``ABC.CSV`` for ``abc.csv``).

Before step 4 (or the exclusive create of ``direct`` mode) the caller's ``may_publish``
is asked whether the invoice's lease still has its safety margin: a file written by a
run that stalled past its lease is removed, never made visible.

A deliberate re-send (``erp-push resend``) publishes with ``fresh``: identical files
under the invoice's names are then only taken names, never proof of delivery, so the
file lands under the next free name beside the earlier one; ``fresh`` is told each name
just before the file can become visible under it, so that after a crash the caller
knows which identical file is the re-send's own (``find_at``) and does not send a third.
"""

from __future__ import annotations

import logging
import posixpath
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Literal, Protocol

from erp_push.errors import (
    FailureCode,
    LeaseLapsing,
    NameTaken,
    RemoteFileMissing,
    SftpOperationError,
)
from erp_push.transport import TMP_PATTERN, Exchange, RemoteStat, Reply, SftpSession, Status

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

# How many names (<stem>.csv, <stem>-2.csv, ...) one invoice's file may carry.
MAX_CANDIDATES = 100
# An identical file found under the invoice's name dated up to this many days back
# proves an earlier delivery (a run that died before midnight, a lost journal). Older
# files are not looked for: every day costs two more stats per invoice.
LOOKBACK_DAYS = 7
# Within one day's names, how far past the last taken name we still look: the ERP may
# have deleted a file or two of a family, leaving gaps before one that is ours.
GAP = 8
# A write that fails with a bare "Failure" on a filesystem with less than this free is
# a full disk (OpenSSH says "Failure" for ENOSPC, and for EROFS).
NEARLY_FULL_BYTES = 64 * 1024

# Bytes go out (and are read back to compare) this many at a time: one round trip per
# window, whatever the file's size, and never more than a window of it in memory.
WINDOW_BYTES = 1024 * 1024


class Content(Protocol):
    """What gets published: a name, and bytes that can be streamed more than once (a
    rendered CSV in memory, an attachment spooled to a local file)."""

    @property
    def file_name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def chunks(self, size: int) -> Iterable[bytes]:
        """The bytes from the start, in pieces of at most ``size``."""
        ...

    @property
    def created_on(self) -> date | None:
        """The UTC day the invoice was created, where known: no file of it is older."""
        ...

    @property
    def other_name(self) -> str | None:
        """The name the other ``file_name_charset`` gives it, where that differs (looked
        for too, so a change of the setting never delivers a file twice)."""
        ...


# A test hook called with each step's name ("tmp_open", "tmp_written", "published"): crash
# tests kill or stall the run there (see ``pipeline.checkpoint``).
Checkpoint = Callable[[str], None]


@dataclass(frozen=True)
class Delivery:
    remote_path: str  # where the file is (outbox, or sent/ if the ERP moved it)
    already_delivered: bool  # an identical file was already there: nothing written


@dataclass
class ServerTraits:
    """What a run learned about the server, shared by all its sessions and lanes."""

    hardlink_broken: bool = False  # offered, but the filesystem refuses links
    delete_forbidden: bool = False  # an upload-only folder: our tmp cannot be removed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def forbid_delete(self, tmp: str) -> None:
        with self._lock:
            if self.delete_forbidden:
                return
            self.delete_forbidden = True
        log.warning(
            "the server does not let erp-push delete files in the outbox (upload-only "
            "folder): %s stays as a second name of a published file; publishing by rename "
            "from now on",
            tmp,
        )


@dataclass(frozen=True)
class Drop:
    """Where files go: the ERP's outbox, the folder it moves files to, and how."""

    outbox: str
    sent: str | None = None
    mode: Literal["rename", "direct"] = "rename"

    @property
    def folders(self) -> tuple[str, ...]:
        return (self.outbox,) if self.sent is None else (self.outbox, self.sent)


def family_name(file_name: str, i: int) -> str:
    """The ``i``-th name one invoice's file may carry: ``X.csv`` for 0, ``X-2.csv`` for 1,
    ... up to MAX_CANDIDATES names."""
    if i == 0:
        return file_name
    stem, ext = posixpath.splitext(file_name)
    return f"{stem}-{i + 1}{ext}"


_DATED = re.compile(r"(?P<number>.+)-(?P<day>[0-9]{8})(?P<ext>\.[^.]*)?")


def day_names(
    file_name: str, days: int = LOOKBACK_DAYS, *, not_before: date | None = None
) -> list[str]:
    """The invoice's name today and on each of the ``days`` days before, newest first,
    none dated before ``not_before`` (today's name always).

    The date in ``<number>-<YYYYMMDD>.csv`` is the day of the push: a run that published
    yesterday and lost its journal left the file under yesterday's name.
    """
    dated = _DATED.fullmatch(file_name)
    if dated is None:
        return [file_name]
    try:
        day = datetime.strptime(dated["day"], "%Y%m%d").date()
    except ValueError:
        return [file_name]
    ext = dated["ext"] or ""
    return [
        f"{dated['number']}-{_ymd(day - timedelta(days=n))}{ext}"
        for n in range(days + 1)
        if n == 0 or not_before is None or day - timedelta(days=n) >= not_before
    ]


def _ymd(day: date) -> str:
    return day.strftime("%Y%m%d")


# --- looking: which names are taken, and is one of them our file? ---------------------


@dataclass
class _Family:
    """One day's names (X.csv, X-2.csv, ...) and what the folders hold under them."""

    first: str  # the day's own name; the others are derived on demand
    taken: dict[int, list[tuple[str, RemoteStat]]] = field(default_factory=dict)
    looked: int = 0  # names[:looked] have been stat'ed in every folder
    last_taken: int = -1

    def wanted(self) -> range:
        """The next names to look at: the first, then up to GAP past the last taken."""
        if self.looked == 0:
            return range(0, 1)
        if self.last_taken < 0:
            return range(0)  # the first name is free: the family ends there
        end = min(MAX_CANDIDATES, self.last_taken + 1 + GAP)
        return range(self.looked, max(self.looked, end))

    def name(self, i: int) -> str:
        return family_name(self.first, i)

    def free(self) -> Iterator[str]:
        for i in range(self.looked):
            if i not in self.taken:
                yield self.name(i)

    def unlooked(self) -> Iterator[str]:
        for i in range(self.looked, MAX_CANDIDATES):
            yield self.name(i)


@dataclass
class Lookup:
    """The result of looking: an identical file, or today's free names in order."""

    identical: str | None
    today: _Family


def _look(
    session: SftpSession,
    drop: Drop,
    file: Content,
    *,
    also: Callable[[Exchange], None] | None = None,
    compare: bool = True,
) -> Lookup:
    """Stat the invoice's names, a round trip per wave, and compare same-sized files.

    The first wave asks for each day's first name in every folder (and ``also`` adds the
    caller's own operations to it, e.g. creating the tmp file); only a family whose
    first name is taken costs more waves. Nothing is listed. The names of the other
    file_name_charset are looked at too (only for numbers where they differ), so that
    changing the setting, or upgrading from before it, never delivers a file twice.
    Without ``compare`` (a re-send) only today's names are looked at, and a taken name
    is only taken.
    """
    days = LOOKBACK_DAYS if compare else 0
    # An invoice created today (the usual case for a run every few minutes) cannot have a
    # file dated a week ago: look back to the day before its creation (a day's slack for
    # the clocks), not LOOKBACK_DAYS, for 4 stats instead of 16.
    created = file.created_on
    not_before = created - timedelta(days=1) if created is not None else None
    families = [_Family(name) for name in day_names(file.file_name, days, not_before=not_before)]
    if file.other_name is not None:
        families += [
            _Family(name) for name in day_names(file.other_name, days, not_before=not_before)
        ]
    first_wave = True
    compared: set[str] = set()
    while True:
        wanted = [
            (family, i, posixpath.join(folder, family.name(i)))
            for family in families
            for i in family.wanted()
            for folder in drop.folders
        ]
        if not wanted:
            return Lookup(identical=None, today=families[0])
        with session.exchange("looking for earlier deliveries") as batch:
            if first_wave and also is not None:
                also(batch)
            asked = [(family, i, path, batch.stat(path)) for family, i, path in wanted]
        first_wave = False
        for family, i, path, reply in asked:
            family.looked = max(family.looked, i + 1)
            try:
                found = reply.value
            except RemoteFileMissing:
                continue
            family.taken.setdefault(i, []).append((path, found))
            family.last_taken = max(family.last_taken, i)
        for family in families:
            for taken in family.taken.values():
                for path, found in taken:
                    if not compare or path in compared or found.size != file.size:
                        continue
                    compared.add(path)
                    if holds(session, path, file):
                        return Lookup(identical=path, today=families[0])


def holds(session: SftpSession, path: str, file: Content) -> bool:
    """Does ``path`` hold exactly ``file``'s bytes? Vanished or unreadable: not provably ours.

    Read and compared a window at a time (an attachment may be large); the last window
    asks for one byte more, since a longer file is not ours either, and closes the file
    in the same round trip (a CSV costs two: open, then read and close).
    """
    try:
        with session.exchange(f"opening {path}") as batch:
            opened = batch.open_read(path)
        handle = opened.value
    except SftpOperationError as exc:
        log.debug("cannot compare %s: %s", path, exc.message)
        return False
    windows = iter(file.chunks(WINDOW_BYTES))
    window: bytes | None = next(windows, b"")
    offset = 0
    closed = False
    try:
        while window is not None:
            following = next(windows, None)
            last = following is None
            got = _read_range(session, handle, path, offset, len(window) + last, close=last)
            closed = last
            if got != window:
                return False
            offset += len(window)
            window = following
        return True
    except SftpOperationError as exc:
        log.debug("cannot compare %s: %s", path, exc.message)
        return False
    finally:
        if not closed:
            with session.exchange(f"closing {path}") as batch:
                batch.close(handle, path)


def find_at(session: SftpSession, drop: Drop, name: str, file: Content) -> str | None:
    """Path of the file called ``name`` in the outbox or sent/ if it holds ``file``."""
    with session.exchange(f"looking for {name}") as batch:
        replies = [
            (posixpath.join(folder, name), batch.stat(posixpath.join(folder, name)))
            for folder in drop.folders
        ]
    for path, reply in replies:
        if reply.ok and holds(session, path, file):
            return path
    return None


def _read_range(
    session: SftpSession, handle: bytes, path: str, offset: int, length: int, *, close: bool
) -> bytes:
    """Up to ``length`` bytes at ``offset`` (less at the end), in one round trip."""
    step = 32 * 1024
    with session.exchange(f"reading {path}") as batch:
        reads = [
            batch.read(handle, at, min(step, offset + length - at), path)
            for at in range(offset, offset + length, step)
        ]
        if close:
            batch.close(handle, path)
    data = bytearray()
    for reply in reads:
        if reply.error is not None:
            if reply.error.sftp_code == Status.EOF:
                break
            raise reply.error
        data += reply.value
    return bytes(data)


def find_delivered(session: SftpSession, drop: Drop, file: Content) -> str | None:
    """Path of a file with the same bytes under the invoice's names, or None.

    Read-only and safe to repeat; proves delivery after a crash or reconnect.
    """
    return _look(session, drop, file).identical


def preview(session: SftpSession, drop: Drop, file: Content) -> Delivery:
    """What ``publish`` would do now, without writing anything (for dry-run).

    ``already_delivered`` with the identical file's path, or the outbox path the file
    would be published under. Another writer may take that name before a real push.
    """
    found = _look(session, drop, file)
    if found.identical is not None:
        return Delivery(remote_path=found.identical, already_delivered=True)
    name = next(found.today.free(), None)
    if name is None:
        raise _no_free_name(file, drop)
    return Delivery(remote_path=posixpath.join(drop.outbox, name), already_delivered=False)


# --- publishing -----------------------------------------------------------------------


def publish(
    session: SftpSession,
    drop: Drop,
    file: Content,
    *,
    traits: ServerTraits | None = None,
    may_publish: Callable[[], bool] | None = None,
    on_checkpoint: Checkpoint | None = None,
    fresh: Callable[[str], None] | None = None,
    only_name: str | None = None,
) -> Delivery:
    """Put ``file`` into the outbox under a free name, never overwriting anything.

    An identical file already under one of the invoice's names (outbox or sent/, dated
    today or up to LOOKBACK_DAYS back) counts as delivered: nothing is written. Raises
    SftpOperationError for this file alone (with the failure code to report),
    LeaseLapsing when ``may_publish`` says no at the last moment (the tmp is removed),
    SftpUnreachable when the connection is lost: the file may or may not have been
    published, so call ``publish`` again on a new session; it looks for the identical
    file before writing anything. ``on_checkpoint`` is a test hook called at each step.
    ``fresh``: a deliberate re-send (see the module docstring); it is called with each
    final path before the file may become visible there.
    ``only_name``: publish under exactly this name of the file's family (the name its
    attachments were given), or raise NameTaken when someone else's file holds it.
    """
    publishing = _Publishing(
        session,
        drop,
        file,
        traits or ServerTraits(),
        may_publish or (lambda: True),
        on_checkpoint or (lambda _name: None),
        fresh,
        only_name,
    )
    if drop.mode == "direct":
        return publishing.direct()
    return publishing.via_tmp()


class _Publishing:
    """One publish of one file: the steps above, with the state they share."""

    def __init__(
        self,
        session: SftpSession,
        drop: Drop,
        file: Content,
        traits: ServerTraits,
        may_publish: Callable[[], bool],
        on_checkpoint: Checkpoint,
        fresh: Callable[[str], None] | None = None,
        only_name: str | None = None,
    ) -> None:
        self.session = session
        self.drop = drop
        self.file = file
        self.traits = traits
        self.may_publish = may_publish
        self.checkpoint = on_checkpoint
        self.fresh = fresh
        self.tmp = self._fresh_tmp_name()
        self.tmp_exists = False
        self.only_name = only_name

    def _fresh_tmp_name(self) -> str:
        """``<name>.<8 hex>.erp-push.tmp`` in the outbox: unique per upload."""
        return posixpath.join(
            self.drop.outbox, f"{self.file.file_name}.{secrets.token_hex(4)}.erp-push.tmp"
        )

    # --- rename mode --------------------------------------------------------------------

    def via_tmp(self) -> Delivery:
        created: list[Reply[bytes]] = []
        try:
            found = _look(
                self.session,
                self.drop,
                self.file,
                also=lambda batch: created.append(batch.create(self.tmp)),
                compare=self.fresh is None,
            )
            handle = self._created(created[0])
            if found.identical is not None:
                self._close_and_discard(handle)
                return Delivery(remote_path=found.identical, already_delivered=True)
            self.checkpoint("tmp_open")
            self._write(handle, self.tmp)
            self.checkpoint("tmp_written")
            delivery = self._move_into_place(found.today)
            self.checkpoint("published")
            return delivery
        except (SftpOperationError, LeaseLapsing, NameTaken):
            self._discard_tmp()
            raise

    def _created(self, reply: Reply[bytes]) -> bytes:
        try:
            handle = reply.value
        except SftpOperationError as exc:
            raise self._explain(exc) from None
        self.tmp_exists = True
        return handle

    def _write(self, handle: bytes, path: str) -> None:
        """Write the body and close, a round trip per WINDOW_BYTES (one for a CSV);
        every write's status is read."""
        windows = iter(self.file.chunks(WINDOW_BYTES))
        window: bytes | None = next(windows, b"")
        offset = 0
        while window is not None:
            following = next(windows, None)
            with self.session.exchange(f"writing {path}") as batch:
                replies = batch.write(handle, window, path, start=offset)
                if following is None:
                    replies.append(batch.close(handle, path))
            for reply in replies:
                if reply.error is not None:
                    raise self._explain(reply.error)
            offset += len(window)
            window = following

    def _move_into_place(self, today: _Family) -> Delivery:
        for name in self._candidates(today):
            final = posixpath.join(self.drop.outbox, name)
            # Someone (a concurrent run, the ERP, an operator) may have taken the name
            # since we looked: the rename must not be what finds out, as it may overwrite.
            rival = self._taken(name)
            if rival is None:
                if self.fresh is not None:
                    self.fresh(final)
                if self._publish_as(final):
                    return Delivery(remote_path=final, already_delivered=False)
                rival = final  # taken between our look and the link or rename
            if self.fresh is None and holds(self.session, rival, self.file):
                self._discard_tmp()  # a concurrent run delivered the same invoice
                return Delivery(remote_path=rival, already_delivered=True)
            log.debug("%s was taken meanwhile; trying the next name", name)
        raise _no_free_name(self.file, self.drop)

    def _publish_as(self, final: str) -> bool:
        """Make the tmp visible as ``final``. False when that name turned out taken."""
        if self._use_hardlink():
            self._ensure_tmp()
            if self._link(final):
                return True
            if self._use_hardlink():
                return False  # the name is taken (links work here)
        self._ensure_tmp()
        return self._rename(final)

    def _ensure_tmp(self) -> None:
        """Upload the tmp again if a refused link took it away; then ask about the lease."""
        if not self.tmp_exists:
            self._upload_tmp()
        self._check_lease()

    def _candidates(self, today: _Family) -> Iterator[str]:
        """Today's free names: those looked at first, then the ones after them."""
        if self.only_name is not None:
            yield self.only_name
            raise NameTaken(
                f"{self.only_name} was taken by another file before it could be published"
            )
        yield from today.free()
        yield from today.unlooked()

    def _taken(self, name: str) -> str | None:
        """Where ``name`` is taken (outbox or sent/), or None.

        A hardlink never replaces an existing name (link(2) fails with EEXIST; the link
        step then looks), so when publishing by link only sent/ is asked about: the ERP
        may have moved a file of that name there since we looked.
        """
        folders = self.drop.folders
        if self.drop.mode == "rename" and self._use_hardlink():
            folders = folders[1:]
        if not folders:
            return None
        with self.session.exchange(f"checking {name}") as batch:
            replies = [
                (posixpath.join(folder, name), batch.stat(posixpath.join(folder, name)))
                for folder in folders
            ]
        for path, reply in replies:
            if reply.ok:
                return path
            if reply.error is not None and not isinstance(reply.error, RemoteFileMissing):
                raise reply.error
        return None

    def _use_hardlink(self) -> bool:
        return (
            self.session.has_hardlink
            and not self.traits.hardlink_broken
            and not self.traits.delete_forbidden
        )

    def _link(self, final: str) -> bool:
        """Link the tmp as ``final`` and drop the tmp name, one round trip.

        False when the name turned out to be taken (or links do not work here: then
        the traits say so and the caller renames instead). The tmp's removal is sent
        with the link, so a refused link costs a fresh upload, a rare case.
        """
        with self.session.exchange(f"linking {final}") as batch:
            linked = batch.hardlink(self.tmp, final)
            removed = batch.remove(self.tmp)
        if removed.ok or isinstance(removed.error, RemoteFileMissing):
            self.tmp_exists = False
        elif linked.ok and removed.error is not None:
            if removed.error.sftp_code == Status.PERMISSION_DENIED:
                self.traits.forbid_delete(self.tmp)
            else:
                log.warning("could not remove %s: %s", self.tmp, removed.error.message)
        if linked.ok:
            return True
        if self.session.stat(final) is None:
            assert linked.error is not None
            log.info(
                "hardlink refused on %s (%s); publishing by rename", final, linked.error.message
            )
            self.traits.hardlink_broken = True
        return False

    def _rename(self, final: str) -> bool:
        with self.session.exchange(f"renaming {self.tmp}") as batch:
            renamed = batch.rename(self.tmp, final)
        if renamed.ok:
            self.tmp_exists = False
            return True
        # OpenSSH answers a plain "Failure" when the target exists: look, don't guess.
        if self.session.stat(final) is not None:
            return False
        assert renamed.error is not None
        raise SftpOperationError(
            renamed.error.message,
            failure_code=FailureCode.SFTP_PUBLISH_FAILED,
            sftp_code=renamed.error.sftp_code,
        )

    def _upload_tmp(self) -> None:
        self.tmp = self._fresh_tmp_name()
        with self.session.exchange(f"creating {self.tmp}") as batch:
            created = batch.create(self.tmp)
        handle = self._created(created)
        self._write(handle, self.tmp)

    def _check_lease(self) -> None:
        if not self.may_publish():
            raise LeaseLapsing(
                f"the lease of {self.file.file_name} is too close to expiry to publish it; "
                "the file was not made visible"
            )

    def _close_and_discard(self, handle: bytes) -> None:
        with self.session.exchange(f"removing {self.tmp}") as batch:
            batch.close(handle, self.tmp)
            batch.remove(self.tmp)
        self.tmp_exists = False

    def _discard_tmp(self) -> None:
        """Best effort removal of our tmp file; never anything else."""
        if not self.tmp_exists or not TMP_PATTERN.match(posixpath.basename(self.tmp)):
            return
        try:
            self.session.remove(self.tmp)
            self.tmp_exists = False
        except SftpOperationError as exc:
            log.debug("could not remove %s: %s", self.tmp, exc.message)

    # --- direct mode ------------------------------------------------------------------

    def direct(self) -> Delivery:
        """For servers that forbid rename: write the final name itself. NOT atomic."""
        found = _look(self.session, self.drop, self.file, compare=self.fresh is None)
        if found.identical is not None:
            return Delivery(remote_path=found.identical, already_delivered=True)
        looked_free = set(found.today.free()) if self.only_name is None else set()
        for name in self._candidates(found.today):
            final = posixpath.join(self.drop.outbox, name)
            if name not in looked_free and self._taken(name) is not None:
                continue
            self._check_lease()
            if self.fresh is not None:
                self.fresh(final)
            with self.session.exchange(f"creating {final}") as batch:
                # Exclusive create: if the name appeared since we looked, the open fails
                # instead of truncating someone else's file.
                created = batch.create(final)
            if created.error is not None:
                if self.session.stat(final) is not None:
                    continue
                raise self._explain(created.error)
            try:
                self.checkpoint("tmp_open")
                self._write(created.value, final)
            except SftpOperationError:
                self._remove_partial(final)
                raise
            self.checkpoint("tmp_written")
            self.checkpoint("published")
            return Delivery(remote_path=final, already_delivered=False)
        raise _no_free_name(self.file, self.drop)

    def _remove_partial(self, final: str) -> None:
        try:
            with self.session.exchange(f"removing {final}") as batch:
                batch.remove(final)  # the partial file is ours: we created it
        except SftpOperationError as exc:
            log.debug("could not remove %s: %s", final, exc.message)

    # --- why a write failed -----------------------------------------------------------

    def _explain(self, error: SftpOperationError) -> SftpOperationError:
        """Name the cause of a bare "Failure" from what the server can tell us.

        OpenSSH answers ENOSPC and EROFS alike with SSH_FX_FAILURE; its statvfs
        extension tells a full or read-only filesystem apart. A cause we cannot name
        stays SFTP_UPLOAD_FAILED, which the pipeline treats as "not the invoice's fault".
        """
        if error.sftp_code != Status.FAILURE or not self.session.has_statvfs:
            return error
        try:
            with self.session.exchange(f"statvfs {self.drop.outbox}") as batch:
                reply = batch.statvfs(self.drop.outbox)
            fs = reply.value
        except SftpOperationError:
            return error
        if fs.read_only:
            return SftpOperationError(
                f"{error.message} (the outbox's filesystem is read-only)",
                failure_code=FailureCode.SFTP_PERMISSION_DENIED,
                sftp_code=error.sftp_code,
            )
        full = fs.bytes_free < self.file.size + NEARLY_FULL_BYTES
        if full or (fs.files_total > 0 and fs.files_free == 0):
            return SftpOperationError(
                f"{error.message} (the outbox's filesystem is full: "
                f"{fs.bytes_free} bytes, {fs.files_free} files free)",
                failure_code=FailureCode.SFTP_DISK_FULL,
                sftp_code=error.sftp_code,
            )
        return error


def _no_free_name(file: Content, drop: Drop) -> SftpOperationError:
    return SftpOperationError(
        f"no free name for {file.file_name} in {drop.outbox}: {MAX_CANDIDATES} taken",
        failure_code=FailureCode.SFTP_PUBLISH_FAILED,
    )
