"""The bench's servers and its two kinds of run, each verified.

``Rig`` starts, for one bench run: the Nuntiq sandbox (``python -m tests.sandbox`` in its
own process, on a temporary SQLite file), one OpenSSH ``sshd`` (chroot, its own user;
``tests.sftp_servers.fixtures.run_openssh``) and, per delay, one delay proxy process
(``tests.bench.proxy``) in front of both. Then:

- ``push(n, delay_ms, sent_files)``: a fresh sandbox seeded with ``n`` invoices, an empty
  outbox, ``sent/`` holding ``sent_files`` unrelated files, a fresh journal; runs the real
  CLI, ``python -m erp_push push --drain --json``, in a child process and times it from
  spawn to exit; its peak RSS and CPU come from ``wait4``. Verified afterwards: exit 0,
  every seeded invoice at 100, exactly one file in the outbox per invoice (the name
  Nuntiq was told), no ``*.erp-push.tmp`` left, ``sent/`` untouched.
- ``reference(n, delay_ms)``: ``tests.bench.reference`` (bare paramiko) uploading ``n``
  files into a fresh folder on the same sshd, through the same proxy. Verified: ``n``
  files, no tmp left.
- ``idle()``: ``push`` with nothing to claim.

CPU seconds of the sandbox, sshd (its finished sessions) and the proxy are read from
/proc around each run, to show where the two cores went.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.sandbox.control import SandboxControl
from tests.sandbox.process import SandboxDidNotStart, sandbox_process, stop
from tests.sftp_servers.fixtures import SftpServerInfo, run_openssh

API_KEY = "bench-" + secrets.token_hex(8)
TMP_SUFFIX = ".erp-push.tmp"
ROOT = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LAUNCHER = Path(__file__).with_name("launch.py")


class RigError(Exception):
    """The bench could not set itself up (not a measurement result)."""


@dataclass
class Run:
    """One measured child process."""

    kind: str  # "push", "reference" or "idle"
    invoices: int
    delay_ms: float | None  # None: direct, no proxy
    sent_files: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # settings beyond the bench's own
    wall_s: float = 0.0
    exit_code: int | None = None
    timed_out: bool = False
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0  # the child's own user + system time
    # The child's voluntary context switches: each a thread waiting (for I/O, a lock, the
    # GIL). Per invoice, they show what threads taking turns cost (README, Speed).
    switches: int = 0
    loop_s: float | None = None  # reference only: first open to last rename
    setup_s: float = 0.0  # seeding and folder preparation, not measured
    # CPU seconds during the run of the servers, and of everything else on the machine
    # ("others": other users' processes, on a shared machine).
    cpu_elsewhere_s: dict[str, float] = field(default_factory=dict)
    done: int = 0  # invoices at 100 / files published, whatever the verdict
    verified: bool = False
    problem: str | None = None

    @property
    def rate(self) -> float:
        """Invoices (files) per second, spawn to exit; a partial run counts what it did."""
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate_per_s"] = round(self.rate, 3)
        return d

    def describe(self) -> str:
        where = "direct" if self.delay_ms is None else f"{self.delay_ms:g} ms proxy"
        what = {"push": "erp-push", "reference": "paramiko", "idle": "idle push"}[self.kind]
        unit = "file" if self.kind == "reference" else "invoice"
        size = f"{self.invoices} {unit}s"
        if self.sent_files:
            size += f", {self.sent_files} in sent/"
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in self.cpu_elsewhere_s.items())
        head = f"{what:9} {size} ({where}): "
        body = f"{self.wall_s:.2f} s wall"
        if self.kind != "idle":
            body = f"{self.rate:.1f}/s, " + body
        if self.loop_s is not None:
            body += f", loop {self.loop_s:.2f} s"
        body += f", peak {self.peak_rss_mb:.0f} MB, cpu s: client {self.cpu_s:.1f}"
        if self.invoices and self.kind != "idle":
            body += f" ({self.switches / self.invoices:.0f} switches per {unit})"
        body += f", {cpu}" if cpu else ""
        verdict = "verified" if self.verified else f"NOT VERIFIED: {self.problem}"
        return f"{head}{body} — {verdict}"


@dataclass
class _Route:
    http_port: int
    ssh_port: int
    known_hosts: Path
    proxy_pid: int | None


@dataclass
class _Child:
    exit_code: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    switches: int
    timed_out: bool
    stdout: str
    stderr: str


def run_child(argv: list[str], env: dict[str, str], timeout: float) -> _Child:
    """Run a child, timed from spawn to exit, its rusage from wait4 (see launch.py)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as report,
    ):
        launcher = [sys.executable, "-I", "-S", str(LAUNCHER), report.name, str(timeout)]
        done = subprocess.run([*launcher, *argv], stdout=out, stderr=err, env=env, cwd=ROOT)
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        try:
            figures = json.loads(Path(report.name).read_text())
        except ValueError as e:
            raise RigError(f"the launcher failed (exit {done.returncode}): {stderr[-500:]}") from e
        return _Child(
            exit_code=figures["exit_code"],
            wall_s=figures["wall_s"],
            peak_rss_mb=figures["maxrss_kb"] / 1024,  # KiB on Linux
            cpu_s=figures["cpu_s"],
            switches=figures["switches"],
            timed_out=figures["timed_out"],
            stdout=out.read().decode(errors="replace"),
            stderr=stderr,
        )


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    stat = _stat(pid)
    return stat[2] / CLOCK_TICKS if stat else 0.0


