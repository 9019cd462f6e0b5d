"""The ``fedmq`` command; the root and its verbs are ``fedmq.cli.app``.

``run`` is the entry point: it makes SIGTERM behave as Ctrl-C, and both end a command with the
documented exit code 130 (click alone would say "Aborted!" and exit 1).  A plain ``fedmq edge``
command line runs without loading typer, rich or click at all (``fedmq.cli.edge_run``): the agent
is a long-lived service on small devices.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

__all__ = ["app", "run"]


def __getattr__(name: str) -> Any:
    if name == "app":  # the typer app, loaded when asked for (not by a plain fedmq edge)
        from fedmq.cli.app import app
        return app
    raise AttributeError(name)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # commands that must stop in order install their own
    from fedmq.cli.edge_run import run_lean

    if "edge" in sys.argv[1:] and run_lean(sys.argv[1:]):
        return
    import click

    from fedmq.cli.app import app
    from fedmq.cli.common import ExitCode, err_console

    try:
        code = app(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:  # usage errors (exit 2) and their kin
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line for the user, the traceback with -v
        logging.getLogger("fedmq.cli").debug("unexpected error", exc_info=True)
        err_console.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} (fedmq -v … shows the "
                          "traceback; please report it)", highlight=False)
        sys.exit(ExitCode.REMOTE_ERROR)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)
