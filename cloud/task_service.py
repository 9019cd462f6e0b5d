"""The ``tasks`` RPC service: the operator's verbs on tasks, a device's request for work, and the
run history -- thin over the lifecycle, selection and history, which raise their own errors."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker import codec
from fedmq.broker.arguments import Requirements
from fedmq.broker.roles import DEVICES, OPERATOR, READERS, STEERING
from fedmq.broker.rpc_server import CallContext, rpc
from fedmq.broker.schema import TaskState
from fedmq.cloud.errors import InvalidTask
from fedmq.cloud.pages import DEFAULT_LIMIT, MAX_LIMIT, Page, page
from fedmq.cloud.run_history import RunHistory
from fedmq.cloud.selection import Selection
from fedmq.cloud.task_fields import MAX_ARGS_BYTES, CriteriaText, Name, Priority, SelectionChoice, Tags
from fedmq.cloud.task_lifecycle import TaskLifecycle
from fedmq.cloud.task_views import task_view

Port = Annotated[int, Field(ge=1024, le=65535)]
RunNumber = Annotated[int, Field(ge=1)]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)]


def _check_args(args: dict[str, Any] | None) -> None:
    if args is not None and len(codec.encode(args)) > MAX_ARGS_BYTES:
        raise InvalidTask(f"args larger than {MAX_ARGS_BYTES} bytes")


class TaskService:
    name = "tasks"

    def __init__(self, lifecycle: TaskLifecycle, selection: Selection, history: RunHistory) -> None:
        self.lifecycle, self.selection, self.history = lifecycle, selection, history

    @rpc(roles=OPERATOR)
    def create(self, name: Name, bundle: str | None = None, folder: str | None = None, task: str | None = None,
               flower_host: str | None = None, flower_port: Port | None = None,
               args: dict[str, Any] | None = None, criteria: CriteriaText = "",
               requirements: Requirements | None = None, tags: Tags | None = None,
               priority: Priority = 0, register_if: CriteriaText | None = None,
               model_name: Name | None = None, selection: SelectionChoice = "cloud") -> dict[str, Any]:
        """Create a task from a stored bundle (digest) or a folder on the cloud host; with
        ``register_if`` (an expression over a run's final metrics) each finished run whose
        metrics satisfy it is registered as the next version of ``model_name`` (default: NAME).
        ``selection="device"``: devices evaluate the criteria themselves and call ``tasks.join``."""
        _check_args(args)
        created = self.lifecycle.create(
            name=name, bundle=bundle, folder=folder, task_id=task, flower_host=flower_host,
            flower_port=flower_port, args=args, criteria=criteria,
            requirements=requirements.model_dump(exclude_none=True) if requirements else None,
            tags=tags, priority=priority, register_if=register_if, model_name=model_name, selection=selection)
        return task_view(created).to_wire()

    @rpc(roles=READERS)
    def get(self, task: str) -> dict[str, Any]:
        """One task."""
        return task_view(self.lifecycle.get(task)).to_wire()

    @rpc(name="list", roles=READERS)
    def list_(self, state: str | None = None, tag: str | None = None, limit: Limit = DEFAULT_LIMIT,
              cursor: str | None = None) -> Page:
        """Tasks, optionally filtered by state and tag, by priority then age: a page of them."""
        if state is not None and state not in TaskState.__members__.values():
            raise InvalidTask(f"state must be one of {', '.join(TaskState)}")
        running = self.selection.running_counts()
        chosen = TaskState(state) if state is not None else None
        return page(self.lifecycle.query(chosen, tag), limit, cursor,
                    lambda t: {**task_view(t).to_wire(), "devices": running.get(t.id, 0)})

    @rpc(roles=STEERING)
    def update(self, task: str, criteria: CriteriaText | None = None, args: dict[str, Any] | None = None,
               priority: Priority | None = None, bundle: str | None = None, tags: Tags | None = None,
               requirements: Requirements | None = None, register_if: CriteriaText | None = None,
               model_name: Name | None = None, selection: SelectionChoice | None = None) -> dict[str, Any]:
        """Change criteria, arguments, priority, tags, requirements, bundle, where the criteria
        are evaluated (``selection``) or the model policy (``register_if``, "" for none;
        ``model_name``): a new revision."""
        _check_args(args)
        changes = {k: v for k, v in dict(criteria=criteria, args=args, priority=priority, bundle=bundle,
                                         tags=tags, register_if=register_if, model_name=model_name,
                                         selection=selection).items()
                   if v is not None}
        if requirements is not None:
            changes["requirements"] = requirements.model_dump(exclude_none=True)
        return task_view(self.lifecycle.update(task, changes)).to_wire()

    @rpc(roles=STEERING)
    def start(self, task: str) -> dict[str, Any]:
        """Start the task's Flower server; devices are offered it from now on."""
        return task_view(self.lifecycle.start(task)).to_wire()

    @rpc(roles=STEERING)
    def stop(self, task: str) -> dict[str, Any]:
        """Stop the server; devices running the task get a stop command."""
        return task_view(self.lifecycle.stop(task)).to_wire()

    @rpc(roles=OPERATOR)
    def delete(self, task: str) -> dict[str, Any]:
        """Delete the task (stopping it first); clears its announcement and unused bundle."""
        self.lifecycle.delete(task)
        return {"task": task, "deleted": True}

    @rpc(roles=DEVICES)
    def request(self, ctx: CallContext) -> list[dict[str, Any]]:
        """A device asks which tasks it may run: eligible running tasks, by priority then age."""
        return [offer.to_wire() for offer in self.selection.request(ctx.caller)]

    @rpc(roles=DEVICES)
    def join(self, ctx: CallContext, task: str) -> dict[str, Any]:
        """A device that found itself eligible for a running task that selects on the device
        (its criteria evaluated on the retained announcement) takes it up: its offer."""
        return self.selection.join(ctx.caller, task).to_wire()

    @rpc(roles=DEVICES)
    def participate(self, ctx: CallContext, task: str) -> dict[str, Any]:
        """A device about to train in a running serverless task asks how its participant (the
        task's client child) connects to the broker: ``{username, password, client_id}``
        (``username`` None: with the device's own credentials)."""
        return self.lifecycle.participant_credentials(task, ctx.caller)

    @rpc(roles=READERS)
    def runs(self, task: str, limit: Limit = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
        """The task's runs, oldest first, each its full record (as ``run``): a page of them."""
        return page(self.history.runs(task), limit, cursor)

    @rpc(roles=READERS)
    def run(self, task: str, run: RunNumber | None = None) -> dict[str, Any]:
        """One run's record (default: the latest): revision (bundle, args, criteria, requirements, selection,
        mode), cohort, each device's data fingerprint, how it ended, final metrics, the model's sha256."""
        return self.history.run(task, run)

    @rpc(roles=READERS)
    def metrics(self, task: str, run: RunNumber | None = None, limit: Limit = DEFAULT_LIMIT,
                cursor: str | None = None) -> dict[str, Any]:
        """Per-round metrics of a run (default: the latest), a page of rounds."""
        result = self.history.metrics(task, run)
        return {"task": result["task"], "run": result["run"], **page(result["rounds"], limit, cursor)}

    @rpc(roles=READERS)
    def logs(self, task: str, run: RunNumber | None = None,
             lines: Annotated[int, Field(ge=1, le=5000)] = 200) -> dict[str, Any]:
        """The last lines of the run's server log."""
        return self.history.logs(task, run, lines)

    @rpc(roles=READERS)
    def model(self, task: str, run: RunNumber | None = None, offset: Annotated[int, Field(ge=0)] = 0,
              size: Annotated[int, Field(ge=1, le=128 * 1024)] = 128 * 1024) -> dict[str, Any]:
        """A piece of the run's final global model (model.npz); offset 0 also gives its sha256."""
        return self.history.model_chunk(task, run, offset, size)
