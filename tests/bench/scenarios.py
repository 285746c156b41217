"""What the bench measures, against which reference, and the targets (issue 7).

Each scenario asks the ``Bench`` for runs; runs are shared between scenarios that need the
same one (the 1,000-invoice drain serves both "no delay" and the RSS flatness), and
``--repeat K`` takes the median of K runs of each (for peak RSS: the largest). The runs a
ratio compares alternate (push, reference, push, reference...), so drift on a shared
machine hits both sides alike. A row whose runs were not all verified is ✗ whatever its
figures say.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.bench.rig import Rig, Run

RSS_SLOPE_MAX_KB = 1.0  # per invoice; 10 MB over a 10,000-invoice drain is "flat"


@dataclass(frozen=True)
class Sizes:
    delay: int = 500
    nodelay: int = 1_000
    archive: int = 200
    archive_files: int = 50_000
    rss: int = 10_000
    rss_small: int = 1_000
    idle_runs: int = 7
    proxy: int = 500
    proxy_rounds: int = 5
    sweep: int = 500


FULL = Sizes()
QUICK = Sizes(
    delay=40,
    nodelay=100,
    archive=40,
    archive_files=5_000,
    rss=400,
    rss_small=100,
    idle_runs=3,
    proxy=200,
    proxy_rounds=3,
    sweep=60,
)


@dataclass
class Row:
    scenario: str
    label: str
    measured: float | None
    unit: str
    target: str
    ok: bool | None  # None: information, no target
    reference: float | None = None
    reference_label: str = ""
    ratio: float | None = None
    problem: str | None = None
    note: str | None = None  # how to read the figure
    runs: list[int] = field(default_factory=list)  # indexes into Bench.runs

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class Bench:
    def __init__(self, rig: Rig, sizes: Sizes, repeat: int) -> None:
        self.rig = rig
        self.sizes = sizes
        self.repeat = repeat
        self.runs: list[Run] = []
        self._cache: dict[tuple[Any, ...], list[int]] = {}

    def _get(self, key: tuple[Any, ...], make: Callable[[], Run], count: int) -> list[int]:
        have = self._cache.setdefault(key, [])
        while len(have) < count:
            self.runs.append(make())
            have.append(len(self.runs) - 1)
        return have[:count]

    def push(self, n: int, delay: float | None, sent: int = 0, k: int = 1) -> list[int]:
        return self._get(("push", n, delay, sent), lambda: self.rig.push(n, delay, sent), k)

    def reference(self, n: int, delay: float | None, k: int = 1, tag: str = "") -> list[int]:
        return self._get(("reference", n, delay, tag), lambda: self.rig.reference(n, delay), k)

    def alternate(
        self, *wanted: Callable[[int], list[int]], rounds: int | None = None
    ) -> list[list[int]]:
        """Runs of several kinds, interleaved: round i takes the i-th of each."""
        rounds = rounds or self.repeat
        for i in range(1, rounds + 1):
            for get in wanted:
                get(i)
        return [get(rounds) for get in wanted]

    def rate(self, indexes: list[int]) -> float:
        return statistics.median(self.runs[i].rate for i in indexes)

    def problem(self, *groups: list[int]) -> str | None:
        problems = [
            self.runs[i].problem or "not verified"
            for group in groups
            for i in group
            if not self.runs[i].verified
        ]
        return "; ".join(dict.fromkeys(problems)) or None


def _ok(problem: str | None, passed: bool) -> bool:
    return problem is None and passed


def _ratio_row(
    scenario: str,
    label: str,
    measured: float,
    reference: float,
    reference_label: str,
    at_least: float,
    target: str,
    problem: str | None,
    runs: list[int],
    note: str | None = None,
) -> Row:
    """A rate against a reference measured in the same run: met at ``at_least`` times it."""
    ratio = measured / reference if reference else None
    return Row(
        scenario,
        label,
        measured,
        "invoices/s",
        target,
        _ok(problem, ratio is not None and ratio >= at_least),
        reference=reference,
        reference_label=reference_label,
        ratio=ratio,
        problem=problem,
        note=note,
        runs=runs,
    )


# --- the scenarios ----------------------------------------------------------------------


def delay(b: Bench) -> list[Row]:
    n, d = b.sizes.delay, 10.0
    push, ref = b.alternate(lambda k: b.push(n, d, k=k), lambda k: b.reference(n, d, k=k))
    p, r = b.rate(push), b.rate(ref)
    problem = b.problem(push, ref)
    loops = [loop for i in ref if (loop := b.runs[i].loop_s)]
    # The paramiko loop makes 4 sequential round trips per file: its pace is the proxy's.
    round_trip = statistics.median(loops) / n / 4 * 1000 if loops else None
    proxy_cpu = sum(b.runs[i].cpu_elsewhere_s.get("proxy", 0.0) for i in push)
    proxy_share = proxy_cpu / sum(b.runs[i].wall_s for i in push)
    note = f"the proxy used {proxy_share:.0%} of a core during erp-push's runs"
    if round_trip:
        note += f"; a paramiko round trip through it took {round_trip:.1f} ms (20 ms added)"
    return [
        Row(
            "delay",
            f"{n:,} invoices, 10 ms each way",
            p,
            "invoices/s",
            "≥ 150 invoices/s",
            _ok(b.problem(push), p >= 150),
            problem=b.problem(push),
            runs=push,
        ),
        _ratio_row(
            "delay",
            f"{n:,} invoices, 10 ms each way, vs paramiko",
            p,
            r,
            "paramiko files/s",
            12,
            "≥ 12× paramiko",
            problem,
            push + ref,
            note,
        ),
    ]


def nodelay(b: Bench) -> list[Row]:
    n = b.sizes.nodelay
    push, ref = b.alternate(lambda k: b.push(n, None, k=k), lambda k: b.reference(n, None, k=k))
    p, r = b.rate(push), b.rate(ref)
    problem = b.problem(push, ref)
    loops = [loop for i in ref if (loop := b.runs[i].loop_s)]
    note = None
    if loops:
        # Both rates above include start-up and login; this one shows what they weigh.
        loop_rate = n / statistics.median(loops)
        note = (
            f"paramiko's loop alone (start-up and login left out): {loop_rate:,.0f} files/s;"
            f" erp-push is {p / loop_rate:.2f}× that"
        )
    return [
        _ratio_row(
            "nodelay",
            f"{n:,} invoices, no delay",
            p,
            r,
            "paramiko files/s",
            0.5,
            "≥ 0.5× paramiko",
            problem,
            push + ref,
            note,
        )
    ]


def archive(b: Bench) -> list[Row]:
    n, files = b.sizes.archive, b.sizes.archive_files
    full, empty = b.alternate(
        lambda k: b.push(n, None, files, k=k), lambda k: b.push(n, None, 0, k=k)
    )
    p, r = b.rate(full), b.rate(empty)
    return [
        _ratio_row(
            "archive",
            f"{n:,} invoices, no delay, {files:,} files in sent/",
            p,
            r,
            "empty sent/ invoices/s",
            0.8,
            "≥ 0.8× empty sent/",
            b.problem(full, empty),
            full + empty,
        )
    ]


def idle(b: Bench) -> list[Row]:
    b.rig.reset_sandbox()
    state = b.rig.workdir / "idle-state"
    b.rig.idle(state)  # warm-up (and the journal's creation): not counted
    first = len(b.runs)
    for _ in range(b.sizes.idle_runs):
        b.runs.append(b.rig.idle(state))
    indexes = list(range(first, len(b.runs)))
    walls = [b.runs[i].wall_s for i in indexes]
    median = statistics.median(walls)
    peak = max(b.runs[i].peak_rss_mb for i in indexes)
    b.rig.log(
        f"idle push x{len(walls)}: median {median:.3f} s wall "
        f"(min {min(walls):.3f}, max {max(walls):.3f}), peak {peak:.0f} MB"
    )
    problem = b.problem(indexes)
    return [
        Row(
            "idle",
            f"idle run (nothing to claim), median of {len(walls)}",
            median,
            "s wall",
            "≤ 0.25 s",
            _ok(problem, median <= 0.25),
            problem=problem,
            runs=indexes,
        )
    ]


def rss(b: Bench) -> list[Row]:
    big, small = b.sizes.rss, b.sizes.rss_small
    large, little = b.alternate(
        lambda k: b.push(big, None, k=k), lambda k: b.push(small, None, k=k)
    )
    peak = max(b.runs[i].peak_rss_mb for i in large)
    base = max(b.runs[i].peak_rss_mb for i in little)
    slope_kb = (peak - base) * 1024 / (big - small)
    problem_big = b.problem(large)
    problem = b.problem(large, little)
    return [
        Row(
            "rss",
            f"{big:,}-invoice drain, peak RSS",
            peak,
            "MB",
            "≤ 80 MB",
            _ok(problem_big, peak <= 80),
            problem=problem_big,
            runs=large,
        ),
        Row(
            "rss",
            f"peak RSS growth, {small:,} → {big:,} invoices",
            slope_kb,
            "KB/invoice",
            f"≤ {RSS_SLOPE_MAX_KB:g} KB/invoice (flat)",
            _ok(problem, slope_kb <= RSS_SLOPE_MAX_KB),
            reference=base,
            reference_label=f"MB at {small:,}",
            ratio=peak / base if base else None,
            problem=problem,
            runs=large + little,
        ),
    ]


def proxy(b: Bench) -> list[Row]:
    """The instrument's own error: the 0 ms proxy against direct, on the paramiko loop.

    Its own runs (not shared with other scenarios), alternated, best of each: on a shared
    machine noise only ever adds time, and this compares two small numbers.
    """
    n, rounds = b.sizes.proxy, max(b.repeat, b.sizes.proxy_rounds)
    direct, proxied = b.alternate(
        lambda k: b.reference(n, None, k=k, tag="proxy"),
        lambda k: b.reference(n, 0.0, k=k, tag="proxy"),
        rounds=rounds,
    )
    best_direct = min(b.runs[i].loop_s or float("inf") for i in direct)
    best_proxied = min(b.runs[i].loop_s or float("inf") for i in proxied)
    # The loop is strictly sequential, 4 round trips per file (open, write, close, rename).
    added_us = (best_proxied - best_direct) / n / 4 * 1e6
    problem = b.problem(direct, proxied)
    return [
        Row(
            "proxy",
            "delay proxy's own cost (0 ms vs direct)",
            added_us,
            "µs per round trip",
            "information",
            None if problem is None else False,
            reference=best_direct / n / 4 * 1e6,
            reference_label="µs direct",
            ratio=best_direct / best_proxied if best_proxied else None,
            problem=problem,
            note=f"paramiko loop of {n} files, best of {rounds} each, start-up left out",
            runs=direct + proxied,
        )
    ]


SCENARIOS: dict[str, Callable[[Bench], list[Row]]] = {
    "idle": idle,
    "nodelay": nodelay,
    "archive": archive,
    "delay": delay,
    "proxy": proxy,
    "rss": rss,
}


def sweep(b: Bench, levels: list[int], delays: list[float | None]) -> list[dict[str, Any]]:
    """The old concurrency sweep: push rate per (delay, concurrency), for tuning defaults."""
    results = []
    n = b.sizes.sweep
    for d in delays:
        for level in levels:
            indexes = []
            for _ in range(b.repeat):
                b.runs.append(b.rig.push(n, d, config={"concurrency": level}))
                indexes.append(len(b.runs) - 1)
            results.append(
                {
                    "delay_ms": d or 0,
                    "concurrency": level,
                    "invoices": n,
                    "rate_per_s": round(b.rate(indexes), 2),
                    "verified": b.problem(indexes) is None,
                    "runs": indexes,
                }
            )
    return results
