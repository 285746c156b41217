"""Helpers the test modules share: the real command line in a child process, and a push
through ``commands`` with the settings a ``make_settings`` fixture wrote (conftest)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erp_push import commands
from erp_push.report import RunReport
from erp_push.settings import Need, load_settings

if TYPE_CHECKING:
    from tests.sandbox.control import SandboxControl

# The type of the ``make_settings`` fixture: (server, *, config=, secrets=, name=) -> path.
MakeSettings = Callable[..., Path]
PUSH_NEEDS = {Need.NUNTIQ, Need.SFTP, Need.STATE, Need.CONNECTOR}


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real command line in a child process: what cron sees, stdout and stderr apart."""
    return subprocess.run(
        [sys.executable, "-m", "erp_push", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def cli_fetching(control: SandboxControl, *args: str) -> Iterator[subprocess.Popen[str]]:
    """The real command line in a child, handed over once it has fetched an invoice (so a
    signal lands mid-run: make the sandbox's GET slow); killed on leaving if still alive."""
    child = subprocess.Popen(
        [sys.executable, "-m", "erp_push", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while control.request_counts().get("get", 0) == 0:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the run never fetched an invoice"
            time.sleep(0.05)
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def push(path: Path, **kwargs: Any) -> RunReport:
    """``commands.push`` with the settings file at ``path``, as the CLI would load it."""
    return commands.push(load_settings(path, needs=PUSH_NEEDS), **kwargs)


def set_invoice_fields(db_path: str, invoice_token: str, **values: Any) -> None:
    """Give a sandbox invoice these header field values (key → value), behind the
    sandbox's back: its seed makes only generated numbers, and a test needs exact ones."""
    import json
    import sqlite3

    with sqlite3.connect(db_path) as db:
        (raw,) = db.execute(
            "SELECT doc FROM invoices WHERE invoice_token = ?", (invoice_token,)
        ).fetchone()
        doc = json.loads(raw)
        fields = {f["key"]: f for f in doc["fields"]}
        for key, value in values.items():
            if key in fields:
                fields[key]["value"] = value
            else:
                doc["fields"].append({"key": key, "label": key, "value": value})
        db.execute(
            "UPDATE invoices SET doc = ? WHERE invoice_token = ?", (json.dumps(doc), invoice_token)
        )
    db.close()
