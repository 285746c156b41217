"""Helper processes: one drain shared by several erp-push processes.

A Python process runs Python code on one core at a time (the GIL): a drain's lanes, its
HTTP and its SSH all take turns on it, and on a fast link that one core is the limit
(README, Speed). ``push --drain`` with ``processes`` above 1 therefore starts helpers:
each one is ``erp-push push --drain --helper``, a run like any other, with its own claims,
lanes, SFTP logins, journal entries and run lock (runs sharing a state_dir and a Nuntiq
queue are safe, README G8), and with three differences:

- It claims nothing before the first process says ``go`` on its stdin, which it does once
  its own SFTP login worked: an unreachable server strands one lease, not one per process.
- It stops claiming when its stdin closes: the first process stopped claiming (the queue
  is empty, max_run_seconds, a server refusing writes, Ctrl-C), or died.
- It leaves the run's bookkeeping to the first process: it writes one JSON line to its
  stdout per claim, per finished invoice and at its end, and the first process adds them
  to its own report, status, metrics and delta-stream entry. Its log lines go to the
  shared stderr as the first process's do.

Helpers are started only when the probe found something to claim, so an idle run stays
one process. A helper that dies leaves its unfinished invoices in the journal like any
dead run; the first process reports them pending, and the next run finishes them.

    first process                          helper (stdin / stdout)
    claim 1 (the probe) ─ something? ─► start ─► imports
    SFTP login works ──────────────────► "go" ─► claims, delivers ─► {"claimed": [...]}
    ...                                                           ─► {"outcome": {...}}
    stops claiming ────────────────────► EOF ─► finishes what it holds
    waits, adds the helper's lines ◄───────────────────────────── {"finished": {...}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from erp_push import logs
from erp_push.errors import ErpPushError, ExitCode
from erp_push.models import Lease
from erp_push.report import Outcome, Result, RunReport, outcome_dict, outcome_from_dict

log = logging.getLogger("erp_push.processes")

GO = "go"
# Why a helper's invoices without an outcome are pending (it died or was stopped).
HELPER_ENDED = "its helper process ended first (exit {code}); the next run finishes it"


class StoppedInHelper(ErpPushError):
    """A helper process stopped early for a reason of its own (its summary's error)."""

    def __init__(self, message: str, *, hint: str | None, exit_code: int) -> None:
        super().__init__(message, hint=hint)
        try:
            self.exit_code = ExitCode(exit_code)
        except ValueError:
            self.exit_code = ExitCode.SOME_FAILED


# --- the first process's side ---------------------------------------------------------


@dataclass
class _Helper:
    process: subprocess.Popen[bytes]
    reader: threading.Thread | None = None
    unfinished: dict[str, None] = field(default_factory=dict)  # claimed, no outcome yet
    summary: dict[str, Any] | None = None


class Helpers:
    """The helper processes of one drain, seen from the first process."""

    def __init__(
        self,
        command: list[str],
        count: int,
        *,
        max_invoices: int | None,
        seconds_left: float,
        on_claimed: Callable[[int], None],
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        self._on_claimed = on_claimed
        self._on_outcome = on_outcome
        self._lock = threading.Lock()  # guards each helper's unfinished and summary
        self._went = False  # told to claim: from then on each stops by itself
        argv = [*command, *(["--max-invoices", str(max_invoices)] if max_invoices else [])]
        # The run's deadline carries over: a helper stops claiming when the first would.
        env = {**os.environ, "ERP_PUSH_MAX_RUN_SECONDS": f"{max(seconds_left, 0.001):.3f}"}
        self._helpers: list[_Helper] = []
        for _ in range(count):
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                    # Its own process group: Ctrl-C reaches the first process only, which
                    # passes it on once (a second SIGINT would cut a wind-down short).
                    start_new_session=True,
                )
            except OSError:
                if not self._helpers:
                    raise  # none started: the caller drains alone
                log.warning("started %d of %d helper processes", len(self._helpers), count)
                break
            helper = _Helper(process)
            helper.reader = threading.Thread(
                target=self._read, args=(helper,), name="erp-push-helper-reader", daemon=True
            )
            helper.reader.start()
            self._helpers.append(helper)
        log.info("started %d helper process(es)", len(self._helpers))

    def go(self, lanes: int) -> None:
        """Let the helpers claim, with ``lanes`` each: the first process's probe went
        through (a server refusing every write has cost one invoice, not one each)."""
        self._went = True
        for helper in self._helpers:
            self._tell(helper, f"{GO} {lanes}\n")

    def stop_claiming(self) -> None:
        """No more claims anywhere: each helper finishes what it holds, then ends."""
        for helper in self._helpers:
            stdin = helper.process.stdin
            if stdin is not None and not stdin.closed:
                with contextlib.suppress(OSError):  # it is gone already
                    stdin.close()

    def forward(self, signum: int) -> None:
        """Pass Ctrl-C or SIGTERM on, once: each helper winds down as a run does."""
        for helper in self._helpers:
            if helper.process.poll() is None:
                with contextlib.suppress(OSError):  # it ended meanwhile
                    helper.process.send_signal(signum)

    def finish_into(self, report: RunReport) -> None:
        """Wait for every helper to end, then add what each did to ``report``.

        Told to go, a helper drains until the queue is empty or its share is done (or
        stop_claiming); never told to go, it is told now that it is not needed.
        """
        if not self._went:
            self.stop_claiming()
        for helper in self._helpers:
            code = helper.process.wait()
            if helper.reader is not None:
                helper.reader.join()
            self._add(helper, code, report)

    def _add(self, helper: _Helper, code: int, report: RunReport) -> None:
        summary = helper.summary or {}
        report.recovered += int(summary.get("recovered") or 0)
        for note in summary.get("notes") or []:
            if note not in report.notes:
                report.notes.append(note)
        error = summary.get("error")
        if error and report.error is None:
            report.error = StoppedInHelper(
                str(error.get("message") or "a helper process stopped"),
                hint=error.get("hint"),
                exit_code=int(error.get("exit_code") or ExitCode.SOME_FAILED),
            )
        if helper.unfinished:
            # It died or was stopped with invoices in hand: their journal entries and
            # leases bring them back; here they are pending, as a dead run's would be.
            message = HELPER_ENDED.format(code=code)
            for token in helper.unfinished:
                outcome = Outcome(token, Result.PENDING, message=message)
                logs.invoice(outcome)
                self._on_outcome(outcome)
            helper.unfinished.clear()
        if helper.summary is None and code not in (0, 1):
            note = f"a helper process ended without its summary (exit {code})"
            log.warning(note)
            report.notes.append(note)

    def _tell(self, helper: _Helper, line: str) -> None:
        stdin = helper.process.stdin
        try:
            if stdin is not None and not stdin.closed:
                stdin.write(line.encode())
                stdin.flush()
        except OSError:
            pass  # it ended already; its lines say what it did

    def _read(self, helper: _Helper) -> None:
        stdout = helper.process.stdout
        assert stdout is not None
        for raw in stdout:
            try:
                message = json.loads(raw)
                self._take(helper, message)
            except (ValueError, TypeError, KeyError, AttributeError):
                log.warning("a helper process wrote a line that is not its protocol")

    def _take(self, helper: _Helper, message: dict[str, Any]) -> None:
        if "claimed" in message:
            tokens = [str(t) for t in message["claimed"]]
            with self._lock:
                helper.unfinished.update(dict.fromkeys(tokens))
            self._on_claimed(len(tokens))
        elif "outcome" in message:
            outcome = outcome_from_dict(message["outcome"])
            with self._lock:
                helper.unfinished.pop(outcome.invoice_token, None)
            self._on_outcome(outcome)
        elif "finished" in message:
            with self._lock:
                helper.summary = dict(message["finished"])


# --- a helper's side ------------------------------------------------------------------


class HelperLink:
    """A helper's end of the pipes: "go" and EOF in, JSON lines out."""

    def __init__(self, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> None:
        self._stdin = stdin or sys.stdin.buffer
        self._stdout = stdout or sys.stdout.buffer
        self._write_lock = threading.Lock()
        self._gone = False  # the first process is gone: nobody reads our lines

    def wait_for_go(self, on_stop: Callable[[], None]) -> int | None:
        """Block until the first process says go (its lanes) or closes our stdin (None).

        After go, a thread waits for the EOF that tells this helper to stop claiming,
        and calls ``on_stop`` then.
        """
        word, _, lanes = self._stdin.readline().decode(errors="replace").partition(" ")
        if word != GO or not lanes.strip().isdigit():
            return None

        def watch() -> None:
            while self._stdin.readline():
                pass
            on_stop()

        threading.Thread(target=watch, name="erp-push-helper-stdin", daemon=True).start()
        return int(lanes)

    def claimed(self, leases: Iterable[Lease]) -> None:
        self._send({"claimed": [lease.invoice_token for lease in leases]})

    def outcome(self, outcome: Outcome) -> None:
        self._send({"outcome": outcome_dict(outcome)})

    def finished(self, report: RunReport) -> None:
        self._send({"finished": report.header()})

    def _send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message, ensure_ascii=False) + "\n").encode()
        with self._write_lock:
            if self._gone:
                return
            try:
                self._stdout.write(line)
                self._stdout.flush()
            except OSError:  # the first process died: the journal and Nuntiq keep the truth
                self._gone = True


def signal_for(exc: BaseException) -> int:
    """The signal that passes a run's interruption on to its helpers."""
    return signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
