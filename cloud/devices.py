"""The device registry: what each device reports about itself (``DeviceInfo``) and whether it is
there (presence births and last wills, applied with the session rule of ``broker.presence``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from peewee import Database, ModelSelect

from fedmq.broker.arguments import DeviceInfo
from fedmq.broker.criteria import device_facts
from fedmq.broker.errors import Invalid
from fedmq.broker.events import EventKind
from fedmq.broker.presence import ONLINE, Presence, newer
from fedmq.cloud.db import Device
from fedmq.cloud.errors import DeviceNotFound
from fedmq.cloud.events import EventLog
from fedmq.cloud.write_batch import AfterCommit, WriteBatcher

MAX_INFO_BYTES = 64 * 1024  # as JSON


def device_row(device: Device) -> dict[str, Any]:
    return {"id": device.id, "online": device.online, "session": device.session,
            "last_seen": device.last_seen, "disconnections": device.disconnections,
            "first_seen": device.first_seen, "info_updated": device.info_updated, "info": device.info}


def flat_info(device: Device) -> dict[str, Any]:
    """What selection criteria see: the reported info, labels lifted to the top, and presence."""
    return device_facts(device.info or {}, device.id, device.online)


class DeviceRegistry:
    """Writes go through the cloud's group commit (``WriteBatcher``); ``listeners`` hear every
    device whose facts or presence changed, once committed (selection keeps its facts fresh so)."""

    def __init__(self, db: Database, events: EventLog, batcher: WriteBatcher | None = None) -> None:
        self.db, self.events = db, events
        self.batcher = batcher or WriteBatcher(db, max_delay_s=0)
        self.listeners: list[Callable[[Device], object]] = []

    def _changed(self, device: Device) -> AfterCommit:
        def notify() -> None:
            for listener in self.listeners:
                listener(device)
        return notify

    def update_info(self, device_id: str, info: DeviceInfo) -> dict[str, Any]:
        payload = info.model_dump(exclude_none=True)
        if len(info.model_dump_json(exclude_none=True)) > MAX_INFO_BYTES:
            raise Invalid(f"info larger than {MAX_INFO_BYTES} bytes")
        updated: list[float] = []

        def write() -> AfterCommit:
            device, created = Device.get_or_create(id=device_id)
            device.info = payload
            device.info_updated = device.last_seen = time.time()
            device.save()
            if created:
                self.events.record(EventKind.DEVICE_REGISTERED, device=device_id, publish=False)
            updated.append(device.info_updated)
            return self._changed(device)

        self.batcher.write(write)  # answered once committed
        return {"device": device_id, "updated": updated[0]}

    @staticmethod
    def get(device_id: str) -> Device:
        row = Device.get_or_none(Device.id == device_id)
        if row is None:
            raise DeviceNotFound(f"no device {device_id!r}")
        return row

    @staticmethod
    def query(online: bool | None) -> ModelSelect[Device]:
        query = Device.select().order_by(Device.id)
        if online is not None:
            query = query.where(Device.online == online)
        return query

    def apply_presence(self, device_id: str, presence: Presence) -> None:
        """Queued, committed within the batcher's delay: presence is retained on the broker, so
        what a crash loses of it the broker hands the next cloud again."""
        def write() -> AfterCommit | None:
            device, _ = Device.get_or_create(id=device_id)
            apply, dropped = newer(presence, device.session, device.online)
            if not apply:
                return None
            device.session = presence.session
            device.online = presence.state == ONLINE
            device.last_seen = time.time()
            if dropped:
                device.disconnections += 1
            device.save()
            self.events.record(EventKind.DEVICE_ONLINE if device.online else EventKind.DEVICE_OFFLINE,
                               device=device_id, data={"session": presence.session}, publish=False)
            return self._changed(device)

        self.batcher.write_later(write)
