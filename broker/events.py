"""The wire shape of an event on ``tasks/<task>/events`` and ``events/<component>``: one
definition for the cloud that records and publishes events and the edges that publish theirs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from broker.topics import TopicError, check_id

MAX_KIND_LENGTH = 64


@dataclass
class EventRecord:
    ts: float
    component: str
    kind: str
    task: str | None
    device: str | None
    run: int | None
    data: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, body: Any, task: str) -> "EventRecord | None":
        """An event as another party published it, or None if it is not one.  Types are checked,
        ids are checked like topic levels; a missing or odd timestamp becomes now."""
        if not isinstance(body, dict):
            return None
        kind, device, component = body.get("kind"), body.get("device"), body.get("component")
        if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_LENGTH:
            return None
        if device is not None:
            try:
                check_id(device, "device")
            except TopicError:
                return None
        ts, run, data = body.get("ts"), body.get("run"), body.get("data")
        return cls(ts=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else time.time(),
                   component=component if isinstance(component, str) else "",
                   kind=kind, task=task, device=device,
                   run=run if isinstance(run, int) and not isinstance(run, bool) else None,
                   data=data if isinstance(data, dict) else {})
