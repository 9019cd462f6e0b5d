"""ftdl (Flower Task Daemon Lib): runs task entry points as supervised child processes.

The cloud runs a task's Flower server with it, the edge the Flower client.  Task code uses
``TaskReporter`` (and ``ftdl.flower`` for Flower), and never imports the rest.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmq.ftdl.manifest import MANIFEST_NAME, ManifestError, TaskManifest, load_manifest
    from fedmq.ftdl.process import TaskEvent, TaskOutcome, TaskProcess
    from fedmq.ftdl.reporter import TaskReporter, task_args
    from fedmq.ftdl.triggers import TriggerRunner

# Loaded when first asked for (PEP 562): an idle edge agent imports ``fedmq.ftdl.paths`` for its
# config and must not pay for subprocess, logging.handlers and the process supervisor with it.
_LAZY = {"MANIFEST_NAME": "manifest", "ManifestError": "manifest", "TaskManifest": "manifest",
         "load_manifest": "manifest", "TaskEvent": "process", "TaskOutcome": "process",
         "TaskProcess": "process", "TaskReporter": "reporter", "task_args": "reporter",
         "TriggerRunner": "triggers"}

__all__ = ["MANIFEST_NAME", "ManifestError", "TaskEvent", "TaskManifest", "TaskOutcome",
           "TaskProcess", "TaskReporter", "TriggerRunner", "load_manifest", "start_task", "task_args"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmq.ftdl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedmq.ftdl.{module}"), name)


def start_task(task_dir: Path, role: str, *, task_id: str, log_dir: Path,
               on_event: Callable[[TaskEvent], None], args: dict[str, Any] | None = None,
               data_dir: Path | None = None, rpc: dict[str, str] | None = None,
               on_output: Callable[[str, str], None] | None = None,
               time_limit_s: float | None = None, manifest: TaskManifest | None = None,
               env: dict[str, str] | None = None) -> TaskProcess:
    """Start the ``role`` entry point of an unpacked task folder, with its declared triggers.

    ``args`` (the operator's) override the manifest's defaults for the role.  Every path must be
    absolute: the entry point runs with ``task_dir`` as its working directory."""
    from fedmq.ftdl.manifest import load_manifest
    from fedmq.ftdl.paths import require_absolute
    from fedmq.ftdl.process import TaskProcess
    from fedmq.ftdl.reporter import ENV_OUTPUT_DIR, ENV_TASK_ID, rpc_env
    from fedmq.ftdl.triggers import TriggerRunner

    for path, what in ((task_dir, "task_dir"), (log_dir, "log_dir"), (data_dir, "data_dir")):
        require_absolute(path, what)
    for key in (ENV_OUTPUT_DIR,):
        if env and key in env:
            require_absolute(env[key], key)
    manifest = manifest or load_manifest(task_dir)
    entry = manifest.entry(role)
    merged = {**entry.args, **(args or {})}
    trigger_env = {ENV_TASK_ID: task_id, **rpc_env(rpc)}
    runner = TriggerRunner(manifest.triggers, task_dir=task_dir, log_dir=log_dir, env=trigger_env,
                           on_event=on_event)
    process = TaskProcess.for_entry(task_dir, entry.entry, args=merged, data_dir=data_dir, rpc=rpc,
                                    task_id=task_id, role=role, log_dir=log_dir, on_event=on_event,
                                    on_output=on_output, time_limit_s=time_limit_s,
                                    on_trigger=runner.handle, env=env)
    return process.start()

