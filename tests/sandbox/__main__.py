"""Run the Nuntiq sandbox in the foreground: ``python -m tests.sandbox [--port 8765]``.

Prints one line with the base URL, then serves until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from types import FrameType

from tests.sandbox.server import SandboxServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox", description="Nuntiq sandbox (development tooling)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--api-key", default="sandbox-key")
    parser.add_argument(
        "--readonly-api-key",
        default=None,
        help="a second key that may GET but gets 403 FORBIDDEN on POST",
    )
    parser.add_argument(
        "--db", default=None, help="SQLite file (default: a temporary file, deleted on exit)"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)

    tmpdir = None
    db = args.db
    if db is None:
        tmpdir = tempfile.mkdtemp(prefix="nuntiq-sandbox-")
        db = os.path.join(tmpdir, "sandbox.sqlite3")

    server = SandboxServer(
        db,
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        readonly_api_key=args.readonly_api_key,
        verbose=not args.quiet,
    )

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds serve_forever exactly like Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.build()
        print(
            f"Nuntiq sandbox at {server.base_url} (X-API-Key: {args.api_key}; db: {db};"
            " Ctrl-C stops)",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"sandbox: cannot start: {e}", file=sys.stderr)
        return 1
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    print("sandbox stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
