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
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "fedmq.toml"
ROLES = ("server", "client")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[A-Za-z0-9,._-]+\])?\s*((==|!=|<=|>=|<|>|~=)\s*[A-Za-z0-9.*+!-]+\s*,?\s*)*$")
MAX_TRIGGER_TIMEOUT_S = 3600.0


class ManifestError(ValueError):
    """The manifest is invalid; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid task manifest: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class EntryPoint:
    entry: str                      # a .py file relative to the task folder
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TriggerSpec:
    name: str
    command: list[str]
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Requirements:
    python: str | None = None
    packages: list[str] = field(default_factory=list)
    memory_mb: int | None = None
    accelerators: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskManifest:
    name: str
    description: str
    server: EntryPoint | None
    client: EntryPoint | None
    triggers: dict[str, TriggerSpec]
    requirements: Requirements

    def entry(self, role: str) -> EntryPoint:
        point = getattr(self, role, None) if role in ROLES else None
        if point is None:
            raise ManifestError([f"the task has no {role} entry point"])
        return point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskManifest":
        """Rebuild from ``to_dict`` output (as carried in bundle manifests)."""
        return parse_manifest({
            "task": {"name": data.get("name"), "description": data.get("description", "")},
            **{role: data[role] for role in ROLES if data.get(role)},
            "triggers": {name: {k: v for k, v in spec.items() if k != "name"}
                         for name, spec in (data.get("triggers") or {}).items()},
            "requirements": data.get("requirements") or {},
        })


def _relative_file(value: Any, where: str, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{where} must be a relative file path")
        return None
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        problems.append(f"{where} {value!r} must stay inside the task folder")
        return None
    return value


def _entry(section: Any, role: str, problems: list[str]) -> EntryPoint | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        problems.append(f"[{role}] must be a table")
        return None
    unknown = set(section) - {"entry", "args"}
    if unknown:
        problems.append(f"[{role}] has unknown keys {sorted(unknown)}")
    entry = _relative_file(section.get("entry"), f"{role}.entry", problems)
    if entry and not entry.endswith(".py"):
        problems.append(f"{role}.entry {entry!r} must be a .py file")
    args = section.get("args", {})
    if not isinstance(args, dict):
        problems.append(f"{role}.args must be a table of named arguments")
        args = {}
    return EntryPoint(entry, dict(args)) if entry else None


def _triggers(section: Any, problems: list[str]) -> dict[str, TriggerSpec]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        problems.append("[triggers] must be a table of named triggers")
        return {}
    triggers: dict[str, TriggerSpec] = {}
    for name, spec in section.items():
        if not _NAME.match(name):
            problems.append(f"trigger name {name!r} is not a valid name")
            continue
        if not isinstance(spec, dict):
            problems.append(f"[triggers.{name}] must be a table")
            continue
        command = spec.get("command")
        if not (isinstance(command, list) and command and all(isinstance(c, str) and c for c in command)):
            problems.append(f"triggers.{name}.command must be a non-empty list of strings")
            continue
        timeout = spec.get("timeout_s", 60.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= MAX_TRIGGER_TIMEOUT_S:
            problems.append(f"triggers.{name}.timeout_s must be a number in (0, {MAX_TRIGGER_TIMEOUT_S:g}]")
            continue
        triggers[name] = TriggerSpec(name, list(command), float(timeout))
    return triggers


def _requirements(section: Any, problems: list[str]) -> Requirements:
    if section is None:
        return Requirements()
    if not isinstance(section, dict):
        problems.append("[requirements] must be a table")
        return Requirements()
    unknown = set(section) - {"python", "packages", "memory_mb", "accelerators"}
    if unknown:
        problems.append(f"[requirements] has unknown keys {sorted(unknown)}")
    python = section.get("python")
    if python is not None and not isinstance(python, str):
        problems.append("requirements.python must be a version specifier string")
        python = None
    packages = section.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        problems.append("requirements.packages must be a list of strings like 'torch>=2.2'")
        packages = []
    for spec in packages:
        if not _PACKAGE.match(spec):
            problems.append(f"requirements.packages: {spec!r} is not a package specifier")
    memory = section.get("memory_mb")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
        problems.append("requirements.memory_mb must be a positive integer")
        memory = None
    accelerators = section.get("accelerators", [])
    if not isinstance(accelerators, list) or not all(isinstance(a, str) for a in accelerators):
        problems.append("requirements.accelerators must be a list of strings")
        accelerators = []
    return Requirements(python, list(packages), memory, list(accelerators))


def parse_manifest(data: dict[str, Any]) -> TaskManifest:
    problems: list[str] = []
    unknown = set(data) - {"task", "server", "client", "triggers", "requirements"}
    if unknown:
        problems.append(f"unknown sections {sorted(unknown)}")
    task = data.get("task")
    if not isinstance(task, dict):
        problems.append("missing [task] table with a name")
        task = {}
    name = task.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append("task.name must be 1-64 characters from A-Z a-z 0-9 . _ -")
    description = task.get("description", "")
    if not isinstance(description, str):
        problems.append("task.description must be a string")
        description = ""
    server = _entry(data.get("server"), "server", problems)
    client = _entry(data.get("client"), "client", problems)
    if data.get("server") is None and data.get("client") is None:
        problems.append("a task needs a [server] or a [client] entry point")
    triggers = _triggers(data.get("triggers"), problems)
    requirements = _requirements(data.get("requirements"), problems)
    if problems:
        raise ManifestError(problems)
    return TaskManifest(str(name), description, server, client, triggers, requirements)


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
    missing = [point.entry for point in (manifest.server, manifest.client)
               if point is not None and not (folder / point.entry).is_file()]
    if missing:
        raise ManifestError([f"entry point {m!r} does not exist in the task folder" for m in missing])
    return manifest
