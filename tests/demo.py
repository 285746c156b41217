"""`make demo`: erp-push's main job on one machine, with nothing but loopback servers.

Starts the Nuntiq sandbox and an SFTP server (asyncssh over a folder) as subprocesses,
seeds invoices (some deliberately awkward), puts an unrelated file in the ERP's sent/
folder under a name one invoice will want, then runs the real `erp-push` command line:
dry-run, push --drain, an idle push, a push with attachments, and a pass in batch mode
(one file per claimed batch). Shows what Nuntiq recorded and which files landed, then
stops both servers. Everything lives in ./.demo (removed at the next demo).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from erp_push.render import file_name_for
from tests.sandbox.control import SandboxControl

console = Console()
DEMO = Path(".demo").resolve()
API_KEY = "sandbox-key"
STATUS_NAMES = {
    90: "pending",
    91: "pending (retry)",
    92: "leased",
    93: "acknowledged",
    97: "IntegrationFailed",
    100: "Processed",
}


def start(args: list[str], pattern: str, name: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start a server and wait for the line that tells where it listens."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if match := re.search(pattern, line):
            return proc, match
    proc.kill()
    raise SystemExit(f"{name} did not start")


def erp_push(*args: str, env: dict[str, str]) -> int:
    command = ["erp-push", *args]
    console.rule(f"[bold]$ {' '.join(command)}")
    exe = Path(sys.executable).with_name("erp-push")
    return subprocess.call([str(exe), *args], env=env)


def main() -> None:
    shutil.rmtree(DEMO, ignore_errors=True)
    (DEMO / "sftp").mkdir(parents=True)
    password = secrets.token_urlsafe(12)
    procs: list[subprocess.Popen[str]] = []
    try:
        sandbox, m = start(
            [
                "-m",
                "tests.sandbox",
                "--port",
                "0",
                "--api-key",
                API_KEY,
                "--quiet",
                "--db",
                str(DEMO / "nuntiq.sqlite3"),
            ],
            r"(http://\S+/api)",
            "the Nuntiq sandbox",
        )
        procs.append(sandbox)
        base_url = m.group(1)
        sftp, m = start(
            [
                "-m",
                "tests.sftp_servers",
                "--root",
                str(DEMO / "sftp"),
                "--port",
                "0",
                "--user",
                "erp",
                "--password",
                password,
                "--host-key",
                str(DEMO / "hostkey"),
            ],
            r"on 127\.0\.0\.1:(\d+)",
            "the SFTP server",
        )
        procs.append(sftp)
        port = int(m.group(1))
        fingerprint = _read_fingerprint(sftp)
        console.print(f"Nuntiq sandbox: [bold]{base_url}[/bold]")
        console.print(
            f"SFTP server:    [bold]127.0.0.1:{port}[/bold] (host key {fingerprint}) "
            f"serving {DEMO / 'sftp'}"
        )

        settings = DEMO / "settings.json"
        settings.write_text(
            json.dumps(
                {
                    "customer_number": "10000001",
                    "secrets": {},  # from the environment below: never in the file
                    "config": {
                        "connector_name": "acme_erp_push",
                        "nuntiq_base_url": base_url,
                        "sftp_host": "127.0.0.1",
                        "sftp_port": port,
                        "sftp_user": "erp",
                        "sftp_host_key_sha256": fingerprint,
                        "remote_outbox": "/outbox",
                        "remote_sent": "/outbox/sent",
                        "batch_size": 10,
                        "state_dir": str(DEMO / "state"),
                    },
                },
                indent=2,
            )
        )
        env = {
            **os.environ,
            "ERP_PUSH_NUNTIQ_API_KEY": API_KEY,
            "ERP_PUSH_SFTP_PASSWORD": password,
            "COLUMNS": str(shutil.get_terminal_size((120, 40)).columns),
        }

        with SandboxControl(base_url, API_KEY) as nuntiq:
            nuntiq.seed(18, seed=1)
            nuntiq.seed(12, seed=2, awkward=True)
            invoices = nuntiq.invoices()
            console.print(
                f"Seeded {len(invoices)} invoices at status 90 "
                "(12 awkward: odd numbers, a tab, no number, 300 lines, ...)"
            )
            # The ERP already picked up an unrelated file with the name one invoice wants:
            # erp-push must not clobber it, and gives the new file a suffix instead.
            taken = file_name_for(
                invoices[3]["invoice_number"], datetime.now(UTC).date(), charset="unicode"
            )
            (DEMO / "sftp/outbox/sent" / taken).write_bytes(b"an older file the ERP processed\n")
            console.print(f"Pre-existing file in sent/: [bold]{taken}[/bold]")

            erp_push("dry-run", "--settings", str(settings), "--limit", "5", env=env)
            # dry-run leased those five for 60 s; fast-forward the sandbox clock so the
            # push below sees them (a real operator would wait a minute).
            nuntiq.advance_clock(61)
            code = erp_push("push", "--settings", str(settings), "--drain", env=env)
            console.print(f"exit code {code} (1 = some invoices failed and were reported)")
            erp_push("push", "--settings", str(settings), env=env)

            # A second pass with attachments: three invoices with two files each, pushed
            # next to their CSV (named after it) and before it.
            nuntiq.seed(3, seed=3, attachments_per_invoice=2, attachment_bytes=200_000)
            console.rule("[bold]With attachments (ERP_PUSH_PUSH_ATTACHMENTS=true)")
            console.print("Seeded 3 invoices with 2 attachments each (200 KB)")
            with_attachments = {**env, "ERP_PUSH_PUSH_ATTACHMENTS": "true"}
            erp_push("push", "--settings", str(settings), env=with_attachments)

            # A third pass in batch mode: each claimed batch of 4 becomes one file.
            nuntiq.seed(7, seed=4)
            console.rule("[bold]Batch mode (ERP_PUSH_OUTPUT_MODE=batch, batch_size 4)")
            console.print("Seeded 7 more invoices")
            batch_env = {**env, "ERP_PUSH_OUTPUT_MODE": "batch", "ERP_PUSH_BATCH_SIZE": "4"}
            erp_push("push", "--settings", str(settings), "--drain", env=batch_env)

            console.rule("[bold]What Nuntiq recorded")
            _show_statuses(nuntiq.invoices())
        console.rule("[bold]What landed in the ERP's drop folder")
        _show_files(DEMO / "sftp")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        console.print("[dim]servers stopped; files and journal are kept in .demo/[/dim]")


def _read_fingerprint(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for _ in range(5):
        line = proc.stdout.readline()
        if m := re.search(r"(SHA256:\S+)", line):
            return m.group(1)
    raise SystemExit("the SFTP server did not print its host key")


def _show_statuses(invoices: list[dict[str, object]]) -> None:
    table = Table()
    for column in ("invoice number", "status", "external_id_1 / failure"):
        table.add_column(column, overflow="fold")
    for inv in invoices:
        status = int(str(inv["status"]))
        style = "green" if status == 100 else "red" if status == 97 else "yellow"
        number = str(inv["invoice_number"] or "(none)")
        detail = (
            inv.get("external_id_1") or f"{inv.get('failure_code')}: {inv.get('failure_message')}"
        )
        table.add_row(
            _short(number),
            f"[{style}]{status} {STATUS_NAMES.get(status, '')}[/{style}]",
            _short(str(detail), 90),
        )
    console.print(table)


def _show_files(root: Path) -> None:
    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    files = sorted(p for p in (root / "outbox").rglob("*") if p.is_file())
    for path in files:
        table.add_row(str(path.relative_to(root)), str(path.stat().st_size))
    console.print(table)
    tmp = [p for p in files if p.name.endswith(".tmp")]
    attachments = [p for p in files if not p.name.endswith((".csv", ".tmp"))]
    console.print(
        f"{len(files)} files ({len(attachments)} attachments next to their CSV), "
        f"{len(tmp)} leftover .tmp files"
    )
    per_invoice = next((p for p in files if p.name.startswith("INV-")), None)
    batches = [p for p in files if p.name.startswith("invoices-")]
    largest_batch = max(batches, key=lambda p: p.stat().st_size, default=None)
    for sample in (per_invoice, largest_batch):
        if sample:
            console.print(f"\n[bold]{sample.name}[/bold] (tabs shown as →):")
            text = sample.read_bytes().decode("utf-8-sig").replace("\t", " → ")
            console.print(text, markup=False)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":
    main()