def _machine_busy_s() -> float:
    """CPU seconds spent by the whole machine (all cores, every process) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    # user nice system idle iowait irq softirq steal: steal is the hypervisor's, not ours.
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / CLOCK_TICKS


def _stat(pid: int | str) -> tuple[int, int, int] | None:
    """(ppid, start time, utime + stime ticks) of a live process, or None."""
    # After the ")" the state is fields[0], so `man proc`'s field n is fields[n - 3].
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


class TreeCpu(threading.Thread):
    """CPU seconds of a process and all its descendants, dead ones included, sampled.

    Why sampling: sshd's session processes are not always reaped by the listening sshd
    (on a clean logout the monitor can exit before the user's session process, which is
    then reaped by init), so the listener's ``cutime`` misses most of the server's work.
    Each process's CPU is read every ``interval`` while it lives; what it spends in its
    last ``interval`` is missed. Only new pids and the tree's own are read each tick.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        super().__init__(name="sshd-cpu", daemon=True)
        self.root = root
        self.interval = interval
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._tree: dict[tuple[int, int], int] = {}  # (pid, start) -> last ticks seen
        self._members: dict[int, int] = {}  # live pid -> start time
        self._unrelated: set[int] = set()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()

    def sample(self) -> None:
        with self._lock:
            pids = {int(e.name) for e in os.scandir("/proc") if e.name.isdigit()}
            self._unrelated &= pids
            fresh: dict[int, tuple[int, int, int]] = {}
            for pid in pids - self._unrelated:
                stat = _stat(pid)
                if stat is not None:
                    fresh[pid] = stat
            members = {self.root}
            changed = True
            while changed:  # a new child and its new parent can appear in the same tick
                changed = False
                for pid, (ppid, _, _) in fresh.items():
                    if pid not in members and ppid in members:
                        members.add(pid)
                        changed = True
            for pid, (_, start, ticks) in fresh.items():
                if pid in members:
                    if pid != self.root:
                        self._tree[(pid, start)] = ticks
                else:
                    self._unrelated.add(pid)

    def has_children(self) -> bool:
        self.sample()
        with self._lock:
            return any(
                (st := _stat(pid)) is not None and st[0] == self.root for pid, _ in self._tree
            )

    def cpu_s(self) -> float:
        self.sample()
        with self._lock:
            own = _stat(self.root)
            ticks = sum(self._tree.values()) + (own[2] if own else 0)
        return ticks / CLOCK_TICKS


def _sshd_pid(config: Path) -> int:
    """The listening sshd of our config (read-only: used for CPU accounting)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # sshd rewrites its title ("sshd: /usr/sbin/sshd -D -e -f CONFIG [listener]")
                cmdline = (entry / "cmdline").read_bytes()
                if str(config).encode() in cmdline and b"sshd" in cmdline.split(b" ")[0]:
                    return int(entry.name)
    raise RigError(f"cannot find the sshd serving {config}")


def child_env() -> dict[str, str]:
    """The bench's environment minus anything that would override the settings file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERP_PUSH_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["NO_COLOR"] = "1"
    return env


