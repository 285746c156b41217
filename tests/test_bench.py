"""The bench's instrument: its delay proxy forwards faithfully, and a smoke run of
``python -m tests.bench`` produces the JSON it promises. Figures are not asserted
(speed is measured by the bench, not by tests), only that they are there and verified."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sftp_servers.fixtures import SSHD, _server_unavailable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback server that echoes everything, then closes when the client half-closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@contextlib.contextmanager
def _terminated(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Stop the proxy however the test ends (a failed assert must not hang on its exit)."""
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(
    sys.version_info < (3, 11, 7),
    reason="the proxy's connections are reset mid-transfer under Debian's Python 3.11.2 "
    "asyncio (about half the runs); on the project's 3.11.7 it has never failed",
)
@pytest.mark.parametrize("delay_ms", [0, 5])
def test_the_delay_proxy_forwards_every_byte_in_order_and_passes_the_half_close(
    echo_port: int, delay_ms: int
) -> None:
    argv = [sys.executable, "-m", "tests.bench.proxy", "--delay-ms", str(delay_ms)]
    with (
        subprocess.Popen(
            [*argv, str(echo_port)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        ) as proxy,
        _terminated(proxy),
    ):
        assert proxy.stdout is not None
        words = proxy.stdout.readline().split()
        assert words[0] == "ready"
        payload = os.urandom(3 * 1024 * 1024)  # several chunks, more than a socket buffer
        with socket.create_connection(("127.0.0.1", int(words[1])), timeout=20) as conn:

            def send() -> None:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            received = bytearray()
            while data := conn.recv(65536):  # ends only if the half-close went through
                received += data
            sender.join()
        assert bytes(received) == payload


@pytest.mark.sshd
def test_a_smoke_run_writes_a_json_with_every_figure_and_verified_runs(tmp_path: Path) -> None:
    if not SSHD.exists() or os.geteuid() != 0:
        _server_unavailable("the bench needs root and /usr/sbin/sshd")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--only", "idle", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "idle run" in done.stdout  # the table
    report = json.loads(out.read_text())
    assert {"cores", "python", "paramiko", "openssh", "git_commit"} <= set(report["machine"])
    assert report["options"]["only"] == ["idle"]
    (row,) = report["rows"]
    assert row["scenario"] == "idle"
    assert isinstance(row["measured"], float) and row["target"] and isinstance(row["ok"], bool)
    idle_runs = [report["runs"][i] for i in row["runs"]]
    assert len(idle_runs) == report["sizes"]["idle_runs"]
    for run in idle_runs:
        assert run["kind"] == "idle" and run["verified"], run
        assert run["wall_s"] > 0 and run["peak_rss_mb"] > 0
