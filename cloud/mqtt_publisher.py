"""The MQTT side of the cloud's ``Publisher`` port: announcements, commands, events and bundles
as messages on the broker.

Bundles: every chunk is a retained QoS 1 message ``bundles/<digest>/<index>`` (raw bytes), then
the manifest ``bundles/<digest>/manifest`` (JSON, for people and Node-RED as much as for devices)
-- manifest last, so whoever sees it finds every chunk already there.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection
from fedmq.broker.events import EventRecord, publish_event
from fedmq.broker.presence import Presence
from fedmq.broker.schema import DesiredModels, DeviceCommand, ModelManifest, TaskAnnouncement
from fedmq.broker.topics import Topics
from fedmq.cloud.bundle_store import BundleStore
from fedmq.ftdl.bundle import DEFAULT_CHUNK_SIZE, BundleManifest, rechunk
from fedmq.ftdl.chunks import clear_chunks, publish_chunks, split

log = logging.getLogger("fedmq.cloud.publisher")
ACK_TIMEOUT_S = 30.0


class MqttPublisher:
    def __init__(self, connection: MqttConnection, topics: Topics, store: BundleStore,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.connection, self.topics, self.store, self.chunk_size = connection, topics, store, chunk_size

    def announce(self, task_id: str, announcement: TaskAnnouncement | None) -> None:
        payload = b"" if announcement is None else codec.encode(announcement.to_wire(), codec.Codec.JSON)
        self.connection.publish(self.topics.task(task_id), payload, qos=1, retain=True)

    def presence(self, device: str, presence: Presence) -> None:
        """The device's retained state, said by the cloud: a revoked device's last will is not
        delivered (the broker checks it against ACLs that are already gone)."""
        self.connection.publish(self.topics.device_state(device), presence.encode(), qos=1, retain=True)

    def command(self, device: str, command: DeviceCommand) -> None:
        self.connection.publish(self.topics.device_cmd(device),
                                codec.encode(command.to_wire(), codec.Codec.JSON), qos=1)

    def event(self, record: EventRecord) -> None:
        publish_event(self.connection, self.topics, record, qos=0, component_topic=True)

    def publish_bundle(self, digest: str, on_chunk: Callable[[int, int], None] | None = None) -> BundleManifest:
        manifest = rechunk(self.store.manifest(digest), self.store.archive_path(digest), self.chunk_size)
        infos = []
        with self.store.archive_path(digest).open("rb") as archive:
            for index in range(manifest.chunk_count):
                data = archive.read(manifest.chunk_size)
                infos.append(self.connection.publish(self.topics.bundle_chunk(digest, index), data,
                                                     qos=1, retain=True))
                if on_chunk:
                    on_chunk(index + 1, manifest.chunk_count)
        for info in infos:  # every chunk acknowledged by the broker before the manifest appears
            info.wait_for_publish(ACK_TIMEOUT_S)
        self.connection.publish(self.topics.bundle_manifest(digest),
                                codec.encode(manifest.to_wire(), codec.Codec.JSON), qos=1,
                                retain=True).wait_for_publish(ACK_TIMEOUT_S)
        log.info("published bundle %s (%d chunks of %d bytes)", digest[:12], manifest.chunk_count,
                 manifest.chunk_size)
        return manifest

    def clear_bundle(self, digest: str) -> None:
        """An empty retained message deletes the retained one: manifest first, then chunks
        (as many as ``publish_bundle`` wrote at this publisher's chunk size)."""
        chunk_count = -(-self.store.manifest(digest).size // self.chunk_size)
        infos = [self.connection.publish(self.topics.bundle_manifest(digest), b"", qos=1, retain=True)]
        for index in range(chunk_count):
            infos.append(self.connection.publish(self.topics.bundle_chunk(digest, index), b"", qos=1,
                                                 retain=True))
        for info in infos:
            info.wait_for_publish(ACK_TIMEOUT_S)

    def desired_models(self, device: str, record: DesiredModels) -> None:
        """The device's desired models, retained (msgpack): a device that is away gets them on return."""
        self.connection.publish(self.topics.device_models(device), record.encode(), qos=1, retain=True)

    def publish_model(self, sha256: str, data: bytes) -> None:
        """A model file as retained chunks ``models/<sha256>/<i>``, acknowledged, then its manifest."""
        chunks = split(data, self.chunk_size)
        publish_chunks(self.connection, lambda i: self.topics.model_blob(sha256, i), chunks, timeout=ACK_TIMEOUT_S)
        manifest = ModelManifest(sha256=sha256, size=len(data), chunk_size=self.chunk_size,
                                 chunks=[hashlib.sha256(chunk).hexdigest() for chunk in chunks])
        self.connection.publish(self.topics.model_blob(sha256), manifest.encode(), qos=1,
                                retain=True).wait_for_publish(ACK_TIMEOUT_S)
        log.info("published model file %s (%d chunks of %d bytes)", sha256[:12], len(chunks), self.chunk_size)

    def clear_model(self, sha256: str, size: int) -> None:
        """Manifest first (nobody starts a download of what is going), then the chunks."""
        self.connection.publish(self.topics.model_blob(sha256), b"", qos=1, retain=True)
        clear_chunks(self.connection, lambda i: self.topics.model_blob(sha256, i), -(-size // self.chunk_size))
        log.info("cleared model file %s from the broker", sha256[:12])

    def clear_serverless(self, task_id: str, settle_s: float = 1.0, limit_s: float = 30.0) -> int:
        """Every retained message under ``tasks/<task>/fl/#`` -- the participants' states, updates,
        globals and blob chunks -- replaced by an empty retained one (which deletes it).  The
        retained messages arrive on subscribing; they are taken as all there once none has come
        for ``settle_s``."""
        found: set[str] = set()
        last = [time.monotonic()]

        def on_message(message: mqtt.MQTTMessage) -> None:
            if message.retain and message.payload:
                found.add(message.topic)
                last[0] = time.monotonic()

        tree = self.topics.fl_tree(task_id)
        self.connection.subscribe(tree, on_message, qos=0)
        try:
            deadline = time.monotonic() + limit_s
            while time.monotonic() < deadline and time.monotonic() - last[0] < settle_s:
                time.sleep(0.05)
        finally:
            self.connection.unsubscribe(tree)
        infos = [self.connection.publish(topic, b"", qos=1, retain=True) for topic in sorted(found)]
        for info in infos:
            info.wait_for_publish(ACK_TIMEOUT_S)
        return len(infos)
