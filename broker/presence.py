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
from typing import Annotated, Self

import msgspec
from msgspec import Meta, field

from fedmq.broker import codec
from fedmq.broker.wire import Wire, problem


class PresenceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


ONLINE, OFFLINE = PresenceState.ONLINE, PresenceState.OFFLINE


class Presence(Wire, kw_only=True):
    """``{"state": "online"|"offline", "session": N, "ts": unix seconds}``"""

    state: PresenceState
    session: Annotated[int, Meta(ge=0)]
    ts: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return codec.encode(self.to_wire(), codec.Codec.JSON)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        body, _ = codec.decode(payload)
        if not isinstance(body, dict):
            raise ValueError("presence must be an object")
        ts = body.get("ts")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            # A missing or odd timestamp is not worth refusing presence for: it becomes now.
            body = {**body, "ts": time.time()}
        try:
            return msgspec.convert(body, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"presence needs state 'online' or 'offline' and a non-negative integer "
                             f"session ({problem(exc)})") from None


def newer(incoming: Presence, known_session: int, known_online: bool) -> tuple[bool, bool]:
    """(apply?, counts as a disconnection?) for a presence message given what is known."""
    if incoming.session < known_session:
        return False, False  # stale: from a session the device has already left
    if incoming.session == known_session and incoming.state == ONLINE and known_online:
        return False, False  # a repeated birth
    dropped = incoming.state == OFFLINE and (known_online or incoming.session > known_session)
    return True, dropped
