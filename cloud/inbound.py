"""What the cloud hears on the broker besides RPC: devices' presence (``devices/+/state``), task
announcements (``tasks/+``, for replicas), the steps edges publish on ``tasks/+/events`` and the
global records of serverless participants (``tasks/+/fl/+/global``).  The
MQTT side of those subscriptions: parse, check, and hand typed values to the domain."""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt

from fedmq.broker import codec
from fedmq.broker.events import EventKind, EventRecord
from fedmq.broker.presence import Presence
from fedmq.broker.topics import TopicError, Topics, check_id
from fedmq.cloud.devices import DeviceRegistry
from fedmq.cloud.events import EventLog
from fedmq.cloud.serverless_runs import ServerlessRuns
from fedmq.cloud.task_lifecycle import TaskLifecycle
from fedmq.ftdl.serverless.records import GlobalRecord, RecordError

log = logging.getLogger("fedmq.cloud.inbound")
MAX_EVENT_BYTES = 16 * 1024
EVENT_RATE, EVENT_BURST = 20.0, 200.0  # per device: a training device sends a few per round
DROP_REPORT_S = 60.0


class Inbound:
    def __init__(self, registry: DeviceRegistry, lifecycle: TaskLifecycle, events: EventLog,
                 serverless: ServerlessRuns | None = None, topics: Topics | None = None) -> None:
        self.registry, self.lifecycle, self.events = registry, lifecycle, events
        self.serverless, self.topics = serverless, topics or Topics()
        self._limiter = RateLimiter(EVENT_RATE, EVENT_BURST)
        self._dropped: dict[str, int] = {}
        self._reported: dict[str, float] = {}

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

    def on_announcement(self, message: mqtt.MQTTMessage) -> None:
        """A task's retained announcement (ours or another replica's): the owner of its server
        stops it when another replica stopped the task."""
        if not message.payload:
            return  # a deleted task's cleared announcement: its stop was announced before
        try:
            task_id = check_id(message.topic.split("/")[-1], "task")
            body, _ = codec.decode(bytes(message.payload))
            state, run = body["state"], body["run"]
            if not isinstance(state, str) or not isinstance(run, int):
                raise ValueError("state and run must be a string and a number")
        except (TopicError, ValueError, KeyError, TypeError, codec.CodecError) as exc:
            log.warning("ignored announcement on %s: %s", message.topic, exc)
            return
        self.lifecycle.on_announcement(task_id, state, run)

    def on_fl_global(self, message: mqtt.MQTTMessage) -> None:
        """A serverless participant's retained ``global`` record on ``tasks/<task>/fl/<device>/global``
        (msgpack); an empty one is a record cleared at the end of a run."""
        if not message.payload or self.serverless is None:
            return
        try:
            task_id, device, _leaf = self.topics.parse_fl(message.topic)
            record = GlobalRecord.decode(bytes(message.payload))
        except (TopicError, RecordError) as exc:
            log.warning("ignored serverless record on %s: %s", message.topic, exc)
            return
        self.serverless.on_global(task_id, device, record)

    def on_device_event(self, message: mqtt.MQTTMessage) -> None:
        """A device's step on ``tasks/<task>/events/<device>`` (JSON or msgpack).  The topic names
        the device -- the broker lets only that device publish there -- and the payload may not
        say otherwise.  Oversized events and a device's flood beyond its rate are dropped (and
        counted in a ``device_events_dropped`` event, at most one a minute per device)."""
        parts = message.topic.split("/")
        try:
            task_id, device = check_id(parts[-3], "task"), check_id(parts[-1], "device")
        except (TopicError, IndexError):
            return
        if len(message.payload) > MAX_EVENT_BYTES:
            self._drop(device, task_id, f"{len(message.payload)} bytes, over {MAX_EVENT_BYTES}")
            return
        if not self._limiter.allow(device):
            self._drop(device, task_id, f"more than {EVENT_RATE:g} events/s")
            return
        try:
            body, _ = codec.decode(message.payload)
        except codec.CodecError:
            self._drop(device, task_id, "not JSON or msgpack")
            return
        if isinstance(body, dict) and body.get("device", device) != device:
            self._drop(device, task_id, f"it names another device ({str(body.get('device'))[:64]!r})")
            return
        event = EventRecord.from_wire({**body, "device": device} if isinstance(body, dict) else body, task_id)
        if event is None:
            self._drop(device, task_id, "not an event")
            return
        self.events.record(event.kind, task=task_id, device=device, run=event.run, data=event.data,
                           component=f"edge.{device}"[:128], ts=event.ts, publish=False)
        self.lifecycle.on_device_step(task_id, device, event.kind)

    def _drop(self, device: str, task: str, why: str) -> None:
        count = self._dropped.get(device, 0) + 1
        self._dropped[device] = count
        now = time.monotonic()
        if now - self._reported.get(device, 0.0) >= DROP_REPORT_S:
            self._reported[device] = now
            self._dropped[device] = 0
            log.warning("dropped %d event(s) from %s on task %s: %s", count, device, task, why)
            self.events.record(EventKind.DEVICE_EVENTS_DROPPED, task=task, device=device,
                               data={"dropped": count, "reason": why})


class RateLimiter:
    """A token bucket per key: ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1, now)
            return True
