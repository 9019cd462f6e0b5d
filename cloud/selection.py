"""Selection: which running tasks a device may run (criteria and requirements against what it
reports), and the bookkeeping of who was offered and runs what, so a stop reaches them.

Running tasks are held parsed and compiled in a snapshot, rebuilt when a task changes here and at
least every ``SNAPSHOT_TTL_S`` (another replica behind a shared subscription may have changed one).
Device facts and device-task states are held in memory too, so a warm request touches the
database only to record a first offer, in the cloud's group commit.

A task that selects on the device (``selection = "device"``, privacy mode) is never evaluated
here: the device evaluates its announcement's criteria on facts that may never leave it and
takes it up with ``join``, one row and one event for the one task it runs, where a first
``request`` records every task it is eligible for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peewee import Database

from fedmq.broker.criteria import Criteria, CriteriaError, eligible, parse_criteria
from fedmq.broker.events import EventKind, EventRecord
from fedmq.broker.schema import ACTIVE_ON_DEVICE, DeviceTaskState, Offer, SelectionMode, TaskState
from fedmq.cloud.db import Device, Task, TaskDevice, insert_rows
from fedmq.cloud.devices import flat_info
from fedmq.cloud.errors import DeviceNotFound, InvalidTask, TaskConflict
from fedmq.cloud.events import EventLog
from fedmq.cloud.task_views import load_task, task_view
from fedmq.cloud.write_batch import WriteBatcher

log = logging.getLogger("fedmq.cloud.selection")
SNAPSHOT_TTL_S = 1.0


@dataclass(frozen=True)
class _Offerable:
    id: str
    criteria: Criteria
    requirements: dict[str, Any]
    offer: Offer
    on_device: bool  # selection = "device": the device decides, and joins


class Selection:
    """``request`` reads nothing from the database once warm: device facts and who-stands-where
    are held in memory, written through by every change (device info and presence through the
    registry's listeners, offers and device steps here).  With ``cache_ttl_s`` (replicas behind a
    shared subscription, which change them too) entries older than that are read again."""

    def __init__(self, db: Database, events: EventLog, batcher: WriteBatcher | None = None,
                 cache_ttl_s: float | None = None) -> None:
        self.db, self.events = db, events
        self.batcher = batcher or WriteBatcher(db, max_delay_s=0)
        self.cache_ttl_s = cache_ttl_s
        self._snapshot: list[_Offerable] = []
        self._snapshot_at = 0.0
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._facts: dict[str, tuple[float, dict[str, Any]]] = {}
        self._known: dict[str, tuple[float, dict[str, DeviceTaskState]]] = {}
        self._all_known = False

    def invalidate(self) -> None:
        self._snapshot_at = 0.0

    def _offerable(self) -> list[_Offerable]:
        """Running tasks, parsed and compiled, by priority then age."""
        with self._lock:
            if time.monotonic() - self._snapshot_at <= SNAPSHOT_TTL_S:
                return self._snapshot
            rows = Task.select().where(Task.state == TaskState.RUNNING).order_by(Task.priority.desc(), Task.created)
            snapshot = []
            for task in rows:
                try:
                    criteria = parse_criteria(task.criteria)
                except CriteriaError:
                    log.error("task %s has unparseable criteria; it is never offered", task.id)
                    continue
                snapshot.append(_Offerable(task.id, criteria, task.requirements or {}, task_view(task).offer(),
                                           task.selection == SelectionMode.DEVICE))
            self._snapshot, self._snapshot_at = snapshot, time.monotonic()
            return snapshot

    # --- the caches ------------------------------------------------------------------------------
    def _fresh(self, at: float) -> bool:
        return self.cache_ttl_s is None or time.monotonic() - at <= self.cache_ttl_s

    def device_changed(self, device: Device) -> dict[str, Any]:
        """The registry's listener: a device's info or presence, as committed; its facts."""
        facts = flat_info(device)
        with self._cache_lock:
            self._facts[device.id] = (time.monotonic(), facts)
        return facts

    def _facts_of(self, device_id: str) -> dict[str, Any]:
        with self._cache_lock:
            cached = self._facts.get(device_id)
        if cached is not None and self._fresh(cached[0]):
            return cached[1]
        device = Device.get_or_none(Device.id == device_id)
        if device is None:
            raise DeviceNotFound(f"unknown device {device_id!r}: report with devices.update_info first")
        return self.device_changed(device)

    def _known_of(self, device_id: str) -> dict[str, DeviceTaskState]:
        """One cloud: every row is read once (one query), then kept by write-through.  Replicas:
        per device, read again once older than cache_ttl_s."""
        if self.cache_ttl_s is None:
            with self._cache_lock:
                if not self._all_known:
                    for row in TaskDevice.select(TaskDevice.task, TaskDevice.device, TaskDevice.state):
                        self._known.setdefault(row.device, (0.0, {}))[1][row.task] = DeviceTaskState(row.state)
                    self._all_known = True
                return dict(self._known.get(device_id, (0.0, {}))[1])
        with self._cache_lock:
            cached = self._known.get(device_id)
            if cached is not None and self._fresh(cached[0]):
                return dict(cached[1])
        rows = TaskDevice.select(TaskDevice.task, TaskDevice.state).where(TaskDevice.device == device_id)
        known = {row.task: DeviceTaskState(row.state) for row in rows}
        with self._cache_lock:
            self._known[device_id] = (time.monotonic(), known)
        return dict(known)

    def _remember(self, task_id: str, device: str, state: DeviceTaskState) -> None:
        with self._cache_lock:
            cached = self._known.get(device)
            if cached is None and self._all_known:
                cached = self._known[device] = (0.0, {})
            if cached is not None:
                cached[1][task_id] = state

    # --- requests ---------------------------------------------------------------------------------
    def request(self, device_id: str) -> list[Offer]:
        """The tasks ``device_id`` may run now, by priority then age; a first offer is recorded
        (committed before the answer leaves: an offer is never lost)."""
        info = self._facts_of(device_id)
        offers = []
        for task in self._offerable():
            if task.on_device:
                continue
            try:
                if not eligible(task.criteria, task.requirements, info):
                    continue
            except Exception:  # one bad task never breaks the request for the others
                log.exception("evaluating task %s for %s failed", task.id, device_id)
                continue
            offers.append(task.offer)
        known = self._known_of(device_id)
        # A device that finished this run of a task is not offered it again (its client ends a
        # moment before the server does; rows are cleared when a new run starts).
        offers = [o for o in offers if known.get(o.id) != DeviceTaskState.DONE]
        # Only a first offer is news: repeated requests (the edge's safety-net re-checks) write nothing.
        fresh = [o for o in offers if known.get(o.id) not in (*ACTIVE_ON_DEVICE, DeviceTaskState.FAILED)]
        if fresh:
            self._record_offers(device_id, fresh, EventKind.DEVICE_REQUESTED)
        return offers

    def join(self, device_id: str, task_id: str) -> Offer:
        """A device takes up a running task that selects on the device: its offer, recorded once
        (a repeated join writes nothing).  The device's facts are not consulted: it decided."""
        task = next((t for t in self._offerable() if t.id == task_id), None)
        if task is None:
            state = load_task(task_id).state  # TaskNotFound for a task that does not exist
            raise TaskConflict(f"task {task_id} is {state}, not running: it cannot be joined")
        if not task.on_device:
            raise InvalidTask(f"task {task_id} selects its devices in the cloud: ask tasks.request")
        known = self._known_of(device_id).get(task_id)
        if known == DeviceTaskState.DONE:
            raise TaskConflict(f"{device_id} already finished run {task.offer.run} of task {task_id}")
        if known not in (*ACTIVE_ON_DEVICE, DeviceTaskState.FAILED):
            self._record_offers(device_id, [task.offer], EventKind.DEVICE_JOINED)
        return task.offer

    def _record_offers(self, device_id: str, offers: list[Offer], kind: EventKind) -> None:
        """First offers: their rows and events (one per task, on its topic, saying which run) in
        the cloud's group commit, committed before the answer leaves (an offer is never lost),
        then remembered."""
        task_ids = [offer.id for offer in offers]

        def write() -> Callable[[], None]:
            self._upsert(task_ids, device_id, DeviceTaskState.OFFERED)
            now = time.time()
            records = self.events.record_many([EventRecord(
                ts=now, component=self.events.component, kind=kind, task=offer.id, device=device_id, run=offer.run,
                data={}) for offer in offers])

            def publish() -> None:
                for record in records:
                    self.events.publish(record)
            return publish

        self.batcher.write(write)
        for task_id in task_ids:
            self._remember(task_id, device_id, DeviceTaskState.OFFERED)

    # --- who stands where -------------------------------------------------------------------------
    @staticmethod
    def _upsert(task_ids: list[str], device: str, state: DeviceTaskState) -> None:
        """One statement for all of a device's rows (a first request offers ~15 tasks at once)."""
        now = time.time()
        insert_rows(TaskDevice, [TaskDevice.task, TaskDevice.device, TaskDevice.state, TaskDevice.updated],
                    [(task, device, str(state), now) for task in task_ids],
                    conflict_target=[TaskDevice.task, TaskDevice.device],
                    preserve=[TaskDevice.state, TaskDevice.updated])

    def mark(self, task_id: str, device: str, state: DeviceTaskState) -> None:
        self._upsert([task_id], device, state)
        self._remember(task_id, device, state)

    def take_active(self, task_id: str) -> list[str]:
        """The devices offered or running ``task_id``, now marked stopping (a stop must reach them;
        their own client_stopped, client_finished or client_error confirms it)."""
        active = (TaskDevice.task == task_id) & TaskDevice.state.in_(ACTIVE_ON_DEVICE)
        rows = list(TaskDevice.select(TaskDevice.device, TaskDevice.state).where(active))
        now = time.time()
        # Only a running client confirms a stop; an offer not taken up yet simply lapses (the
        # retained announcement also tells a device that started meanwhile to stop).
        TaskDevice.update(state=DeviceTaskState.STOPPING, updated=now).where(
            active & (TaskDevice.state == DeviceTaskState.RUNNING)).execute()
        TaskDevice.update(state=DeviceTaskState.STOPPED, updated=now).where(active).execute()
        for row in rows:
            running = row.state == DeviceTaskState.RUNNING
            self._remember(task_id, row.device, DeviceTaskState.STOPPING if running else DeviceTaskState.STOPPED)
        return [row.device for row in rows]

    @staticmethod
    def unconfirmed_stops() -> list[tuple[str, str]]:
        """(task, device) of every stop not confirmed yet."""
        rows = TaskDevice.select(TaskDevice.task, TaskDevice.device).where(TaskDevice.state == DeviceTaskState.STOPPING)
        return [(row.task, row.device) for row in rows]

    @staticmethod
    def running_counts() -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in TaskDevice.select(TaskDevice.task).where(TaskDevice.state == DeviceTaskState.RUNNING):
            counts[row.task] = counts.get(row.task, 0) + 1
        return counts

    def forget(self, task_id: str) -> None:
        TaskDevice.delete().where(TaskDevice.task == task_id).execute()
        with self._cache_lock:
            for _, known in self._known.values():
                known.pop(task_id, None)
