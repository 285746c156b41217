"""Run one command, report its wall time and rusage: ``python -I -S launch.py REPORT TIMEOUT CMD``

Why a launcher: Linux carries a process's peak RSS across ``exec``, so a child forked
from the bench (70+ MB of imports) reports at least the bench's RSS as its own peak,
whatever it really used. Forked from this small interpreter (``-I -S``: no site, no
imports beyond the standard few, ~10 MB), the child's ``ru_maxrss`` is its own. The wall
time is taken here too, from fork to reaping, so the launcher's own start-up is not in it.

Writes ``{"wall_s", "exit_code", "maxrss_kb", "cpu_s", "switches", "timed_out"}`` to
REPORT (``switches``: the child's voluntary context switches, its threads' waits). After
TIMEOUT seconds the child is killed (SIGKILL) and reported as timed out.
"""

import json
import os
import signal
import sys
import time


def main() -> int:
    report, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    timed_out = []
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)

    def kill(signum: int, frame: object) -> None:
        timed_out.append(True)
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, kill)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    signal.setitimer(signal.ITIMER_REAL, 0)
    with open(report, "w") as f:
        json.dump(
            {
                "wall_s": wall,
                "exit_code": os.waitstatus_to_exitcode(status),
                "maxrss_kb": usage.ru_maxrss,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "switches": usage.ru_nvcsw,
                "timed_out": bool(timed_out),
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
