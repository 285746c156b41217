"""How many requests per second the sandbox serves to a push-shaped load. A measurement, not
a test.

    python -m tests.sandbox.loadtest [--threads 8] [--invoices 2000]
                                     [--seed-invoices 1000,50000] [--repeat 3]
                                     [--in-process | --url URL --api-key KEY] [--json PATH]

Each run resets the sandbox, then
- holds ``--seed-invoices`` invoices that the push never touches: seeded and claimed under
  30-minute leases, i.e. sitting at 92 with live leases. That is the adversarial case for
  lease lapsing: a server that scans every lease on every request gets slower with each one;
- seeds ``--invoices`` invoices for the push (timed: seeding speed is reported too);
- runs ``--threads`` client threads doing what erp-push does: claim batches of up to 50
  (with an idempotency key), then get, acknowledge and integration-result per invoice; a
  delta-stream begin at the start, a delta GET every 10th batch, a complete at the end;
- checks that every pushed invoice ended at 100.

The client is deliberately light, so it does not hide the server's speed: one
``http.client.HTTPConnection`` per thread, keep-alive, TCP_NODELAY. By default the sandbox
runs in a child process (``python -m tests.sandbox``), so client and server do not share a
GIL. ``run_loadtest()`` is importable (``make bench`` may call it) and returns the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.sandbox.process import sandbox_process

CLIENT = "http.client.HTTPConnection per thread, keep-alive, TCP_NODELAY"
API_KEY = "loadtest-key"
BATCH = 50
HELD_TTL = 1800  # the contract's maximum: held leases never lapse during a run
SEED_CHUNK = 10_000


class _Client:
    """One keep-alive connection; records the latency of every request by endpoint."""

    def __init__(self, base_url: str, api_key: str) -> None:
        url = urlsplit(base_url)
        self.prefix = url.path.rstrip("/")
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.headers = {"X-API-Key": api_key, "Content-Type": "application/json"}
        self.conn: http.client.HTTPConnection | None = None
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.requests = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None or self.conn.sock is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self.conn.connect()
            assert self.conn.sock is not None
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.conn

    def call(self, endpoint: str, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        if sum(self.errors.values()) > 100:
            raise RuntimeError(f"too many failed requests: {dict(self.errors)}")
        self.requests += 1
        started = time.perf_counter()
        conn = self._connection()
        try:
            conn.request(method, self.prefix + path, body=data, headers=self.headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.errors[f"{endpoint} connection error"] += 1
            return None
        self.latencies[endpoint].append(time.perf_counter() - started)
        if response.status != 200:
            self.errors[f"{endpoint} {response.status}"] += 1
            return None
        return json.loads(raw)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _control(client: _Client, method: str, path: str, body: Any = None) -> Any:
    result = client.call("sandbox", method, "/_sandbox" + path, body)
    if result is None:
        raise RuntimeError(f"sandbox control {method} {path} failed: {dict(client.errors)}")
    return result


def _seed(client: _Client, count: int) -> list[str]:
    tokens: list[str] = []
    while len(tokens) < count:
        n = min(SEED_CHUNK, count - len(tokens))
        tokens += _control(client, "POST", "/seed", {"count": n, "seed": len(tokens)})[
            "invoice_tokens"
        ]
    return tokens


def _parallel(threads: int, work: Any) -> float:
    """Run ``work(i)`` on ``threads`` threads started together; the wall time they took."""
    barrier = threading.Barrier(threads + 1)
    failures: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as e:  # reported below: a thread must not die silently
            failures.append(e)

    pool = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"a load thread failed: {failures[0]!r}") from failures[0]
    return elapsed


def _hold(base_url: str, api_key: str, threads: int) -> None:
    """Claim everything claimable under long leases (the held invoices sit at 92)."""
    body = {"state": "PendingIntegration", "limit": BATCH, "lease_ttl_seconds": HELD_TTL}

    def work(i: int) -> None:
        c = _Client(base_url, api_key)
        try:
            while True:
                claimed = c.call("claim", "POST", "/v1/invoices/claim", body)
                if claimed is not None and not claimed["leases"]:
                    break
        finally:
            c.close()

    _parallel(threads, work)


def _push(clients: list[_Client]) -> float:
    def work(i: int) -> None:
        c = clients[i]
        stream = f"/v1/delta/streams/loadtest/worker-{i}"
        c.call("delta", "POST", stream + "/begin", {"cursor_type": "timestamp_utc"})
        batches = done = 0
        while True:
            claimed = c.call(
                "claim",
                "POST",
                "/v1/invoices/claim",
                {
                    "state": "PendingIntegration",
                    "limit": BATCH,
                    "lease_ttl_seconds": 300,
                    "idempotency_key": str(uuid.uuid4()),
                },
            )
            if claimed is None:
                continue  # counted as an error; try again
            if not claimed["leases"]:
                break
            batches += 1
            if batches % 10 == 0:
                c.call("delta", "GET", stream)
            for lease in claimed["leases"]:
                token, lease_token = lease["invoice_token"], lease["lease_token"]
                c.call("get", "GET", f"/v1/invoices/{token}")
                c.call("acknowledge", "POST", f"/v1/invoices/{token}/acknowledge",
                       {"lease_token": lease_token})  # fmt: skip
                c.call(
                    "integration_result",
                    "POST",
                    f"/v1/invoices/{token}/integration-result",
                    {
                        "lease_token": lease_token,
                        "success": True,
                        "external_id_1": f"/outbox/{token}.csv",
                        "external_message_1": "SFTP_DELIVERED",
                    },
                )
                done += 1
        c.call(
            "delta",
            "POST",
            stream + "/complete",
            {
                "new_cursor_value": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "records_processed": done,
            },
        )

    return _parallel(len(clients), work)


def _ms(values: list[float], q: float) -> float:
    if len(values) < 2:
        return round(values[0] * 1000, 3) if values else 0.0
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000, 3)


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU the server process has used so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _one_run(
    base_url: str, api_key: str, *, threads: int, invoices: int, held: int, pid: int | None
) -> dict[str, Any]:
    ctl = _Client(base_url, api_key)
    try:
        _control(ctl, "POST", "/reset", {})
        started = time.perf_counter()
        if held:
            _seed(ctl, held)
            _hold(base_url, api_key, threads)
        hold_s = time.perf_counter() - started
        started = time.perf_counter()
        pushed = _seed(ctl, invoices)
        seed_s = time.perf_counter() - started

        clients = [_Client(base_url, api_key) for _ in range(threads)]
        try:
            cpu_before, client_before = _cpu_seconds(pid), time.process_time()
            elapsed = _push(clients)
            cpu_after, client_cpu = _cpu_seconds(pid), time.process_time() - client_before
        finally:
            for c in clients:
                c.close()

        rows = _control(ctl, "GET", "/invoices")["invoices"]
        statuses = {r["invoice_token"]: r["status"] for r in rows}
        not_done = sum(1 for t in pushed if statuses.get(t) != 100)
    finally:
        ctl.close()

    latencies: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    for c in clients:
        for name, values in c.latencies.items():
            latencies[name] += values
        errors.update(c.errors)
    requests = sum(c.requests for c in clients)
    return {
        "held_invoices": held,
        "held_setup_seconds": round(hold_s, 3),
        "seed_seconds": round(seed_s, 3),
        "seed_invoices_per_second": round(invoices / seed_s, 1) if seed_s else None,
        "seconds": round(elapsed, 3),
        # CPU the server spent per request: what the machine's other load cannot inflate.
        "server_cpu_us_per_request": (
            round((cpu_after - cpu_before) / requests * 1e6, 1)
            if cpu_before is not None and cpu_after is not None
            else None
        ),
        # The same for this process (the client threads, and an in-process server if any).
        "client_cpu_us_per_request": round(client_cpu / requests * 1e6, 1),
        "requests": requests,
        "requests_per_second": round(requests / elapsed, 1),
        "invoices_per_second": round(invoices / elapsed, 1),
        "endpoints": {
            name: {
                "count": len(values),
                "median_ms": _ms(values, 50),
                "p95_ms": _ms(values, 95),
            }
            for name, values in sorted(latencies.items())
        },
        "errors": dict(errors),
        "not_processed": not_done,
    }


@contextlib.contextmanager
def _server(mode: str, url: str | None, api_key: str) -> Iterator[tuple[str, int | None]]:
    """A sandbox (the given one, one on a thread, or one in a child): its base URL and, when
    it is a child process, its pid."""
    if url is not None:
        yield url, None
        return
    with tempfile.TemporaryDirectory(prefix="sandbox-loadtest-") as tmp:
        db = os.path.join(tmp, "sandbox.sqlite3")
        if mode == "in-process":
            from tests.sandbox.server import SandboxServer

            with SandboxServer(db, api_key=api_key) as server:
                yield server.base_url, None
            return
        with sandbox_process(db, api_key, log=Path(tmp, "sandbox.log")) as (base_url, proc):
            yield base_url, proc.pid


def run_loadtest(
    *,
    threads: int = 8,
    invoices: int = 2000,
    held: tuple[int, ...] = (0,),
    repeat: int = 1,
    server: str = "subprocess",
    url: str | None = None,
    api_key: str = API_KEY,
) -> dict[str, Any]:
    """Run the load ``repeat`` times per held count; every figure, plus the best run's."""
    results: list[dict[str, Any]] = []
    with _server(server, url, api_key) as (base_url, pid):
        for n_held in held:
            runs = [
                _one_run(
                    base_url, api_key, threads=threads, invoices=invoices, held=n_held, pid=pid
                )
                for _ in range(repeat)
            ]
            rates = [r["requests_per_second"] for r in runs]
            best = max(runs, key=lambda r: r["requests_per_second"])
            results.append(
                {
                    "held_invoices": n_held,
                    "best_requests_per_second": best["requests_per_second"],
                    "median_requests_per_second": round(statistics.median(rates), 1),
                    "least_server_cpu_us_per_request": min(
                        (r["server_cpu_us_per_request"] for r in runs), default=None
                    )
                    if pid is not None
                    else None,
                    "best": best,
                    "runs": runs,
                }
            )
    return {
        "client": CLIENT,
        "server": "given URL" if url else server,
        "threads": threads,
        "invoices": invoices,
        "repeat": repeat,
        "results": results,
    }


