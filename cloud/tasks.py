"""The task manager: tasks' lifecycle, their Flower servers, announcements, and who may run what.

State machine::

    created --start--> running --(server finishes)--> finished
                         |  \\--(server fails)------> failed
                         \\----stop----------------> stopped
    finished/failed/stopped --start--> running (a new run; history is kept per run)

Every state change republishes the retained announcement ``tasks/<id>``; when a task leaves
``running`` the devices it was offered to get a ``stop`` command on ``devices/<id>/cmd`` (QoS 1,
queued for a device that is offline).  A task that was running when the cloud died is marked
``failed`` on the next start (its orphaned Flower server is killed): a half-finished federated run
cannot be resumed, and saying so beats pretending.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from peewee import IntegrityError

from broker import codec
from broker.connection import MqttConnection
from broker.envelope import ErrorCode, RpcError
from broker.net import free_port
from broker.topics import Topics, TopicError, check_id
from cloud.bundle_service import digest_arg
from cloud.bundle_store import BundlePublisher, BundleStore
from cloud.criteria import Criteria, CriteriaError, parse_criteria, requirements_met
from cloud.db import Device, Event, Task, TaskDevice, write_transaction
from cloud.devices import flat_info
from broker.events import EventRecord
from cloud.events import EventLog
from ftdl import TaskEvent, start_task
from ftdl.reporter import ENV_OUTPUT_DIR
from ftdl.bundle import BundleError, build_bundle, file_digest as file_sha256, safe_unpack
from ftdl.manifest import ManifestError
from ftdl.paths import require_absolute
from ftdl.process import TaskProcess

log = logging.getLogger("fedmq.cloud.tasks")

CREATED, RUNNING, FINISHED, FAILED, STOPPED = "created", "running", "finished", "failed", "stopped"
STATES = (CREATED, RUNNING, FINISHED, FAILED, STOPPED)
ACTIVE_ON_DEVICE = ("offered", "running")  # a device in these states must hear of a stop


@dataclass
class TaskSettings:
    home: Path
    broker_url: str
    prefix: str
    flower_bind: str = "0.0.0.0"
    flower_advertise: str = "127.0.0.1"
    server_time_limit_s: float | None = None

    def __post_init__(self) -> None:
        require_absolute(self.home, "the cloud home")


def flower_address(task: Task) -> str | None:
    return f"{task.flower_host}:{task.flower_port}" if task.flower_port else None


def task_row(task: Task) -> dict[str, Any]:
    return {"id": task.id, "name": task.name, "state": task.state, "revision": task.revision,
            "bundle": task.bundle, "criteria": task.criteria, "requirements": task.requirements,
            "args": task.args, "tags": task.tags, "priority": task.priority,
            "flower": flower_address(task), "round": task.current_round, "total_rounds": task.total_rounds, "run": task.run,
            "created": task.created, "updated": task.updated, "started_at": task.started_at,
            "finished_at": task.finished_at, "last_error": task.last_error, "metrics": task.metrics}


def announcement(task: Task) -> dict[str, Any]:
    """What devices and dashboards see on ``tasks/<id>`` (retained, JSON)."""
    return {"v": 1, "id": task.id, "name": task.name, "state": task.state, "revision": task.revision,
            "bundle": task.bundle, "flower": flower_address(task),
            "criteria": task.criteria, "requirements": task.requirements, "priority": task.priority,
            "tags": task.tags, "round": task.current_round, "total_rounds": task.total_rounds,
            "run": task.run, "updated": task.updated, "last_error": task.last_error}


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


SNAPSHOT_TTL_S = 1.0


@dataclass(frozen=True)
class _Offerable:
    id: str
    criteria: Criteria
    requirements: dict[str, Any]
    offer: dict[str, Any]


@dataclass
class _Running:
    process: TaskProcess
    run: int
    stopping: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class TaskManager:
    def __init__(self, settings: TaskSettings, connection: MqttConnection, topics: Topics,
                 store: BundleStore, publisher: BundlePublisher, events: EventLog) -> None:
        self.settings, self.connection, self.topics = settings, connection, topics
        self.store, self.publisher, self.events = store, publisher, events
        self._running: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._snapshot: list[_Offerable] = []
        self._snapshot_at = 0.0

    # --- helpers ---------------------------------------------------------------------------
    def _get(self, task_id: str) -> Task:
        task = Task.get_or_none(Task.id == task_id)
        if task is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"no task {task_id!r}")
        return task

    def announce(self, task: Task) -> None:
        self.connection.publish(self.topics.task(task.id), codec.encode(announcement(task), codec.Codec.JSON),
                                qos=1, retain=True)

    @staticmethod
    def _parse(criteria: str) -> None:
        try:
            parse_criteria(criteria)
        except CriteriaError as exc:
            raise RpcError(ErrorCode.INVALID_ARGS, str(exc), {"position": exc.position}) from None

    def _bundle_requirements(self, digest: str) -> dict[str, Any]:
        try:
            return dict(self.store.manifest(digest).task.get("requirements") or {})
        except BundleError:
            raise RpcError(ErrorCode.NOT_FOUND, f"bundle {digest} is not in the cloud's store "
                                                "(push it with fedmq bundle push)") from None

    # --- create / update / delete ------------------------------------------------------------
    def create(self, *, name: str, bundle: str | None = None, folder: str | None = None,
               task_id: str | None = None, flower_host: str | None = None, flower_port: int | None = None,
               args: dict[str, Any] | None = None, criteria: str = "", requirements: dict[str, Any] | None = None,
               tags: list[str] | None = None, priority: int = 0) -> Task:
        if (bundle is None) == (folder is None):
            raise RpcError(ErrorCode.INVALID_ARGS, "give exactly one of bundle (a digest) or folder")
        try:
            task_id = check_id(task_id or f"{name}-{uuid.uuid4().hex[:6]}", "task id")
        except TopicError as exc:
            raise RpcError(ErrorCode.INVALID_ARGS, str(exc)) from None
        self._parse(criteria)
        if folder is not None:
            bundle = self._store_folder(Path(folder))
        digest = digest_arg(bundle)
        merged_requirements = {**self._bundle_requirements(digest), **(requirements or {})}
        now = time.time()
        try:
            with write_transaction():
                Task.insert(id=task_id, name=name, bundle=digest, criteria=criteria,
                            requirements=merged_requirements, args=args or {}, tags=tags or [],
                            priority=priority, flower_host=flower_host or self.settings.flower_advertise,
                            flower_port=flower_port, auto_port=flower_port is None, created=now,
                            updated=now).execute()
        except IntegrityError:
            raise RpcError(ErrorCode.CONFLICT, f"a task with id {task_id!r} exists") from None
        task = self._get(task_id)
        self.publisher.publish(digest)
        self.announce(task)
        self.events.record("task_created", task=task_id, data={"name": name, "bundle": digest})
        return task

    def _store_folder(self, folder: Path) -> str:
        """A task folder on the cloud host: packed and stored as the operator's push would."""
        if not folder.is_dir():
            raise RpcError(ErrorCode.NOT_FOUND, f"no folder {folder} on the cloud host")
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "bundle.tar.gz"
            try:
                manifest = build_bundle(folder, archive)
            except (BundleError, ManifestError) as exc:
                raise RpcError(ErrorCode.INVALID_ARGS, str(exc)) from None
            self.store.adopt(manifest, archive)
        return manifest.digest

    def update(self, task_id: str, changes: dict[str, Any]) -> Task:
        with self._lock:
            task = self._get(task_id)
            if "criteria" in changes:
                self._parse(changes["criteria"])
            if "bundle" in changes:
                if task.state == RUNNING:
                    raise RpcError(ErrorCode.CONFLICT, "stop the task before changing its bundle")
                self._bundle_requirements(digest_arg(changes["bundle"]))
            for key, value in changes.items():
                setattr(task, key, value)
            task.revision += 1
            task.updated = time.time()
            task.save()
            self._invalidate()
        if "bundle" in changes:
            self.publisher.publish(task.bundle)
        self.announce(task)
        self.events.record("task_updated", task=task_id, data={"revision": task.revision, "changed": sorted(changes)})
        return task

    def delete(self, task_id: str) -> None:
        task = self._get(task_id)
        if task.state == RUNNING:
            self.stop(task_id, reason="deleted")
        with write_transaction():
            Task.delete().where(Task.id == task_id).execute()
            TaskDevice.delete().where(TaskDevice.task == task_id).execute()
        self._invalidate()
        self.connection.publish(self.topics.task(task_id), b"", qos=1, retain=True)
        if not Task.select().where(Task.bundle == task.bundle).exists() and self.store.has(task.bundle):
            self.publisher.clear(task.bundle)
        self.events.record("task_deleted", task=task_id)

    # --- start / stop ------------------------------------------------------------------------
    def start(self, task_id: str) -> Task:
        with self._lock:
            task = self._get(task_id)
            if task.state == RUNNING:
                raise RpcError(ErrorCode.CONFLICT, f"task {task_id} is already running")
            if not self.store.has(task.bundle):
                raise RpcError(ErrorCode.NOT_FOUND, f"bundle {task.bundle} is not in the store")
            port = task.flower_port if not task.auto_port else free_port(self.settings.flower_bind)
            if not _port_free(self.settings.flower_bind, port):
                raise RpcError(ErrorCode.CONFLICT, f"Flower port {port} is already in use on the cloud host")
            folder = self._unpacked(task.bundle)
            run = task.run + 1
            run_dir = self._run_path(task_id, run)
            try:
                process = start_task(
                    folder, "server", task_id=task_id, log_dir=run_dir, args=task.args,
                    on_event=lambda event: self._on_server_event(task_id, run, event),
                    rpc={"broker": self.settings.broker_url, "prefix": self.settings.prefix,
                         "caller": f"task.{task_id}"[:128]},
                    env={"FEDMQ_FLOWER_ADDRESS": f"{self.settings.flower_bind}:{port}",
                         ENV_OUTPUT_DIR: str(run_dir)},
                    time_limit_s=self.settings.server_time_limit_s)
            except Exception as exc:  # a manifest without a server, say
                raise RpcError(ErrorCode.INVALID_ARGS, f"cannot start the task's server: {exc}") from None
            self._running[task_id] = _Running(process, run)
            task.state, task.run, task.flower_port = RUNNING, run, port
            task.started_at, task.finished_at, task.last_error = time.time(), None, None
            task.current_round, task.total_rounds, task.metrics = 0, None, {}
            task.server_pid = process.process.pid if process.process else None
            task.updated = time.time()
            task.save()
            self._invalidate()
        self.announce(task)
        self.events.record("task_started", task=task_id, run=run,
                           data={"flower": flower_address(task), "revision": task.revision,
                                 "bundle": task.bundle, "args": task.args, "criteria": task.criteria})
        return task

    def _unpacked(self, digest: str) -> Path:
        folder = self.settings.home / "tasks" / digest
        if not folder.is_dir():
            try:
                safe_unpack(self.store.archive_path(digest), folder)
            except BundleError as exc:
                if not folder.is_dir():  # lost a race with another start: fine
                    raise RpcError(ErrorCode.INTERNAL, f"stored bundle cannot be unpacked: {exc}") from None
        return folder

    def stop(self, task_id: str, reason: str = "stopped by operator") -> Task:
        with self._lock:
            task = self._get(task_id)
            if task.state != RUNNING:
                raise RpcError(ErrorCode.CONFLICT, f"task {task_id} is not running (it is {task.state})")
            entry = self._running.get(task_id)
            if entry is not None:
                entry.stopping = True
        if entry is not None:
            entry.process.stop(grace_s=5.0)
            entry.done.wait(10.0)
        return self._leave_running(task_id, STOPPED, reason, entry.run if entry else task.run)

    def _leave_running(self, task_id: str, state: str, reason: str | None, run: int) -> Task:
        with self._lock:
            task = self._get(task_id)
            if task.state != RUNNING or task.run != run:
                return task
            task.state, task.finished_at, task.updated = state, time.time(), time.time()
            task.server_pid = None
            if state == FAILED:
                task.last_error = reason
            task.save()
            self._invalidate()
            self._running.pop(task_id, None)
        self.announce(task)
        kind = {FINISHED: "task_finished", FAILED: "task_failed", STOPPED: "task_stopped"}[state]
        self.events.record(kind, task=task_id, run=run, data={"reason": reason, "metrics": task.metrics})
        if state != FINISHED:  # after a normal finish the clients end with their Flower server
            self._command_devices(task, "stop", reason or state)
        return task

    def _command_devices(self, task: Task, command: str, reason: str) -> None:
        active = (TaskDevice.task == task.id) & TaskDevice.state.in_(ACTIVE_ON_DEVICE)
        for row in TaskDevice.select().where(active):
            body = {"cmd": command, "task": task.id, "revision": task.revision, "reason": reason, "ts": time.time()}
            self.connection.publish(self.topics.device_cmd(row.device), codec.encode(body, codec.Codec.JSON), qos=1)
        TaskDevice.update(state="stopped", updated=time.time()).where(active).execute()

    @staticmethod
    def _mark_device(task_id: str, device: str, state: str) -> None:
        now = time.time()
        TaskDevice.insert(task=task_id, device=device, state=state, updated=now).on_conflict(
            conflict_target=[TaskDevice.task, TaskDevice.device],
            update={TaskDevice.state: state, TaskDevice.updated: now}).execute()

    def _on_server_event(self, task_id: str, run: int, event: TaskEvent) -> None:
        data = event.data
        if event.kind == "progress":
            task = Task.get_or_none(Task.id == task_id)
            if task is None or task.run != run:
                return
            task.current_round, task.total_rounds, task.updated = data["round"], data["total"], time.time()
            task.save()
            self.announce(task)
            if data["round"] > 0:
                self.events.record("round_done", task=task_id, run=run, data={"round": data["round"], "total": data["total"]})
        elif event.kind == "stats":
            task = Task.get_or_none(Task.id == task_id)
            if task is not None and task.run == run:
                task.metrics = {**(task.metrics or {}), **data["metrics"], "round": data["round"]}
                task.save()
            self.events.record("round_metrics", task=task_id, run=run, data=data)
        elif event.kind == "exit":
            entry = self._running.get(task_id)
            stopping = entry.stopping if entry and entry.run == run else False
            if not stopping:
                ok = bool(data.get("ok"))
                self._leave_running(task_id, FINISHED if ok else FAILED, None if ok else data.get("cause"), run)
            if entry is not None:
                entry.done.set()
        elif event.kind in ("error", "info", "finished", "trigger_started", "trigger_result", "trigger_refused"):
            self.events.record(f"server_{event.kind}", task=task_id, run=run, data=data)

    # --- devices asking for work ---------------------------------------------------------------
    def _invalidate(self) -> None:
        self._snapshot_at = 0.0

    def _offerable(self) -> list["_Offerable"]:
        """Running tasks, parsed, by priority then age.  Rebuilt when a task changes here, and at
        least every second (another replica behind a shared subscription may have changed one)."""
        now = time.monotonic()
        if now - self._snapshot_at > SNAPSHOT_TTL_S:
            rows = Task.select().where(Task.state == RUNNING).order_by(Task.priority.desc(), Task.created)
            snapshot = []
            for task in rows:
                try:
                    criteria = parse_criteria(task.criteria)
                except CriteriaError:
                    log.error("task %s has unparseable criteria; it is never offered", task.id)
                    continue
                snapshot.append(_Offerable(task.id, criteria, task.requirements or {}, {
                    "id": task.id, "name": task.name, "revision": task.revision, "bundle": task.bundle,
                    "flower": flower_address(task), "args": task.args,
                    "priority": task.priority, "run": task.run}))
            self._snapshot, self._snapshot_at = snapshot, now
        return self._snapshot

    def request(self, device_id: str) -> list[dict[str, Any]]:
        device = Device.get_or_none(Device.id == device_id)
        if device is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"unknown device {device_id!r}: report with devices.update_info first")
        info = flat_info(device)
        offers = []
        for task in self._offerable():
            try:
                if not task.criteria.matches(info) or not requirements_met(task.requirements, info)[0]:
                    continue
            except Exception:  # one bad task never breaks the request for the others
                log.exception("evaluating task %s for %s failed", task.id, device_id)
                continue
            offers.append(dict(task.offer))
        # Only a first offer is news: repeated requests (the edge's safety-net re-checks) write nothing.
        known = {row.task: row.state for row in TaskDevice.select().where(TaskDevice.device == device_id)}
        fresh = [o for o in offers if known.get(o["id"]) not in (*ACTIVE_ON_DEVICE, "failed")]
        if fresh:
            with write_transaction():
                for offer in fresh:
                    self._mark_device(offer["id"], device_id, "offered")
                    self.events.record("device_requested", task=offer["id"], device=device_id,
                                       data={"offered": [o["id"] for o in offers]})
        return offers

    def on_task_event(self, message: mqtt.MQTTMessage) -> None:
        """Steps reported by edges on ``tasks/<id>/events`` (JSON or msgpack)."""
        try:
            body, _ = codec.decode(message.payload)
            task_id = check_id(message.topic.split("/")[-2], "task")
        except (codec.CodecError, TopicError, IndexError):
            return
        event = EventRecord.from_wire(body, task_id)
        if event is None or event.device is None or event.component == self.events.component:
            return  # not an edge's event, or our own (already recorded)
        kind, device = event.kind, event.device
        self.events.record(kind, task=task_id, device=device, run=event.run, data=event.data,
                           component=f"edge.{device}"[:128], ts=event.ts, publish=False)
        state = {"client_started": "running", "client_finished": "done", "client_error": "failed",
                 "client_stopped": "stopped"}.get(kind)
        if state and Task.get_or_none(Task.id == task_id) is not None:
            self._mark_device(task_id, device, state)

    # --- run history ------------------------------------------------------------------------------
    def runs(self, task_id: str) -> list[dict[str, Any]]:
        """Each run of a task: when, with what, how it ended."""
        self._get(task_id)
        runs: dict[int, dict[str, Any]] = {}
        ends = {"task_finished": FINISHED, "task_failed": FAILED, "task_stopped": STOPPED}
        for event in Event.select().where((Event.task == task_id) & Event.kind.in_(["task_started", *ends]))\
                .order_by(Event.ts):
            if event.run is None:
                continue
            if event.kind == "task_started":
                runs[event.run] = {"run": event.run, "started": event.ts, "finished": None, "state": RUNNING,
                                   **{k: event.data.get(k) for k in ("bundle", "args", "criteria", "revision")}}
            elif event.run in runs:
                runs[event.run].update(finished=event.ts, state=ends[event.kind],
                                       reason=event.data.get("reason"), metrics=event.data.get("metrics"))
        return [runs[k] for k in sorted(runs)]

    def _run_number(self, task_id: str, run: int | None) -> int:
        task = self._get(task_id)
        if run is None:
            if not task.run:
                raise RpcError(ErrorCode.NOT_FOUND, f"task {task_id} has not run yet")
            return task.run
        if not 1 <= run <= task.run:
            raise RpcError(ErrorCode.NOT_FOUND, f"task {task_id} has no run {run} (runs 1..{task.run})")
        return run

    def metrics(self, task_id: str, run: int | None = None) -> dict[str, Any]:
        """Per-round metrics of a run (the server's aggregated ones), one row per round."""
        number = self._run_number(task_id, run)
        rows: dict[int, dict[str, Any]] = {}
        for event in Event.select().where((Event.task == task_id) & (Event.run == number) &
                                          (Event.kind == "round_metrics")).order_by(Event.ts):
            round_ = event.data.get("round")
            if isinstance(round_, int):
                rows.setdefault(round_, {"round": round_}).update(event.data.get("metrics") or {})
        return {"task": task_id, "run": number, "rounds": [rows[k] for k in sorted(rows)]}

    def _run_path(self, task_id: str, run: int) -> Path:
        return self.settings.home / "runs" / task_id / str(run)

    def run_dir(self, task_id: str, run: int | None) -> Path:
        return self._run_path(task_id, self._run_number(task_id, run))

    def logs(self, task_id: str, run: int | None, lines: int) -> dict[str, Any]:
        folder = self.run_dir(task_id, run)
        path = folder / f"{task_id}.server.log"
        text = path.read_text(errors="replace").splitlines() if path.is_file() else []
        return {"task": task_id, "run": int(folder.name), "lines": text[-lines:], "total_lines": len(text)}

    def model_chunk(self, task_id: str, run: int | None, offset: int, size: int) -> dict[str, Any]:
        folder = self.run_dir(task_id, run)
        path = folder / "model.npz"
        if not path.is_file():
            raise RpcError(ErrorCode.NOT_FOUND, f"run {folder.name} of {task_id} saved no model "
                                                "(it did not finish, or its server does not use ftdl.flower.serve)")
        total = path.stat().st_size
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        digest = file_sha256(path) if offset == 0 else None
        return {"task": task_id, "run": int(folder.name), "size": total, "offset": offset, "data": data,
                "sha256": digest}

    # --- life of the cloud itself ------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """After a restart: tasks left 'running' by a dead cloud are marked failed."""
        failed = []
        for task in Task.select().where(Task.state == RUNNING):
            if task.server_pid:
                try:
                    os.killpg(task.server_pid, signal.SIGKILL)  # the orphaned Flower server
                except (ProcessLookupError, PermissionError):
                    pass
            task.state, task.last_error = FAILED, "interrupted: the cloud stopped while the task was running"
            task.finished_at = task.updated = time.time()
            task.server_pid = None
            task.save()
            self._invalidate()
            self.events.record("task_failed", task=task.id, run=task.run, data={"reason": task.last_error})
            self._command_devices(task, "stop", task.last_error)
            failed.append(task.id)
        return failed

    def republish(self) -> None:
        """Put every announcement and referenced bundle back (a broker may have lost them)."""
        for task in Task.select():
            self.announce(task)
        for digest in {t.bundle for t in Task.select(Task.bundle)}:
            if self.store.has(digest):
                self.publisher.publish(digest)

    def shutdown(self) -> None:
        for task_id in list(self._running):
            try:
                self.stop(task_id, reason="the cloud shut down")
            except RpcError:
                pass
