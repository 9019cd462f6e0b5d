"""The tasks' lifecycle: create, update, delete, start, stop, and what a restart of the cloud finds.

State machine::

    created --start--> running --(server finishes)--> finished
                         |  \\--(server fails)------> failed
                         \\----stop----------------> stopped
    finished/failed/stopped --start--> running (a new run; history is kept per run)

Every state change republishes the retained announcement ``tasks/<id>``.  When a task is stopped
or fails, the devices it was offered to get a ``stop`` command (queued for a device that is
away); after a normal finish the clients end with their server.  A task that was running when
the cloud died is marked ``failed`` on the next start (its orphaned Flower server is killed): a
half-finished federated run cannot be resumed, and saying so beats pretending.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peewee import Database, IntegrityError

from fedmq.broker.criteria import CriteriaError, parse_criteria
from fedmq.broker.events import EventKind
from fedmq.broker.roles import Role, bound_client_id, participant_identity
from fedmq.broker.schema import DeviceCommand, DeviceTaskState, TaskState
from fedmq.broker.topics import TopicError, check_id
from fedmq.cloud.bundle_store import BundleStore, bundle_digest
from fedmq.cloud.db import Task, write_transaction
from fedmq.cloud.errors import InvalidTask, TaskConflict, TaskNotFound
from fedmq.cloud.events import EventLog
from fedmq.cloud.identities import IdentityRegistry
from fedmq.cloud.model_registry import model_policy
from fedmq.cloud.ports import Publisher
from fedmq.cloud.run_history import RunHistory
from fedmq.cloud.selection import Selection
from fedmq.cloud.task_servers import ServerSupervisor, TaskSettings
from fedmq.cloud.task_views import TaskView, flower_address, load_task, task_view
from fedmq.ftdl import TaskEvent
from fedmq.ftdl.bundle import BundleError, BundleRefused, build_bundle, safe_unpack
from fedmq.ftdl.channel import ReporterKind
from fedmq.ftdl.manifest import FLOWER_MODE as FLOWER
from fedmq.ftdl.manifest import SERVERLESS_MODE as SERVERLESS
from fedmq.ftdl.manifest import ManifestError, TaskManifest
from fedmq.ftdl.process import ProcessIdentity
from fedmq.ftdl.serverless.config import ServerlessConfig, training_mode

log = logging.getLogger("fedmq.cloud.tasks")


class CodeRefused(BundleRefused):
    """A task whose server code this cloud will not run (unsigned, or an untrusted signer)."""


_END_EVENTS = {TaskState.FINISHED: EventKind.TASK_FINISHED, TaskState.FAILED: EventKind.TASK_FAILED,
               TaskState.STOPPED: EventKind.TASK_STOPPED}
_POLICY_KEYS = {"register_if", "model_name"}  # what happens to a finished run's model
# What a device's own step says about where it stands with a task.
DEVICE_STATES = {EventKind.CLIENT_STARTED: DeviceTaskState.RUNNING, EventKind.CLIENT_FINISHED: DeviceTaskState.DONE,
                 EventKind.CLIENT_ERROR: DeviceTaskState.FAILED, EventKind.CLIENT_STOPPED: DeviceTaskState.STOPPED}
# Server reports recorded as events of their own kind.
_SERVER_EVENTS = {ReporterKind.ERROR: EventKind.SERVER_ERROR, ReporterKind.INFO: EventKind.SERVER_INFO,
                  ReporterKind.FINISHED: EventKind.SERVER_FINISHED,
                  "trigger_started": EventKind.SERVER_TRIGGER_STARTED,
                  "trigger_result": EventKind.SERVER_TRIGGER_RESULT,
                  "trigger_refused": EventKind.SERVER_TRIGGER_REFUSED}


class TaskLifecycle:
    def __init__(self, db: Database, settings: TaskSettings, store: BundleStore, publisher: Publisher,
                 events: EventLog, selection: Selection, servers: ServerSupervisor, history: RunHistory,
                 identities: IdentityRegistry, replica: str = "cloud") -> None:
        """``replica`` names this cloud among replicas sharing the database (its client id): a
        task it starts is owned by it, since its Flower server runs on this host."""
        self.db, self.settings, self.store, self.publisher = db, settings, store, publisher
        self.events, self.selection, self.servers, self.history = events, selection, servers, history
        self.identities = identities
        self.replica = replica
        self._manifests: dict[str, TaskManifest] = {}  # by bundle digest: a bundle never changes
        # Called with the task and the run number when a run finishes normally (after its
        # task_finished event): the model registry's policy (register_if) listens here.
        self.finished_listeners: list[Callable[[Task, int], None]] = []
        self._lock = threading.RLock()

    # --- reading -----------------------------------------------------------------------------
    get = staticmethod(load_task)

    @staticmethod
    def query(state: TaskState | None, tag: str | None) -> list[Task]:
        query = Task.select().order_by(Task.priority.desc(), Task.created)
        if state is not None:
            query = query.where(Task.state == state)
        return [t for t in query if tag is None or tag in (t.tags or [])]

    def announce(self, task: Task) -> TaskView:
        view = task_view(task)
        self.publisher.announce(task.id, view.announcement())
        return view

    # --- create / update / delete --------------------------------------------------------------
    @staticmethod
    def _check_criteria(criteria: str) -> None:
        try:
            parse_criteria(criteria)
        except CriteriaError as exc:
            raise InvalidTask(str(exc), {"position": exc.position}) from None

    def _bundle_requirements(self, digest: str) -> dict[str, Any]:
        return dict(self.store.manifest(digest).task.get("requirements") or {})

    def create(self, *, name: str, bundle: str | None = None, folder: str | None = None,
               task_id: str | None = None, flower_host: str | None = None, flower_port: int | None = None,
               args: dict[str, Any] | None = None, criteria: str = "", requirements: dict[str, Any] | None = None,
               tags: list[str] | None = None, priority: int = 0, register_if: str | None = None,
               model_name: str | None = None, selection: str = "cloud") -> Task:
        if (bundle is None) == (folder is None):
            raise InvalidTask("give exactly one of bundle (a digest) or folder")
        try:
            task_id = check_id(task_id or f"{name}-{uuid.uuid4().hex[:6]}", "task id")
        except TopicError as exc:
            raise InvalidTask(str(exc)) from None
        self._check_criteria(criteria)
        lifecycle = model_policy(register_if, model_name, name)
        digest = self._store_folder(folder) if folder is not None else bundle_digest(bundle or "")
        merged_requirements = {**self._bundle_requirements(digest), **(requirements or {})}
        now = time.time()
        try:
            with write_transaction(self.db):
                Task.insert(id=task_id, name=name, bundle=digest, criteria=criteria,
                            requirements=merged_requirements, args=args or {}, tags=tags or [],
                            priority=priority, flower_host=flower_host or self.settings.flower_advertise,
                            flower_port=flower_port, auto_port=flower_port is None, created=now,
                            updated=now, lifecycle=lifecycle, selection=str(selection)).execute()
        except IntegrityError:
            raise TaskConflict(f"a task with id {task_id!r} exists") from None
        task = self.get(task_id)
        self.publisher.publish_bundle(digest)
        self.announce(task)
        self.events.record(EventKind.TASK_CREATED, task=task_id, data={"name": name, "bundle": digest})
        return task

    def _store_folder(self, folder: str) -> str:
        """A task folder on the cloud host: packed and stored as the operator's push would."""
        path = Path(folder)
        if not path.is_absolute():
            raise InvalidTask(f"folder {folder!r} must be an absolute path on the cloud host")
        if not path.is_dir():
            raise TaskNotFound(f"no folder {folder} on the cloud host")
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "bundle.tar.gz"
            try:
                manifest = build_bundle(path, archive)
            except (BundleError, ManifestError) as exc:
                raise InvalidTask(str(exc)) from None
            return self.store.adopt(manifest, archive).digest

    def update(self, task_id: str, changes: dict[str, Any]) -> Task:
        if not changes:
            raise InvalidTask("nothing to update")
        with self._lock:
            task = self.get(task_id)
            if "criteria" in changes:
                self._check_criteria(changes["criteria"])
            if _POLICY_KEYS & changes.keys():  # not columns: kept in the task's lifecycle
                task.lifecycle = model_policy(changes.get("register_if"), changes.get("model_name"), task.name,
                                              task.lifecycle)
            if "bundle" in changes:
                if task.state == TaskState.RUNNING:
                    raise TaskConflict("stop the task before changing its bundle")
                self._bundle_requirements(bundle_digest(changes["bundle"]))
            for key, value in changes.items():
                if key not in _POLICY_KEYS:
                    setattr(task, key, value)
            task.revision += 1
            task.updated = time.time()
            task.save()
            self.selection.invalidate()
        if "bundle" in changes:
            self.publisher.publish_bundle(task.bundle)
        self.announce(task)
        self.events.record(EventKind.TASK_UPDATED, task=task_id,
                           data={"revision": task.revision, "changed": sorted(changes)})
        return task

    def delete(self, task_id: str) -> None:
        task = self.get(task_id)
        if task.state == TaskState.RUNNING:
            self.stop(task_id, reason="deleted")
        with write_transaction(self.db):
            Task.delete().where(Task.id == task_id).execute()
            self.selection.forget(task_id)
        self.selection.invalidate()
        self.publisher.announce(task_id, None)
        if not Task.select().where(Task.bundle == task.bundle).exists() and self.store.has(task.bundle):
            self.publisher.clear_bundle(task.bundle)
        self.events.record(EventKind.TASK_DELETED, task=task_id)

    # --- start / stop -------------------------------------------------------------------------
    def start(self, task_id: str) -> Task:
        with self._lock:
            task = self.get(task_id)
            if task.state == TaskState.RUNNING:
                raise TaskConflict(f"task {task_id} is already running")
            if not self.store.has(task.bundle):
                raise TaskNotFound(f"bundle {task.bundle} is not in the store")
            run = task.run + 1
            rounds = self.serverless_rounds(task)
            if rounds is not None:  # serverless: no server, nothing of the task runs on this host
                server, port = None, None
            else:
                self._check_code(task.bundle)
                port = self.servers.pick_port(None if task.auto_port else task.flower_port)
                if port is None:
                    raise TaskConflict(f"Flower port {task.flower_port} is already in use on the cloud host")
                folder = self._unpacked(task.bundle)
                credentials = self.identities.for_task(task_id)
                try:
                    server = self.servers.start(task_id, run, folder, self.history.run_path(task_id, run),
                                                task.args or {}, port, self.on_server_event, credentials)
                except (ManifestError, OSError) as exc:  # a manifest without a server, say
                    self.identities.end_task(task_id)
                    raise InvalidTask(f"cannot start the task's server: {exc}") from None
            task.state, task.run, task.flower_port = TaskState.RUNNING, run, port
            task.started_at, task.finished_at, task.last_error = time.time(), None, None
            task.current_round, task.total_rounds, task.metrics = 0, rounds, {}
            self.selection.forget(task_id)  # a new run: every device may be offered it again
            task.server_pid = server.pid if server else None
            task.server_started = server.to_text() if server else None
            task.owner = self.replica
            task.updated = time.time()
            task.save()
            self.selection.invalidate()
        self.announce(task)
        self.events.record(EventKind.TASK_STARTED, task=task_id, run=run,
                           data={"flower": flower_address(task), "revision": task.revision,
                                 "bundle": task.bundle, "args": task.args, "criteria": task.criteria,
                                 "requirements": task.requirements, "selection": task.selection or "cloud",
                                 "replica": self.replica,
                                 "mode": SERVERLESS if rounds is not None else FLOWER})
        return task

    def _manifest(self, digest: str) -> TaskManifest | None:
        if digest not in self._manifests:
            try:
                self._manifests[digest] = TaskManifest.from_dict(self.store.manifest(digest).task)
            except (BundleError, ManifestError):
                return None
        return self._manifests[digest]

    def serverless_rounds(self, task: Task) -> int | None:
        """The rounds of a serverless task (its bundle's arguments or the operator's say ``mode =
        "serverless"``), None for a Flower task; ``InvalidTask`` for arguments that cannot run."""
        manifest = self._manifest(task.bundle)
        if manifest is None:
            return None
        args = manifest.client_args(task.args or {})
        try:
            if training_mode(args) != SERVERLESS:
                return None
            return ServerlessConfig.from_args(args).rounds
        except ValueError as exc:
            raise InvalidTask(str(exc)) from None

    def participant_credentials(self, task_id: str, device: str) -> dict[str, str | None]:
        """How a device's participant in a running serverless task connects: on a broker whose
        identities the cloud manages, as the identity ``fl.<device>`` (a fresh password each time);
        elsewhere (an open broker, a password file with the ACL's ``%u`` patterns) with the
        device's own credentials -- ``username`` None -- under the participant's client id."""
        task = self.get(task_id)
        if task.state != TaskState.RUNNING or not self.is_serverless(task):
            raise TaskConflict(f"task {task_id} is not a running serverless task")
        name = participant_identity(device)
        if not self.identities.accounts.managed:
            return {"username": None, "password": None, "client_id": bound_client_id(name, Role.PARTICIPANT)}
        credentials = self.identities.for_participant(device)
        return {"username": credentials.name, "password": credentials.password, "client_id": credentials.clientid}

    def is_serverless(self, task: Task) -> bool:
        try:
            return self.serverless_rounds(task) is not None
        except InvalidTask:
            return False

    def _check_code(self, digest: str) -> None:
        """The server entry point and the triggers run on the cloud host: only from a bundle
        signed by a key this cloud trusts, unless development mode says otherwise."""
        if self.settings.allow_unsigned_code:
            return
        try:
            self.store.manifest(digest).verify(self.store.trust)
        except BundleError as exc:
            raise CodeRefused(exc.code, f"{exc.message}: the task's server would run code from bundle "
                                        f"{digest[:12]} on the cloud host, which runs only bundles signed by a "
                                        "key it trusts (fedmq cloud --trusted-key KEY.pub; --allow-unsigned "
                                        "for development)") from None

    def _unpacked(self, digest: str) -> Path:
        """The stored bundle, unpacked once under ``<home>/tasks/<digest>`` (shared by every task
        and run of that bundle, read-only to them: their outputs go to their run folders)."""
        folder = self.settings.home / "tasks" / digest
        if not folder.is_dir():
            try:
                safe_unpack(self.store.archive_path(digest), folder)
            except BundleError as exc:
                if not folder.is_dir():  # lost a race with another start: fine
                    raise RuntimeError(f"stored bundle {digest} cannot be unpacked: {exc}") from None
        return folder

    def stop(self, task_id: str, reason: str = "stopped by operator") -> Task:
        with self._lock:
            task = self.get(task_id)
            if task.state != TaskState.RUNNING:
                raise TaskConflict(f"task {task_id} is not running (it is {task.state})")
        run = self.servers.stop(task_id)
        return self._leave_running(task_id, TaskState.STOPPED, reason, run if run is not None else task.run)

    def _leave_running(self, task_id: str, state: TaskState, reason: str | None, run: int) -> Task:
        with self._lock:
            task = self.get(task_id)
            if task.state != TaskState.RUNNING or task.run != run:
                return task
            task.state, task.finished_at, task.updated = state, time.time(), time.time()
            task.server_pid = task.server_started = task.owner = None
            if state == TaskState.FAILED:
                task.last_error = reason
            task.save()
            self.selection.invalidate()
        self.identities.end_task(task_id)  # the run's credentials end with it
        if self.is_serverless(task):
            self._clear_fl_later(task_id, run, self.settings.fl_clear_delay_s)
        self.announce(task)
        self.events.record(_END_EVENTS[state], task=task_id, run=run,
                           data={"reason": reason, "metrics": task.metrics, "replica": self.replica})
        if state == TaskState.FINISHED:
            for listener in self.finished_listeners:
                try:
                    listener(task, run)
                except Exception:  # a listener's failure must not undo the run's end
                    log.exception("task %s run %s: a finished-run listener failed", task_id, run)
        if state != TaskState.FINISHED:  # after a normal finish the clients end with their Flower server
            self._stop_devices(task, reason or state)
        return task

    def _clear_fl_later(self, task_id: str, run: int, delay_s: float) -> None:
        """A serverless run's retained records and blobs come off the broker when it ends -- once
        the participants have had time to fetch the final model, or to stop (a stopped one's last
        will is retained too) -- and not at all if the task has started another run meanwhile."""
        def clear() -> None:
            task = Task.get_or_none(Task.id == task_id)
            if task is not None and (task.run != run or task.state == TaskState.RUNNING):
                return
            try:
                cleared = self.publisher.clear_serverless(task_id)
                log.info("task %s run %s: cleared %d retained serverless messages", task_id, run, cleared)
            except Exception:
                log.exception("could not clear the serverless messages of task %s", task_id)

        timer = threading.Timer(delay_s, clear)
        timer.daemon = True
        timer.start()

    def _stop_devices(self, task: Task, reason: str) -> None:
        for device in self.selection.take_active(task.id):
            self.publisher.command(device, DeviceCommand(cmd="stop", task=task.id, revision=task.revision,
                                                         reason=reason))

    # --- what the server and the devices report ---------------------------------------------------
    def on_server_event(self, task_id: str, run: int, event: TaskEvent) -> None:
        data = event.data
        if event.kind == ReporterKind.PROGRESS:
            task = Task.get_or_none(Task.id == task_id)
            if task is None or task.run != run:
                return
            task.current_round, task.total_rounds, task.updated = data["round"], data["total"], time.time()
            task.save()
            self.announce(task)
            if data["round"] > 0:
                self.events.record(EventKind.ROUND_DONE, task=task_id, run=run,
                                   data={"round": data["round"], "total": data["total"]})
        elif event.kind == ReporterKind.STATS:
            task = Task.get_or_none(Task.id == task_id)
            if task is not None and task.run == run:
                task.metrics = {**(task.metrics or {}), **data["metrics"], "round": data["round"]}
                task.save()
            self.events.record(EventKind.ROUND_METRICS, task=task_id, run=run, data=data)
        elif event.kind == "exit":
            if not self.servers.ended(task_id, run):  # its own end, not a stop we asked for
                ok = bool(data.get("ok"))
                self._leave_running(task_id, TaskState.FINISHED if ok else TaskState.FAILED,
                                    None if ok else data.get("cause"), run)
        elif event.kind in _SERVER_EVENTS:
            self.events.record(_SERVER_EVENTS[event.kind], task=task_id, run=run, data=data)

    def on_device_step(self, task_id: str, device: str, kind: str) -> None:
        """A device's step on a task changes where it stands with it."""
        state = DEVICE_STATES.get(kind)  # type: ignore[call-overload]
        if state is not None and Task.get_or_none(Task.id == task_id) is not None:
            self.selection.mark(task_id, device, state)

    # --- life of the cloud itself ------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """After a restart: this replica's tasks left 'running' by its previous process are
        marked failed (their servers died with it, or are killed now).  Other replicas' running
        tasks are theirs: they are handled here only when that replica goes offline."""
        mine = (Task.owner == self.replica) | Task.owner.is_null()
        return self._fail_orphans(mine, "interrupted: the cloud stopped while the task was running",
                                  kill_recorded=True)

    def replica_lost(self, replica: str) -> list[str]:
        """Another replica went offline (its last will): its Flower servers went with it, so
        its running tasks fail and their devices are told to stop.  Every survivor may call
        this; the database's conditional update lets exactly one of them handle each task."""
        if replica == self.replica:
            return []
        return self._fail_orphans(Task.owner == replica, f"interrupted: replica {replica}, which ran its "
                                  "Flower server, went offline", kill_recorded=False)

    def _fail_orphans(self, owned: Any, reason: str, kill_recorded: bool) -> list[str]:
        failed = []
        for task in Task.select().where((Task.state == TaskState.RUNNING) & owned):
            if self.is_serverless(task):  # no server died: the run goes on without the cloud
                self._adopt(task)
                continue
            if kill_recorded and self.servers.pid(task.id) is None:
                recorded = ProcessIdentity.from_text(task.server_started)
                if recorded is not None:
                    self.servers.kill_orphan(recorded)  # only if that pid is still that process
            now = time.time()
            claimed = Task.update(state=TaskState.FAILED, last_error=reason, finished_at=now, updated=now,
                                  server_pid=None, server_started=None, owner=None).where(
                (Task.id == task.id) & (Task.run == task.run) & (Task.state == TaskState.RUNNING)).execute()
            if not claimed:  # another replica handled it first, or it ended meanwhile
                continue
            ended = self.get(task.id)
            self.identities.end_task(ended.id)
            self.selection.invalidate()
            self.announce(ended)
            self.events.record(EventKind.TASK_FAILED, task=ended.id, run=ended.run, data={"reason": reason})
            self._stop_devices(ended, reason)
            failed.append(ended.id)
        return failed

    def _adopt(self, task: Task) -> None:
        """A serverless run observed by a replica that is gone (or by this one before a restart):
        this replica records it from now on (one survivor wins the conditional update); the
        participants' retained records let it catch up."""
        claimed = Task.update(owner=self.replica).where(
            (Task.id == task.id) & (Task.run == task.run) & (Task.state == TaskState.RUNNING) &
            (Task.owner == task.owner if task.owner is not None else Task.owner.is_null())).execute()
        if claimed:
            log.info("task %s run %s (serverless) is observed by %s from now on", task.id, task.run, self.replica)

    def observes(self, task: Task) -> bool:
        """Whether this replica records the task's serverless rounds (its owner does)."""
        return task.owner in (None, self.replica)

    def on_announcement(self, task_id: str, state: str, run: int) -> None:
        """Any replica may stop a task, but only the owner's host runs its server: the owner
        hears the retained announcement say it no longer runs (or runs another run) and stops
        its own server.  Nothing to do on one cloud: its stop stopped the server first."""
        local = self.servers.run_of(task_id)
        if local is not None and (state != TaskState.RUNNING or run != local):
            log.info("task %s run %s is %s (changed by another replica): stopping its server here",
                     task_id, local, state)
            threading.Thread(target=self.servers.stop, args=(task_id,), name=f"stop-{task_id}", daemon=True).start()

    def republish(self) -> None:
        """Put every announcement, referenced bundle and unconfirmed stop command back: after a
        reconnect the broker may have lost them (amqtt restarts empty; Mosquitto saves every 100
        changes, so a crash loses the last few)."""
        for task in Task.select():
            self.announce(task)
        for task_id, device in self.selection.unconfirmed_stops():
            stopped = Task.get_or_none(Task.id == task_id)
            if stopped is not None and stopped.state != TaskState.RUNNING:
                self.publisher.command(device, DeviceCommand(cmd="stop", task=task_id, revision=stopped.revision,
                                                             reason="stopped (sent again after a reconnect)"))
        for digest in {t.bundle for t in Task.select(Task.bundle)}:
            if self.store.has(digest):
                self.publisher.publish_bundle(digest)

    def shutdown(self) -> None:
        for task_id in self.servers.running():
            try:
                self.stop(task_id, reason="the cloud shut down")
            except TaskConflict:
                pass
