"""Selection: which running tasks a device may run (criteria and requirements against what it
reports), and the bookkeeping of who was offered and runs what, so a stop reaches them.

Running tasks are held parsed in a snapshot, rebuilt when a task changes here and at least every
``SNAPSHOT_TTL_S`` (another replica behind a shared subscription may have changed one).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from peewee import Database

from fedmq.broker.events import EventKind
from fedmq.broker.schema import ACTIVE_ON_DEVICE, DeviceTaskState, Offer, TaskState
from fedmq.cloud.criteria import Criteria, CriteriaError, parse_criteria, requirements_met
from fedmq.cloud.db import Device, Task, TaskDevice, write_transaction
from fedmq.cloud.devices import flat_info
from fedmq.cloud.errors import DeviceNotFound
from fedmq.cloud.events import EventLog
from fedmq.cloud.task_views import task_view

log = logging.getLogger("fedmq.cloud.selection")
SNAPSHOT_TTL_S = 1.0


@dataclass(frozen=True)
class _Offerable:
    id: str
    criteria: Criteria
    requirements: dict[str, Any]
    offer: Offer


class Selection:
    def __init__(self, db: Database, events: EventLog) -> None:
        self.db, self.events = db, events
        self._snapshot: list[_Offerable] = []
        self._snapshot_at = 0.0
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        self._snapshot_at = 0.0

    def _offerable(self) -> list[_Offerable]:
        """Running tasks, parsed, by priority then age."""
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
                snapshot.append(_Offerable(task.id, criteria, task.requirements or {}, task_view(task).offer()))
            self._snapshot, self._snapshot_at = snapshot, time.monotonic()
            return snapshot

    def request(self, device_id: str) -> list[Offer]:
        """The tasks ``device_id`` may run now, by priority then age; a first offer is recorded."""
        device = Device.get_or_none(Device.id == device_id)
        if device is None:
            raise DeviceNotFound(f"unknown device {device_id!r}: report with devices.update_info first")
        info = flat_info(device)
        offers = []
        for task in self._offerable():
            try:
                if not task.criteria.matches(info) or not requirements_met(task.requirements, info)[0]:
                    continue
            except Exception:  # one bad task never breaks the request for the others
                log.exception("evaluating task %s for %s failed", task.id, device_id)
                continue
            offers.append(task.offer)
        known = {row.task: row.state for row in TaskDevice.select().where(TaskDevice.device == device_id)}
        # A device that finished this run of a task is not offered it again (its client ends a
        # moment before the server does; rows are cleared when a new run starts).
        offers = [o for o in offers if known.get(o.id) != DeviceTaskState.DONE]
        # Only a first offer is news: repeated requests (the edge's safety-net re-checks) write nothing.
        fresh = [o for o in offers if known.get(o.id) not in (*ACTIVE_ON_DEVICE, DeviceTaskState.FAILED)]
        if fresh:
            with write_transaction(self.db):
                for offer in fresh:
                    self.mark(offer.id, device_id, DeviceTaskState.OFFERED)
                    self.events.record(EventKind.DEVICE_REQUESTED, task=offer.id, device=device_id,
                                       data={"offered": [o.id for o in offers]})
        return offers

    @staticmethod
    def mark(task_id: str, device: str, state: DeviceTaskState) -> None:
        now = time.time()
        TaskDevice.insert(task=task_id, device=device, state=state, updated=now).on_conflict(
            conflict_target=[TaskDevice.task, TaskDevice.device],
            update={TaskDevice.state: state, TaskDevice.updated: now}).execute()

    @staticmethod
    def take_active(task_id: str) -> list[str]:
        """The devices offered or running ``task_id``, now marked stopping (a stop must reach them;
        their own client_stopped, client_finished or client_error confirms it)."""
        active = (TaskDevice.task == task_id) & TaskDevice.state.in_(ACTIVE_ON_DEVICE)
        devices = [row.device for row in TaskDevice.select(TaskDevice.device).where(active)]
        now = time.time()
        # Only a running client confirms a stop; an offer not taken up yet simply lapses (the
        # retained announcement also tells a device that started meanwhile to stop).
        TaskDevice.update(state=DeviceTaskState.STOPPING, updated=now).where(
            active & (TaskDevice.state == DeviceTaskState.RUNNING)).execute()
        TaskDevice.update(state=DeviceTaskState.STOPPED, updated=now).where(active).execute()
        return devices

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

    @staticmethod
    def forget(task_id: str) -> None:
        TaskDevice.delete().where(TaskDevice.task == task_id).execute()
