"""Device presence on ``devices/<id>/state`` (retained): the device's birth message and the
last will the broker publishes for it.

Both carry the device's session counter, which the device increments on every connect.  A
receiver keeps the highest session it has seen, so a last will that the broker delivers late --
after the device has already reconnected -- is recognised as stale and never marks a connected
device offline.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmq.broker import codec


class PresenceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


ONLINE, OFFLINE = PresenceState.ONLINE, PresenceState.OFFLINE


class Presence(BaseModel):
    """``{"state": "online"|"offline", "session": N, "ts": unix seconds}``"""

    model_config = ConfigDict(strict=True, extra="ignore")

    state: PresenceState
    session: Annotated[int, Field(ge=0)]
    ts: float = Field(default_factory=time.time)

    @field_validator("state", mode="before")
    @classmethod
    def _state(cls, value: Any) -> Any:
        return PresenceState(value) if value in ("online", "offline") else value

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: Any) -> float:
        # A missing or odd timestamp is not worth refusing presence for: it becomes now.
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else time.time()

    def encode(self) -> bytes:
        return codec.encode(self.model_dump(mode="json"), codec.Codec.JSON)

    @classmethod
    def decode(cls, payload: bytes) -> Presence:
        body, _ = codec.decode(payload)
        if not isinstance(body, dict):
            raise ValueError("presence must be an object")
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors(include_url=False) if e["loc"]})
            raise ValueError(f"presence needs state 'online' or 'offline' and a non-negative integer "
                             f"session (bad: {', '.join(fields)})") from None


def newer(incoming: Presence, known_session: int, known_online: bool) -> tuple[bool, bool]:
    """(apply?, counts as a disconnection?) for a presence message given what is known."""
    if incoming.session < known_session:
        return False, False  # stale: from a session the device has already left
    if incoming.session == known_session and incoming.state == ONLINE and known_online:
        return False, False  # a repeated birth
    dropped = incoming.state == OFFLINE and (known_online or incoming.session > known_session)
    return True, dropped
