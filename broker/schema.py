"""The wire formats about tasks and devices, and their vocabularies: what the cloud announces
and offers, the commands it sends a device, the retained records of the models it should run.

One schema layer (msgspec, ``fedmq.broker.wire``) for both sides: the cloud builds these, the
edges and dashboards read them, and neither knows the other's code.  Receivers ignore fields they
do not know, so a newer cloud can add some.  What callers send the cloud as RPC arguments (a
device's info, a task's requirements) is in ``fedmq.broker.arguments``.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from msgspec import Meta, field

from fedmq.broker import codec
from fedmq.broker.wire import FrozenWire, RecordError, Wire, read


class SelectionMode(StrEnum):
    """Where a task's criteria and requirements are evaluated.  ``cloud``: on the facts a device
    reports, in ``tasks.request``.  ``device``: by the device itself, on the retained
    announcement, over facts that may never leave it (private labels); it calls ``tasks.join``."""

    CLOUD = "cloud"
    DEVICE = "device"


class TaskState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def ended(self) -> bool:
        return self in (TaskState.FINISHED, TaskState.FAILED, TaskState.STOPPED)


class DeviceTaskState(StrEnum):
    """Where a device stands with a task, as the cloud records it."""

    OFFERED = "offered"
    RUNNING = "running"
    STOPPING = "stopping"  # told to stop, not confirmed yet (told again when the cloud reconnects)
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


ACTIVE_ON_DEVICE = (DeviceTaskState.OFFERED, DeviceTaskState.RUNNING)  # must hear of a stop


class TaskAnnouncement(Wire, kw_only=True):
    """Retained on ``tasks/<id>``, republished on every change."""

    v: int = 1
    id: str
    name: str
    state: TaskState
    revision: int
    bundle: str
    flower: str | None = None
    criteria: str = ""
    requirements: dict[str, Any] = field(default_factory=dict)
    selection: SelectionMode = SelectionMode.CLOUD
    priority: int = 0
    tags: list[str] = field(default_factory=list)
    round: int = 0
    total_rounds: int | None = None
    run: int = 0
    updated: float = field(default_factory=time.time)
    last_error: str | None = None


class Offer(Wire, kw_only=True):
    """One entry of ``tasks.request``'s answer: a running task this device may run."""

    id: str
    name: str
    revision: int
    bundle: str
    flower: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    run: int = 0


class DeviceCommand(Wire, kw_only=True):
    """On ``devices/<id>/cmd`` (QoS 1, queued for a device that is away)."""

    cmd: Literal["stop"]
    task: str
    revision: int | None = None
    reason: str = ""
    ts: float = field(default_factory=time.time)


# \Z, not $: Python's $ also matches before a trailing newline.
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
ModelName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")]


class WireRecord(FrozenWire, frozen=True, kw_only=True):
    """A msgpack record on a retained topic, tolerant of fields it does not know (the deployments'
    records here, the serverless participants' in ``ftdl.serverless.records``)."""

    def encode(self) -> bytes:
        return codec.encode(self.to_wire())

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """The record in ``payload`` (msgpack, or JSON from a person); raises ``RecordError``."""
        try:
            body, _ = codec.decode(payload)
        except codec.CodecError as exc:
            raise RecordError(f"undecodable {cls.__name__}: {exc}") from None
        return read(cls, body)


class DesiredModel(WireRecord, frozen=True, kw_only=True):
    """One model a device should run: which version, the file's identity, the code that serves it."""

    version: Annotated[int, Meta(ge=1)]
    sha256: Sha256                        # of model.npz, fetched from models/<sha256>/...
    size: Annotated[int, Meta(gt=0)]
    bundle: Sha256                        # the bundle of the task that trained it: its [deploy] entry loads it
    deployment: Annotated[str, Meta(max_length=128)]
    signature: str | None = None          # Ed25519 over ftdl.signing.model_signing_message(name, version, sha256)
    key_id: str | None = None


class DesiredModels(WireRecord, frozen=True, kw_only=True):
    """Retained QoS 1 on ``devices/<device>/models``: every model the device should run.  A name
    absent from ``models`` means none of that name; ``seq`` grows with every publication, so a
    device can tell a newer record from a replayed one."""

    seq: Annotated[int, Meta(ge=0)] = 0
    models: Annotated[dict[ModelName, DesiredModel], Meta(max_length=256)] = field(default_factory=dict)


class ModelManifest(WireRecord, frozen=True, kw_only=True):
    """Retained on ``models/<sha256>/manifest``: how the model file is cut into retained chunks
    ``models/<sha256>/<index>`` (each chunk's SHA-256; the whole is ``sha256``)."""

    sha256: Sha256
    size: Annotated[int, Meta(gt=0)]
    chunk_size: Annotated[int, Meta(gt=0)]
    chunks: list[Sha256]

    def __post_init__(self) -> None:
        if len(self.chunks) != -(-self.size // self.chunk_size):
            raise ValueError("chunks must list one SHA-256 per chunk")
