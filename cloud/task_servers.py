"""Supervision of the tasks' Flower servers: each an ftdl child process on the cloud host, in its
own process group, with its run folder (logs, the final model) under the cloud home."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.net import free_port
from fedmq.broker.urls import with_credentials
from fedmq.cloud.identities import Credentials
from fedmq.ftdl import TaskEvent, start_task
from fedmq.ftdl.paths import require_absolute
from fedmq.ftdl.process import ProcessIdentity, TaskProcess, process_identity
from fedmq.ftdl.reporter import ENV_FLOWER_ADDRESS, ENV_OUTPUT_DIR

STOP_GRACE_S = 5.0


@dataclass
class TaskSettings:
    home: Path
    broker_url: str
    prefix: str
    flower_bind: str = "0.0.0.0"
    flower_advertise: str = "127.0.0.1"
    server_time_limit_s: float | None = None
    allow_unsigned_code: bool = False  # development only: run server code from unsigned bundles
    fl_clear_delay_s: float = 20.0  # an ended serverless run's records stay this long (final model fetchers, stops)

    def __post_init__(self) -> None:
        require_absolute(self.home, "the cloud home")


@dataclass
class _Running:
    process: TaskProcess
    run: int
    stopping: bool = False
    done: threading.Event = field(default_factory=threading.Event)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


class ServerSupervisor:
    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()

    def pick_port(self, fixed: int | None) -> int | None:
        """The port a server will listen on: the task's own, or a free one; None if taken."""
        port = fixed if fixed is not None else free_port(self.settings.flower_bind)
        return port if port_free(self.settings.flower_bind, port) else None

    def start(self, task_id: str, run: int, folder: Path, run_dir: Path, args: dict[str, Any], port: int,
              on_event: Callable[[str, int, TaskEvent], None], credentials: Credentials) -> ProcessIdentity | None:
        """Start the task's server entry point; returns who it is (pid and start time).  Its code,
        and its triggers, get the task's own credentials, never the cloud's.  Raises
        ``ManifestError`` (no server entry point) or ``OSError`` (it could not be started)."""
        process = start_task(
            folder, "server", task_id=task_id, log_dir=run_dir, args=args,
            on_event=lambda event: on_event(task_id, run, event),
            rpc={"broker": with_credentials(self.settings.broker_url, credentials.name, credentials.password),
                 "prefix": self.settings.prefix, "caller": credentials.name,
                 "client_id": credentials.clientid or ""},
            env={ENV_FLOWER_ADDRESS: f"{self.settings.flower_bind}:{port}", ENV_OUTPUT_DIR: str(run_dir)},
            time_limit_s=self.settings.server_time_limit_s)
        with self._lock:
            self._running[task_id] = _Running(process, run)
        return process_identity(process.process.pid) if process.process else None

    def stop(self, task_id: str, grace_s: float = STOP_GRACE_S) -> int | None:
        """Stop the task's server and wait for it; returns the run it served (None if none ran)."""
        with self._lock:
            entry = self._running.get(task_id)
            if entry is None:
                return None
            entry.stopping = True
        entry.process.stop(grace_s=grace_s)
        entry.done.wait(2 * grace_s)
        return entry.run

    def ended(self, task_id: str, run: int) -> bool:
        """The server of ``run`` exited; True if that was a stop asked for (not its own end)."""
        with self._lock:
            entry = self._running.get(task_id)
            if entry is None or entry.run != run:
                return False
            self._running.pop(task_id, None)
        entry.done.set()
        return entry.stopping

    def run_of(self, task_id: str) -> int | None:
        """The run whose server this host runs for the task (None: none here)."""
        with self._lock:
            entry = self._running.get(task_id)
            return None if entry is None or entry.stopping else entry.run

    def pid(self, task_id: str) -> int | None:
        entry = self._running.get(task_id)
        return entry.process.process.pid if entry and entry.process.process else None

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    @staticmethod
    def kill_orphan(recorded: ProcessIdentity) -> bool:
        """The server of a cloud that died, killed with its process group -- only if the process
        with the recorded pid is still the one recorded (same start time): a pid the system has
        given to another process since is never signalled.  True if it was killed."""
        if process_identity(recorded.pid) != recorded:
            return False
        try:
            os.killpg(recorded.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True
