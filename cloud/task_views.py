"""One projection of a task row, from which every view of it is derived: the operator's
(``tasks.get``/``list``), the retained announcement and a device's offer."""

from __future__ import annotations

from typing import Any

from msgspec import field

from fedmq.broker.schema import Offer, SelectionMode, TaskAnnouncement, TaskState
from fedmq.cloud.db import Task
from fedmq.cloud.errors import TaskNotFound


class TaskView(TaskAnnouncement, kw_only=True):
    """What an operator sees: the announcement plus the task's arguments, times and metrics."""

    args: dict[str, Any] = field(default_factory=dict)
    created: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None  # the cloud replica whose host runs the Flower server, while it runs
    register_if: str | None = None  # a finished run whose final metrics satisfy it is registered...
    model_name: str | None = None   # ...as the next version of this model (None: the task's name)

    def announcement(self) -> TaskAnnouncement:
        return TaskAnnouncement(**{name: getattr(self, name) for name in TaskAnnouncement.__struct_fields__})

    def offer(self) -> Offer:
        return Offer(**{name: getattr(self, name) for name in Offer.__struct_fields__})


def load_task(task_id: str) -> Task:
    """The task row, or ``TaskNotFound``."""
    task = Task.get_or_none(Task.id == task_id)
    if task is None:
        raise TaskNotFound(f"no task {task_id!r}")
    return task


def flower_address(task: Task) -> str | None:
    """Where the task's Flower server listens -- while it runs (the port is free again after)."""
    return f"{task.flower_host}:{task.flower_port}" if task.flower_port and task.state == "running" else None


def task_view(task: Task) -> TaskView:
    policy = task.lifecycle or {}
    return TaskView(id=task.id, name=task.name, state=TaskState(task.state), revision=task.revision,
                    bundle=task.bundle, flower=flower_address(task), criteria=task.criteria,
                    requirements=task.requirements or {}, selection=SelectionMode(task.selection or "cloud"),
                    priority=task.priority, tags=task.tags or [], round=task.current_round,
                    total_rounds=task.total_rounds, run=task.run, updated=task.updated, last_error=task.last_error,
                    args=task.args or {}, created=task.created, started_at=task.started_at,
                    finished_at=task.finished_at, metrics=task.metrics or {}, owner=task.owner,
                    register_if=policy.get("register_if"), model_name=policy.get("model_name"))
