"""The one port through which the cloud's domain tells the world what changed.

The domain (task lifecycle, selection, device registry, event log, bundle store) knows nothing
of MQTT: it hands typed messages to a ``Publisher``.  ``cloud.mqtt_publisher.MqttPublisher`` is
the implementation that puts them on the broker; tests may pass another.
"""

from __future__ import annotations

from typing import Protocol

from fedmq.broker.events import EventRecord
from fedmq.broker.presence import Presence
from fedmq.broker.schema import DeviceCommand, TaskAnnouncement
from fedmq.ftdl.bundle import BundleManifest


class Publisher(Protocol):
    def announce(self, task_id: str, announcement: TaskAnnouncement | None) -> None:
        """Retain the task's announcement; ``None`` clears it (the task is gone)."""

    def command(self, device: str, command: DeviceCommand) -> None:
        """Send a command to one device (queued for it while it is away)."""

    def presence(self, device: str, presence: Presence) -> None:
        """Retain a device's state in its place (a revoked device's last will never comes)."""

    def event(self, record: EventRecord) -> None:
        """Publish an event for live watchers (it is recorded separately)."""

    def publish_bundle(self, digest: str) -> BundleManifest:
        """Put a stored bundle on the broker as retained chunks, then its manifest."""

    def clear_bundle(self, digest: str) -> None:
        """Take a bundle's retained messages off the broker."""

    def clear_serverless(self, task_id: str) -> int:
        """Take a serverless task's retained records and blobs (``tasks/<task>/fl/…``) off the
        broker; returns how many messages were cleared."""
