"""Shared fixtures. Real servers on loopback live in their own plugin modules:

- ``tests.sandbox.fixtures``: the Nuntiq sandbox (HTTP over SQLite) on a free port;
- ``tests.sftp_servers.fixtures``: asyncssh, OpenSSH sshd and pytest-sftpserver servers.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.sandbox.fixtures", "tests.sftp_servers.fixtures"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no ERP_PUSH_* variables from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("ERP_PUSH_"):
            monkeypatch.delenv(name)