class Rig:
    def __init__(self, *, timeout: float, config: dict[str, Any], log: Any = None) -> None:
        self.timeout = timeout
        self.config_overrides = config
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stack = contextlib.ExitStack()
        self._routes: dict[float | None, _Route] = {}
        self._sent_now = 0
        self._have_sent = {0}
        self._ref_count = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="erp-push-bench-"))
        self.env = child_env()

    # --- start and stop -------------------------------------------------------------------

    def __enter__(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _start(self) -> None:
        if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
            raise RigError(
                "the bench runs OpenSSH's sshd with a chroot and its own user: it needs root"
                " and /usr/sbin/sshd (apt-get install openssh-server)"
            )
        # erp-push as installed: pip compiles a package's bytecode at install time, but
        # this checkout runs from src/, and with PYTHONDONTWRITEBYTECODE set every child
        # would compile erp_push again (~30 ms of each run). Compile it once, as pip would.
        compileall.compile_dir(str(ROOT / "src" / "erp_push"), quiet=1)
        self.sandbox = self._stack.enter_context(self._sandbox())
        self.sftp: SftpServerInfo = self._stack.enter_context(run_openssh())
        assert self.sftp.root is not None
        self.chroot: Path = self.sftp.root
        self.sshd_cpu = TreeCpu(_sshd_pid(self.chroot.parent / "sshd_config"))
        self.sshd_cpu.start()
        self._stack.callback(self.sshd_cpu.stop)
        self.control = self._stack.enter_context(SandboxControl(self.base_url, API_KEY))

    @contextlib.contextmanager
    def _sandbox(self) -> Iterator[subprocess.Popen[str]]:
        db = self.workdir / "nuntiq.sqlite3"
        try:
            with sandbox_process(db, API_KEY, env=self.env) as (base_url, proc):
                self.base_url = base_url
                self.http_port = int(urlsplit(base_url).port or 0)
                yield proc
        except SandboxDidNotStart as exc:
            raise RigError(str(exc)) from None

    def route(self, delay_ms: float | None) -> _Route:
        """Ports (and a known_hosts for that port) that reach the servers with a delay."""
        if delay_ms in self._routes:
            return self._routes[delay_ms]
        if delay_ms is None:
            http_port, ssh_port, pid = self.http_port, self.sftp.port, None
        else:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.proxy",
                    "--delay-ms",
                    f"{delay_ms:g}",
                    str(self.http_port),
                    str(self.sftp.port),
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=self.env,
                cwd=ROOT,
            )
            self._stack.callback(stop, proc)
            assert proc.stdout is not None
            words = proc.stdout.readline().split()
            if words[:1] != ["ready"]:
                raise RigError("the delay proxy did not start")
            http_port, ssh_port, pid = int(words[1]), int(words[2]), proc.pid
        entry = self.sftp.known_hosts_path.read_text().split(None, 1)[1]
        known_hosts = self.workdir / f"known_hosts_{ssh_port}"
        known_hosts.write_text(f"[127.0.0.1]:{ssh_port} {entry}")
        self._routes[delay_ms] = _Route(http_port, ssh_port, known_hosts, pid)
        return self._routes[delay_ms]

    # --- CPU accounting ---------------------------------------------------------------------

    def _server_cpu(self, route: _Route) -> dict[str, float]:
        cpu = {
            "machine": _machine_busy_s(),
            "sandbox": _cpu_s(self.sandbox.pid),
            "sshd": self.sshd_cpu.cpu_s(),
        }
        if route.proxy_pid is not None:
            cpu["proxy"] = _cpu_s(route.proxy_pid)
        return cpu

    def _cpu_since(
        self, route: _Route, before: dict[str, float], child_cpu_s: float
    ) -> dict[str, float]:
        # Let the run's SSH sessions end, so that what they spent is in.
        deadline = time.monotonic() + 2
        while self.sshd_cpu.has_children() and time.monotonic() < deadline:
            time.sleep(0.02)
        after = self._server_cpu(route)
        spent = {k: after[k] - before[k] for k in before}
        machine = spent.pop("machine")
        spent["others"] = max(0.0, machine - child_cpu_s - sum(spent.values()))
        return {k: round(v, 2) for k, v in spent.items()}

    # --- the folders on the server ----------------------------------------------------------

    def _chown(self, path: Path) -> None:
        shutil.chown(path, self.sftp.user, self.sftp.user)
        path.chmod(0o755)

    def set_sent(self, count: int) -> None:
        """Make ``sent/`` hold ``count`` unrelated files; kept sets are swapped in by rename."""
        if count == self._sent_now:
            return
        sent = self.chroot / "outbox" / "sent"
        sent.rename(self._parked(self._sent_now))
        if count not in self._have_sent:
            folder = self._parked(count)
            folder.mkdir()
            self._chown(folder)
            body = b"\xef\xbb\xbfinvoice_number\tdate\tcurrency\ttotal\tsupplier_code\n"
            for i in range(count):
                # A year of an ERP's archive: other invoices' names, other days.
                name = f"ARCH-{i:06d}-2025{1 + i % 12:02d}{1 + i % 28:02d}.csv"
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, body)
                os.close(fd)
            self._have_sent.add(count)
        self._parked(count).rename(sent)
        self._sent_now = count

    def _parked(self, count: int) -> Path:
        # Outside the chroot (the SFTP user cannot see it), on the same filesystem.
        return self.chroot.parent / f"sent-{count}"

    def _clear_outbox(self) -> None:
        for entry in os.scandir(self.chroot / "outbox"):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)

    # --- runs --------------------------------------------------------------------------------

    def _settings(
        self, route: _Route, state_dir: Path, extra: dict[str, Any] | None = None
    ) -> Path:
        config: dict[str, Any] = {
            "connector_name": "bench",
            "nuntiq_base_url": f"http://127.0.0.1:{route.http_port}/api",
            "sftp_host": "127.0.0.1",
            "sftp_port": route.ssh_port,
            "sftp_user": self.sftp.user,
            "sftp_known_hosts": str(route.known_hosts),
            "remote_outbox": "/outbox",
            "remote_sent": "/outbox/sent",
            "state_dir": str(state_dir),
        }
        config.update(self.config_overrides)
        config.update(extra or {})
        path = self.workdir / "settings.json"
        path.write_text(
            json.dumps(
                {
                    "customer_number": "1",
                    "secrets": {"nuntiq_api_key": API_KEY, "sftp_password": self.sftp.password},
                    "config": config,
                }
            )
        )
        path.chmod(0o600)
        return path

    def push(
        self,
        invoices: int,
        delay_ms: float | None,
        sent_files: int = 0,
        config: dict[str, Any] | None = None,
    ) -> Run:
        run = Run("push", invoices, delay_ms, sent_files, config=dict(config or {}))
        setup = time.perf_counter()
        route = self.route(delay_ms)
        self.control.reset()
        tokens = self.control.seed(invoices) if invoices else []
        self.set_sent(sent_files)
        self._clear_outbox()
        state = self.workdir / "state"
        shutil.rmtree(state, ignore_errors=True)
        settings = self._settings(route, state, run.config)
        run.setup_s = round(time.perf_counter() - setup, 2)
        before = self._server_cpu(route)
        argv = [sys.executable, "-m", "erp_push", "push", "--drain", "--json"]
        child = run_child([*argv, "--settings", str(settings)], self.env, self.timeout)
        self._record(run, child)
        run.cpu_elsewhere_s = self._cpu_since(route, before, child.cpu_s)
        run.done, run.problem = self._verify_push(tokens, sent_files, child)
        run.verified = run.problem is None
        self.log(run.describe())
        return run

    def _record(self, run: Run, child: _Child) -> None:
        run.wall_s = round(child.wall_s, 4)
        run.exit_code = child.exit_code
        run.timed_out = child.timed_out
        run.peak_rss_mb = round(child.peak_rss_mb, 1)
        run.cpu_s = round(child.cpu_s, 2)
        run.switches = child.switches

    def _verify_push(
        self, tokens: list[str], sent_files: int, child: _Child
    ) -> tuple[int, str | None]:
        """(invoices at 100, what is wrong or None)."""
        rows = {r["invoice_token"]: r for r in self.control.invoices()}
        at_100 = [rows[t] for t in tokens if t in rows and rows[t]["status"] == 100]
        problems = []
        if child.timed_out:
            problems.append(f"killed after {self.timeout:g} s")
        elif child.exit_code != 0:
            last = child.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            problems.append(f"exit {child.exit_code}: {last[0][:200]}")
        if len(at_100) != len(tokens):
            problems.append(f"{len(at_100)}/{len(tokens)} invoices at 100")
        told = [(r["external_id_1"] or "").rpartition("/")[2] for r in at_100]
        outbox = [e.name for e in os.scandir(self.chroot / "outbox") if e.is_file()]
        tmp = [n for n in outbox if n.endswith(TMP_SUFFIX)]
        final = set(outbox) - set(tmp)
        if tmp:
            problems.append(f"{len(tmp)} tmp files left")
        if len(final) != len(tokens):
            problems.append(f"{len(final)} files in the outbox for {len(tokens)} invoices")
        elif len(set(told)) != len(told) or not set(told) <= final:
            problems.append("the files in the outbox are not the ones Nuntiq was told")
        sent_now = sum(1 for _ in os.scandir(self.chroot / "outbox" / "sent"))
        if sent_now != sent_files:
            problems.append(f"sent/ changed: {sent_now} files, was {sent_files}")
        return len(at_100), "; ".join(problems) or None

    def reference(self, files: int, delay_ms: float | None) -> Run:
        run = Run("reference", files, delay_ms)
        route = self.route(delay_ms)
        self._ref_count += 1
        folder = self.chroot / f"ref-{self._ref_count}"
        folder.mkdir()
        self._chown(folder)
        before = self._server_cpu(route)
        argv = [
            sys.executable,
            "-m",
            "tests.bench.reference",
            "--port",
            str(route.ssh_port),
            "--user",
            self.sftp.user,
            "--known-hosts",
            str(route.known_hosts),
            "--folder",
            f"/{folder.name}",
            "--count",
            str(files),
        ]
        env = {**self.env, "BENCH_SFTP_PASSWORD": self.sftp.password}
        child = run_child(argv, env, self.timeout)
        self._record(run, child)
        run.cpu_elsewhere_s = self._cpu_since(route, before, child.cpu_s)
        names = [e.name for e in os.scandir(folder)]
        run.done = sum(1 for n in names if n.endswith(".csv"))
        problems = []
        if child.timed_out:
            problems.append(f"killed after {self.timeout:g} s")
        elif child.exit_code != 0:
            last = child.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            problems.append(f"exit {child.exit_code}: {last[0][:200]}")
        else:
            with contextlib.suppress(ValueError, KeyError):
                run.loop_s = round(json.loads(child.stdout)["loop_s"], 4)
        if run.done != files or len(names) != files:
            problems.append(f"{run.done} files published, {len(names) - run.done} other")
        shutil.rmtree(folder, ignore_errors=True)
        run.problem = "; ".join(problems) or None
        run.verified = run.problem is None
        self.log(run.describe())
        return run

    def idle(self, state_dir: Path) -> Run:
        """``push`` with nothing to claim (one batch, as cron would run it)."""
        run = Run("idle", 0, None)
        route = self.route(None)
        settings = self._settings(route, state_dir)
        before = self._server_cpu(route)
        argv = [sys.executable, "-m", "erp_push", "push", "--json", "--settings", str(settings)]
        child = run_child(argv, self.env, self.timeout)
        self._record(run, child)
        run.cpu_elsewhere_s = self._cpu_since(route, before, child.cpu_s)
        problem = None
        if child.timed_out or child.exit_code != 0:
            problem = f"exit {child.exit_code}" + (" (killed)" if child.timed_out else "")
        else:
            try:
                claimed = json.loads(child.stdout)["claimed"]
            except (ValueError, KeyError):
                claimed = None
            if claimed != 0:
                problem = f"claimed {claimed!r}, expected 0"
        run.problem = problem
        run.verified = problem is None
        return run

    def reset_sandbox(self) -> None:
        self.control.reset()
