"""The task manifest, ``fedmq.toml``: what a task folder runs and what it needs.

Parsed and validated in one place, for the cloud (create/push), the edge (before running
anything) and ftdl (entry points, triggers).  A manifest that does not validate is refused with
every problem listed, never half-used.

    [task]
    name = "digits"
    description = "CNN on scikit-learn's digits"

    [server]
    entry = "server.py"
    args = { rounds = 3 }

    [client]
    entry = "client.py"
    args = { epochs = 1 }

    [deploy]
    entry = "deploy.py"          # loads a registered model, evaluates it on the device's data

    [triggers.lower_lr]
    command = ["python", "triggers/lower_lr.py"]
    timeout_s = 30

    [requirements]
    python = ">=3.11"
    packages = ["torch>=2.2", "flwr>=1.41"]
    memory_mb = 256
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmq.broker.arguments import Requirements, problem

MANIFEST_NAME = "fedmq.toml"
ROLES = ("server", "client", "deploy")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_TRIGGER_TIMEOUT_S = 3600.0
_SECTIONS = ("task", "server", "client", "deploy", "triggers", "requirements")
# The training modes, here so that reading a manifest needs no numpy (fedmq.ftdl.serverless re-exports them).
FLOWER_MODE, SERVERLESS_MODE = "flower", "serverless"


class ManifestError(ValueError):
    """The manifest is invalid; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid task manifest: " + "; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class EntryPoint(_Strict):
    entry: str                      # a .py file relative to the task folder
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("entry")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError(f"{value!r} must stay inside the task folder")
        if not value.endswith(".py"):
            raise ValueError(f"{value!r} must be a .py file")
        return value


class TriggerSpec(_Strict):
    name: str
    command: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0, le=MAX_TRIGGER_TIMEOUT_S)] = 60.0


class _TriggerSection(_Strict):
    command: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0, le=MAX_TRIGGER_TIMEOUT_S)] = 60.0


class _TaskSection(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""


class ManifestFile(_Strict):
    """``fedmq.toml`` as written: the sections above, nothing else."""

    task: _TaskSection
    server: EntryPoint | None = None
    client: EntryPoint | None = None
    # A device runs it when a model this task trained is deployed to it (docs/lifecycle.md).
    deploy: EntryPoint | None = None
    triggers: dict[Annotated[str, Field(pattern=NAME_PATTERN)], _TriggerSection] = Field(default_factory=dict)
    requirements: Requirements = Field(default_factory=Requirements)

    @model_validator(mode="after")
    def _has_an_entry(self) -> ManifestFile:
        if self.server is None and self.client is None:
            raise ValueError("a task needs a [server] or a [client] entry point")
        return self


class TaskManifest(_Strict):
    """A validated manifest, as the bundle manifest carries it (``to_dict``)."""

    name: str
    description: str
    server: EntryPoint | None
    client: EntryPoint | None
    triggers: dict[str, TriggerSpec]
    requirements: Requirements
    deploy: EntryPoint | None = None

    def entry(self, role: str) -> EntryPoint:
        point = getattr(self, role, None) if role in ROLES else None
        if point is None:
            raise ManifestError([f"the task has no {role} entry point"])
        return point

    def client_args(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The arguments the client entry point runs with: its ``[client] args`` under the
        operator's ``args``.  In serverless mode (``mode = "serverless"`` in either, or in the
        ``[server] args``) the server's defaults (rounds, min_clients, ...) come in between: no
        server runs to take them, the participants do."""
        client = self.client.args if self.client else {}
        server = self.server.args if self.server else {}
        merged = {**client, **(args or {})}
        if merged.get("mode", server.get("mode")) == SERVERLESS_MODE:
            merged = {**client, **server, **(args or {})}
        return merged

    def training_mode(self, args: dict[str, Any] | None = None) -> str:
        """``flower`` or ``serverless`` (whatever else was written, as written: the caller checks)."""
        return str(self.client_args(args).get("mode", FLOWER_MODE))

    def to_dict(self) -> dict[str, Any]:
        # Without a [deploy] entry the dict is what it was before the section existed: the bundle
        # manifests (and the bytes their signatures cover) of such tasks do not change.
        return self.model_dump(mode="json", exclude={"deploy"} if self.deploy is None else None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskManifest:
        """Rebuild from ``to_dict`` output (as carried in bundle manifests), validating it as a
        ``fedmq.toml`` would be."""
        if not isinstance(data, dict):
            raise ManifestError(["the task manifest must be an object"])
        return parse_manifest({
            "task": {"name": data.get("name"), "description": data.get("description", "")},
            **{role: data[role] for role in ROLES if data.get(role)},
            "triggers": {name: {k: v for k, v in spec.items() if k != "name"} if isinstance(spec, dict) else spec
                         for name, spec in (data.get("triggers") or {}).items()},
            "requirements": data.get("requirements") or {},
        })


def _problems(exc: ValidationError) -> list[str]:
    found = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden":
            found.append(f"unknown sections {loc}" if len(loc) == 1 else
                         f"[{'.'.join(loc[:-1])}] has unknown keys {loc[-1:]}")
        elif error["type"] == "missing" and loc == ["task"]:
            found.append("missing [task] table with a name")
        else:
            found.append(problem(error))
    return found


def parse_manifest(data: dict[str, Any]) -> TaskManifest:
    """Validate a ``fedmq.toml`` document; every problem is listed, nothing is half-used."""
    try:
        parsed = ManifestFile.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_problems(exc)) from None
    return TaskManifest(name=parsed.task.name, description=parsed.task.description, server=parsed.server,
                        client=parsed.client, deploy=parsed.deploy, requirements=parsed.requirements,
                        triggers={name: TriggerSpec(name=name, command=spec.command, timeout_s=spec.timeout_s)
                                  for name, spec in parsed.triggers.items()})


def load_manifest(task_dir: Path | str) -> TaskManifest:
    """Read and validate ``fedmq.toml`` of a task folder, checking the files it names exist."""
    folder = Path(task_dir)
    path = folder / MANIFEST_NAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError([f"no {MANIFEST_NAME} in {folder}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError([f"{MANIFEST_NAME} is not valid TOML: {exc}"]) from None
    manifest = parse_manifest(data)
    missing = [point.entry for point in (manifest.server, manifest.client, manifest.deploy)
               if point is not None and not (folder / point.entry).is_file()]
    if missing:
        raise ManifestError([f"entry point {m!r} does not exist in the task folder" for m in missing])
    return manifest
