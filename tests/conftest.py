"""Shared fixtures. Real servers on loopback live in their own plugin modules:

- ``tests.sandbox.fixtures``: the Nuntiq sandbox (HTTP over SQLite) on a free port;
- ``tests.sftp_servers.fixtures``: asyncssh, OpenSSH sshd and pytest-sftpserver servers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.sandbox.fixtures import Sandbox
    from tests.sftp_servers.fixtures import SftpServerInfo

pytest_plugins = ["tests.sandbox.fixtures", "tests.sftp_servers.fixtures"]


@pytest.fixture(autouse=True)
def _isolated_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every test starts with no ERP_PUSH_* variables from the developer's shell, and a
    default state_dir of its own: settings that need one create it (and the journal) to
    prove it usable, which must not happen in the developer's ~/.local/state."""
    for name in list(os.environ):
        if name.startswith("ERP_PUSH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture
def make_settings(tmp_path: Path, sandbox: Sandbox) -> Callable[..., Path]:
    """Write a settings file (seed layout) pointing at the sandbox and an SFTP test server.

    ``config`` and ``secrets`` keyword dicts override single keys; ``server`` may be None
    for commands that need no SFTP.
    """
    import json

    def make(
        server: SftpServerInfo | None,
        *,
        config: dict[str, Any] | None = None,
        secrets: dict[str, Any] | None = None,
        name: str = "settings.json",
    ) -> Path:
        cfg: dict[str, Any] = {
            "connector_name": "acme_erp_push",
            "nuntiq_base_url": sandbox.base_url,
            "batch_size": 20,
            "state_dir": str(tmp_path / "state"),
            "nuntiq_timeout_seconds": 5,
        }
        sec: dict[str, Any] = {"nuntiq_api_key": sandbox.api_key}
        if server is not None:
            cfg.update(
                sftp_host=server.host,
                sftp_port=server.port,
                sftp_user=server.user,
                remote_outbox=server.outbox,
                remote_sent=server.sent,
                sftp_known_hosts=str(server.known_hosts_path),
                sftp_connect_timeout_seconds=5,
                sftp_operation_timeout_seconds=10,
            )
            sec["sftp_password"] = server.password
        cfg.update(config or {})
        sec.update(secrets or {})
        path = tmp_path / name
        path.write_text(
            json.dumps({"customer_number": "10000001", "secrets": sec, "config": cfg}, indent=2)
        )
        return path

    return make
