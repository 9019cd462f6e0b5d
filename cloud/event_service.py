"""The ``events`` RPC service: a task's events and its timeline (AGATA's events.json)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.rpc_server import rpc
from fedmq.cloud.db import Task
from fedmq.cloud.errors import TaskNotFound
from fedmq.cloud.events import EventLog, timeline


class EventService:
    name = "events"

    @rpc(name="list")
    def list_(self, task: str, run: int | None = None,
              limit: Annotated[int, Field(ge=1, le=100000)] = 10000) -> dict[str, Any]:
        """A task's events and its per-step timeline (AGATA's events.json)."""
        if Task.get_or_none(Task.id == task) is None and not EventLog.for_task(task, run, 1):
            raise TaskNotFound(f"no task {task!r}")
        events = EventLog.for_task(task, run, limit)
        return {"task": task, "events": [e.to_wire() for e in events], "timeline": timeline(events)}
