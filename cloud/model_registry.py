"""The model registry: a finished run's model, kept under a name with a version (NAME:VERSION).

Registering copies the run's ``model.npz`` to ``<home>/models/<name>/<version>/model.npz`` and
records a ``ModelVersion`` row holding the run's lineage (its ``RunHistory`` record, frozen at
registration: what trained it, on which devices, on which data) and its final metrics, so a model
can be traced and compared long after its task changed or was deleted.  Versions count 1, 2, 3
per name.  Registering the same task:run under the same name again returns the version it got
(an RPC retried over QoS 1 must not make a second one).

A task's lifecycle policy (``register_if``, ``model_name``, kept in ``Task.lifecycle``) decides
when one of its runs finishes: the expression is evaluated over the run's final metrics with the
safe criteria evaluator, and the decision is an event either way -- ``model_registered`` or
``model_not_registered`` -- whose ``reason`` says which values decided it.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from peewee import Database, IntegrityError, ModelSelect, fn
from pydantic import BaseModel

from fedmq.broker.criteria import CriteriaError, parse_criteria
from fedmq.broker.errors import FedmqError
from fedmq.broker.events import EventKind
from fedmq.broker.schema import TaskState
from fedmq.broker.topics import ID_PATTERN
from fedmq.cloud.db import DeviceModel, ModelVersion, Task, write_transaction
from fedmq.cloud.errors import InvalidModel, InvalidTask, ModelConflict, ModelNotFound, RunNotFound
from fedmq.cloud.events import EventLog
from fedmq.cloud.run_history import RunHistory
from fedmq.cloud.task_views import load_task
from fedmq.ftdl.bundle import file_digest
from fedmq.ftdl.reporter import MODEL_FILE

# Lineage fields a diff leaves out: times differ between any two runs and say nothing about how a
# model was made; the final metrics are compared on their own, side by side.
_NOT_COMPARED = ("started", "finished", "metrics")


def check_model_name(name: str) -> str:
    """A model name is an id (it names a folder, and a key of a device's desired models) without
    ``:``, which separates it from the version in ``NAME:VERSION``."""
    if not isinstance(name, str) or not ID_PATTERN.match(name) or ":" in name:
        raise InvalidModel(f"invalid model name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ - "
                           "starting with a letter or digit")
    return name


def model_policy(register_if: str | None, model_name: str | None, task_name: str,
                 current: dict[str, Any] | None = None) -> dict[str, Any]:
    """A task's lifecycle policy with these changes (None: unchanged), checked now -- a bad
    expression is refused when the task is created or updated, not when a run ends."""
    policy = dict(current or {})
    if register_if is not None:
        try:
            parse_criteria(register_if)
        except CriteriaError as exc:
            raise InvalidTask(f"register_if: {exc}", {"position": exc.position}) from None
        policy["register_if"] = register_if.strip()
    if model_name is not None:
        try:
            policy["model_name"] = check_model_name(model_name) if model_name else None
        except InvalidModel as exc:
            raise InvalidTask(f"model_name: {exc.message}") from None
    if policy.get("register_if") and not policy.get("model_name"):
        try:
            check_model_name(task_name)
        except InvalidModel:
            raise InvalidTask(f"register_if registers under the task's name, and {task_name!r} cannot name a "
                              "model: give model_name") from None
    return {k: v for k, v in policy.items() if v not in (None, "")}


class ModelView(BaseModel):
    """A registered version as callers see it (``lineage`` only where one version is shown)."""

    name: str
    version: int
    task: str
    run: int
    sha256: str
    size: int
    metrics: dict[str, Any]
    note: str
    created: float
    created_by: str
    deployed: dict[str, int] | None = None  # devices told to run it (desired), devices that say they do (running)
    lineage: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def model_view(row: ModelVersion, lineage: bool = False,
               deployed: dict[tuple[str, int], dict[str, int]] | None = None) -> ModelView:
    where = deployed if deployed is not None else deployed_counts(row.name)
    return ModelView(name=row.name, version=row.version, task=row.task, run=row.run, sha256=row.sha256,
                     size=row.size, metrics=row.metrics or {}, note=row.note, created=row.created,
                     created_by=row.created_by, lineage=(row.lineage or {}) if lineage else None,
                     deployed=where.get((row.name, row.version), {"desired": 0, "running": 0}))


def deployed_counts(name: str | None = None) -> dict[tuple[str, int], dict[str, int]]:
    """Per NAME:VERSION, how many devices should run it and how many say they do: two grouped
    queries over the desired state, whatever the number of versions shown."""
    counts: dict[tuple[str, int], dict[str, int]] = {}
    for key, column in (("desired", DeviceModel.version), ("running", DeviceModel.installed)):
        query = DeviceModel.select(DeviceModel.name, column.alias("v"), fn.COUNT(DeviceModel.device).alias("n"))
        if name is not None:
            query = query.where(DeviceModel.name == name)
        grouped = query.where(column.is_null(False)).group_by(DeviceModel.name, column).dicts()
        rows = cast(Iterable[dict[str, Any]], grouped)
        for row in rows:
            counts.setdefault((row["name"], int(row["v"])), {"desired": 0, "running": 0})[key] = int(row["n"])
    return counts


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``revision.args.lr``), so two records compare key by key."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key in value:
            flat.update(_flat(value[key], f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def differences(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """The dotted keys whose values differ, each with ``[a's, b's]`` (None: absent)."""
    fa, fb = _flat(a), _flat(b)
    return {key: [fa.get(key), fb.get(key)] for key in sorted(fa.keys() | fb.keys())
            if fa.get(key) != fb.get(key) and key.split(".")[0] not in ignore}


class ModelRegistry:
    def __init__(self, db: Database, home: Path, history: RunHistory, events: EventLog) -> None:
        self.db, self.home, self.history, self.events = db, home, history, events

    def path(self, name: str, version: int) -> Path:
        return self.home / "models" / name / str(version) / MODEL_FILE

    # --- registering ---------------------------------------------------------------------------
    def register(self, task_id: str, run: int | None, name: str | None, note: str = "", by: str = "",
                 reason: str | None = None, data: dict[str, Any] | None = None) -> tuple[ModelVersion, bool]:
        """The run's model as the next version of ``name`` (default: the task's ``model_name``,
        else its name); ``(version, created)`` -- ``created`` False when this task:run already is
        a version of that name.  ``reason``/``data`` go into the ``model_registered`` event."""
        task = load_task(task_id)
        number = self.history.run_number(task_id, run)
        name = check_model_name(name or (task.lifecycle or {}).get("model_name") or task.name)
        existing = self._version_of(name, task_id, number)
        if existing is not None:
            return existing, False
        record = self.history.run(task_id, number)  # its lineage, frozen here
        if record.get("state") != TaskState.FINISHED:
            state = record.get("state") or "unknown"
            raise ModelConflict(f"run {number} of {task_id} has not finished (it is {state}): only a finished "
                                "run's model can be registered")
        source = self.history.run_path(task_id, number) / MODEL_FILE
        if not source.is_file():
            raise RunNotFound(f"run {number} of {task_id} saved no model (its server does not use "
                              "fedmq.ftdl.flower.serve, or the file was removed)")
        # Copied and hashed aside first; moved to its version's folder only once the row is in:
        # two registrations racing for one version number (replicas on PostgreSQL) never write
        # the same file, and a failed one leaves no file behind.
        staged = self.home / "models" / f".staged-{uuid.uuid4().hex}{Path(MODEL_FILE).suffix}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, staged)
            sha256, size = file_digest(staged), staged.stat().st_size
            with write_transaction(self.db):
                latest = ModelVersion.select(fn.MAX(ModelVersion.version)).where(ModelVersion.name == name).scalar()
                version = int(latest or 0) + 1
                row = ModelVersion.create(name=name, version=version, task=task_id, run=number, sha256=sha256,
                                          size=size, metrics=record.get("metrics") or {}, lineage=record,
                                          note=note, created=time.time(), created_by=by)
                target = self.path(name, version)
                target.parent.mkdir(parents=True, exist_ok=True)
                staged.replace(target)  # before the commit: a version on record always has its file
        except IntegrityError:  # another registration took that version first: the same run, or a conflict
            existing = self._version_of(name, task_id, number)
            if existing is not None:
                return existing, False
            raise ModelConflict(f"another version of {name} was registered at the same moment; try again") from None
        finally:
            staged.unlink(missing_ok=True)
        self.events.record(EventKind.MODEL_REGISTERED, task=task_id, run=number,
                           data={"name": name, "version": version, "task": task_id, "run": number,
                                 "sha256": row.sha256, "by": by, **(data or {}),
                                 "reason": reason or f"registered by {by or 'an operator'}"})
        return row, True

    @staticmethod
    def _version_of(name: str, task_id: str, run: int) -> ModelVersion | None:
        return ModelVersion.get_or_none((ModelVersion.name == name) & (ModelVersion.task == task_id) &
                                        (ModelVersion.run == run))

    # --- the task's policy, when a run finishes ----------------------------------------------------
    def on_run_finished(self, task: Task, run: int) -> None:
        """Evaluate the task's ``register_if`` over the run's final metrics; register or say why not."""
        policy = task.lifecycle or {}
        condition = policy.get("register_if") or ""
        if not condition:
            return
        name = policy.get("model_name") or task.name
        base = {"name": name, "task": task.id, "run": run, "register_if": condition}
        metrics = self.history.run(task.id, run).get("metrics") or task.metrics or {}
        held, why = parse_criteria(condition).explain(metrics)
        if not held:
            self.events.record(EventKind.MODEL_NOT_REGISTERED, task=task.id, run=run, data={**base, "reason": why})
            return
        try:
            self.register(task.id, run, name, by="policy", reason=why, data={"register_if": condition})
        except FedmqError as exc:  # no model saved, a bad name since the policy was set
            self.events.record(EventKind.MODEL_NOT_REGISTERED, task=task.id, run=run,
                               data={**base, "reason": f"{why}, but {exc.message}"})

    # --- reading -----------------------------------------------------------------------------------
    @staticmethod
    def query(name: str | None = None) -> ModelSelect[ModelVersion]:
        query = ModelVersion.select().order_by(ModelVersion.name, ModelVersion.version)
        return query.where(ModelVersion.name == name) if name is not None else query

    @staticmethod
    def get(name: str, version: int | None = None) -> ModelVersion:
        """NAME:VERSION, or the latest version of NAME."""
        query = ModelVersion.select().where(ModelVersion.name == name)
        row = (query.where(ModelVersion.version == version) if version is not None
               else query.order_by(ModelVersion.version.desc())).first()
        if row is None:
            if version is not None and query.exists():
                latest = query.select(fn.MAX(ModelVersion.version)).scalar()
                raise ModelNotFound(f"model {name} has no version {version} (versions 1..{latest})")
            raise ModelNotFound(f"no model named {name!r}")
        return row

    def diff(self, a: ModelVersion, b: ModelVersion) -> dict[str, Any]:
        """What differs between two versions: their lineage (key by key, times left out) and
        their final metrics (every one, side by side)."""
        keys = sorted((a.metrics or {}).keys() | (b.metrics or {}).keys())
        return {"a": model_view(a).to_wire(), "b": model_view(b).to_wire(), "same_model": a.sha256 == b.sha256,
                "lineage": differences(a.lineage or {}, b.lineage or {}, ignore=_NOT_COMPARED),
                "metrics": {k: [(a.metrics or {}).get(k), (b.metrics or {}).get(k)] for k in keys}}

    def artifact(self, name: str, version: int | None, offset: int, size: int) -> dict[str, Any]:
        """A piece of the version's model file; offset 0 also gives its sha256 (as recorded)."""
        row = self.get(name, version)
        path = self.path(row.name, row.version)
        if not path.is_file():
            raise ModelNotFound(f"the file of {row.name}:{row.version} is not on this cloud host ({path})")
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        return {"name": row.name, "version": row.version, "size": path.stat().st_size, "offset": offset,
                "data": data, "sha256": row.sha256 if offset == 0 else None}

