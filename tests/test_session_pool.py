"""The SFTP session pool: one login per run, channels for parallel work, never a dead one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

import pytest

from erp_push.errors import ExitCode, SftpOperationError
from erp_push.pipeline import PARALLEL_LOGINS, SessionPool
from erp_push.transport import SftpSession
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo


def _pool(server: SftpServerInfo, logins: list[SftpSession]) -> SessionPool:
    def connect() -> SftpSession:
        session = SftpSession.connect(server.options())
        logins.append(session)
        return session

    return SessionPool(connect, max_channels=10)


def test_parallel_sessions_are_channels_of_one_login(asyncssh_sftp: SftpServerInfo) -> None:
    logins: list[SftpSession] = []
    pool = _pool(asyncssh_sftp, logins)
    with pool.session() as first, pool.session() as second, pool.session() as third:
        assert len({id(first), id(second), id(third)}) == 3
        assert [s.owns_connection for s in (first, second, third)] == [True, False, False]
    assert len(logins) == 1
    pool.close()


def test_a_dead_connection_is_never_handed_out_again(asyncssh_sftp: SftpServerInfo) -> None:
    logins: list[SftpSession] = []
    pool = _pool(asyncssh_sftp, logins)
    with pool.session() as owner, pool.session() as channel:
        pass  # both idle now, on one connection
    logins[0]._ssh.close()  # the connection drops under the idle sessions
    assert not owner.connected and not channel.connected

    with pool.session() as fresh:
        assert fresh.connected
        assert fresh is not owner and fresh is not channel
        fresh.check_folders(asyncssh_sftp.outbox, asyncssh_sftp.sent)  # it really works
    assert len(logins) == 2
    pool.close()


def test_a_failed_file_operation_gives_the_session_back(asyncssh_sftp: SftpServerInfo) -> None:
    """One file failing must not leak its session (each leak would cost a login)."""
    logins: list[SftpSession] = []
    pool = _pool(asyncssh_sftp, logins)
    used: set[int] = set()
    for _ in range(5):
        try:
            with pool.session() as session:
                used.add(id(session))
                session.remove("/outbox/not-ours.csv")  # refused: not an erp-push tmp file
        except (SftpOperationError, ValueError):
            pass
    assert len(used) == 1  # the same session every time: none leaked
    assert len(logins) == 1
    pool.close()


def test_never_more_channels_on_a_login_than_allowed(asyncssh_sftp: SftpServerInfo) -> None:
    """ProFTPD drops the whole connection on an 11th channel: the pool opens another
    login instead of asking one connection for more than ``max_channels``."""
    logins: list[SftpSession] = []

    def connect() -> SftpSession:
        session = SftpSession.connect(asyncssh_sftp.options())
        logins.append(session)
        return session

    pool = SessionPool(connect, max_channels=3)
    with ExitStack() as stack:
        sessions = [stack.enter_context(pool.session()) for _ in range(7)]
        per_login = [sum(1 for s in sessions if s.same_connection(login)) for login in logins]
    assert len(logins) == 3
    assert sorted(per_login) == [1, 3, 3]
    pool.close()


def test_a_server_refusing_more_logins_caps_the_pool_instead_of_failing(
    asyncssh_sftp: SftpServerInfo,
) -> None:
    """OpenSSH's MaxStartups drops logins that arrive in a burst: with one login held,
    a refused second one means "share what we have", not "the server is down"."""
    from erp_push.errors import SftpUnreachable

    logins: list[SftpSession] = []

    def connect() -> SftpSession:
        if logins:  # the server takes this client's first login only
            raise SftpUnreachable("cannot reach sftp: Error reading SSH protocol banner")
        session = SftpSession.connect(asyncssh_sftp.options())
        logins.append(session)
        return session

    pool = SessionPool(connect, max_channels=1, login_retry_delay=0.01)
    with pool.session() as first:
        pass
    handed: list[SftpSession] = []

    def worker() -> None:
        with pool.session() as session:
            handed.append(session)
            time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(handed) == 3 and all(s is first for s in handed)  # all shared the one
    assert len(logins) == 1
    pool.close()


def _slow_logins(
    server: SftpServerInfo, logins: list[SftpSession], at_once: dict[str, int]
) -> Callable[[], SftpSession]:
    """connect() over a slow network (each login takes 0.2 s), counting logins in flight."""
    lock = threading.Lock()

    def connect() -> SftpSession:
        with lock:
            at_once["now"] += 1
            at_once["most"] = max(at_once["most"], at_once["now"])
        try:
            time.sleep(0.2)  # logins overlap here if the pool lets them
            session = SftpSession.connect(server.options())
        finally:
            with lock:
                at_once["now"] -= 1
        with lock:
            logins.append(session)
        return session

    return connect


def _hold_sessions(pool: SessionPool, workers: int) -> list[SftpSession]:
    """``workers`` threads that each take a session and keep it until all have one."""
    lock = threading.Lock()
    release = threading.Event()
    handed: list[SftpSession] = []

    def worker() -> None:
        with pool.session() as session:
            with lock:
                handed.append(session)
            release.wait(timeout=30)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(handed) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    return handed


def test_logins_beyond_the_first_are_opened_a_few_at_a_time(
    asyncssh_sftp: SftpServerInfo,
) -> None:
    """Each login costs several round trips: workers that each need one are served by a
    few logins in parallel (PARALLEL_LOGINS), never by a burst the server would throttle."""
    logins: list[SftpSession] = []
    at_once = {"now": 0, "most": 0}
    pool = SessionPool(_slow_logins(asyncssh_sftp, logins, at_once), max_channels=1)
    pool.warm_up()

    handed = _hold_sessions(pool, 2 * PARALLEL_LOGINS)

    assert len({id(s) for s in handed}) == 2 * PARALLEL_LOGINS  # one channel per login
    assert at_once["most"] == PARALLEL_LOGINS  # in parallel, but never more at once
    pool.close()


@pytest.mark.parametrize(("workers", "expected_logins"), [(20, 2), (25, 3)])
def test_workers_wait_for_a_login_in_progress_rather_than_open_more(
    asyncssh_sftp: SftpServerInfo, workers: int, expected_logins: int
) -> None:
    """Ten workers short of a channel need one more 10-channel login, not PARALLEL_LOGINS
    of them: they wait for the one in progress."""
    logins: list[SftpSession] = []
    at_once = {"now": 0, "most": 0}
    pool = SessionPool(_slow_logins(asyncssh_sftp, logins, at_once), max_channels=10)
    pool.warm_up()

    handed = _hold_sessions(pool, workers)

    assert len({id(s) for s in handed}) == workers
    assert len(logins) == expected_logins
    pool.close()


# --- a first login the server drops (OpenSSH's MaxStartups) ------------------------------


def _take_the_startup_slot(server: SftpServerInfo) -> socket.socket:
    """A client that connects and never logs in: with ``MaxStartups 1`` it holds the one
    unauthenticated slot until it hangs up. Tried until sshd has taken it (a connection
    sshd is still counting from a moment ago is told "Exceeded MaxStartups" too)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        holder = socket.create_connection((server.host, server.port), timeout=5)
        if holder.recv(64).startswith(b"SSH-"):
            return holder
        holder.close()
        time.sleep(0.1)
    raise AssertionError("sshd never took the holding connection")


