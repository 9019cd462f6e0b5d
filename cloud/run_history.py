"""Run history: every run of a task, its per-round metrics, its server's log and the final model,
from the event log and the run folders under ``<home>/runs/<task>/<run>/``.

A run's record is its lineage: what it was started with (the revision), who trained (the
cohort), on what (each device's data fingerprint), how it ended and which model it saved."""

from __future__ import annotations

import re
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


# What a run was started with: enough, with the bundle's own defaults, to start it again.
_REVISION_KEYS = ("revision", "bundle", "args", "criteria", "requirements", "selection", "mode")
_RECORD_KINDS = [EventKind.TASK_STARTED, *_ENDS, EventKind.CLIENT_STARTED, EventKind.CLIENT_DATA,
                 EventKind.ROUND_METRICS]
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _fingerprint(data: dict[str, Any]) -> dict[str, Any] | None:
    """A device's ``client_data`` as the record keeps it; anything else a device sent is not one
    (the cloud records devices' events leniently, so it is checked again here)."""
    digest, examples = data.get("digest"), data.get("examples")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        return None
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        return None
    return {"digest": digest, "examples": examples}


class RunHistory:
    def __init__(self, home: Path) -> None:
        self.home = home
        self._model_digests: dict[tuple[str, int, int], str] = {}

    def run_path(self, task_id: str, run: int) -> Path:
        return self.home / "runs" / task_id / str(run)

    def runs(self, task_id: str) -> list[dict[str, Any]]:
        """Each run of a task, oldest first, as its full record (``run``)."""
        load_task(task_id)
        return self._records(task_id, None)

    def run(self, task_id: str, run: int | None = None) -> dict[str, Any]:
        """One run's full record (default: the latest): enough to run it again and to tell it
        from another -- ``{task, run, started, finished, state, reason, revision: {revision,
        bundle, args, criteria, requirements, mode}, cohort: [devices that started a client in
        it], data: {device: {digest, examples}}, metrics: final, rounds, model: {sha256, size} | None}``."""
        number = self.run_number(task_id, run)
        records = self._records(task_id, number)
        if not records:  # numbered by the task but never recorded as started (an old database)
            raise RunNotFound(f"task {task_id} has no record of run {number}")
        return records[0]

    def _records(self, task_id: str, only: int | None) -> list[dict[str, Any]]:
        """The records of every run (or run ``only``) from one pass over the task's events."""
        query = Event.select(Event.kind, Event.ts, Event.run, Event.device, Event.data).where(
            (Event.task == task_id) & Event.kind.in_(_RECORD_KINDS) & Event.run.is_null(False))
        if only is not None:
            query = query.where(Event.run == only)
        runs: dict[int, dict[str, Any]] = {}
        cohorts: dict[int, set[str]] = {}
        rounds: dict[int, set[int]] = {}
        for event in query.order_by(Event.ts, Event.id):
            number, data = event.run, event.data or {}
            if number is None:
                continue
            if event.kind == EventKind.TASK_STARTED:
                runs[number] = {"task": task_id, "run": number, "started": event.ts, "finished": None,
                                "state": TaskState.RUNNING, "reason": None,
                                "revision": {k: data.get(k) for k in _REVISION_KEYS},
                                "cohort": [], "data": {}, "metrics": None, "rounds": 0, "model": None}
                cohorts[number], rounds[number] = set(), set()
            elif number not in runs:
                continue
            elif event.kind in _ENDS:
                runs[number].update(finished=event.ts, state=_ENDS[EventKind(event.kind)],
                                    reason=data.get("reason"), metrics=data.get("metrics"))
            elif event.kind == EventKind.CLIENT_STARTED and event.device:
                cohorts[number].add(event.device)
            elif event.kind == EventKind.CLIENT_DATA and event.device:
                fingerprint = _fingerprint(data)
                if fingerprint is not None:  # the last one a device sent in the run counts
                    runs[number]["data"][event.device] = fingerprint
            elif event.kind == EventKind.ROUND_METRICS and isinstance(data.get("round"), int):
                rounds[number].add(data["round"])
        for number, record in runs.items():
            record["cohort"] = sorted(cohorts[number])
            record["data"] = dict(sorted(record["data"].items()))
            record["rounds"] = len(rounds[number])
            record["model"] = self._model(self.run_path(task_id, number) / MODEL_FILE)
        return [runs[k] for k in sorted(runs)]

    def _model(self, path: Path) -> dict[str, Any] | None:
        """The saved model's identity, hashed once per version of the file (the list of runs
        asks for every run's, every time)."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._model_digests:
            if len(self._model_digests) > 4096:
                self._model_digests.clear()
            self._model_digests[key] = file_digest(path)
        return {"sha256": self._model_digests[key], "size": stat.st_size}

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
