"""Content in retained chunks over MQTT: publish a byte string as numbered chunks, fetch it back
verified, a window of chunks at a time.

The generic half of the bundle transport, for content that fits in memory (model weights in
serverless training): each chunk is a retained QoS 1 message on ``topic_of(index)`` and is checked
against its SHA-256 from a manifest the caller has already verified; the whole is checked against
its digest.  Chunks are requested by subscribing to their exact retained topics, ``window`` at a
time, so what is in flight stays bounded; a ``ChunkFetch`` keeps what it has received, and the
connection re-subscribes after a reconnect, so a lost connection costs only the chunks that had
not arrived.  (``edge.bundle_fetch`` does the same into a file on disk; it could be built on
``ChunkFetch`` with a sink that writes at offsets.)
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedmq.broker.errors import Invalid, NotFound
from fedmq.ftdl.bundle import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

DEFAULT_WINDOW = 16

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_WINDOW", "MAX_CHUNK_SIZE", "MIN_CHUNK_SIZE", "ChunkError",
           "ChunkFetch", "check_chunk_size", "clear_chunks", "publish_chunks", "split", "wait_retained"]


class ChunkError(Invalid):
    """Content that must not be used; ``code`` in one word: ``tampered_chunk``,
    ``digest_mismatch``, ``timeout``, ``not_found``, ``bad_manifest``, ``bad_shape``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, {"reason": code})
        self.code = code


class ChunkTimeout(NotFound, ChunkError):
    """Nothing arrived for too long (resumable: what did arrive is kept)."""


def check_chunk_size(chunk_size: int) -> int:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChunkError("bad_manifest", f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return chunk_size


def split(data: bytes, chunk_size: int) -> list[bytes]:
    check_chunk_size(chunk_size)
    if not data:  # an empty retained message deletes: empty content cannot be stored
        raise ChunkError("bad_manifest", "cannot publish empty content")
    return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]


def publish_chunks(connection: Any, topic_of: Callable[[int], str], chunks: Sequence[bytes], *,
                   timeout: float = 60.0) -> None:
    """Publish every chunk retained at QoS 1 and wait until the broker has acknowledged them all,
    so that whoever later sees the manifest finds every chunk.  ``connection`` is an
    ``MqttConnection`` (or anything with its ``publish``)."""
    infos = [connection.publish(topic_of(i), chunk, qos=1, retain=True) for i, chunk in enumerate(chunks)]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.01, deadline - time.monotonic()))
        if not info.is_published():
            raise ChunkError("timeout", f"the broker did not acknowledge {len(infos)} chunks within {timeout:g} s")


def wait_retained(connection: Any, topic: str, timeout: float) -> bytes | None:
    """The retained (or next) non-empty message on ``topic``, or None after ``timeout``."""
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(message: Any) -> None:
        if message.payload:
            got.append(bytes(message.payload))
            arrived.set()

    connection.subscribe(topic, on_message, qos=1)
    try:
        arrived.wait(timeout)
    finally:
        connection.unsubscribe(topic)
    return got[-1] if got else None


def clear_chunks(connection: Any, topic_of: Callable[[int], str], count: int) -> None:
    """Delete retained chunks (an empty retained message deletes one)."""
    for index in range(count):
        connection.publish(topic_of(index), b"", qos=1, retain=True)


class ChunkFetch:
    """One download of ``len(digests)`` chunks into memory; its callbacks run in paho's thread."""

    def __init__(self, connection: Any, topic_of: Callable[[int], str], digests: Sequence[str], *,
                 window: int = DEFAULT_WINDOW, on_progress: Callable[[int, int], None] | None = None) -> None:
        self.connection, self.topic_of, self.digests = connection, topic_of, list(digests)
        self.window = max(1, window)
        self.on_progress = on_progress
        self.parts: dict[int, bytes] = {}
        self.pending = list(reversed(range(len(self.digests))))
        self.outstanding: set[int] = set()
        self.failure: ChunkError | None = None
        self.done = threading.Condition()
        self.last_activity = time.monotonic()

    def _request_more(self) -> None:
        while self.pending and len(self.outstanding) < self.window:
            index = self.pending.pop()
            self.outstanding.add(index)
            self.connection.subscribe(self.topic_of(index), self._on_chunk, qos=1, wait=False)

    def _index(self, topic: str) -> int | None:
        try:
            index = int(topic.rsplit("/", 1)[1])
        except (ValueError, IndexError):
            return None
        return index if 0 <= index < len(self.digests) and self.topic_of(index) == topic else None

    def _on_chunk(self, message: Any) -> None:
        index = self._index(message.topic)
        if index is None:
            return
        with self.done:
            if index not in self.outstanding or self.failure is not None:
                return
            payload = bytes(message.payload)
            if not payload:
                self.failure = ChunkError("not_found", "the content was removed from the broker during the download")
            elif hashlib.sha256(payload).hexdigest() != self.digests[index]:
                self.failure = ChunkError("tampered_chunk", f"chunk {index} does not match its digest")
            else:
                self.parts[index] = payload
                self.outstanding.discard(index)
                self.last_activity = time.monotonic()
                self.connection.unsubscribe(self.topic_of(index))
                self._request_more()
                if self.on_progress is not None:
                    self.on_progress(len(self.parts), len(self.digests))
            if self.failure is not None or (not self.outstanding and not self.pending):
                self.done.notify_all()

    def wait(self, stall_timeout: float) -> bytes:
        """The content, once every chunk has arrived verified; raises ``ChunkError``."""
        try:
            with self.done:
                if isinstance(self.failure, ChunkTimeout):  # resuming: go on with what is missing
                    self.failure = None
                self.last_activity = time.monotonic()
                self._request_more()
                while (self.outstanding or self.pending) and self.failure is None:
                    self.done.wait(0.5)
                    if time.monotonic() - self.last_activity > stall_timeout:
                        self.failure = ChunkTimeout(
                            "timeout", f"no chunk arrived for {stall_timeout:g} s "
                                       f"({len(self.parts)}/{len(self.digests)} fetched; resumable)")
            if self.failure is not None:
                raise self.failure
            return b"".join(self.parts[i] for i in range(len(self.digests)))
        finally:
            self.close()

    def close(self) -> None:
        with self.done:
            outstanding, self.outstanding = list(self.outstanding), set()
            self.pending = [i for i in reversed(range(len(self.digests))) if i not in self.parts]
        for index in outstanding:
            self.connection.unsubscribe(self.topic_of(index))

