"""The desired state from a file, on the cloud: what differs from it, and making it so.

``diff`` and ``apply`` compute one plan -- a list of steps, each a change a person reads
(``{action, kind, id, fields: {field: [old, new]}}``) and the lifecycle call that makes it --
so what ``fedmq diff`` shows is what ``fedmq apply`` does.  Everything that can be checked is
checked before the first step (the file's schema, every bundle in the store, no task of another
fleet touched); the steps then go through the task lifecycle like an operator's calls, each
recording its own event, which carries the file's name and digest (``data.source``); one
``fleet_applied`` event sums the apply up.  A step the lifecycle refuses midway (a port in use,
an unsigned bundle the cloud will not start) ends the apply there: the summary and the error say
what was done.  The lifecycle's steps publish as they go, so they are not one database
transaction; a lock keeps two applies on this cloud from interleaving.

Managed tasks: a task an apply created (or adopted: the file names an existing task's id) has
``lifecycle.managed_by = <fleet>`` (the file's ``fleet`` key, else its file name).  ``--prune``
deletes only tasks managed by that fleet that the file no longer names; a task another fleet
manages is never touched (``conflict``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peewee import Database

from fedmq.broker.events import EventKind
from fedmq.broker.schema import TaskState
from fedmq.cloud.bundle_store import BundleStore
from fedmq.cloud.db import Deployment, ModelVersion, Task, write_transaction
from fedmq.cloud.deployments import DeploymentConflict, Deployments
from fedmq.cloud.errors import TaskConflict
from fedmq.cloud.events import EventLog
from fedmq.cloud.fleet_file import (
    DeploymentSpec,
    DesiredState,
    FleetFileError,
    FleetSource,
    FleetSpec,
    ModelSignature,
    TaskSpec,
)
from fedmq.cloud.model_registry import model_policy
from fedmq.cloud.task_lifecycle import TaskLifecycle

MANAGED_BY = "managed_by"  # the key in Task.lifecycle that names the fleet that manages the task
COMPONENT = "cloud.fleet"
DEPLOYMENT_FIELDS = ("model", "to", "stages", "max_failure_rate", "health", "stage_timeout_s")
TASK_FIELDS = ("name", "bundle", "args", "criteria", "requirements", "tags", "priority", "selection", "register_if",
               "model_name")
_NOT_RUNNING = {TaskState.CREATED, TaskState.STOPPED}  # what a desired "running" starts


@dataclass
class Change:
    """One change, as a person reads it: ``fields`` maps each field to ``[old, new]``."""

    action: str  # create | update | start | stop | delete (a deployment: create only)
    kind: str    # task | deployment
    id: str
    fields: dict[str, list[Any]] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"action": self.action, "kind": self.kind, "id": self.id, "fields": self.fields}


@dataclass
class Step:
    change: Change
    run: Callable[[], object]


def managed_by(task: Task) -> str | None:
    return (task.lifecycle or {}).get(MANAGED_BY)


class FleetState:
    def __init__(self, db: Database, lifecycle: TaskLifecycle, store: BundleStore, events: EventLog,
                 deployments: Deployments) -> None:
        self.db, self.lifecycle, self.store, self.events = db, lifecycle, store, events
        self.deployments = deployments
        self._lock = threading.Lock()

    # --- the plan ----------------------------------------------------------------------------
    def diff(self, spec: FleetSpec, source: FleetSource, prune: bool = False) -> list[Change]:
        """What ``apply`` would change now (nothing is changed)."""
        return [step.change for step in self._plan(spec, source, prune, {})]

    def _plan(self, spec: FleetSpec, source: FleetSource, prune: bool,
              signatures: dict[str, ModelSignature]) -> list[Step]:
        fleet = spec.fleet or source.file
        problems = [f"tasks.{task_id}.bundle: {task.bundle!r} is not a bundle digest: the CLI pushes a "
                    "task folder and sends its digest (fedmq apply FILE)"
                    for task_id, task in spec.tasks.items() if not task.is_digest]
        if problems:
            raise FleetFileError(problems)
        steps: list[Step] = []
        for task_id, task in spec.tasks.items():
            existing = Task.get_or_none(Task.id == task_id)
            if existing is None:
                steps.extend(self._create(task_id, task, fleet))
            else:
                steps.extend(self._converge(existing, task, fleet))
        if prune:
            for existing in Task.select().order_by(Task.id):
                if managed_by(existing) == fleet and existing.id not in spec.tasks:
                    steps.append(Step(Change("delete", "task", existing.id, {"state": [existing.state, None]}),
                                      functools.partial(self.lifecycle.delete, existing.id)))
        # Deployments after the tasks; --prune leaves them be (a roll-out is history, not a resource).
        for deployment_id, deployment in spec.deployments.items():
            steps.extend(self._deploy(deployment_id, deployment, fleet, signatures.get(deployment_id)))
        return steps

    def _deploy(self, deployment_id: str, spec: DeploymentSpec, fleet: str,
                signature: ModelSignature | None) -> list[Step]:
        desired: dict[str, Any] = {
            "model": spec.model, "to": spec.to.strip(), "stages": [float(s) for s in spec.stages],
            "max_failure_rate": float(spec.max_failure_rate), "health": spec.health.strip(),
            "stage_timeout_s": float(spec.stage_timeout_s)}
        existing = Deployment.get_or_none(Deployment.id == deployment_id)
        if existing is not None:
            current = {"model": f"{existing.name}:{existing.version}", "to": existing.criteria,
                       "stages": existing.stages, "max_failure_rate": existing.max_failure_rate,
                       "health": existing.health, "stage_timeout_s": existing.stage_timeout_s}
            differ = [f"{key} {current[key]!r} -> {desired[key]!r}" for key in DEPLOYMENT_FIELDS
                      if current[key] != desired[key]]
            if differ:
                raise DeploymentConflict(f"deployment {deployment_id} exists ({existing.state}) with another plan "
                                         f"({'; '.join(differ)}): a deployment is not changed in place -- give the "
                                         "new roll-out a new id")
            return []  # created once; whatever became of it since (completed, rolled back) is its history
        model = ModelVersion.get_or_none((ModelVersion.name == spec.name) & (ModelVersion.version == spec.version))
        if model is None:
            raise FleetFileError([f"deployments.{deployment_id}.model: no model {spec.model} in the registry "
                                  "(fedmq model list)"])
        said = spec.model_fields_set | {"model"}
        fields = {key: [None, desired[key]] for key in DEPLOYMENT_FIELDS if key in said}
        fields["sha256"] = [None, model.sha256]  # what an operator signs (the CLI, with --key)

        def create() -> None:
            self.deployments.create(
                name=spec.name, version=spec.version, to=desired["to"], stages=desired["stages"],
                max_failure_rate=desired["max_failure_rate"], health=desired["health"],
                stage_timeout_s=desired["stage_timeout_s"], signature=signature.signature if signature else None,
                key_id=signature.key_id if signature else None, by=f"fedmq apply ({fleet})",
                deployment_id=deployment_id)

        return [Step(Change("create", "deployment", deployment_id, fields), create)]

    def _requirements(self, task: TaskSpec) -> dict[str, Any] | None:
        """What the task's requirements will be (the bundle's, the file's over them, as
        ``tasks.create`` merges them); None while the bundle is not in the store yet."""
        if not self.store.has(task.bundle):
            return None
        own = task.requirements.model_dump(exclude_unset=True) if task.requirements else {}
        return {**dict(self.store.manifest(task.bundle).task.get("requirements") or {}), **own}

    def _create(self, task_id: str, task: TaskSpec, fleet: str) -> list[Step]:
        model_policy(task.register_if or None, task.model_name, task.name or task_id)  # refused now, not midway
        said = task.model_fields_set - {"state", "name", "bundle"}
        fields: dict[str, list[Any]] = {"name": [None, task.name or task_id], "bundle": [None, task.bundle]}
        for key in (k for k in TASK_FIELDS if k in said):
            value = self._requirements(task) if key == "requirements" else getattr(task, key)
            fields[key] = [None, value]

        def create() -> None:
            self.lifecycle.create(
                name=task.name or task_id, bundle=task.bundle, task_id=task_id, args=dict(task.args),
                criteria=task.criteria, tags=list(task.tags), priority=task.priority,
                requirements=task.requirements.model_dump(exclude_unset=True) if task.requirements else None,
                register_if=task.register_if or None, model_name=task.model_name, selection=task.selection)
            self._mark(task_id, fleet)

        steps = [Step(Change("create", "task", task_id, fields), create)]
        if task.state == DesiredState.RUNNING:
            steps.append(self._start(task_id, TaskState.CREATED))
        return steps

    def _converge(self, existing: Task, task: TaskSpec, fleet: str) -> list[Step]:
        owner = managed_by(existing)
        if owner not in (None, fleet):
            raise TaskConflict(f"task {existing.id} is managed by fleet {owner!r}, not {fleet!r}: "
                               "change it in that file (or delete it there first)")
        policy = existing.lifecycle or {}
        desired: dict[str, Any] = {"name": task.name or existing.id, "bundle": task.bundle, "args": dict(task.args),
                                   "criteria": task.criteria, "tags": list(task.tags), "priority": task.priority,
                                   "selection": str(task.selection), "requirements": self._requirements(task),
                                   "register_if": task.register_if.strip(),
                                   "model_name": task.model_name}
        current = {"name": existing.name, "bundle": existing.bundle, "args": existing.args or {},
                   "criteria": existing.criteria, "tags": existing.tags or [], "priority": existing.priority,
                   "selection": existing.selection or "cloud", "requirements": existing.requirements or {},
                   "register_if": policy.get("register_if") or "",
                   "model_name": policy.get("model_name")}
        unknown = {"requirements"} if desired["requirements"] is None else set()  # the bundle is not stored yet
        changes = {key: desired[key] for key in TASK_FIELDS if key not in unknown and desired[key] != current[key]}
        if task.requirements is not None and unknown:
            changes["requirements"] = task.requirements.model_dump(exclude_unset=True)
        fields = {key: [current[key], value] for key, value in changes.items()}
        if "model_name" in changes and changes["model_name"] is None:
            changes["model_name"] = ""  # the lifecycle's "none": the task's own name again
        if {"register_if", "model_name", "name"} & changes.keys():  # refused now, not midway
            model_policy(task.register_if, changes.get("model_name"), desired["name"], policy)
        if owner is None:
            fields[MANAGED_BY] = [None, fleet]
        state = TaskState(existing.state)
        restart = "bundle" in changes and state == TaskState.RUNNING  # a bundle changes only when stopped
        steps: list[Step] = []
        if restart or (task.state == DesiredState.STOPPED and state == TaskState.RUNNING):
            steps.append(Step(Change("stop", "task", existing.id, {"state": [state.value, TaskState.STOPPED.value]}),
                              lambda: self._stop(existing.id)))
            state = TaskState.STOPPED
        if fields:
            steps.append(Step(Change("update", "task", existing.id, fields),
                              lambda: self._update(existing.id, changes, fleet, adopt=owner is None)))
        if (restart and task.state != DesiredState.STOPPED) or (task.state == DesiredState.RUNNING
                                                                and state in _NOT_RUNNING):
            steps.append(self._start(existing.id, state))
        return steps

    # --- the steps ---------------------------------------------------------------------------
    def _start(self, task_id: str, state: TaskState) -> Step:
        return Step(Change("start", "task", task_id, {"state": [state.value, TaskState.RUNNING.value]}),
                    lambda: self.lifecycle.start(task_id))

    def _stop(self, task_id: str) -> None:
        self.lifecycle.stop(task_id, reason="stopped by fedmq apply")

    def _update(self, task_id: str, changes: dict[str, Any], fleet: str, adopt: bool) -> None:
        if changes:
            self.lifecycle.update(task_id, changes)
        if adopt:
            task = self._mark(task_id, fleet)
            if not changes:  # adoption alone is a change too: say so (no new revision)
                self.events.record(EventKind.TASK_UPDATED, task=task_id,
                                   data={"revision": task.revision, "changed": [MANAGED_BY],
                                         "reason": f"managed by fleet {fleet} from now on"})

    def _mark(self, task_id: str, fleet: str) -> Task:
        with write_transaction(self.db):
            task = self.lifecycle.get(task_id)
            task.lifecycle = {**(task.lifecycle or {}), MANAGED_BY: fleet}
            task.save()
        return task

    def _check(self, spec: FleetSpec, steps: list[Step], signatures: dict[str, ModelSignature]) -> None:
        """Before any change: every bundle a step needs is in the store, and every deployment is
        signed if this cloud deploys only signed models."""
        if self.deployments.require_signed:
            unsigned = [f"deployments.{s.change.id}: this cloud deploys signed models only: fedmq apply FILE --key KEY"
                        for s in steps if s.change.kind == "deployment" and s.change.id not in signatures]
            if unsigned:
                raise FleetFileError(unsigned)
        needed = {c.id for s in steps for c in [s.change] if c.kind == "task" and
                  (c.action == "create" or (c.action == "update" and "bundle" in c.fields))}
        missing = [f"tasks.{task_id}.bundle: bundle {spec.tasks[task_id].bundle} is not in the cloud's store "
                   "(fedmq bundle push FOLDER, or name the folder in the file)"
                   for task_id in sorted(needed) if not self.store.has(spec.tasks[task_id].bundle)]
        if missing:
            raise FleetFileError(missing)

    # --- apply -------------------------------------------------------------------------------
    def apply(self, spec: FleetSpec, source: FleetSource, prune: bool = False,
              signatures: dict[str, ModelSignature] | None = None) -> list[Change]:
        """Make the tasks (and deployments) what the file says; the changes made, in order ([]
        when in sync).  ``signatures``: the operator's, of each deployment's model, by id."""
        fleet = spec.fleet or source.file
        wire_source = source.model_dump()
        with self._lock:
            steps = self._plan(spec, source, prune, signatures or {})
            self._check(spec, steps, signatures or {})
            done: list[Change] = []
            try:
                with self.events.context(source=wire_source, fleet=fleet):
                    for step in steps:
                        step.run()
                        done.append(step.change)
            except Exception as exc:
                self._summary(fleet, wire_source, prune, done, error=getattr(exc, "message", None) or str(exc))
                raise
            self._summary(fleet, wire_source, prune, done)
            return done

    def _summary(self, fleet: str, source: dict[str, Any], prune: bool, done: list[Change],
                 error: str | None = None) -> None:
        counts: dict[str, int] = {}
        for change in done:
            counts[change.action] = counts.get(change.action, 0) + 1
        said = ", ".join(f"{n} {action}" for action, n in counts.items()) or "nothing to change: in sync"
        reason = f"{source['file']} ({source['digest'][:12]}): {said}"
        if error is not None:
            reason += f"; stopped at an error: {error}"
        self.events.record(EventKind.FLEET_APPLIED, component=COMPONENT,
                           data={"source": source, "fleet": fleet, "prune": prune, "counts": counts,
                                 "changes": [c.to_wire() for c in done], "error": error, "reason": reason})
