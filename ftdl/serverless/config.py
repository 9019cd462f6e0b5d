"""A serverless task's parameters, read from the task's arguments (``fedmq.toml`` defaults merged
with the operator's ``--args``), and the rule that ends a run early."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmq.broker.arguments import problems
from fedmq.ftdl.chunks import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from fedmq.ftdl.manifest import FLOWER_MODE as FLOWER
from fedmq.ftdl.manifest import SERVERLESS_MODE as SERVERLESS

MODES = (FLOWER, SERVERLESS)


class Target(BaseModel):
    """Stop when ``metric`` (an evaluation metric, or ``loss``) reaches ``value``, or when it has
    improved by less than ``tolerance`` over the last ``window`` rounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = "accuracy"
    value: float | None = None
    goal: Literal["max", "min"] = "max"
    tolerance: Annotated[float, Field(ge=0)] | None = None
    window: Annotated[int, Field(ge=1)] = 3

    def stop_reason(self, history: list[float]) -> str | None:
        if not history:
            return None
        sign = 1.0 if self.goal == "max" else -1.0
        if self.value is not None and sign * (history[-1] - self.value) >= 0:
            return f"{self.metric} {history[-1]:.4g} reached the target {self.value:g}"
        if self.tolerance is not None and len(history) > self.window:
            before = max(sign * v for v in history[:-self.window])
            recent = max(sign * v for v in history[-self.window:])
            if recent - before < self.tolerance:
                return f"{self.metric} improved by less than {self.tolerance:g} over {self.window} rounds"
        return None


class ServerlessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_participants: Annotated[int, Field(ge=1)] = 2
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 3
    target: Target | None = None
    round_deadline_s: Annotated[float, Field(gt=0)] = 120.0
    fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    # The largest chunk: a round moves several models through the broker, and per-message costs
    # dominate small chunks (10 MiB model, 3 devices: 0.72 s a round at 192 KiB, 1.10 s at 64 KiB).
    chunk_size: Annotated[int, Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)] = MAX_CHUNK_SIZE
    aggregate: str = "fedavg"
    join_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    quiet_s: Annotated[float, Field(ge=0)] = 1.0       # membership settles this long before round 0

    # the task-argument names read, with the Flower-mode names accepted as aliases
    ALIASES: ClassVar[dict[str, str]] = {"min_clients": "min_participants", "round_timeout_s": "round_deadline_s",
                               "fraction_fit": "fraction"}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServerlessConfig:
        """The serverless parameters among a task's arguments (the rest are the task's own)."""
        values = {key: value for key, value in args.items() if key in cls.model_fields}
        for alias, name in cls.ALIASES.items():
            if alias in args and name not in values:
                values[name] = args[alias]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ValueError("invalid serverless arguments: " + "; ".join(problems(exc))) from None


def training_mode(args: dict[str, Any]) -> str:
    mode = args.get("mode", FLOWER)
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r} (use {' or '.join(MODES)})")
    return str(mode)
