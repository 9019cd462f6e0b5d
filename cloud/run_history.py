"""Run history: every run of a task, its per-round metrics, its server's log and the final model,
from the event log and the run folders under ``<home>/runs/<task>/<run>/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmq.broker.events import EventKind
from fedmq.broker.schema import TaskState
from fedmq.cloud.db import Event
from fedmq.cloud.errors import RunNotFound
from fedmq.cloud.task_views import load_task
from fedmq.ftdl.bundle import file_digest
from fedmq.ftdl.reporter import MODEL_FILE

LOG_REPLY_BYTES = 256 * 1024  # the rest of a big log stays on the cloud host
_ENDS = {EventKind.TASK_FINISHED: TaskState.FINISHED, EventKind.TASK_FAILED: TaskState.FAILED,
         EventKind.TASK_STOPPED: TaskState.STOPPED}


class RunHistory:
    def __init__(self, home: Path) -> None:
        self.home = home

    def run_path(self, task_id: str, run: int) -> Path:
        return self.home / "runs" / task_id / str(run)

    def runs(self, task_id: str) -> list[dict[str, Any]]:
        """Each run of a task: when, with what, how it ended."""
        load_task(task_id)
        runs: dict[int, dict[str, Any]] = {}
        kinds = [EventKind.TASK_STARTED, *_ENDS]
        for event in Event.select().where((Event.task == task_id) & Event.kind.in_(kinds)).order_by(Event.ts):
            if event.run is None:
                continue
            if event.kind == EventKind.TASK_STARTED:
                runs[event.run] = {"run": event.run, "started": event.ts, "finished": None, "state": TaskState.RUNNING,
                                   **{k: event.data.get(k) for k in ("bundle", "args", "criteria", "revision")}}
            elif event.run in runs:
                runs[event.run].update(finished=event.ts, state=_ENDS[EventKind(event.kind)],
                                       reason=event.data.get("reason"), metrics=event.data.get("metrics"))
        return [runs[k] for k in sorted(runs)]

    def run_number(self, task_id: str, run: int | None) -> int:
        task = load_task(task_id)
        if run is None:
            if not task.run:
                raise RunNotFound(f"task {task_id} has not run yet")
            return int(task.run)
        if not 1 <= run <= task.run:
            raise RunNotFound(f"task {task_id} has no run {run} (runs 1..{task.run})")
        return run

    def metrics(self, task_id: str, run: int | None = None) -> dict[str, Any]:
        """Per-round metrics of a run (the server's aggregated ones), one row per round."""
        number = self.run_number(task_id, run)
        rows: dict[int, dict[str, Any]] = {}
        for event in Event.select().where((Event.task == task_id) & (Event.run == number) &
                                          (Event.kind == EventKind.ROUND_METRICS)).order_by(Event.ts):
            round_ = event.data.get("round")
            if isinstance(round_, int):
                rows.setdefault(round_, {"round": round_}).update(event.data.get("metrics") or {})
        return {"task": task_id, "run": number, "rounds": [rows[k] for k in sorted(rows)]}

    def run_dir(self, task_id: str, run: int | None) -> Path:
        return self.run_path(task_id, self.run_number(task_id, run))

    def logs(self, task_id: str, run: int | None, lines: int, max_bytes: int = LOG_REPLY_BYTES) -> dict[str, Any]:
        """The last ``lines`` lines of the run's server log, as many as fit in ``max_bytes``."""
        folder = self.run_dir(task_id, run)
        path = folder / f"{task_id}.server.log"
        text = path.read_text(errors="replace").splitlines() if path.is_file() else []
        tail, size = [], 0
        for line in reversed(text[-lines:]):
            size += len(line.encode()) + 1
            if size > max_bytes:
                break
            tail.append(line)
        tail.reverse()
        return {"task": task_id, "run": int(folder.name), "lines": tail, "total_lines": len(text),
                "truncated": len(tail) < min(lines, len(text))}

    def model_chunk(self, task_id: str, run: int | None, offset: int, size: int) -> dict[str, Any]:
        folder = self.run_dir(task_id, run)
        path = folder / MODEL_FILE
        if not path.is_file():
            raise RunNotFound(f"run {folder.name} of {task_id} saved no model "
                              "(it did not finish, or its server does not use fedmq.ftdl.flower.serve)")
        total = path.stat().st_size
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        digest = file_digest(path) if offset == 0 else None
        return {"task": task_id, "run": int(folder.name), "size": total, "offset": offset, "data": data,
                "sha256": digest}
