"""The command line's entry: ``python -m erp_push`` and the ``erp-push`` script."""

import gc
import signal

# Start-up builds a few hundred thousand objects (typer's commands, pydantic's models and
# validators, httpx) and no garbage: the collector would walk them over and over for
# nothing, about 6% of an idle run's wall time. It is switched on again, with everything
# built so far frozen out of its way, once the command has loaded its settings
# (cli._begin), before any real work.
gc.disable()
# Until cli.main installs its own handler, Ctrl-C ends the process as SIGTERM does, by
# the signal: nothing has been done yet, and Python's KeyboardInterrupt would print a
# traceback from the middle of an import.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from erp_push.cli import main  # noqa: E402  (after the collector is off)

if __name__ == "__main__":
    main()
