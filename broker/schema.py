"""The wire formats about tasks and devices, and their vocabularies: what the cloud announces
and offers, the commands it sends a device, what a device reports about itself.

One schema layer (pydantic) for both sides: the cloud builds these, the edges and dashboards
read them, and neither knows the other's code.  Receivers ignore fields they do not know, so a
newer cloud can add some; senders validate everything.
"""

from __future__ import annotations

import re
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmq.broker import codec


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


_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[A-Za-z0-9,._-]+\])?\s*"
                      r"((==|!=|<=|>=|<|>|~=)\s*[A-Za-z0-9.*+!-]+\s*,?\s*)*$")


class Requirements(BaseModel):
    """What a task needs of a device (``[requirements]`` of ``fedmq.toml``, or a task's own)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    python: Annotated[str, Field(max_length=64)] | None = None
    packages: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=64)] = Field(default_factory=list)
    memory_mb: Annotated[int, Field(gt=0)] | None = None
    accelerators: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] = \
        Field(default_factory=list)

    @field_validator("packages")
    @classmethod
    def _specifiers(cls, value: list[str]) -> list[str]:
        bad = [spec for spec in value if not _PACKAGE.match(spec)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a package specifier like 'torch>=2.2'")
        return value


class _Received(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TaskAnnouncement(_Received):
    """Retained on ``tasks/<id>``, republished on every change."""

    v: int = 1
    id: str
    name: str
    state: TaskState
    revision: int
    bundle: str
    flower: str | None = None
    criteria: str = ""
    requirements: dict[str, Any] = Field(default_factory=dict)
    selection: SelectionMode = SelectionMode.CLOUD
    priority: int = 0
    tags: list[str] = Field(default_factory=list)
    round: int = 0
    total_rounds: int | None = None
    run: int = 0
    updated: float = Field(default_factory=time.time)
    last_error: str | None = None


class Offer(_Received):
    """One entry of ``tasks.request``'s answer: a running task this device may run."""

    id: str
    name: str
    revision: int
    bundle: str
    flower: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    run: int = 0


class DeviceCommand(_Received):
    """On ``devices/<id>/cmd`` (QoS 1, queued for a device that is away)."""

    cmd: Literal["stop"]
    task: str
    revision: int | None = None
    reason: str = ""
    ts: float = Field(default_factory=time.time)


class TaskStats(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    round: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    contribution: float | None = None
    num_examples: int | None = None


class DeviceInfo(BaseModel):
    """What a device reports (``devices.update_info``); strict types for the facts selection
    relies on, anything else in ``extra``."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    data_quantity: int | None = Field(default=None, ge=0)
    cpu_count: int | None = Field(default=None, ge=0)
    memory_mb: float | None = Field(default=None, ge=0)
    disk_free_mb: float | None = Field(default=None, ge=0)
    python: str | None = Field(default=None, max_length=32)
    platform: str | None = Field(default=None, max_length=128)
    packages: dict[str, str] = Field(default_factory=dict, max_length=500)
    accelerators: list[str] = Field(default_factory=list, max_length=32)
    accuracy: float | None = None
    contribution: float | None = None
    current_task: str | None = Field(default=None, max_length=128)
    tasks: dict[str, TaskStats] = Field(default_factory=dict, max_length=100)
    labels: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)
    models: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict, max_length=256)  # name -> version run
    extra: dict[str, Any] = Field(default_factory=dict)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class RecordError(ValueError):
    """A wire record that is not one (receivers log it and keep what they had)."""


class WireRecord(BaseModel):
    """A msgpack record on a retained topic: strict when built, tolerant of fields it does not know
    (the deployments' records here, the serverless participants' in ``ftdl.serverless.records``)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    def encode(self) -> bytes:
        return codec.encode(self.model_dump(mode="json"))

    @classmethod
    def decode(cls, payload: bytes) -> Any:
        """The record in ``payload`` (msgpack, or JSON from a person); raises ``RecordError``."""
        try:
            body, _ = codec.decode(payload)
            return cls.model_validate(body)
        except codec.CodecError as exc:
            raise RecordError(f"undecodable {cls.__name__}: {exc}") from None
        except ValidationError as exc:
            raise RecordError(f"invalid {cls.__name__}: " + "; ".join(problems(exc))) from None


class DesiredModel(WireRecord):
    """One model a device should run: which version, the file's identity, the code that serves it."""

    version: Annotated[int, Field(ge=1)]
    sha256: Sha256                        # of model.npz, fetched from models/<sha256>/...
    size: Annotated[int, Field(gt=0)]
    bundle: Sha256                        # the bundle of the task that trained it: its [deploy] entry loads it
    deployment: Annotated[str, Field(max_length=128)]
    signature: str | None = None          # Ed25519 over ftdl.signing.model_signing_message(name, version, sha256)
    key_id: str | None = None


class DesiredModels(WireRecord):
    """Retained QoS 1 on ``devices/<device>/models``: every model the device should run.  A name
    absent from ``models`` means none of that name; ``seq`` grows with every publication, so a
    device can tell a newer record from a replayed one."""

    seq: Annotated[int, Field(ge=0)] = 0
    models: Annotated[dict[ModelName, DesiredModel], Field(max_length=256)] = Field(default_factory=dict)


class ModelManifest(WireRecord):
    """Retained on ``models/<sha256>/manifest``: how the model file is cut into retained chunks
    ``models/<sha256>/<index>`` (each chunk's SHA-256; the whole is ``sha256``)."""

    sha256: Sha256
    size: Annotated[int, Field(gt=0)]
    chunk_size: Annotated[int, Field(gt=0)]
    chunks: list[Sha256]

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        if len(self.chunks) != -(-self.size // self.chunk_size):
            raise ValueError("chunks must list one SHA-256 per chunk")
        return self


def problem(error: Any) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as ``where what``."""
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where} {message}" if where else message


def problems(exc: ValidationError) -> list[str]:
    """A pydantic error as one line per problem, for people."""
    return [problem(error) for error in exc.errors(include_url=False)]
