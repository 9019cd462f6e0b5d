"""Fetching a bundle from the broker on a device: streamed, verified, resumable, unpacked safely.

The archive is assembled in place in ``partial/<digest>.tar.gz`` (chunks written at their
offsets), so memory holds a few chunks, never the bundle.  Which chunks are present is decided by
their content: on start every chunk slot of a partial file is hashed against the manifest, so a
crash or a lost connection costs only the chunks that never arrived intact -- no bookkeeping file
that a crash could leave out of step with the data.

Chunks are requested by subscribing to their exact retained topics, a window at a time, which
bounds what is in flight and means a resumed download asks only for what is missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection
from fedmq.broker.topics import TopicError, Topics, check_digest
from fedmq.ftdl.bundle import BundleError, BundleManifest, Limits, file_digest, safe_unpack
from fedmq.ftdl.manifest import TaskManifest, load_manifest
from fedmq.ftdl.signing import TrustStore

log = logging.getLogger("fedmq.edge.bundle_fetch")

# Flow control: the chunks subscribed at a time.  What is in flight waits in the broker's queue for
# this client and in the kernel's socket buffers -- the process itself holds one chunk at a time --
# so the window is sized to hide the broker's reply latency (a busy broker takes 100+ ms to answer
# a SUBSCRIBE), not by device memory.  By default 8 MiB of chunks (128 of 64 KiB), at most 256: far
# below Mosquitto's per-client queue (max_queued_messages, default 1000).
DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
MAX_WINDOW = 256
# A fresh download of at most this much is asked for with one wildcard subscription instead: the
# broker then walks its retained tree once and streams every chunk (a third of the broker CPU of
# exact subscriptions, measured in bench.bundles).  Bounded so that everything queued at once for
# the client stays far inside Mosquitto's per-client queue (max_queued_messages 1000 by default,
# 10,000 and max_queued_bytes 100 MB in the shipped mosquitto.conf).
STREAM_MAX_CHUNKS = 512
STREAM_MAX_BYTES = 32 * 1024 * 1024


@dataclass
class FetchResult:
    digest: str
    path: Path
    cached: bool = False
    downloaded_chunks: int = 0
    reused_chunks: int = 0
    total_chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0


class _Download:
    """State of one archive being assembled; its callbacks run in paho's thread.

    Flow control is a window of exact chunk subscriptions, refilled in batches: when half the
    window has arrived, one UNSUBSCRIBE drops the chunks received and one SUBSCRIBE (many topic
    filters in one packet) asks for the next ones, so the broker streams retained chunks back to
    back instead of waiting for a round trip per chunk.  Exact topics (never ``+``) keep resume
    exact -- present chunks are never sent again -- and keep what the broker queues for this
    client bounded by the window whatever the bundle's size (a wildcard would queue every chunk
    at once and a broker drops what exceeds its per-client queue)."""

    def __init__(self, fetcher: BundleFetcher, manifest: BundleManifest, path: Path,
                 missing: list[int]) -> None:
        self.fetcher, self.manifest, self.path = fetcher, manifest, path
        self.client = fetcher.connection.client
        self.window = fetcher.window or max(8, min(MAX_WINDOW, DEFAULT_WINDOW_BYTES // manifest.chunk_size))
        self.batch = max(1, self.window // 4)
        self.prefix = fetcher.topics.bundle_chunk(manifest.digest, 0)[:-1]
        self.stream = (fetcher.window is None and len(missing) == manifest.chunk_count
                       and manifest.chunk_count <= STREAM_MAX_CHUNKS and manifest.size <= STREAM_MAX_BYTES)
        self.pending = list(reversed(missing))
        self.outstanding: set[int] = set()
        self.received_topics: list[str] = []
        self.total_missing = len(missing)
        self.received = 0
        self.failure: BundleError | None = None
        self.done = threading.Condition()
        self.fd = os.open(path, os.O_RDWR)
        self.last_activity = time.monotonic()
        self.client.message_callback_add(self.prefix + "+", self._on_message)

    def request_more(self) -> None:
        """Top the window up once a quarter of it has arrived (called with ``done`` held)."""
        if self.stream and self.pending:  # every chunk is missing: one wildcard asks for them all
            self.outstanding.update(self.pending)
            self.pending = []
            self.client.subscribe(self.prefix + "+", 1)
            return
        if not self.pending or len(self.outstanding) > self.window - self.batch:
            return
        if self.received_topics:
            self.client.unsubscribe(self.received_topics)
            self.received_topics = []
        batch = []
        while self.pending and len(self.outstanding) < self.window:
            index = self.pending.pop()
            self.outstanding.add(index)
            batch.append((self.prefix + str(index), 1))
        self.client.subscribe(batch)  # while disconnected this is a no-op: resubscribe() covers it

    def resubscribe(self) -> None:
        """After a reconnect (paho's thread): ask again for what was in flight, by exact topics
        (also after a wildcard: what has arrived is not sent again)."""
        with self.done:
            if self.outstanding and self.failure is None:
                self.client.subscribe([(self.prefix + str(i), 1) for i in sorted(self.outstanding)])

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self.on_chunk(message)
        except Exception:  # never let an exception out into paho's network thread
            log.exception("bundle chunk handler failed for %s", message.topic)

    def on_chunk(self, message: mqtt.MQTTMessage) -> None:
        suffix = message.topic[len(self.prefix):]
        if not suffix.isdigit():  # the manifest, or something that is no chunk of ours
            return
        index = int(suffix)
        with self.done:
            if index not in self.outstanding or self.failure is not None:
                return
            payload = message.payload
            if not payload:  # cleared while we were fetching: the bundle was removed
                self.failure = BundleError("not_found", "the bundle was removed from the broker during the download")
                self.done.notify_all()
                return
            if hashlib.sha256(payload).hexdigest() != self.manifest.chunks[index]:
                self.failure = BundleError("tampered_chunk", f"chunk {index} does not match its digest")
                self.done.notify_all()
                return
            if os.pwrite(self.fd, payload, index * self.manifest.chunk_size) != len(payload):
                self.failure = BundleError("corrupt", f"chunk {index} could not be written in full")
                self.done.notify_all()
                return
            self.outstanding.discard(index)
            if not self.stream:
                self.received_topics.append(message.topic)
            self.received += 1
            self.last_activity = time.monotonic()
            self.request_more()
            self.fetcher._progress(self.manifest, self.received, self.total_missing)
            if not self.outstanding and not self.pending:
                self.done.notify_all()

    def wait(self, stall_timeout: float) -> None:
        with self.done:
            self.request_more()
            while (self.outstanding or self.pending) and self.failure is None:
                self.done.wait(1.0)
                if time.monotonic() - self.last_activity > stall_timeout:
                    self.failure = BundleError(
                        "timeout", f"no chunk arrived for {stall_timeout:g} s "
                                   f"({self.received}/{self.total_missing} fetched; resumable)")
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Drop the subscriptions and the callback.  No fsync: the partial file is checked by
        content on resume, and deleted once unpacked."""
        with self.done:
            leftover = self.received_topics + [self.prefix + str(i) for i in self.outstanding]
            if self.stream:
                leftover = [self.prefix + "+", *(self.prefix + str(i) for i in self.outstanding)]
            self.received_topics, self.outstanding, self.pending = [], set(), []
        if leftover and self.fetcher.connection.connected.is_set():
            self.client.unsubscribe(leftover)
        self.client.message_callback_remove(self.prefix + "+")
        os.close(self.fd)


class BundleFetcher:
    def __init__(self, connection: MqttConnection, topics: Topics, cache_dir: Path | str, *,
                 trust: TrustStore | None = None, allow_unsigned: bool = False,
                 limits: Limits = Limits(), window: int | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_progress: Callable[[int, int, BundleManifest], None] | None = None) -> None:
        self.connection, self.topics = connection, topics
        self.cache = Path(cache_dir)
        self.trust = trust
        self.allow_unsigned = allow_unsigned
        self.limits = limits
        self.window = None if window is None else max(1, window)  # None: DEFAULT_WINDOW_BYTES of chunks
        self.on_event = on_event or (lambda kind, data: None)
        self.on_progress = on_progress
        (self.cache / "bundles").mkdir(parents=True, exist_ok=True)
        (self.cache / "partial").mkdir(parents=True, exist_ok=True)
        self._downloads: set[_Download] = set()
        # One fetch per digest at a time: the agent's task start and its deployed models may want the
        # same bundle at once, and two downloads of one digest would share a partial file and a callback.
        self._busy: dict[str, threading.Lock] = {}
        self._busy_lock = threading.Lock()
        connection.add_connect_listener(self._on_reconnect)

    def _on_reconnect(self, _session_present: bool) -> None:
        for download in list(self._downloads):
            download.resubscribe()

    def path_for(self, digest: str) -> Path:
        return self.cache / "bundles" / digest

    def _progress(self, manifest: BundleManifest, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total, manifest)

    def fetch(self, digest: str, *, manifest_timeout: float = 30.0, stall_timeout: float = 30.0,
              on_event: Callable[[str, dict[str, Any]], None] | None = None) -> FetchResult:
        """Return the unpacked bundle folder, downloading what is missing.  Raises ``BundleError``
        (after an event ``bundle_refused``) for anything that must not run.  ``on_event`` (for
        this fetch; default: the fetcher's own) gets ``bundle_fetch_started``, ``bundle_fetched``
        and ``bundle_refused`` with their data."""
        emit = on_event or self.on_event
        try:
            check_digest(digest)
        except TopicError as exc:
            raise BundleError("bad_manifest", str(exc)) from None
        target = self.path_for(digest)
        with self._busy_lock:
            busy = self._busy.setdefault(digest, threading.Lock())
        with busy:
            if target.is_dir():
                return FetchResult(digest, target, cached=True)
            try:
                return self._fetch(digest, target, manifest_timeout, stall_timeout, emit)
            except BundleError as exc:
                emit("bundle_refused", {"digest": digest, "reason": exc.code, "message": exc.message})
                raise

    def _wait_manifest(self, digest: str, timeout: float) -> BundleManifest:
        got: list[bytes] = []
        arrived = threading.Event()

        def on_manifest(message: mqtt.MQTTMessage) -> None:
            if message.payload:
                got.append(bytes(message.payload))
                arrived.set()

        topic = self.topics.bundle_manifest(digest)
        self.connection.subscribe(topic, on_manifest, qos=1)
        try:
            if not arrived.wait(timeout):
                raise BundleError("not_found", f"no manifest for bundle {digest} on the broker within {timeout:g} s")
        finally:
            self.connection.unsubscribe(topic)
        try:
            body, _ = codec.decode(got[-1])
        except codec.CodecError as exc:
            raise BundleError("bad_manifest", f"bundle manifest is not decodable: {exc}") from None
        manifest = BundleManifest.from_wire(body, self.limits)
        if manifest.digest != digest:
            raise BundleError("bad_manifest", f"manifest on {topic} describes another bundle")
        return manifest

    def _present(self, manifest: BundleManifest, path: Path, previous_size: int) -> list[int]:
        """The chunk slots of a partial file that already hold their chunk (none in a new file)."""
        present: list[int] = []
        if previous_size == 0:
            return present
        with path.open("rb") as handle:
            for index, want in enumerate(manifest.chunks):
                handle.seek(index * manifest.chunk_size)
                if hashlib.sha256(handle.read(manifest.chunk_size)).hexdigest() == want:
                    present.append(index)
        return present

    def _fetch(self, digest: str, target: Path, manifest_timeout: float, stall_timeout: float,
               emit: Callable[[str, dict[str, Any]], None]) -> FetchResult:
        started = time.monotonic()
        manifest = self._wait_manifest(digest, manifest_timeout)
        # Signature first: no byte of an untrusted bundle is downloaded.
        manifest.verify(self.trust, self.allow_unsigned)
        partial = self.cache / "partial" / f"{digest}.tar.gz"
        with partial.open("ab") as handle:
            previous_size = handle.tell()
            handle.truncate(manifest.size)
        present = set(self._present(manifest, partial, previous_size))
        missing = [i for i in range(manifest.chunk_count) if i not in present]
        emit("bundle_fetch_started", {"digest": digest, "chunks": manifest.chunk_count,
                                               "missing": len(missing), "size": manifest.size})
        download = _Download(self, manifest, partial, missing)
        self._downloads.add(download)
        try:
            download.wait(stall_timeout)
        finally:
            self._downloads.discard(download)
            download.close()
        if file_digest(partial) != digest:
            partial.unlink(missing_ok=True)
            raise BundleError("digest_mismatch", "the assembled archive does not match the bundle digest")
        try:
            safe_unpack(partial, target, self.limits)
            if load_manifest(target) != TaskManifest.from_dict(manifest.task):
                shutil.rmtree(target, ignore_errors=True)
                raise BundleError("bad_manifest", "the unpacked fedmq.toml differs from the signed manifest")
        except BundleError:
            partial.unlink(missing_ok=True)  # verified bytes, but refused content: never retry it
            raise
        partial.unlink(missing_ok=True)
        result = FetchResult(digest, target, downloaded_chunks=download.received, reused_chunks=len(present),
                             total_chunks=manifest.chunk_count, bytes=manifest.size,
                             seconds=round(time.monotonic() - started, 3))
        emit("bundle_fetched", {k: v for k, v in vars(result).items() if k != "path"})
        return result
