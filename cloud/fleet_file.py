"""The fleet file (``fedmq apply fleet.toml``): its schema, and errors that name the file's line.

One schema, two readers: the CLI validates the file before it pushes a bundle or calls the
cloud (so a bad file changes nothing), and the cloud validates the desired state it is sent
again (a caller need not be our CLI).  Only the CLI knows the text, so only its errors carry
line numbers: a pydantic error's location (``tasks.digits-a.args``) is found in the text by
the table header or key that introduced it.

    fleet = "demo"                      # optional: whose tasks --prune may delete (default: the file's name)

    [tasks.digits-a]                    # the task id
    name = "digits"                     # default: the id
    bundle = "digits"                   # a task folder relative to this file, or a 64-hex bundle digest
    args = { rounds = 3 }
    criteria = "data_quantity >= 100"
    requirements = { memory_mb = 256 }  # merged over the bundle's [requirements], like tasks.create
    tags = ["demo"]
    priority = 0
    selection = "cloud"                 # cloud | device (devices evaluate the criteria themselves)
    state = "created"                   # created | running | stopped
    register_if = "accuracy >= 0.9"     # a finished run that satisfies it is registered...
    model_name = "digits"               # ...as the next version of this model (default: the task's name)
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fedmq.broker import codec
from fedmq.broker.arguments import Requirements
from fedmq.broker.criteria import parse_criteria
from fedmq.broker.errors import Invalid
from fedmq.broker.schema import SelectionMode
from fedmq.broker.topics import check_id
from fedmq.cloud.task_fields import MAX_ARGS_BYTES, CriteriaText, Name, Priority, Tags

DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_TASKS = 1000


class DesiredState(StrEnum):
    """What apply does to a task's runs.  ``created``: it creates the task and never starts or stops
    it (its runs are the operators' and triggers' business); ``running``: it starts the task when
    it is created or stopped (a finished or failed run is history, not drift: no re-training on
    every apply); ``stopped``: it stops the task when it runs."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


def _criteria(text: str) -> str:
    parse_criteria(text)  # a CriteriaError is a ValueError: pydantic reports it at the key
    return text