def test_a_first_login_dropped_by_maxstartups_is_tried_again(
    openssh_one_startup: SftpServerInfo, sandbox: Sandbox, make_settings: MakeSettings
) -> None:
    """The run's first login arrives while another client holds the server's one
    unauthenticated slot: sshd says "Exceeded MaxStartups" and hangs up. The slot is
    free half a second later; the run tries again and delivers."""
    [token] = sandbox.control.seed(1)
    holder = _take_the_startup_slot(openssh_one_startup)
    threading.Timer(0.5, holder.close).start()
    result = run_cli("push", "--verbose", "--settings", str(make_settings(openssh_one_startup)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "closed the connection before its SSH banner; trying again" in result.stderr
    assert {r["invoice_token"]: r["status"] for r in sandbox.control.invoices()} == {token: 100}


def test_a_server_that_keeps_dropping_the_first_login_ends_the_run_after_three_tries(
    openssh_one_startup: SftpServerInfo, sandbox: Sandbox, make_settings: MakeSettings
) -> None:
    [token] = sandbox.control.seed(1)
    holder = _take_the_startup_slot(openssh_one_startup)
    try:
        result = run_cli("push", "--verbose", "--settings", str(make_settings(openssh_one_startup)))
    finally:
        holder.close()
    assert result.returncode == int(ExitCode.SFTP), result.stderr[-2000:]
    assert result.stderr.count("trying again in") == 2
    assert "closed the connection before its SSH banner" in result.stderr
    assert "MaxStartups" in result.stderr  # the hint
    assert {r["invoice_token"]: r["status"] for r in sandbox.control.invoices()} != {token: 100}
