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
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmq.broker import codec
from fedmq.broker.arguments import problems

log = logging.getLogger("fedmq.ftdl.channel")

ENV_FD = "FEDMQ_REPORTER_FD"
MAX_FRAME_BYTES = 64 * 1024


class ReporterKind(StrEnum):
    INFO = "info"
    STATS = "stats"
    PROGRESS = "progress"
    ERROR = "error"
    TRIGGER = "trigger"
    LOG = "log"
    FINISHED = "finished"
    DATA = "data"  # the fingerprint of the data the client trains on (lineage)
    HEALTH = "health"  # a deploy entry point's verdict on the model it loaded (docs/lifecycle.md)


class _Data(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StatsData(_Data):
    round: int
    metrics: dict[str, Any]


class ProgressData(_Data):
    round: int
    total: int


class ErrorData(_Data):
    type: str
    message: str


class TriggerData(_Data):
    name: str
    args: list[Any]


class LogData(_Data):
    message: str


class DataFingerprint(_Data):
    """What a device says of its training data: a digest and a count, never the data."""

    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    examples: Annotated[int, Field(ge=0)]


class HealthData(_Data):
    metrics: dict[str, Any]


# The shape each kind's data must have; a frame that breaks it is dropped like garbage.
DATA_SHAPES: dict[ReporterKind, type[_Data]] = {
    ReporterKind.STATS: StatsData, ReporterKind.PROGRESS: ProgressData, ReporterKind.ERROR: ErrorData,
    ReporterKind.TRIGGER: TriggerData, ReporterKind.LOG: LogData, ReporterKind.INFO: _Data,
    ReporterKind.FINISHED: _Data, ReporterKind.HEALTH: HealthData, ReporterKind.DATA: DataFingerprint}


@dataclass
class ReporterMessage:
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_line(self) -> bytes:
        return codec.encode({"kind": self.kind, "data": self.data, "ts": self.ts}, codec.Codec.JSON) + b"\n"


class FrameError(ValueError):
    pass


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
    if not isinstance(kind, str) or kind not in ReporterKind.__members__.values():
        raise FrameError(f"unknown frame kind {kind!r}")
    if not isinstance(data, dict):
        raise FrameError("frame 'data' must be an object")
    try:
        DATA_SHAPES[ReporterKind(kind)].model_validate(data)
    except ValidationError as exc:
        raise FrameError(f"{kind} frame: " + "; ".join(problems(exc))) from None
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        ts = time.time()
    return ReporterMessage(ReporterKind(kind), data, float(ts))


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
