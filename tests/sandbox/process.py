"""The sandbox in a child process, for tools that must not share its GIL (bench, loadtest)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class SandboxDidNotStart(RuntimeError):
    """The child exited or printed something other than its address."""


@contextlib.contextmanager
def sandbox_process(
    db: Path | str,
    api_key: str,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m tests.sandbox`` on a free loopback port: its base URL once it serves,
    and the process; stopped on leaving. Its stderr goes to ``log`` (or nowhere).
    Raises SandboxDidNotStart, with what it logged, if it does not start."""
    child_env = dict(os.environ if env is None else env)
    # The child imports the same tests package as this process, whatever the cwd.
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    argv = ["-m", "tests.sandbox", "--port", "0", "--api-key", api_key, "--db", str(db)]
    with open(log, "w") if log is not None else open(os.devnull, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, *argv, "--quiet"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_env,
            cwd=ROOT,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://\S+/api", line)
        if match is None:
            logged = log.read_text() if log is not None else ""
            raise SandboxDidNotStart(f"the sandbox did not start: {line.strip()!r} {logged!r}")
        yield match.group(0), proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    """Terminate a child, kill it if it lingers, and close its pipe."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
