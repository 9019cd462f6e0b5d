"""The ``tasks`` and ``events`` RPC services, over the task manager."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from broker import codec
from broker.envelope import ErrorCode, RpcError
from broker.rpc_server import CallContext, Service
from cloud.db import Task, TaskDevice
from cloud.events import EventLog, timeline
from cloud.tasks import STATES, TaskManager, task_row

MAX_ARGS_BYTES = 16 * 1024
Tag = Annotated[str, Field(min_length=1, max_length=64)]
Priority = Annotated[int, Field(ge=-1000, le=1000)]
Port = Annotated[int, Field(ge=1024, le=65535)]
Name = Annotated[str, Field(min_length=1, max_length=128)]


class Requirements(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    python: str | None = Field(default=None, max_length=64)
    packages: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=64)
    memory_mb: int | None = Field(default=None, ge=0)
    accelerators: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=16)


def _check_args(args: dict[str, Any] | None) -> None:
    if args is not None and len(codec.encode(args)) > MAX_ARGS_BYTES:
        raise RpcError(ErrorCode.INVALID_ARGS, f"args larger than {MAX_ARGS_BYTES} bytes")


def make_task_service(manager: TaskManager) -> Service:
    service = Service("tasks")

    @service.method
    def create(name: Name, bundle: str | None = None, folder: str | None = None, task: str | None = None,
               flower_host: str | None = None, flower_port: Port | None = None,
               args: dict[str, Any] | None = None, criteria: Annotated[str, Field(max_length=4000)] = "",
               requirements: Requirements | None = None,
               tags: Annotated[list[Tag], Field(max_length=16)] | None = None,
               priority: Priority = 0) -> dict[str, Any]:
        """Create a task from a stored bundle (digest) or a folder on the cloud host."""
        _check_args(args)
        created = manager.create(name=name, bundle=bundle, folder=folder, task_id=task, flower_host=flower_host,
                                 flower_port=flower_port, args=args, criteria=criteria,
                                 requirements=requirements.model_dump(exclude_none=True) if requirements else None,
                                 tags=tags, priority=priority)
        return task_row(created)

    @service.method
    def get(task: str) -> dict[str, Any]:
        """One task."""
        return task_row(manager._get(task))

    @service.method(name="list")
    def list_(state: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """Tasks, optionally filtered by state and tag, by priority then age."""
        if state is not None and state not in STATES:
            raise RpcError(ErrorCode.INVALID_ARGS, f"state must be one of {', '.join(STATES)}")
        query = Task.select().order_by(Task.priority.desc(), Task.created)
        if state:
            query = query.where(Task.state == state)
        running: dict[str, int] = {}
        for row in TaskDevice.select(TaskDevice.task).where(TaskDevice.state == "running"):
            running[row.task] = running.get(row.task, 0) + 1
        rows = [{**task_row(t), "devices": running.get(t.id, 0)} for t in query]
        return [r for r in rows if tag is None or tag in (r["tags"] or [])]

    @service.method
    def update(task: str, criteria: Annotated[str, Field(max_length=4000)] | None = None,
               args: dict[str, Any] | None = None, priority: Priority | None = None,
               bundle: str | None = None, tags: Annotated[list[Tag], Field(max_length=16)] | None = None,
               requirements: Requirements | None = None) -> dict[str, Any]:
        """Change criteria, arguments, priority, tags, requirements or bundle: a new revision."""
        _check_args(args)
        changes = {k: v for k, v in dict(criteria=criteria, args=args, priority=priority, bundle=bundle,
                                         tags=tags).items() if v is not None}
        if requirements is not None:
            changes["requirements"] = requirements.model_dump(exclude_none=True)
        if not changes:
            raise RpcError(ErrorCode.INVALID_ARGS, "nothing to update")
        return task_row(manager.update(task, changes))

    @service.method
    def start(task: str) -> dict[str, Any]:
        """Start the task's Flower server; devices are offered it from now on."""
        return task_row(manager.start(task))

    @service.method
    def stop(task: str) -> dict[str, Any]:
        """Stop the server; devices running the task get a stop command."""
        return task_row(manager.stop(task))

    @service.method
    def delete(task: str) -> dict[str, Any]:
        """Delete the task (stopping it first); clears its announcement and unused bundle."""
        manager.delete(task)
        return {"task": task, "deleted": True}

    @service.method
    def request(ctx: CallContext) -> list[dict[str, Any]]:
        """A device asks which tasks it may run: eligible running tasks, by priority then age."""
        return manager.request(ctx.caller)

    @service.method
    def runs(task: str) -> list[dict[str, Any]]:
        """Every run of the task: parameters, bundle, start, end, final metrics."""
        return manager.runs(task)

    @service.method
    def metrics(task: str, run: Annotated[int, Field(ge=1)] | None = None) -> dict[str, Any]:
        """Per-round metrics of a run (default: the latest)."""
        return manager.metrics(task, run)

    @service.method
    def logs(task: str, run: Annotated[int, Field(ge=1)] | None = None,
             lines: Annotated[int, Field(ge=1, le=5000)] = 200) -> dict[str, Any]:
        """The last lines of the run's server log."""
        return manager.logs(task, run, lines)

    @service.method
    def model(task: str, run: Annotated[int, Field(ge=1)] | None = None, offset: Annotated[int, Field(ge=0)] = 0,
              size: Annotated[int, Field(ge=1, le=128 * 1024)] = 128 * 1024) -> dict[str, Any]:
        """A piece of the run's final global model (model.npz); offset 0 also gives its sha256."""
        return manager.model_chunk(task, run, offset, size)

    return service


def make_event_service() -> Service:
    service = Service("events")

    @service.method(name="list")
    def list_(task: str, run: int | None = None,
              limit: Annotated[int, Field(ge=1, le=100000)] = 10000) -> dict[str, Any]:
        """A task's events and its per-step timeline (AGATA's events.json)."""
        if Task.get_or_none(Task.id == task) is None and not EventLog.for_task(task, run, 1):
            raise RpcError(ErrorCode.NOT_FOUND, f"no task {task!r}")
        events = EventLog.for_task(task, run, limit)
        return {"task": task, "events": [e.to_wire() for e in events], "timeline": timeline(events)}

    return service
