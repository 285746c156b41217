"""`make bench`: erp-push end to end beside a bare paramiko loop, in one run.

    python -m tests.bench [--quick] [--only idle,nodelay,...] [--repeat K] [--json PATH]
                          [--timeout S] [--set KEY=VALUE ...] [--sweep 1,4,8,16]

A benchmark, not a test: it prints a table of the issue-7 targets (measured, reference,
ratio, target, ✓/✗) and exits 0 whether or not they are met; 2 when it cannot set itself
up (it needs root and OpenSSH's sshd).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.bench import report
from tests.bench.rig import Rig, RigError
from tests.bench.scenarios import FULL, QUICK, SCENARIOS, Bench, Row, sweep


def _parse_set(items: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench: --set wants KEY=VALUE, got {item!r}")
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated scenarios (default all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="median of K runs of each, alternating (default 3; 1 with --quick): one run "
        "on a shared machine moves by 10-20%%",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown (for the README)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="kill a child run after S seconds (✗)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an erp-push config key for every push (default: erp-push's own defaults)",
    )
    parser.add_argument(
        "--sweep",
        default="",
        metavar="LEVELS",
        help="also push at 0 and 10 ms for each concurrency level (e.g. 1,4,8,16)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no folder {args.json.parent}")
    chosen = [s for s in args.only.split(",") if s] if args.only else list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
    if args.sweep and not args.only:
        chosen = []  # --sweep alone is the sweep; with --only, the scenarios come first
    levels = [int(x) for x in args.sweep.split(",") if x]
    config = _parse_set(args.set)
    sizes = QUICK if args.quick else FULL

    started = time.perf_counter()
    started_at = datetime.now(UTC)
    machine = report.machine()
    rows: list[Row] = []
    swept: list[dict[str, Any]] = []
    try:
        with Rig(timeout=args.timeout, config=config) as rig:
            bench = Bench(rig, sizes, args.repeat)
            # Not counted: compiles bytecode and warms caches, as any second run finds them.
            if levels or set(chosen) & {"nodelay", "archive", "delay", "rss"}:
                rig.log("warm-up (not counted):")
                rig.push(5, None)
            if set(chosen) & {"nodelay", "delay", "proxy"}:
                rig.log("warm-up (not counted):")
                rig.reference(5, None)
            for name in chosen:
                try:
                    rows.extend(SCENARIOS[name](bench))
                except (RigError, OSError, httpx.HTTPError, RuntimeError) as e:
                    # One broken scenario (a server died, a folder could not be made) is
                    # a ✗ row with the reason; the others still run.
                    rig.log(f"{name}: could not run: {e}")
                    rows.append(
                        Row(name, name, None, "", "—", False, problem=f"could not run: {e}")
                    )
            if levels:
                swept = sweep(bench, levels, [None, 10.0])
            runs = bench.runs
    except RigError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    duration = time.perf_counter() - started
    machine["load_average_after"] = os.getloadavg()

    defaults = {**machine["erp_push_defaults"], **config}
    title = (
        f"erp-push bench ({'quick' if args.quick else 'full'}; "
        f"{'median of ' + str(args.repeat) if args.repeat > 1 else 'one run each'}; "
        f"batch_size {defaults.get('batch_size')}, concurrency {defaults.get('concurrency')})"
    )
    note = (
        f"{machine['cores_usable']} cores, Python {machine['python']}, paramiko "
        f"{machine['paramiko']}, {machine['openssh'].split(',')[0]}; erp-push "
        f"{machine['git_commit']}; {duration:.0f} s. Rates are invoices (files) per second "
        "from spawn to exit of the child, start-up and login included, for erp-push and "
        "paramiko alike. Rerun: make bench (or python -m tests.bench --help)."
    )
    report.print_report(rows, swept, runs, title, note, as_markdown=args.markdown)
    if args.json is not None:
        document: dict[str, Any] = {
            "bench": "erp-push",
            "started_at": started_at.isoformat(),
            "duration_s": round(duration, 1),
            "options": {
                "quick": args.quick,
                "only": chosen,
                "repeat": args.repeat,
                "timeout_s": args.timeout,
                "config": config,
                "sweep": levels,
                "markdown": args.markdown,
            },
            "sizes": sizes.__dict__,
            "machine": machine,
            "contention": round(report.contention(runs), 3),
            "rows": [r.to_dict() for r in rows],
            "sweep": swept,
            "runs": [r.to_dict() for r in runs],
        }
        try:
            report.write_json(args.json, document)
        except OSError as e:
            print(f"bench: cannot write {args.json}: {e.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
