"""`make bench`: push throughput against local servers. A measurement, not a test.

    python -m tests.bench [--invoices 200] [--server openssh|asyncssh]
                          [--delay-ms 0,10] [--concurrency 1,4,8] [--repeat 3]

For each (delay, concurrency) it seeds a fresh sandbox with N invoices, runs
`erp-push push --drain` in a child process and reports invoices/s (median of --repeat
runs; the child's wall time includes ~0.5 s of Python start-up). With --delay-ms D, both
the Nuntiq and the SFTP connection go through a proxy that delays every chunk D ms each
way (about 2·D per round trip): a loopback stand-in for a real network, since this kernel
has no netem. The proxy runs in its own process so it does not compete with the push for
the GIL. Every run is checked: all invoices at 100 and one file each, or it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.sandbox.control import SandboxControl
from tests.sandbox.server import SandboxServer
from tests.sftp_servers.fixtures import SftpServerInfo

API_KEY = "bench-key"


# --- a delaying TCP proxy (runs as `python -m tests.bench proxy ...`) --------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward bytes, each chunk delivered `delay` seconds after it arrived, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            await queue.put((time.monotonic() + delay, data))
    except OSError:
        pass
    await queue.put((0.0, b""))
    with contextlib.suppress(OSError):
        await task


async def _proxy(listen_port: int, target_port: int, delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def delayed(target_port: int, delay_ms: int) -> Iterator[int]:
    """A port that reaches `target_port` with `delay_ms` added each way (0: no proxy)."""
    if delay_ms == 0:
        yield target_port
        return
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench", "proxy", str(port), str(target_port), str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready"
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- servers -------------------------------------------------------------------------


@contextlib.contextmanager
def sftp_server(kind: str, workdir: Path) -> Iterator[SftpServerInfo]:
    if kind == "openssh":
        from tests.sftp_servers.fixtures import run_openssh

        with run_openssh() as info:
            yield info
        return
    root = workdir / "sftp"
    password = "bench-password"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.sftp_servers",
            "--root",
            str(root),
            "--port",
            "0",
            "--password",
            password,
            "--host-key",
            str(workdir / "hostkey"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    port = int(lines[0].split("127.0.0.1:")[1].split()[0])
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(lines[2].split("known_hosts line: ")[1])
    try:
        yield SftpServerInfo(
            kind="asyncssh",
            host="127.0.0.1",
            port=port,
            user="erp",
            password=password,
            root=root,
            host_key_sha256=lines[1].split()[-1],
            known_hosts_path=known_hosts,
            client_key_path=None,
        )
    finally:
        proc.terminate()
        proc.wait()


def _known_hosts_for(info: SftpServerInfo, port: int, workdir: Path) -> Path:
    """The same host key, under the proxy's port."""
    entry = info.known_hosts_path.read_text().split(None, 1)[1]
    path = workdir / f"known_hosts_{port}"
    path.write_text(f"[127.0.0.1]:{port} {entry}")
    return path


# --- one measurement -----------------------------------------------------------------


def measure(
    *,
    nuntiq: SandboxServer,
    sftp: SftpServerInfo,
    invoices: int,
    delay_ms: int,
    concurrency: int,
    workdir: Path,
) -> float:
    http_port = int(nuntiq.base_url.split(":")[2].split("/")[0])
    with SandboxControl(nuntiq.base_url, API_KEY) as control:
        control.reset()
        assert sftp.root is not None
        for folder in ("outbox", "outbox/sent"):
            for f in (sftp.root / folder).iterdir():
                if f.is_file():
                    f.unlink()
        control.seed(invoices)
        with delayed(http_port, delay_ms) as nport, delayed(sftp.port, delay_ms) as sport:
            state = workdir / "state"
            shutil.rmtree(state, ignore_errors=True)
            settings = workdir / "settings.json"
            settings.write_text(
                json.dumps(
                    {
                        "customer_number": "1",
                        "secrets": {"nuntiq_api_key": API_KEY, "sftp_password": sftp.password},
                        "config": {
                            "connector_name": "bench",
                            "nuntiq_base_url": f"http://127.0.0.1:{nport}/api",
                            "sftp_host": "127.0.0.1",
                            "sftp_port": sport,
                            "sftp_user": sftp.user,
                            "sftp_known_hosts": str(_known_hosts_for(sftp, sport, workdir)),
                            "remote_outbox": "/outbox",
                            "remote_sent": "/outbox/sent",
                            "batch_size": 50,
                            "concurrency": concurrency,
                            "state_dir": str(state),
                        },
                    }
                )
            )
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "erp_push", "push", "--drain", "--settings", str(settings)],
                capture_output=True,
                text=True,
            )
            elapsed = time.perf_counter() - started
        statuses = list(control.statuses().values())
        files = list((sftp.root / "outbox").glob("*.csv"))
        if done.returncode != 0 or statuses.count(100) != invoices or len(files) != invoices:
            raise SystemExit(
                f"run failed (exit {done.returncode}, {statuses.count(100)} at 100, "
                f"{len(files)} files):\n{done.stderr[-2000:]}"
            )
    return invoices / elapsed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["proxy"]:
        listen, target, delay = int(argv[1]), int(argv[2]), int(argv[3]) / 1000
        asyncio.run(_proxy(listen, target, delay))
        return
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--invoices", type=int, default=200)
    parser.add_argument(
        "--server",
        choices=["openssh", "asyncssh"],
        default="openssh" if os.geteuid() == 0 and Path("/usr/sbin/sshd").exists() else "asyncssh",
    )
    parser.add_argument("--delay-ms", default="0,10", help="comma-separated, each way")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    delays = [int(d) for d in args.delay_ms.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="erp-push-bench-"))
    print(f"{args.invoices} invoices per run, server {args.server}, median of {args.repeat}")
    print(f"{'delay each way':>15} {'in flight':>10} {'invoices/s':>11}  runs")
    try:
        with (
            SandboxServer(str(workdir / "nuntiq.sqlite3"), api_key=API_KEY) as nuntiq,
            sftp_server(args.server, workdir) as sftp,
        ):
            for delay in delays:
                for level in levels:
                    runs = [
                        measure(
                            nuntiq=nuntiq,
                            sftp=sftp,
                            invoices=args.invoices,
                            delay_ms=delay,
                            concurrency=level,
                            workdir=workdir,
                        )
                        for _ in range(args.repeat)
                    ]
                    shown = ", ".join(f"{r:.1f}" for r in runs)
                    print(
                        f"{delay:>12} ms {level:>10} {statistics.median(runs):>11.1f}  [{shown}]",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
