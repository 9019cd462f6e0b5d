"""Replicas of the cloud: each says it is alive on ``replicas/<id>/state`` (retained; the broker
publishes its last will when the connection dies), and each hears the others.

A running task's Flower server is a child process of the replica that started it (the task's
``owner``).  When that replica goes offline its servers are gone, so a survivor fails its running
tasks and stops their devices -- the rest of the fleet and every other task carry on.  Presence
uses the device presence format with a session counter (the connect time in milliseconds), so a
stale last will that arrives after the replica came back is recognised and ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from fedmq.broker.connection import MqttConnection, Will
from fedmq.broker.presence import OFFLINE, ONLINE, Presence, PresenceState
from fedmq.broker.topics import TopicError, Topics, check_id

log = logging.getLogger("fedmq.cloud.replicas")


class ReplicaPresence:
    def __init__(self, connection: MqttConnection, topics: Topics, replica: str,
                 on_lost: Callable[[str], object]) -> None:
        self.connection, self.topics = connection, topics
        self.replica = check_id(replica, "replica")
        self.on_lost = on_lost
        self.session = 0
        self._seen: dict[str, int] = {}  # the highest session heard from each replica
        self._lock = threading.Lock()

    def will(self) -> Will:
        """Asked by the connection before every connect: a new session each time."""
        self.session = max(self.session + 1, int(time.time() * 1000))
        return Will(self.topics.replica_state(self.replica), Presence(state=OFFLINE, session=self.session).encode())

    def _say(self, state: PresenceState) -> mqtt.MQTTMessageInfo:
        return self.connection.publish(self.topics.replica_state(self.replica),
                                       Presence(state=state, session=self.session).encode(), qos=1, retain=True)

    def birth(self) -> None:
        self._say(ONLINE)

    def goodbye(self, timeout: float = 5.0) -> None:
        """A clean stop fires no last will: say offline ourselves (our servers are stopped)."""
        try:
            self._say(OFFLINE).wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            log.warning("could not say offline before stopping (the last will is not sent on a clean stop)")

    def on_state(self, message: mqtt.MQTTMessage) -> None:
        """paho's thread: note the state; a replica lost is handled on a thread of its own."""
        if not message.payload:
            return
        try:
            replica = message.topic.split("/")[-2]
            check_id(replica, "replica")
            presence = Presence.decode(bytes(message.payload))
        except (TopicError, ValueError) as exc:
            log.warning("ignored replica state on %s: %s", message.topic, exc)
            return
        if replica == self.replica:
            return  # our own birth, or the will of our previous process (reconcile handled it)
        with self._lock:
            if presence.session < self._seen.get(replica, 0):
                return  # stale: that replica has connected again since
            self._seen[replica] = presence.session
        if presence.state == OFFLINE:
            log.warning("replica %s went offline: its running tasks are failed here", replica)
            threading.Thread(target=self._lost, args=(replica,), name=f"replica-lost-{replica}", daemon=True).start()

    def _lost(self, replica: str) -> None:
        try:
            self.on_lost(replica)
        except Exception:
            log.exception("handling the loss of replica %s failed", replica)
