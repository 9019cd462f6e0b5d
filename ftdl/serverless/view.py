"""What one participant sees of a serverless task: every participant's latest state, update and
global record of this run, kept from the retained ``fl`` topics by paho's thread and read under
one condition by the runner.

A global record is stored with the set of participants that were offline (or not electable) when
it arrived: whether its aggregator was the rightful one is judged against the view of that
moment, so a participant that published its global and then died is still its round's
aggregator for everyone who saw the global before the death (the broker delivers one
publisher's messages, and then its last will, in order).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from fedmq.broker.presence import ONLINE, newer
from fedmq.broker.topics import TopicError, Topics
from fedmq.ftdl.serverless.election import Candidate
from fedmq.ftdl.serverless.records import GlobalRecord, ParticipantState, RecordError, UpdateRecord

log = logging.getLogger("fedmq.ftdl.serverless")


@dataclass(frozen=True)
class SeenGlobal:
    record: GlobalRecord
    away: frozenset[str]      # devices offline or not electable when it arrived


class View:
    def __init__(self, topics: Topics, task: str, run: str) -> None:
        self.topics, self.task, self.run = topics, task, run
        self.changed = threading.Condition()
        self.states: dict[str, ParticipantState] = {}
        self.updates: dict[str, UpdateRecord] = {}
        self.globals: dict[str, SeenGlobal] = {}
        self.version = 0

    def subscribe(self, connection: Any) -> None:
        for leaf in ("state", "update", "global"):
            connection.subscribe(self.topics.fl_all(self.task, leaf), self.on_message, qos=1)

    # --- paho's thread ---------------------------------------------------------------------
    def on_message(self, message: Any) -> None:
        try:
            task, device, leaf = self.topics.parse_fl(message.topic)
        except TopicError:
            return
        if task != self.task or not message.payload:
            return
        try:
            self._apply(device, leaf, bytes(message.payload))
        except (RecordError, ValueError) as exc:
            log.info("ignored %s of %s: %s", leaf, device, exc)

    def _apply(self, device: str, leaf: str, payload: bytes) -> None:
        with self.changed:
            if leaf == "state":
                state = ParticipantState.decode(payload)
                if state.run != self.run:
                    return
                known = self.states.get(device)
                apply, _ = newer(state, known.session, known.state == ONLINE) if known else (True, False)
                if not apply and not (known and state.session == known.session and state != known):
                    return
                self.states[device] = state
            elif leaf == "update":
                update = UpdateRecord.decode(payload)
                if update.run != self.run or update.device != device:
                    return  # a record naming another device than the level it came from
                self.updates[device] = update
            else:
                record = GlobalRecord.decode(payload)
                if record.run != self.run or record.aggregator != device:
                    return
                self.globals[device] = SeenGlobal(record, frozenset(self._away()))
            self.version += 1
            self.changed.notify_all()

    # --- readers (hold ``changed``) --------------------------------------------------------
    def _away(self) -> set[str]:
        return {d for d, s in self.states.items() if s.state != ONLINE or not s.eligible}

    def away(self) -> set[str]:
        return self._away()

    def live(self) -> list[Candidate]:
        """Online, electable participants with their current sessions."""
        return [Candidate(d, s.session) for d, s in self.states.items() if s.state == ONLINE and s.eligible]

    def online(self) -> set[str]:
        return {d for d, s in self.states.items() if s.state == ONLINE}

    def wait(self, timeout: float) -> None:
        self.changed.wait(timeout)
