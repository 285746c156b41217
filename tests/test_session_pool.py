"""The SFTP session pool: one login per run, channels for parallel work, never a dead one."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

from erp_push.errors import SftpOperationError
from erp_push.pipeline import SessionPool
from erp_push.transport import SftpSession
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
