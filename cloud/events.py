"""The event log: every step AGATA timed, recorded with a timestamp and the component that did it.

Events are rows in the database (for history and export) and, through the publisher port, JSON
messages on the broker: on ``tasks/<task>/events`` when they concern a task, and on
``events/<component>``, so Node-RED and ``mosquitto_sub`` see them live.  Edges publish their own
steps (bundle fetched, client started, rounds) on ``tasks/<task>/events``; the cloud records
those too (without publishing them again).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

from peewee import Database, ModelSelect

from fedmq.broker.events import EventKind, EventRecord
from fedmq.cloud.db import Event, insert_rows
from fedmq.cloud.ports import Publisher

# The experiment-1 timeline, in the order a run goes through it.
TIMELINE_STEPS = (EventKind.TASK_CREATED, EventKind.TASK_STARTED, EventKind.DEVICE_REQUESTED, EventKind.DEVICE_JOINED,
                  EventKind.BUNDLE_FETCHED, EventKind.CLIENT_STARTED, EventKind.ROUND_DONE,
                  EventKind.CLIENT_FINISHED, EventKind.TASK_FINISHED, EventKind.TASK_FAILED,
                  EventKind.TASK_STOPPED, EventKind.CLIENT_ERROR,
                  # serverless: who aggregated each round, failovers, refused updates, each participant's end
                  EventKind.FL_GLOBAL_PUBLISHED, EventKind.FL_FAILOVER, EventKind.FL_UPDATE_REJECTED,
                  EventKind.FL_ROUND_TIMEOUT, EventKind.FL_FINISHED)


# Data every event recorded in this context carries (``EventLog.context``): a caller that makes
# several changes through the domain (fedmq apply) says once where they came from.
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("fedmq_event_context", default=None)


class EventLog:
    def __init__(self, db: Database, publisher: Publisher | None, component: str = "cloud") -> None:
        self.db, self.publisher, self.component = db, publisher, component

    def record(self, kind: str, *, task: str | None = None, device: str | None = None,
               run: int | None = None, data: dict[str, Any] | None = None, component: str | None = None,
               ts: float | None = None, publish: bool = True) -> EventRecord:
        record = EventRecord(ts=ts or time.time(), component=component or self.component, kind=str(kind),
                             task=task, device=device, run=run, data={**(_CONTEXT.get() or {}), **(data or {})})
        Event.create(ts=record.ts, component=record.component, kind=record.kind, task=task, device=device,
                     run=run, data=record.data)
        if publish:
            self.publish(record)
        return record

    @staticmethod
    @contextlib.contextmanager
    def context(**data: Any) -> Iterator[None]:
        """Events recorded inside the block, on this thread, carry ``data`` too (an event's own
        keys win): the lifecycle's task events name the file an apply came from without every
        verb of the lifecycle taking a parameter for it."""
        token = _CONTEXT.set({**(_CONTEXT.get() or {}), **data})
        try:
            yield
        finally:
            _CONTEXT.reset(token)

    def record_many(self, records: list[EventRecord]) -> list[EventRecord]:
        """Rows in one statement, published by the caller (``publish``) once committed."""
        insert_rows(Event, [Event.ts, Event.component, Event.kind, Event.task, Event.device, Event.run, Event.data],
                    [(r.ts, r.component, str(r.kind), r.task, r.device, r.run, r.data) for r in records])
        return records

    def publish(self, record: EventRecord) -> None:
        """On the broker: done after the commit when the row is written in a batch."""
        if self.publisher is not None:
            self.publisher.event(record)

    @staticmethod
    def query(task: str, run: int | None = None, kinds: tuple[str, ...] | None = None) -> ModelSelect[Event]:
        """A task's events (of one run, with the run-less ones) in time order."""
        query = Event.select().where(Event.task == task)
        if run is not None:
            query = query.where((Event.run == run) | (Event.run.is_null()))
        if kinds is not None:
            query = query.where(Event.kind.in_([str(k) for k in kinds]))
        return query.order_by(Event.ts, Event.id)

    @staticmethod
    def record_of(row: Event) -> EventRecord:
        return EventRecord(ts=row.ts, component=row.component, kind=row.kind, task=row.task, device=row.device,
                           run=row.run, data=row.data)

    @classmethod
    def for_task(cls, task: str, run: int | None = None, limit: int = 10000,
                 kinds: tuple[str, ...] | None = None) -> list[EventRecord]:
        return [cls.record_of(e) for e in cls.query(task, run, kinds).limit(limit)]


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
        if event.kind == EventKind.ROUND_DONE:
            label = f"round {event.data.get('round')}"
        elif event.kind == EventKind.FL_GLOBAL_PUBLISHED:  # the device column says who aggregated
            label = f"{'final' if event.data.get('final') else 'global'} {event.data.get('round')} aggregated"
        elif event.kind == EventKind.FL_FAILOVER:
            label = f"failover {event.data.get('round')}: {event.data.get('lost')} -> {event.data.get('aggregator')}"
        rows.append({"step": label, "task": event.task, "component": event.component, "device": event.device,
                     "t_s": round(event.ts - origin, 3), "delta_s": round(event.ts - previous, 3),
                     "ts": event.ts})
        previous = event.ts
    return rows
