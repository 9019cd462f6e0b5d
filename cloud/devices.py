"""The device registry (``devices`` service) and presence tracking.

A device reports what it is (``update_info``); the broker tells us whether it is there (retained
``devices/<id>/state`` births and last wills).  Info is typed: the facts selection and
requirements rely on must have the right types, anything else a device wants to report goes in
``extra``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field

from broker import codec
from broker.envelope import ErrorCode, RpcError
from broker.presence import ONLINE, Presence, newer
from broker.rpc_server import CallContext, Service
from broker.topics import Topics, TopicError, check_id
from cloud.db import Device, write_transaction
from cloud.events import EventLog

log = logging.getLogger("fedmq.cloud.devices")
MAX_INFO_BYTES = 64 * 1024


class TaskStats(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    round: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    contribution: float | None = None
    num_examples: int | None = None


class DeviceInfo(BaseModel):
    """What a device reports; strict types for the facts selection relies on."""

    model_config = ConfigDict(strict=True, extra="forbid")
    data_quantity: int | None = Field(default=None, ge=0)
    cpu_count: int | None = Field(default=None, ge=0)
    memory_mb: float | None = Field(default=None, ge=0)
    disk_free_mb: float | None = Field(default=None, ge=0)
    python: str | None = Field(default=None, max_length=32)
    platform: str | None = Field(default=None, max_length=128)
    packages: dict[str, str] = Field(default_factory=dict, max_length=500)
    accelerators: list[str] = Field(default_factory=list, max_length=32)
    accuracy: float | None = None
    contribution: float | None = None
    current_task: str | None = Field(default=None, max_length=128)
    tasks: dict[str, TaskStats] = Field(default_factory=dict, max_length=100)
    labels: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    extra: dict[str, Any] = Field(default_factory=dict)


def device_row(device: Device) -> dict[str, Any]:
    return {"id": device.id, "online": device.online, "session": device.session,
            "last_seen": device.last_seen, "disconnections": device.disconnections,
            "first_seen": device.first_seen, "info_updated": device.info_updated, "info": device.info}


def flat_info(device: Device) -> dict[str, Any]:
    """What selection criteria see: the reported info, labels lifted to the top, and presence."""
    info = dict(device.info or {})
    for key, value in (info.get("labels") or {}).items():
        info.setdefault(key, value)
    info.update(device=device.id, online=device.online)
    return info


class PresenceTracker:
    """Applies presence messages with the session rule (see ``broker.presence``)."""

    def __init__(self, topics: Topics, events: EventLog) -> None:
        self.topics, self.events = topics, events
        self._lock = threading.Lock()

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) < 3 or not message.payload:
            return
        try:
            device_id = check_id(parts[-2], "device")
            presence = Presence.decode(message.payload)
        except (TopicError, ValueError, codec.CodecError) as exc:
            log.warning("ignored presence on %s: %s", message.topic, exc)
            return
        self.apply(device_id, presence)

    def apply(self, device_id: str, presence: Presence) -> bool:
        with self._lock, write_transaction():
            device, _ = Device.get_or_create(id=device_id)
            apply, dropped = newer(presence, device.session, device.online)
            if not apply:
                return False
            device.session = presence.session
            device.online = presence.state == ONLINE
            device.last_seen = time.time()
            if dropped:
                device.disconnections += 1
            device.save()
        self.events.record("device_online" if device.online else "device_offline", device=device_id,
                           data={"session": presence.session}, publish=False)
        return True


def make_device_service(events: EventLog) -> Service:
    service = Service("devices")

    @service.method
    def update_info(info: DeviceInfo, ctx: CallContext) -> dict[str, Any]:
        """A device reports its facts (it can only speak for itself: the caller is the device)."""
        payload = info.model_dump(exclude_none=True)
        if len(codec.encode(payload)) > MAX_INFO_BYTES:
            raise RpcError(ErrorCode.INVALID_ARGS, f"info larger than {MAX_INFO_BYTES} bytes")
        with write_transaction():
            device, created = Device.get_or_create(id=ctx.caller)
            device.info = payload
            device.info_updated = device.last_seen = time.time()
            device.save()
        if created:
            events.record("device_registered", device=ctx.caller, publish=False)
        return {"device": ctx.caller, "updated": device.info_updated}

    @service.method
    def get_info(device: str) -> dict[str, Any]:
        """One device: its info and presence."""
        row = Device.get_or_none(Device.id == device)
        if row is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"no device {device!r}")
        return device_row(row)

    @service.method(name="list")
    def list_(online: bool | None = None, limit: Annotated[int, Field(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        """Devices, optionally only online or offline ones."""
        query = Device.select().order_by(Device.id).limit(limit)
        if online is not None:
            query = query.where(Device.online == online)
        return [device_row(d) for d in query]

    return service
