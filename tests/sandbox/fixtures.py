"""Pytest plugin (registered in tests/conftest.py): the Nuntiq sandbox on a free port.

- ``sandbox_server`` (session): one ``SandboxServer`` on a temporary SQLite file.
- ``sandbox`` (function): resets that server (database, faults, clock, request counts)
  before the test and yields a ``Sandbox`` handle: ``.base_url`` / ``.url``, ``.api_key``,
  ``.readonly_api_key`` and ``.control`` (a ``SandboxControl``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.sandbox.control import SandboxControl
from tests.sandbox.server import SandboxServer

API_KEY = "sandbox-key"
READONLY_API_KEY = "sandbox-readonly-key"  # may GET, gets 403 FORBIDDEN on every POST


@dataclass
class Sandbox:
    base_url: str
    api_key: str
    readonly_api_key: str
    control: SandboxControl
    server: SandboxServer

    @property
    def url(self) -> str:
        return self.base_url


@pytest.fixture(scope="session")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    db = tmp_path_factory.mktemp("nuntiq-sandbox") / "sandbox.sqlite3"
    with SandboxServer(str(db), api_key=API_KEY, readonly_api_key=READONLY_API_KEY) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[Sandbox]:
    with SandboxControl(sandbox_server.base_url, API_KEY) as control:
        control.reset()
        yield Sandbox(
            base_url=sandbox_server.base_url,
            api_key=API_KEY,
            readonly_api_key=READONLY_API_KEY,
            control=control,
            server=sandbox_server,
        )
