"""Fast start: what an idle `erp-push push` (cron, nothing to claim) loads, and what it never does.

Speed itself is measured by `make bench`, not here; these tests hold the behaviour that
keeps it fast: no SSH library until there is something to upload, no distribution-metadata
scan for the version, rich only when something is drawn.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from erp_push import __version__
from tests.helpers import MakeSettings
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

ROOT = Path(__file__).resolve().parents[1]
# What an idle run must never load: the SSH stack and the module that drives it, the
# rich console (an idle run prints one plain line), and importlib.metadata (pydantic's
# plugin loader imports it; erp_push/__init__.py stands in for that loader).
NEVER_WHEN_IDLE = (
    "paramiko",
    "cryptography",
    "erp_push.transport",
    "rich.console",
    "importlib.metadata",
)


def imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output: every module the process loaded."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", stderr, re.MULTILINE))


def test_an_idle_push_never_loads_the_ssh_library(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """The real command line, against the sandbox with nothing to claim."""
    settings = make_settings(asyncssh_sftp)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "erp_push", "push", "--settings", str(settings)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to push" in result.stderr
    loaded = imported_modules(result.stderr)
    assert "erp_push.pipeline" in loaded and "httpx" in loaded  # the parse sees the run
    for name in NEVER_WHEN_IDLE:
        assert name not in loaded, f"an idle push imported {name}"
    assert sandbox.control.request_counts()["claim"] == 1


def test_a_push_with_work_loads_the_ssh_library_then(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    """The counterpart: the lazy import still happens when there is something to upload."""
    sandbox.control.seed(1)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "erp_push", "push", "--settings"]
        + [str(make_settings(asyncssh_sftp))],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"paramiko", "erp_push.transport"} <= imported_modules(result.stderr)
    assert len(asyncssh_sftp.listdir(asyncssh_sftp.outbox)) == 1


def test_importing_the_cli_loads_no_metadata_ssh_or_rich() -> None:
    probe = "import sys, erp_push.cli; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(result.stdout.split())
    assert "erp_push.cli" in loaded
    for name in ("importlib.metadata", "paramiko", "erp_push.transport", "rich", "httpx"):
        assert name not in loaded, f"import erp_push.cli imported {name}"


# A pydantic plugin, installed as pydantic finds them (an entry point in the group
# "pydantic"): it announces every schema it sees on stderr.
PLUGIN_MODULE = """
import sys

class Announce:
    def new_schema_validator(self, schema, schema_type, schema_type_path, *rest):
        print("plugin saw", schema_type_path.name, file=sys.stderr)
        return None, None, None

plugin = Announce()
"""
PLUGIN_ENTRY_POINTS = "[pydantic]\nannounce = announce_plugin:plugin\n"
BUILD_A_MODEL = """
import sys
import erp_push
from pydantic import BaseModel

class Probe(BaseModel):
    x: int

