"""Triggers: small programs a task declares in its manifest and fires while it runs.

A task asks (``reporter.trigger("lower_lr", "0.01")``); the parent checks the name against the
manifest -- an undeclared name is refused with an event, so a task cannot run arbitrary
commands -- and runs the declared command with the arguments as a ``TaskProcess`` with the
trigger's time limit.  A trigger gets the cloud's RPC coordinates in its environment, so it can
call back (change hyper-parameters, start or stop tasks), which closes AGATA's loop.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from fedmq.ftdl.channel import ReporterMessage
from fedmq.ftdl.manifest import TriggerSpec
from fedmq.ftdl.process import TaskEvent, TaskProcess

MAX_ARGS = 32
MAX_ARG_LENGTH = 1024


class TriggerRunner:
    def __init__(self, specs: dict[str, TriggerSpec], *, task_dir: Path, log_dir: Path,
                 env: dict[str, str], on_event: Callable[[TaskEvent], None],
                 max_concurrent: int = 1) -> None:
        """One trigger of a task at a time by default: they share the task's credentials, which
        may connect with one client id only."""
        self.specs = specs
        self.task_dir, self.log_dir, self.env = Path(task_dir), Path(log_dir), env
        self.on_event = on_event
        self._slots = threading.Semaphore(max_concurrent)

    def handle(self, source: TaskProcess, message: ReporterMessage) -> None:
        name = message.data["name"]
        args = message.data["args"]

        def emit(kind: str, **data: object) -> None:
            self.on_event(TaskEvent(kind, {"name": name, **data}, source.task_id, source.role))

        spec = self.specs.get(name)
        if spec is None:
            emit("trigger_refused", args=args[:MAX_ARGS], declared=sorted(self.specs),
                 reason=f"trigger {name!r} is not declared in the task manifest")
            return
        if len(args) > MAX_ARGS or not all(isinstance(a, str) and len(a) <= MAX_ARG_LENGTH for a in args):
            emit("trigger_refused", reason=f"trigger arguments must be at most {MAX_ARGS} strings "
                                           f"of at most {MAX_ARG_LENGTH} characters")
            return
        thread = threading.Thread(target=self._run, args=(spec, list(args), source, emit), daemon=True,
                                  name=f"trigger-{name}")
        thread.start()

    def _run(self, spec: TriggerSpec, args: list[str], source: TaskProcess,
             emit: Callable[..., None]) -> None:
        with self._slots:
            command = [sys.executable if part in ("python", "python3") and i == 0 else part
                       for i, part in enumerate(spec.command)]

            def forward(event: TaskEvent) -> None:  # the trigger may report too (info, log)
                if event.kind not in ("started", "exit", "finished"):
                    self.on_event(TaskEvent(event.kind, {**event.data, "trigger": spec.name},
                                            source.task_id, source.role))

            emit("trigger_started", args=args)
            proc = TaskProcess([*command, *args], cwd=self.task_dir, task_id=source.task_id,
                               role=f"trigger-{spec.name}", log_dir=self.log_dir, env=self.env,
                               on_event=forward, time_limit_s=spec.timeout_s, expect_finish=False)
            outcome = proc.start().wait()
            assert outcome is not None
            emit("trigger_result", args=args, ok=outcome.ok, cause=outcome.cause,
                 exit_code=outcome.exit_code, output=outcome.log_tail[-20:],
                 duration_s=outcome.duration_s)

