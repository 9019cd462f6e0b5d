"""``TaskProcess``: the one process runner of fedmq.

Runs a child in its own process group with a controlled environment, its output in rotating log
files and streamed line by line, a reporter pipe for typed messages, and an optional time limit.
Every ending becomes one ``exit`` event with a cause -- finished, exit code, signal, time limit,
stopped -- so nothing that runs a task can hang on a child that died without a word.  After the
child ends, whatever is left of its process group is killed: no orphans.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from fedmq.ftdl import reporter as rep
from fedmq.ftdl.channel import ENV_FD, FrameReader, ReporterMessage

log = logging.getLogger("fedmq.ftdl.process")

# What a child inherits from our environment; everything else it gets is set explicitly.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "SYSTEMROOT",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS")
GROUP_REAP_TIMEOUT_S = 5.0
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
TAIL_LINES = 40
MAX_LINE_BYTES = 16 * 1024


@dataclass
class TaskEvent:
    """Something a task process did: a reporter message, a trigger's outcome, its exit."""

    kind: str
    data: dict[str, Any]
    task_id: str
    role: str
    ts: float = field(default_factory=time.time)


@dataclass
class TaskOutcome:
    ok: bool
    cause: str
    exit_code: int | None = None
    signal: str | None = None
    stopped: bool = False
    timed_out: bool = False
    error: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    log_tail: list[str] = field(default_factory=list)
    duration_s: float = 0.0


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc; elsewhere, whether
    signal 0 still reaches the group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat_line[stat_line.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as the system knows it: its pid and when it started (in clock ticks since
    boot), so a pid reused by another process later is not mistaken for it."""

    pid: int
    started: int

    def to_text(self) -> str:
        return f"{self.pid}:{self.started}"

    @classmethod
    def from_text(cls, text: str | None) -> ProcessIdentity | None:
        try:
            pid, started = (int(part) for part in (text or "").split(":"))
        except ValueError:
            return None
        return cls(pid, started)


def process_identity(pid: int) -> ProcessIdentity | None:
    """Who has this pid now (None: nobody, or not readable here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return ProcessIdentity(pid, int(fields[19])) if len(fields) > 19 and fields[0] not in ("Z", "X") else None


def kill_group(pgid: int, timeout_s: float = GROUP_REAP_TIMEOUT_S) -> list[int]:
    """SIGKILL a process group and wait until none of it is alive; returns the survivors (empty
    unless a process could not be killed within ``timeout_s``, which is logged)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        alive = group_members(pgid)
        if not alive or time.monotonic() > deadline:
            if alive:
                log.error("process group %d still has %s %.0f s after SIGKILL", pgid, alive, timeout_s)
            return alive
        time.sleep(0.01)


def controlled_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class TaskProcess:
    """A supervised child.  Build it with ``for_entry`` (a task's Python entry point) or with a
    plain ``argv`` (triggers); ``start()``, then ``wait()`` or ``stop()``."""

    def __init__(self, argv: list[str], *, cwd: Path, task_id: str, role: str,
                 log_dir: Path, env: dict[str, str] | None = None,
                 on_event: Callable[[TaskEvent], None] | None = None,
                 on_output: Callable[[str, str], None] | None = None,
                 time_limit_s: float | None = None, expect_finish: bool = True,
                 on_trigger: Callable[[TaskProcess, ReporterMessage], None] | None = None) -> None:
        self.argv = argv
        self.cwd = Path(cwd)
        self.task_id, self.role = task_id, role
        self.env = env or {}
        self.on_event = on_event or (lambda event: None)
        self.on_output = on_output
        self.on_trigger = on_trigger
        self.time_limit_s = time_limit_s
        self.expect_finish = expect_finish
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{task_id}.{role}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.outcome: TaskOutcome | None = None
        self._done = threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._error: dict[str, Any] | None = None
        self._finished: dict[str, Any] | None = None
        self._stopping = False
        self._timed_out = False
        self._threads: list[threading.Thread] = []
        self._log_handler: logging.handlers.RotatingFileHandler | None = None
        self._started_at = 0.0

    @classmethod
    def for_entry(cls, task_dir: Path, entry: str, *, args: dict[str, Any] | None = None,
                  data_dir: Path | None = None, rpc: dict[str, str] | None = None,
                  **kwargs: Any) -> TaskProcess:
        """Run ``entry`` (a .py file of the task folder) under ``ftdl.bootstrap``."""
        import json

        env = {rep.ENV_TASK_ID: kwargs["task_id"], rep.ENV_ROLE: kwargs["role"],
               rep.ENV_ARGS: json.dumps(args or {})}
        if data_dir is not None:
            env[rep.ENV_DATA_DIR] = str(data_dir)
        env.update(rep.rpc_env(rpc))
        env.update(kwargs.pop("env", None) or {})
        argv = [sys.executable, "-m", "fedmq.ftdl.bootstrap", entry]
        return cls(argv, cwd=Path(task_dir), env=env, **kwargs)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> TaskProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.handlers.RotatingFileHandler(
            self.log_path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(message)s"))
        read_fd, write_fd = os.pipe()
        env = controlled_env({**self.env, ENV_FD: str(write_fd)})
        self._started_at = time.monotonic()
        try:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            self._finish_outcome(TaskOutcome(False, f"could not start: {exc}"))
            return self
        finally:
            if self.process is not None:
                os.close(write_fd)
        reader = FrameReader(read_fd, self._on_frame, self._on_drop)
        self._spawn(reader.run, "reporter")
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None and stderr is not None
        self._spawn(lambda: self._pump("stdout", stdout), "stdout")
        self._spawn(lambda: self._pump("stderr", stderr), "stderr")
        threading.Thread(target=self._monitor, name=f"{self.task_id}-{self.role}-monitor",
                         daemon=True).start()
        self._emit("started", {"pid": self.process.pid, "argv": self.argv[-1:]})
        return self

    def wait(self, timeout: float | None = None) -> TaskOutcome | None:
        self._done.wait(timeout)
        return self.outcome

    @property
    def running(self) -> bool:
        return self.process is not None and not self._done.is_set()

    def stop(self, grace_s: float = 5.0) -> TaskOutcome | None:
        """Terminate the whole group, wait ``grace_s``, then kill it."""
        if self.process is None or self._done.is_set():
            return self.outcome
        self._stopping = True
        self._signal_group(signal.SIGTERM)
        if not self._done.wait(grace_s):
            self._signal_group(signal.SIGKILL)
            self._done.wait(grace_s)
        return self.outcome

    # --- internals -------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{self.task_id}-{self.role}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self.on_event(TaskEvent(kind, data, self.task_id, self.role))
        except Exception:
            log.exception("task event handler failed")

    def _on_frame(self, message: ReporterMessage) -> None:
        if message.kind == "error":
            self._error = message.data
        elif message.kind == "finished":
            self._finished = message.data
        elif message.kind == "trigger" and self.on_trigger is not None:
            self.on_trigger(self, message)
            return
        self._emit(message.kind, message.data)

    def _on_drop(self, reason: str) -> None:
        log.warning("%s/%s: reporter frame dropped: %s", self.task_id, self.role, reason)

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        handler = self._log_handler
        for raw in iter(lambda: stream.readline(MAX_LINE_BYTES), b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._tail.append(line)
            if handler is not None:
                handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
            if self.on_output is not None:
                try:
                    self.on_output(name, line)
                except Exception:
                    log.exception("output handler failed")
        stream.close()

    def _monitor(self) -> None:
        assert self.process is not None
        try:
            code = self.process.wait(self.time_limit_s)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            self._signal_group(signal.SIGTERM)
            try:
                code = self.process.wait(3.0)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                code = self.process.wait()
        # Whatever the child left behind in its group dies before the outcome is reported, so a
        # caller that sees the exit never finds a leftover still running.
        kill_group(self.process.pid)
        for thread in self._threads:
            thread.join(5.0)
        self._finish_outcome(self._judge(code))

    def _judge(self, code: int) -> TaskOutcome:
        duration = time.monotonic() - self._started_at
        sig = signal.Signals(-code).name if code < 0 else None
        base: dict[str, Any] = dict(exit_code=code if code >= 0 else None, signal=sig, error=self._error,
                    finished=self._finished, log_tail=list(self._tail), duration_s=round(duration, 3))
        if self._timed_out:
            return TaskOutcome(False, f"time limit of {self.time_limit_s:g} s exceeded", timed_out=True, **base)
        if self._stopping:
            return TaskOutcome(False, "stopped", stopped=True, **base)
        if sig is not None:
            return TaskOutcome(False, f"killed by signal {sig}", **base)
        if code != 0:
            why = f"exit code {code}"
            if self._error:
                why += f": {self._error.get('type')}: {self._error.get('message')}"
            return TaskOutcome(False, why, **base)
        if self.expect_finish and self._finished is None:
            return TaskOutcome(False, "exited without reporting that it finished", **base)
        return TaskOutcome(True, "finished", **base)

    def _finish_outcome(self, outcome: TaskOutcome) -> None:
        self.outcome = outcome
        if self._log_handler is not None:
            self._log_handler.close()
        self._emit("exit", asdict(outcome))
        self._done.set()
