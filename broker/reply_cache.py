"""Absorbing QoS 1 redeliveries: a request seen again is answered again, never run twice.

A request is keyed by (caller, method, id) and remembered with a digest of its payload.  The
same key with the same payload is a redelivery: absorbed while the first one runs, answered
from the cache once it has.  The same key with another payload is a caller reusing an id for a
different request -- a ``conflict``, never another call's cached answer.  The cache is bounded in
entries and in bytes, so no caller can grow the service's memory with large replies.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

MAX_ENTRIES = 2048
MAX_BYTES = 16 * 1024 * 1024

Key = tuple[str, str, str]  # caller, method, request id


class Seen(Enum):
    NEW = "new"              # run it
    RUNNING = "running"      # a redelivery while the first still runs: it will answer
    ANSWERED = "answered"    # a redelivery after the answer: send the cached one again
    CONFLICT = "conflict"    # the id was used for a different request


@dataclass
class Answer:
    digest: str
    reply_to: str
    payload: bytes


def digest_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:32]


class ReplyCache:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._answers: OrderedDict[Key, Answer] = OrderedDict()
        self._running: dict[Key, str] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def begin(self, key: Key, digest: str) -> tuple[Seen, Answer | None]:
        with self._lock:
            running = self._running.get(key)
            if running is not None:
                return (Seen.RUNNING if running == digest else Seen.CONFLICT), None
            answer = self._answers.get(key)
            if answer is not None:
                return (Seen.ANSWERED if answer.digest == digest else Seen.CONFLICT), answer
            self._running[key] = digest
            return Seen.NEW, None

    def finish(self, key: Key, reply_to: str, payload: bytes | None) -> None:
        with self._lock:
            digest = self._running.pop(key, None)
            if digest is None or payload is None:
                return
            self._answers[key] = Answer(digest, reply_to, payload)
            self._bytes += len(payload)
            while self._answers and (len(self._answers) > self.max_entries or self._bytes > self.max_bytes):
                _, evicted = self._answers.popitem(last=False)
                self._bytes -= len(evicted.payload)

    @property
    def size(self) -> tuple[int, int]:
        """(entries, bytes) held."""
        with self._lock:
            return len(self._answers), self._bytes
