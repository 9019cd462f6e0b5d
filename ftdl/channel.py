"""The reporter channel: typed messages from a task process to its parent, as JSON lines.

A dedicated pipe, not stdout, so a stray ``print`` cannot corrupt it.  JSON lines rather than a
length-prefixed binary format because a line-oriented stream resynchronises by itself: garbage
written into the pipe costs one dropped line, never the rest of the stream.  Frames use the
project's one codec (``broker.codec``, JSON flavour).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from broker import codec

log = logging.getLogger("fedmq.ftdl.channel")

ENV_FD = "FEDMQ_REPORTER_FD"
MAX_FRAME_BYTES = 64 * 1024
KINDS = frozenset({"info", "stats", "progress", "error", "trigger", "log", "finished"})


@dataclass
class ReporterMessage:
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_line(self) -> bytes:
        return codec.encode({"kind": self.kind, "data": self.data, "ts": self.ts}, codec.Codec.JSON) + b"\n"


class FrameError(ValueError):
    pass


def _check(kind: str, data: dict[str, Any]) -> None:
    """The per-kind shape; a frame that breaks it is dropped like garbage."""
    def need(key: str, *types: type) -> None:
        value = data.get(key)
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise FrameError(f"{kind} frame needs {key!r} of type {'/'.join(t.__name__ for t in types)}")

    if kind == "stats":
        need("round", int)
        need("metrics", dict)
    elif kind == "progress":
        need("round", int)
        need("total", int)
    elif kind == "error":
        need("type", str)
        need("message", str)
    elif kind == "trigger":
        need("name", str)
        need("args", list)
    elif kind == "log":
        need("message", str)


def parse_frame(line: bytes) -> ReporterMessage:
    if len(line) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(line)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        body, _ = codec.decode(line, codec.Codec.JSON)
    except codec.CodecError as exc:
        raise FrameError(str(exc)) from None
    if not isinstance(body, dict):
        raise FrameError("frame is not an object")
    kind, data, ts = body.get("kind"), body.get("data", {}), body.get("ts", time.time())
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind!r}")
    if not isinstance(data, dict):
        raise FrameError("frame 'data' must be an object")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        ts = time.time()
    _check(kind, data)
    return ReporterMessage(kind, data, float(ts))


class FrameReader:
    """Reads the parent's end of the pipe; calls ``on_message`` per valid frame.

    Bounded memory: a line longer than ``MAX_FRAME_BYTES`` is skipped up to its newline without
    being buffered.  Returns when the child side is closed (all writers gone).
    """

    def __init__(self, fd: int, on_message: Callable[[ReporterMessage], None],
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.fd = fd
        self.on_message = on_message
        self.on_drop = on_drop or (lambda reason: log.warning("reporter frame dropped: %s", reason))
        self.dropped = 0
        self.received = 0

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        self.on_drop(reason)

    def run(self) -> None:
        buffer = bytearray()
        skipping = False
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            start = 0
            while True:
                newline = chunk.find(b"\n", start)
                if newline < 0:
                    if not skipping:
                        buffer += chunk[start:]
                        if len(buffer) > MAX_FRAME_BYTES:
                            self._drop(f"frame longer than {MAX_FRAME_BYTES} bytes")
                            buffer.clear()
                            skipping = True
                    break
                if skipping:
                    skipping = False
                else:
                    buffer += chunk[start:newline]
                    self._deliver(bytes(buffer))
                buffer.clear()
                start = newline + 1
        if buffer and not skipping:
            self._deliver(bytes(buffer))
        os.close(self.fd)

    def _deliver(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = parse_frame(line)
        except FrameError as exc:
            self._drop(str(exc))
            return
        self.received += 1
        try:
            self.on_message(message)
        except Exception:  # a failing consumer must not stop the reader
            log.exception("reporter message handler failed")
