"""Device presence on ``devices/<id>/state`` (retained): the device's birth message and the
last will the broker publishes for it.

Both carry the device's session counter, which the device increments on every connect.  A
receiver keeps the highest session it has seen, so a last will that the broker delivers late --
after the device has already reconnected -- is recognised as stale and never marks a connected
device offline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from broker import codec

ONLINE, OFFLINE = "online", "offline"


@dataclass
class Presence:
    state: str
    session: int
    ts: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return codec.encode(asdict(self), codec.Codec.JSON)

    @classmethod
    def decode(cls, payload: bytes) -> "Presence":
        body, _ = codec.decode(payload)
        if not isinstance(body, dict) or body.get("state") not in (ONLINE, OFFLINE):
            raise ValueError("presence needs state 'online' or 'offline'")
        session, ts = body.get("session"), body.get("ts", time.time())
        if not isinstance(session, int) or isinstance(session, bool) or session < 0:
            raise ValueError("presence needs a non-negative integer session")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            ts = time.time()
        return cls(body["state"], session, float(ts))


def newer(incoming: Presence, known_session: int, known_online: bool) -> tuple[bool, bool]:
    """(apply?, counts as a disconnection?) for a presence message given what is known."""
    if incoming.session < known_session:
        return False, False  # stale: from a session the device has already left
    if incoming.session == known_session and incoming.state == ONLINE and known_online:
        return False, False  # a repeated birth
    dropped = incoming.state == OFFLINE and (known_online or incoming.session > known_session)
    return True, dropped
