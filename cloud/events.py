"""The event log: every step AGATA timed, recorded with a timestamp and the component that did it.

Events are rows in the database (for history and export) and JSON messages on the broker: on
``tasks/<task>/events`` when they concern a task, and on ``events/<component>``, so Node-RED and
``mosquitto_sub`` see them live.  Edges publish their own steps (bundle fetched, client started,
rounds) on ``tasks/<task>/events``; the cloud records those too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from broker import codec
from broker.connection import MqttConnection
from broker.events import EventRecord
from broker.topics import Topics
from cloud.db import Event

log = logging.getLogger("fedmq.cloud.events")

# The experiment-1 timeline, in the order a run goes through it.
TIMELINE_STEPS = ("task_created", "task_started", "device_requested", "bundle_fetched",
                  "client_started", "round_done", "client_finished", "task_finished", "task_failed",
                  "task_stopped", "client_error")


class EventLog:
    def __init__(self, connection: MqttConnection | None, topics: Topics, component: str = "cloud") -> None:
        self.connection, self.topics, self.component = connection, topics, component

    def record(self, kind: str, *, task: str | None = None, device: str | None = None,
               run: int | None = None, data: dict[str, Any] | None = None, component: str | None = None,
               ts: float | None = None, publish: bool = True) -> EventRecord:
        record = EventRecord(ts or time.time(), component or self.component, kind, task, device, run, data or {})
        Event.create(ts=record.ts, component=record.component, kind=kind, task=task, device=device,
                     run=run, data=record.data)
        if publish and self.connection is not None:
            payload = codec.encode(record.to_wire(), codec.Codec.JSON)
            if task:
                self.connection.publish(self.topics.task_events(task), payload, qos=0)
            self.connection.publish(self.topics.events(record.component), payload, qos=0)
        return record

    @staticmethod
    def for_task(task: str, run: int | None = None, limit: int = 10000) -> list[EventRecord]:
        query = Event.select().where(Event.task == task)
        if run is not None:
            query = query.where((Event.run == run) | (Event.run.is_null()))
        return [EventRecord(e.ts, e.component, e.kind, e.task, e.device, e.run, e.data)
                for e in query.order_by(Event.ts, Event.id).limit(limit)]


def timeline(events: list[EventRecord]) -> list[dict[str, Any]]:
    """Per-step timing: seconds since the first step and since the previous one (events in time order)."""
    rows: list[dict[str, Any]] = []
    steps = [e for e in events if e.kind in TIMELINE_STEPS]
    if not steps:
        return rows
    origin = steps[0].ts
    previous = origin
    for event in steps:
        label = event.kind
        if event.kind == "round_done":
            label = f"round {event.data.get('round')}"
        rows.append({"step": label, "task": event.task, "component": event.component, "device": event.device,
                     "t_s": round(event.ts - origin, 3), "delta_s": round(event.ts - previous, 3),
                     "ts": event.ts})
        previous = event.ts
    return rows
