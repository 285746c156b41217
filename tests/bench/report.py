"""The bench's output: a table for people (stdout) and, with --json, every figure."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.bench.rig import ROOT, Run
from tests.bench.scenarios import Row


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    digits = 3 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("scenario")
    t.add_column("measured", justify="right")
    t.add_column("reference", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("target")
    t.add_column("", justify="center")
    for r in rows:
        mark = "·" if r.ok is None else "[green]✓[/green]" if r.ok else "[red]✗[/red]"
        reference = _fmt(r.reference, r.reference_label) if r.reference is not None else "—"
        t.add_row(
            r.label,
            _fmt(r.measured, r.unit),
            reference,
            "—" if r.ratio is None else f"{r.ratio:.2f}×",
            r.target,
            mark,
        )
    return t


def markdown(rows: list[Row]) -> str:
    """The table as Markdown, for the README's Speed section."""
    lines = ["| scenario | measured | reference | ratio | target | |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r.ok is None else "✓" if r.ok else "✗"
        reference = _fmt(r.reference, r.reference_label) if r.reference is not None else "—"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        cells = [r.label, _fmt(r.measured, r.unit), reference, ratio, r.target, mark]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(
    rows: list[Row],
    sweep: list[dict[str, Any]],
    runs: list[Run],
    title: str,
    note: str,
    *,
    as_markdown: bool = False,
) -> None:
    # Piped or redirected, rich would wrap at 80 columns; the table wants ~130.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    if rows and as_markdown:
        console.print(title, markup=False)
        console.print(markdown(rows), markup=False, soft_wrap=True)
    elif rows:
        console.print(table(rows, title))
        for r in rows:
            if r.problem:
                console.print(f"[red]✗[/red] {r.label}: {r.problem}")
            if r.note:
                console.print(f"· {r.label}: {r.note}")
    if sweep:
        t = Table(title="concurrency sweep (invoices/s)", title_justify="left")
        t.add_column("delay each way")
        levels = sorted({s["concurrency"] for s in sweep})
        for level in levels:
            t.add_column(f"{level} in flight", justify="right")
        for d in dict.fromkeys(s["delay_ms"] for s in sweep):
            cells = []
            for level in levels:
                hit = next(s for s in sweep if s["delay_ms"] == d and s["concurrency"] == level)
                cells.append(f"{hit['rate_per_s']:.1f}" + ("" if hit["verified"] else " ✗"))
            t.add_row(f"{d:g} ms", *cells)
        console.print(t)
    busy = contention(runs)
    if busy > 0.1:
        console.print(
            f"[yellow]warning: other processes on this machine used {busy:.0%} of its CPU "
            "during the measured runs; the figures are pessimistic, rerun when it is quiet."
            "[/yellow]"
        )
    console.print(note)


def contention(runs: list[Run]) -> float:
    """Share of the machine's CPU (all cores) that other users took during the runs."""
    others = sum(r.cpu_elsewhere_s.get("others", 0.0) for r in runs)
    capacity = sum(r.wall_s for r in runs) * (os.cpu_count() or 1)
    return others / capacity if capacity else 0.0


def _first_line(argv: list[str]) -> str:
    """The first line a command prints (``sshd -V`` answers on stderr), or ""."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=10)
        return next(iter((done.stdout + done.stderr).strip().splitlines()), "")
    return ""


def _proc_value(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return ""


def machine() -> dict[str, Any]:
    import paramiko

    import erp_push
    from erp_push.settings import Config

    defaults = Config()
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_first_line(["git", "status", "--porcelain"]))
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu": _proc_value("/proc/cpuinfo", "model name"),
        "memory": _proc_value("/proc/meminfo", "MemTotal"),
        "load_average": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paramiko": paramiko.__version__,
        "openssh": _first_line(["/usr/sbin/sshd", "-V"]) or _first_line(["ssh", "-V"]),
        "sqlite": sqlite3.sqlite_version,
        "erp_push": getattr(erp_push, "__version__", ""),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "erp_push_defaults": {
            "batch_size": defaults.batch_size,
            "concurrency": defaults.concurrency,
        },
        "executable": sys.executable,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n")
