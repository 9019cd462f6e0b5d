"""Child-side start of a task entry point: ``python -m fedmq.ftdl.bootstrap ENTRY.py [args...]``.

Runs the entry file as ``__main__`` and turns its ending into a report: returning normally (or
``sys.exit(0)``) reports ``finished``; an exception -- including one at import time -- reports an
``error`` with its type and message before the process exits non-zero, and the traceback goes to
stderr, i.e. the task's log.  Exit codes and signals are judged by the parent.

A task process never outlives its supervisor: when the parent dies (SIGKILL, OOM, a lost cloud
replica), the task's whole process group ends within a second, instead of a Flower server or
client running on with nobody to stop it or hear from it.
"""

from __future__ import annotations

import os
import runpy
import select
import signal
import sys
import threading
import traceback

from fedmq.ftdl.channel import ENV_FD
from fedmq.ftdl.reporter import TaskReporter


def _end_with_supervisor(fd: int) -> None:
    """Our end of the reporter pipe reports an error once nobody holds the other end: the
    supervisor is gone.  Then end the task's session (its process group).  (A pipe, not the
    parent pid: it costs no polling, and it held where a re-parented pid did not.)"""
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    events = 0
    while not events:
        events = sum(event for _, event in poller.poll())
    if events & select.POLLNVAL:
        return  # the task closed the pipe itself: nothing to watch
    # Nobody reads our output any more (the log was the parent's pipe): nothing to say it to.
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m fedmq.ftdl.bootstrap ENTRY.py [args...]", file=sys.stderr)
        return 2
    entry = argv[1]
    if os.environ.get(ENV_FD, "").isdigit():  # started by a supervisor (ftdl.start_task)
        threading.Thread(target=_end_with_supervisor, args=(int(os.environ[ENV_FD]),), name="orphan-watch",
                         daemon=True).start()
    reporter = TaskReporter.get()
    sys.argv = [entry, *argv[2:]]
    sys.path.insert(0, os.getcwd())
    try:
        runpy.run_path(entry, run_name="__main__")
    except SystemExit as exc:
        if exc.code in (None, 0):
            reporter.finish()
            return 0
        raise
    except BaseException as exc:  # report, then fail: the parent must learn why
        traceback.print_exc()
        reporter.send_error(type(exc).__name__, str(exc)[:2000] or type(exc).__name__)
        return 1
    reporter.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
