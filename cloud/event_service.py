"""The ``events`` RPC service: a task's events and its timeline (AGATA's events.json)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.roles import READERS
from fedmq.broker.rpc_server import rpc
from fedmq.cloud.db import Task
from fedmq.cloud.errors import TaskNotFound
from fedmq.cloud.events import TIMELINE_STEPS, EventLog, timeline
from fedmq.cloud.pages import DEFAULT_LIMIT, MAX_LIMIT, page_query

MAX_STEPS = 2000


class EventService:
    name = "events"

    @staticmethod
    def _exists(task: str, run: int | None) -> None:
        if Task.get_or_none(Task.id == task) is None and not EventLog.for_task(task, run, 1):
            raise TaskNotFound(f"no task {task!r}")

    @rpc(name="list", roles=READERS)
    def list_(self, task: str, run: int | None = None, limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
              cursor: str | None = None) -> dict[str, Any]:
        """A task's events in time order: a page of them."""
        self._exists(task, run)
        return {"task": task, **page_query(EventLog.query(task, run), limit, cursor,
                                           lambda e: EventLog.record_of(e).to_wire())}

    @rpc(roles=READERS)
    def timeline(self, task: str, run: int | None = None) -> dict[str, Any]:
        """A task's per-step timeline (AGATA's events.json steps), at most MAX_STEPS steps."""
        self._exists(task, run)
        steps = timeline(EventLog.for_task(task, run, MAX_STEPS, kinds=TIMELINE_STEPS))
        return {"task": task, "timeline": steps, "truncated": len(steps) >= MAX_STEPS}
