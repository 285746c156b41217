"""Run the asyncssh test SFTP server in the foreground, e.g. for the demo.

    python -m tests.sftp_servers --root DIR --port 2222 --user erp --password secret

Serves DIR (with ``outbox/`` and ``outbox/sent/`` created) on 127.0.0.1 and prints the
host key's fingerprint and a known_hosts line to trust it. The host key is kept in
``--host-key`` (default ``DIR/../<basename>.hostkey``) so restarts keep the same key.
Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import asyncssh

from tests.sftp_servers import asyncssh_server
from tests.sftp_servers.asyncssh_server import QUIRKS, ServerConfig


def _host_key(path: Path) -> asyncssh.SSHKey:
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    return key


async def _serve(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    asyncssh_server.prepare_root(root)
    key = _host_key(Path(args.host_key) if args.host_key else root.with_suffix(".hostkey"))
    config = ServerConfig(
        root=root,
        user=args.user,
        password=args.password,
        quirk=args.quirk,
        client_keys=asyncssh_server.load_public_keys(args.authorized_key or []),
    )
    acceptor = await asyncssh_server.start_server(config, key, host=args.host, port=args.port)
    port = asyncssh_server.bound_port(acceptor)
    print(f"serving {root} on {args.host}:{port} (quirk: {args.quirk})", flush=True)
    print(f"host key fingerprint: {key.get_fingerprint('sha256')}", flush=True)
    print(f"known_hosts line: {asyncssh_server.known_hosts_line(args.host, port, key)}", flush=True)
    try:
        await acceptor.wait_closed()
    finally:
        await asyncssh_server.stop_server(acceptor, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.sftp_servers", description=__doc__)
    parser.add_argument("--root", required=True, help="directory to serve as /")
    parser.add_argument("--port", type=int, default=2222, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--user", default="erp")
    parser.add_argument("--password", required=True)
    parser.add_argument("--host-key", help="ed25519 host key file (created if missing)")
    parser.add_argument("--authorized-key", action="append", help="client .pub to accept")
    parser.add_argument("--quirk", default="normal", choices=QUIRKS)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