def format_report(report: dict[str, Any]) -> str:
    out = [
        f"sandbox load test: {report['threads']} client threads, {report['invoices']} invoices"
        f" pushed per run, best of {report['repeat']}",
        f"client: {report['client']}; server: {report['server']}",
    ]
    for res in report["results"]:
        best = res["best"]
        out.append("")
        cpu = res["least_server_cpu_us_per_request"]
        out += [
            f"held {res['held_invoices']} invoices (at 92 under live leases; set up in"
            f" {best['held_setup_seconds']} s)",
            f"  {res['best_requests_per_second']:.1f} requests/s best,"
            f" {res['median_requests_per_second']:.1f} median"
            f" (runs: {', '.join(str(r['requests_per_second']) for r in res['runs'])});"
            f" {best['invoices_per_second']} invoices/s",
            "  server CPU per request: "
            + (f"{cpu:.0f} us (least of the runs)" if cpu is not None else "not measured")
            + f"; client CPU per request: {best['client_cpu_us_per_request']:.0f} us"
            + f"; seeding: {best['seed_invoices_per_second']} invoices/s",
        ]
        out.append(f"  {'endpoint':<20}{'count':>8}{'median ms':>12}{'p95 ms':>10}")
        for name, e in best["endpoints"].items():
            out.append(f"  {name:<20}{e['count']:>8}{e['median_ms']:>12.2f}{e['p95_ms']:>10.2f}")
        if best["errors"] or best["not_processed"]:
            out.append(f"  PROBLEMS: errors {best['errors']}; not at 100: {best['not_processed']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox.loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--invoices", type=int, default=2000, help="pushed per run")
    parser.add_argument(
        "--seed-invoices",
        default="0",
        help="invoices held (leased, untouched) besides the pushed ones; a comma list"
        " measures each, e.g. 1000,50000",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per held count; best wins")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true", help="sandbox on a thread here")
    where.add_argument("--url", help="an already running sandbox (its /_sandbox/reset is used)")
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        held = tuple(int(x) for x in args.seed_invoices.split(","))
    except ValueError:
        parser.error("--seed-invoices takes integers separated by commas")
    report = run_loadtest(
        threads=args.threads,
        invoices=args.invoices,
        held=held,
        repeat=args.repeat,
        server="in-process" if args.in_process else "subprocess",
        url=args.url,
        api_key=args.api_key,
    )
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    problems = any(
        run["errors"] or run["not_processed"] for res in report["results"] for run in res["runs"]
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