Probe(x=1)
print("metadata:", "importlib.metadata" in sys.modules)
"""


def _with_plugin_installed(tmp_path: Path, plugins: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "announce_plugin.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "announce_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: announce-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "src"), str(ROOT)])
    if plugins is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = plugins
    return subprocess.run(
        [sys.executable, "-c", BUILD_A_MODEL],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )


def test_by_default_pydantic_plugins_are_not_looked_for(tmp_path: Path) -> None:
    """No plugin runs and importlib.metadata stays unloaded, though one is installed."""
    result = _with_plugin_installed(tmp_path, None)
    assert "plugin saw" not in result.stderr
    assert "metadata: False" in result.stdout


@pytest.mark.parametrize("setting", ["", "some_other_plugin"])
def test_an_operator_can_still_enable_pydantic_plugins(tmp_path: Path, setting: str) -> None:
    """PYDANTIC_DISABLE_PLUGINS set to anything but its off values: pydantic's own loader
    runs, finds the installed plugin, and the plugin sees our models being built."""
    result = _with_plugin_installed(tmp_path, setting)
    assert "plugin saw Probe" in result.stderr
    assert "metadata: True" in result.stdout


def test_the_version_has_one_source() -> None:
    """pyproject takes the version from erp_push/__init__.py (hatch's regex source), so the
    package and its metadata cannot disagree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    source = ROOT / project["tool"]["hatch"]["version"]["path"]
    # hatch's default pattern for a version file
    match = re.search(
        r"""^(__version__|VERSION) *= *(['"])v?(?P<version>.+?)\2""",
        source.read_text(),
        re.MULTILINE,
    )
    assert match is not None and match["version"] == __version__


# How a command ends: ``cli._leave`` skips the interpreter's teardown (about 45 ms of an
# idle run) once the work is done, but only then. A handler registered with atexit is
# the probe: teardown runs it, ``os._exit`` does not.
LEAVE_PROBE = """
import atexit, sys, threading, time
from erp_push.cli import main
atexit.register(lambda: print("teardown ran", file=sys.stderr, flush=True))
if "--with-thread" in sys.argv:
    sys.argv.remove("--with-thread")
    def late() -> None:
        time.sleep(0.3)
        print("thread finished", file=sys.stderr, flush=True)
    threading.Thread(target=late).start()
sys.argv[0] = "erp-push"
main()
"""


def _leave_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LEAVE_PROBE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_a_finished_command_exits_without_the_interpreter_teardown() -> None:
    result = _leave_probe("--version")
    assert result.returncode == 0
    assert result.stdout == f"erp-push {__version__}\n"  # flushed before leaving
    assert "teardown ran" not in result.stderr


def test_a_failed_command_keeps_its_exit_code_and_message(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    result = _leave_probe("push", "--settings", str(missing))
    assert result.returncode == 3  # bad settings
    assert f"settings file not found: {missing}" in result.stderr
    assert "teardown ran" not in result.stderr
    usage = _leave_probe("push", "--no-such-option")
    assert usage.returncode == 2
    assert "No such option" in usage.stderr


def test_a_thread_still_running_gets_the_ordinary_exit_which_waits_for_it() -> None:
    result = _leave_probe("--with-thread", "--version")
    assert result.returncode == 0
    assert result.stdout == f"erp-push {__version__}\n"
    # The interpreter waited for the thread, then ran its teardown.
    assert result.stderr.splitlines() == ["thread finished", "teardown ran"]


# Injected as sitecustomize: says, as the command leaves (cli._leave ends with os._exit),
# whether the garbage collector was on and how much start-up had frozen out of its way.
_REPORT_THE_COLLECTOR = """
import gc, os, sys
_exit = os._exit
def _reporting_exit(code):
    sys.stderr.write(f"GC enabled={gc.isenabled()} frozen={gc.get_freeze_count()}\\n")
    sys.stderr.flush()
    _exit(code)
os._exit = _reporting_exit
"""


@pytest.mark.parametrize("entry", ["module", "script"])
def test_the_garbage_collector_sleeps_through_start_up_only(
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
    tmp_path: Path,
    entry: str,
) -> None:
    """Start-up makes no garbage, so the collector is off while it runs (``__main__``),
    and on again for the work, with start-up's objects frozen (``cli._begin``): a drain
    of many thousand invoices still has its cycles collected. Both ways in: ``python -m
    erp_push`` and the installed ``erp-push`` script."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_REPORT_THE_COLLECTOR)
    sandbox.control.seed(3)
    settings = make_settings(asyncssh_sftp)
    command = (
        [sys.executable, "-m", "erp_push"]
        if entry == "module"
        else [str(Path(sys.executable).parent / "erp-push")]
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "inject")}
    result = subprocess.run(
        [*command, "push", "--drain", "--settings", str(settings)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"GC enabled=(\w+) frozen=(\d+)", result.stderr)
    assert found is not None, result.stderr[-2000:]
    assert found[1] == "True"
    assert int(found[2]) > 20_000  # typer, pydantic and httpx's objects, frozen