def _args(args: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(codec.encode(args))
    except (TypeError, ValueError):  # a TOML date or time, say: the wire has no such thing
        raise ValueError("args may hold strings, numbers, booleans, arrays and tables only") from None
    if size > MAX_ARGS_BYTES:
        raise ValueError(f"args larger than {MAX_ARGS_BYTES} bytes")
    return args


def _model_name(name: str) -> str:
    # The registry's rule (cloud/model_registry.check_model_name, which the cloud applies again):
    # an id without ":", which separates the name from the version in NAME:VERSION.
    check_id(name, "model name")
    if ":" in name:
        raise ValueError(f"invalid model name {name!r}: no ':' (it separates NAME:VERSION)")
    return name


TaskId = Annotated[str, AfterValidator(lambda v: check_id(v, "task id"))]


class TaskSpec(BaseModel):
    """``[tasks.<id>]``: what the task should be.  A key left out means its default (no args,
    no criteria, ...), not "whatever it is now": the file is the whole truth of what it names."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: Name | None = None
    bundle: Annotated[str, Field(min_length=1, max_length=4096)]
    args: Annotated[dict[str, Any], AfterValidator(_args)] = Field(default_factory=dict)
    criteria: Annotated[CriteriaText, AfterValidator(_criteria)] = ""
    requirements: Requirements | None = None
    tags: Tags = Field(default_factory=list)
    priority: Priority = 0
    selection: SelectionMode = SelectionMode.CLOUD
    state: DesiredState = DesiredState.CREATED
    register_if: Annotated[CriteriaText, AfterValidator(_criteria)] = ""  # over a finished run's final metrics
    model_name: Annotated[Name, AfterValidator(_model_name)] | None = None  # default: the task's name

    @field_validator("state", "selection", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: ValidationInfo) -> Any:
        # TOML gives a str; strict mode would refuse it for the enum, with a worse message.
        choices = {"state": DesiredState, "selection": SelectionMode}[str(info.field_name)]
        if isinstance(value, choices):
            return value
        if isinstance(value, str) and value in choices.__members__.values():
            return choices(value)
        raise ValueError(f"unknown {info.field_name} {value!r}: use one of {', '.join(choices)}")

    @property
    def is_digest(self) -> bool:
        return bool(DIGEST.match(self.bundle))


def _model_ref(text: str) -> str:
    name, colon, version = text.rpartition(":")
    if not colon or not version.isdigit() or int(version) < 1:
        raise ValueError(f"{text!r} is not NAME:VERSION, like digits:3")
    _model_name(name)
    return text


def _stages(stages: list[float]) -> list[float]:
    from fedmq.cloud.deployments import check_stages  # here: the CLI pays for it only with deployments

    try:
        return check_stages(stages)
    except Invalid as exc:
        raise ValueError(exc.message.removeprefix("stages: ")) from None


DeploymentId = Annotated[str, AfterValidator(lambda v: check_id(v, "deployment id"))]


class DeploymentSpec(BaseModel):
    """``[deployments.<id>]``: a roll-out that should exist (``fedmq deploy start`` as a file).
    A deployment is a decision in time, not a state to hold: once created, whatever became of it
    (completed, rolled back) is in sync; a different model or plan under the same id is refused
    -- a new roll-out is a new id."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: Annotated[str, Field(max_length=160), AfterValidator(_model_ref)]
    to: Annotated[CriteriaText, AfterValidator(_criteria)] = ""
    stages: Annotated[list[float], AfterValidator(_stages)] = Field(default_factory=lambda: [1.0])
    max_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    health: Annotated[CriteriaText, AfterValidator(_criteria)] = ""
    stage_timeout_s: Annotated[float, Field(ge=1, le=7 * 24 * 3600)] = 600.0

    @property
    def name(self) -> str:
        return self.model.rpartition(":")[0]

    @property
    def version(self) -> int:
        return int(self.model.rpartition(":")[2])


class FleetSpec(BaseModel):
    """The whole file."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    fleet: Annotated[str, AfterValidator(lambda v: check_id(v, "fleet name"))] | None = None
    tasks: Annotated[dict[TaskId, TaskSpec], Field(max_length=MAX_TASKS)] = Field(default_factory=dict)
    deployments: Annotated[dict[DeploymentId, DeploymentSpec], Field(max_length=MAX_TASKS)] = \
        Field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """As sent to the cloud: only what the file said, so both sides apply the same defaults."""
        return self.model_dump(mode="json", exclude_unset=True)


class FleetSource(BaseModel):
    """Where a desired state came from, recorded with every change it makes."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    file: Annotated[str, Field(min_length=1, max_length=255)]
    digest: Annotated[str, Field(pattern=DIGEST.pattern)]


class ModelSignature(BaseModel):
    """The operator's signature of a deployment's model (``model_signing_message``), made by the
    CLI with ``--key`` for each deployment the plan creates."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    signature: Annotated[str, Field(max_length=256)]
    key_id: Annotated[str, Field(max_length=32)]


class FleetFileError(Invalid):
    """A fleet file (or desired state) that cannot be used; ``details`` lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems) if len(problems) < 4 else
                         f"{'; '.join(problems[:3])}; and {len(problems) - 3} more", {"problems": problems})
        self.problems = problems


def _allowed(loc: tuple[Any, ...]) -> list[str]:
    """The keys the table holding ``loc`` allows (for an "unknown key" message)."""
    parents = tuple(loc[:-1])
    tables: dict[tuple[Any, ...], type[BaseModel]] = {(): FleetSpec}
    if len(parents) >= 2:
        kinds: dict[Any, type[BaseModel]] = {"tasks": TaskSpec, "deployments": DeploymentSpec}
        tables[parents[:2]] = kinds.get(parents[0], BaseModel)
        tables[(*parents[:2], "requirements")] = Requirements
    return list(tables.get(parents, BaseModel).model_fields)


