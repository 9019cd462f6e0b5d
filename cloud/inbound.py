"""What the cloud hears on the broker besides RPC: devices' presence (``devices/+/state``) and
the steps edges publish on ``tasks/+/events``.  The MQTT side of those subscriptions: parse,
check, and hand typed values to the domain."""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt

from fedmq.broker import codec
from fedmq.broker.events import EventRecord
from fedmq.broker.presence import Presence
from fedmq.broker.topics import TopicError, check_id
from fedmq.cloud.devices import DeviceRegistry
from fedmq.cloud.events import EventLog
from fedmq.cloud.task_lifecycle import TaskLifecycle

log = logging.getLogger("fedmq.cloud.inbound")


class Inbound:
    def __init__(self, registry: DeviceRegistry, lifecycle: TaskLifecycle, events: EventLog) -> None:
        self.registry, self.lifecycle, self.events = registry, lifecycle, events

    def on_presence(self, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) < 3 or not message.payload:
            return
        try:
            device_id = check_id(parts[-2], "device")
            presence = Presence.decode(bytes(message.payload))
        except (TopicError, ValueError, codec.CodecError) as exc:
            log.warning("ignored presence on %s: %s", message.topic, exc)
            return
        self.registry.apply_presence(device_id, presence)

    def on_task_event(self, message: mqtt.MQTTMessage) -> None:
        """Steps reported by edges on ``tasks/<id>/events`` (JSON or msgpack).  Our own events come
        back here too and are skipped (already recorded); one without a device is not an edge's."""
        try:
            body, _ = codec.decode(message.payload)
            task_id = check_id(message.topic.split("/")[-2], "task")
        except (codec.CodecError, TopicError, IndexError):
            return
        event = EventRecord.from_wire(body, task_id)
        if event is None or event.device is None or event.component == self.events.component:
            return
        self.events.record(event.kind, task=task_id, device=event.device, run=event.run, data=event.data,
                           component=f"edge.{event.device}"[:128], ts=event.ts, publish=False)
        self.lifecycle.on_device_step(task_id, event.device, event.kind)
