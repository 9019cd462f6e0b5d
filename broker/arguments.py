"""What callers hand the cloud as RPC arguments and people write in files: a device's report of
itself, a task's requirements; and how a pydantic error reads for people.

Pydantic, because the cloud's RPC layer validates arguments against its handlers' signatures and
the files people write (``fedmq.toml``, the fleet file) want its error messages.  An idle device
never imports this module: what it reads off topics is in ``fedmq.broker.schema`` (msgspec).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


def problem(error: Any) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as ``where what``."""
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where} {message}" if where else message


def problems(exc: ValidationError) -> list[str]:
    """A pydantic error as one line per problem, for people."""
    return [problem(error) for error in exc.errors(include_url=False)]