def _message(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _allowed(tuple(error["loc"]))
        return f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    if error["type"] == "missing":
        return "required key missing"
    return message


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "[key]")


def validate_desired(data: Any) -> FleetSpec:
    """The cloud's check of a desired state it is sent: the file's schema, without lines."""
    try:
        return FleetSpec.model_validate(data)
    except ValidationError as exc:
        raise FleetFileError([f"{_where(e['loc'])}: {_message(e)}" if e["loc"] else _message(e)
                              for e in exc.errors(include_url=False)]) from None


# --- the file, with lines ----------------------------------------------------------------------
_HEADER = re.compile(r"^\s*\[\[?\s*(?P<key>[^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_PART = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_ASSIGN = re.compile(rf"^\s*(?P<key>{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_PART = re.compile(r"\s*(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<bare>[A-Za-z0-9_-]+))\s*(?:\.|$)")
_SYNTAX_AT = re.compile(r"\(at line (?P<line>\d+), column (?P<column>\d+)\)")


def _dotted(key: str) -> tuple[str, ...]:
    parts, position = [], 0
    while position < len(key):
        match = _PART.match(key, position)
        if match is None:
            break
        parts.append(match["dq"] if match["dq"] is not None else match["sq"] if match["sq"] is not None
                     else match["bare"])
        position = match.end()
    return tuple(parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each table and key is first introduced (1-based lines).  A line scanner, not a TOML
    parser: the file already parsed, this only points a person at the right line."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline = False
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            in_multiline = line.count('"""') % 2 == 0 and line.count("'''") % 2 == 0
            continue
        header = _HEADER.match(line)
        if header:
            table = _dotted(header["key"])
            lines.setdefault(table, number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            lines.setdefault(table + _dotted(assign["key"]), number)
            in_multiline = line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1
    return lines


@dataclass(frozen=True)
class FleetFile:
    """A fleet file as read: its name (the source the cloud records), the path as a person gave
    it (for messages), its bytes' digest, text and validated spec."""

    path: Path
    name: str
    shown: str
    digest: str
    text: str
    spec: FleetSpec

    @property
    def source(self) -> dict[str, str]:
        """What the cloud records with every change this file makes."""
        return {"file": self.name, "digest": self.digest}

    def line_of(self, loc: tuple[Any, ...]) -> int:
        return line_of(key_lines(self.text), loc)

    def problem(self, loc: tuple[Any, ...], message: str) -> str:
        return f"{self.shown}:{self.line_of(loc)}: {_where(loc)}: {message}"


def line_of(lines: dict[tuple[str, ...], int], loc: tuple[Any, ...]) -> int:
    """The line of the longest prefix of ``loc`` the text introduced (1 if none)."""
    path = tuple(str(part) for part in loc if isinstance(part, str) and part != "[key]")
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1


def load_fleet(path: Path, display: str | None = None) -> FleetFile:
    """Read, parse and validate a fleet file; ``FleetFileError`` lists every problem, each as
    ``fleet.toml:12: tasks.digits-a.args: ...`` (``display``: the path as the person gave it).
    ``OSError`` when it cannot be read."""
    name = display or path.name
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FleetFileError([f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = _SYNTAX_AT.search(str(exc))
        where = f"{name}:{at['line']}:{at['column']}" if at else name
        raise FleetFileError([f"{where}: TOML syntax: {_SYNTAX_AT.sub('', str(exc)).strip()}"]) from None
    lines = key_lines(text)
    try:
        spec = FleetSpec.model_validate(data)
    except ValidationError as exc:
        located = sorted((line_of(lines, e["loc"]), f"{_where(e['loc'])}: {_message(e)}")
                         for e in exc.errors(include_url=False))
        raise FleetFileError([f"{name}:{line}: {text}" for line, text in located]) from None
    return FleetFile(path=path, name=path.name, shown=name, digest=digest, text=text, spec=spec)
