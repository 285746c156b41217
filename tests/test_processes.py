"""A drain shared by helper processes (``processes``), on the real command line, the
sandbox Nuntiq and OpenSSH: every invoice once, one report, one run in the status, and
nothing lost when a helper or the first process is killed or stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from erp_push.errors import ExitCode
from tests.helpers import MakeSettings, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

TWO = {"processes": 2, "batch_size": 10}
# Two processes of four lanes, each invoice 200 ms on Nuntiq's get: a drain of 120 takes
# seconds, long enough to kill or stop it midway.
SLOW = {**TWO, "concurrency": 4, "lease_ttl_seconds": 60}


def drain(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("push", "--settings", str(path), "--drain", "--json", *extra, timeout=180)


def start_drain(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "erp_push", "push", "--settings", str(path), "--drain", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def runs_in_journal(path: Path) -> set[str]:
    """The runs (processes) that journaled the invoices."""
    journal = path.parent / "state" / "journal.sqlite3"
    try:  # read-only: never create the journal before the run does
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT DISTINCT run_id FROM invoices").fetchall()
    except sqlite3.Error:
        return set()
    return {run_id for (run_id,) in rows}


def helper_pids(parent: int) -> list[int]:
    """The helper processes a drain started (children of ``parent`` run with --helper)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"--helper" in argv:
            found.append(int(entry.name))
    return found


def wait_for(what: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def assert_each_delivered_once(sandbox: Sandbox, server: SftpServerInfo, tokens: list[str]) -> None:
    statuses = sandbox.control.statuses()
    assert [t for t in tokens if statuses[t] != 100] == []
    files = [p for p in server.files() if p.endswith(".csv")]
    assert len(files) == len(tokens)
    assert not [p for p in server.files() if p.endswith(".tmp")]


def start_slow_drain(
    sandbox: Sandbox, server: SftpServerInfo, make_settings: MakeSettings, count: int
) -> tuple[list[str], Path, subprocess.Popen[str], int]:
    """``count`` invoices drained by two processes (SLOW), returned once the helper holds
    invoices too: the tokens, the settings, the first process and the helper's pid."""
    server.clear()
    tokens = sandbox.control.seed(count)
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 200}])
    path = make_settings(server, config=SLOW)
    first = start_drain(path)
    (helper,) = wait_for(lambda: helper_pids(first.pid))
    wait_for(lambda: len(runs_in_journal(path)) == 2)  # the helper has invoices too
    return tokens, path, first, helper


def finish_the_rest(sandbox: Sandbox, path: Path) -> None:
    """Later runs, once the stopped runs' leases lapsed: recovery, then what came back."""
    sandbox.control.set_faults([])
    sandbox.control.advance_clock(61)
    for _ in range(2):
        result = drain(path)
        assert result.returncode in (ExitCode.OK, ExitCode.SOME_FAILED), result.stderr


def test_a_drain_is_shared_by_a_helper_and_reported_as_one_run(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    openssh_sftp.clear()
    tokens = sandbox.control.seed(150)
    path = make_settings(openssh_sftp, config=TWO)

    result = drain(path)

    assert result.returncode == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)
    assert report["claimed"] == 150
    assert sorted(o["invoice_token"] for o in report["invoices"]) == sorted(tokens)
    assert report["counts"]["delivered"] == 150
    assert_each_delivered_once(sandbox, openssh_sftp, tokens)
    assert len(runs_in_journal(path)) == 2  # two processes did the work
    status = json.loads(run_cli("status", "--settings", str(path), "--json").stdout)
    (last,) = [r for r in status["runs"] if r["command"] == "push"][:1]
    assert (last["claimed"], last["exit_code"]) == (150, 0)  # one run: the whole drain


def test_an_idle_drain_and_one_process_start_no_helper(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    openssh_sftp.clear()
    idle = run_cli(
        "push", "--settings", str(make_settings(openssh_sftp, config=TWO)), "--drain", "-v"
    )
    assert idle.returncode == ExitCode.OK, idle.stderr
    assert "helper" not in idle.stderr

    sandbox.control.seed(40)
    path = make_settings(openssh_sftp, config={**TWO, "processes": 1})
    result = drain(path, "-v")
    assert result.returncode == ExitCode.OK, result.stderr
    assert "helper" not in result.stderr
    assert len(runs_in_journal(path)) == 1


def test_max_invoices_is_shared_between_the_processes(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    openssh_sftp.clear()
    tokens = sandbox.control.seed(100)
    path = make_settings(openssh_sftp, config=TWO)

    report = json.loads(drain(path, "--max-invoices", "50").stdout)

    assert report["claimed"] == 50
    statuses = sandbox.control.statuses()
    assert sum(1 for t in tokens if statuses[t] == 100) == 50
    assert sum(1 for t in tokens if statuses[t] == 90) == 50  # never claimed
    assert len(runs_in_journal(path)) == 2


def test_a_killed_helper_leaves_its_invoices_pending_and_the_next_run_finishes_them(
    sandbox: Sandbox, openssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """SIGKILL on a helper mid-drain: the first process finishes its own invoices,
    reports the helper's unfinished ones pending (exit 1), and the next run (once their
    leases lapse) delivers each of them, once."""
    tokens, path, first, helper = start_slow_drain(sandbox, openssh_sftp, make_settings, 120)
    os.kill(helper, signal.SIGKILL)
    out, err = first.communicate(timeout=120)

    assert first.returncode == ExitCode.SOME_FAILED, err
    report = json.loads(out)
    pending = [o for o in report["invoices"] if o["result"] == "pending"]
    assert pending and all("helper process ended" in o["message"] for o in pending)
    assert len({o["invoice_token"] for o in report["invoices"]}) == len(report["invoices"])

    finish_the_rest(sandbox, path)
    assert_each_delivered_once(sandbox, openssh_sftp, tokens)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_first_process_stopped_or_killed_takes_its_helpers_down_with_nothing_lost(
    sandbox: Sandbox,
    openssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    how: str,
) -> None:
    """SIGTERM on the first process reaches its helper once (both wind down, exit 143);
    SIGKILL closes the helper's pipe, and it stops claiming and ends by itself. Either
    way the next runs deliver every invoice exactly once."""
    tokens, path, first, helper = start_slow_drain(sandbox, openssh_sftp, make_settings, 150)

    first.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    out, err = first.communicate(timeout=120)
    if how == "sigterm":
        assert first.returncode == ExitCode.TERMINATED, err
        assert not alive(helper)  # the first process waited for it
        assert err.count("terminated:") == 1  # said once, by the first process
    else:
        assert first.returncode == -signal.SIGKILL
        wait_for(lambda: not alive(helper), timeout=60)  # it ends by itself
    statuses = sandbox.control.statuses()
    assert 0 < sum(1 for t in tokens if statuses[t] == 100) < 150  # stopped midway

    finish_the_rest(sandbox, path)
    assert_each_delivered_once(sandbox, openssh_sftp, tokens)
