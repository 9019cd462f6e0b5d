"""Operator side of a task's run: follow its retained announcement until the run ends.

The announcement ``tasks/<id>`` is pushed on every change (state, round), so following it costs
no polling; a watcher that subscribes late still gets the current state, retained.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection
from fedmq.broker.topics import Topics

ENDED = ("finished", "failed", "stopped")
ANNOUNCEMENT_WAIT_S = 5.0  # retained: it arrives at once if the task exists


class TaskWaitTimeout(TimeoutError):
    def __init__(self, task: str, timeout: float, latest: dict[str, Any]) -> None:
        state = latest.get("state", "unknown")
        super().__init__(f"task {task} did not end within {timeout:g} s (it is {state}, "
                         f"round {latest.get('round', 0)}/{latest.get('total_rounds') or '?'})")
        self.latest = latest


def wait_for_task(connection: MqttConnection, topics: Topics, task: str, timeout: float, *,
                  on_update: Callable[[dict[str, Any]], None] | None = None,
                  stop_waiting: Callable[[], str | None] | None = None,
                  started_after: float | None = None) -> dict[str, Any]:
    """Block until the task's announcement says its run ended; return that announcement.

    ``on_update`` sees every announcement; ``stop_waiting`` is asked every 0.2 s and gives up
    (``RuntimeError`` with its answer) when it returns a reason.  ``started_after``: ignore an
    announcement of a run that ended before this time (an earlier run), so waiting right after
    ``tasks.start`` never returns the previous run's ending.  Raises ``LookupError`` for a task
    that does not exist or is not running and ``TaskWaitTimeout`` on timeout."""
    latest: dict[str, Any] = {}
    changed = threading.Event()
    lock = threading.Lock()

    def on_announcement(message: Any) -> None:
        if not message.payload:
            with lock:
                latest.clear()
                latest["deleted"] = True
            changed.set()
            return
        try:
            body, _ = codec.decode(message.payload)
        except codec.CodecError:
            return
        if isinstance(body, dict):
            with lock:
                latest.clear()
                latest.update(body)
            if on_update is not None:
                on_update(dict(body))
            changed.set()

    topic = topics.task(task)
    connection.subscribe(topic, on_announcement, qos=1)
    started = time.monotonic()
    deadline = started + timeout
    try:
        while True:
            changed.wait(0.2)
            changed.clear()
            with lock:
                current = dict(latest)
            if current.get("deleted"):
                raise LookupError(f"task {task} was deleted")
            state = current.get("state")
            if state in ENDED and not (started_after and (current.get("updated") or 0) < started_after):
                return current
            if state == "created":
                raise LookupError(f"task {task} is created but not running: fedmq task start {task}")
            if stop_waiting is not None and (reason := stop_waiting()):
                raise RuntimeError(reason)
            now = time.monotonic()
            if not current and now - started > ANNOUNCEMENT_WAIT_S:
                raise LookupError(f"no task {task} is announced on {topic}")
            if now > deadline:
                raise TaskWaitTimeout(task, timeout, current)
    finally:
        connection.unsubscribe(topic)
