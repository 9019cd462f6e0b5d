"""Child-side start of a task entry point: ``python -m fedmq.ftdl.bootstrap ENTRY.py [args...]``.

Runs the entry file as ``__main__`` and turns its ending into a report: returning normally (or
``sys.exit(0)``) reports ``finished``; an exception -- including one at import time -- reports an
``error`` with its type and message before the process exits non-zero, and the traceback goes to
stderr, i.e. the task's log.  Exit codes and signals are judged by the parent.
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback

from fedmq.ftdl.reporter import TaskReporter


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m fedmq.ftdl.bootstrap ENTRY.py [args...]", file=sys.stderr)
        return 2
    entry = argv[1]
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
