"""What the cloud records of a serverless run, which it only observes: no server of its own runs.

Each participant's retained ``global`` record (``tasks/<task>/fl/<device>/global``) says which
round it aggregated, from which updates, with which fit metrics and the evaluation of the round
before.  They become the same reports a Flower server makes -- progress (``round_done``,
round/total in the announcement) and stats (``round_metrics``) -- handed to the task lifecycle
as if its server had sent them, so ``fedmq task metrics|events|wait`` read both modes alike.
The final record points at the final model's blob: it is fetched, verified and saved in the run
folder as ``model.npz`` (where a Flower server saves it, so ``fedmq task model`` works), and the
run is finished.  Who aggregated each round, and failovers, are in the participants' own
``fl_*`` events, which the cloud records like every device step.

Records are retained, so a cloud that was down catches up when it subscribes again; rounds
already recorded are skipped.  Only the replica that owns the task records it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.broker.schema import TaskState
from fedmq.cloud.db import Task
from fedmq.cloud.run_history import RunHistory
from fedmq.cloud.task_lifecycle import TaskLifecycle
from fedmq.ftdl import TaskEvent
from fedmq.ftdl.channel import ReporterKind
from fedmq.ftdl.chunks import ChunkError
from fedmq.ftdl.reporter import MODEL_FILE
from fedmq.ftdl.serverless.records import GlobalRecord

log = logging.getLogger("fedmq.cloud.serverless")
# (task, owner, digest) -> the verified arrays of a blob
FetchModel = Callable[[str, str, str], list[np.ndarray]]


class ServerlessRuns:
    def __init__(self, lifecycle: TaskLifecycle, history: RunHistory, fetch_model: FetchModel) -> None:
        self.lifecycle, self.history, self.fetch_model = lifecycle, history, fetch_model
        self._recorded: dict[tuple[str, int], set[int]] = {}  # rounds recorded per (task, run)
        self._lock = threading.Lock()

    def on_global(self, task_id: str, device: str, record: GlobalRecord) -> None:
        """A participant's global record (``device`` is the level it arrived on)."""
        if record.aggregator != device:
            return  # a record that names another publisher than its level is not one
        task = Task.get_or_none(Task.id == task_id)
        if (task is None or task.state != TaskState.RUNNING or str(task.run) != record.run
                or not self.lifecycle.observes(task) or not self.lifecycle.is_serverless(task)):
            return
        run = int(task.run)
        key = record.round if not record.final else -1  # one final per run
        with self._lock:
            seen = self._recorded.setdefault((task_id, run), set())
            if key in seen or (not record.final and record.round <= (task.current_round or 0)):
                return  # recorded already (a retained record seen again, a second rightful global)
            seen.add(key)
        self._record_round(task_id, run, record, int(task.total_rounds or 0))
        if record.final:
            threading.Thread(target=self._finish, args=(task_id, run, record), name=f"fl-final-{task_id}",
                             daemon=True).start()

    def _report(self, task_id: str, run: int, kind: str, data: dict[str, Any]) -> None:
        self.lifecycle.on_server_event(task_id, run, TaskEvent(kind=kind, data=data, task_id=task_id, role="server"))

    def _record_round(self, task_id: str, run: int, record: GlobalRecord, total: int) -> None:
        evaluation = record.evaluation
        if evaluation is not None and evaluation.round >= 1:  # the evaluation of the global before
            stats = {**evaluation.metrics, "loss": evaluation.loss, "eval_examples": evaluation.num_examples}
            self._report(task_id, run, ReporterKind.STATS,
                         {"round": evaluation.round, "metrics": {k: v for k, v in stats.items() if v is not None}})
        if record.final or record.round < 1:
            return
        fit = {"fit_clients": len(record.contributors), "fit_failures": len(record.rejected),
               "aggregator": record.aggregator,
               **{k if k == "examples" else f"train_{k}": v for k, v in record.metrics.items()}}
        self._report(task_id, run, ReporterKind.STATS, {"round": record.round, "metrics": fit})
        self._report(task_id, run, ReporterKind.PROGRESS, {"round": record.round, "total": total or record.round})

    def _finish(self, task_id: str, run: int, record: GlobalRecord) -> None:
        """The final model: fetched and verified from its owner's blobs, saved, and the run ends."""
        try:
            arrays = self.fetch_model(task_id, record.owner, record.digest)
            path = self._save(self.history.run_path(task_id, run), arrays)
        except (ChunkError, OSError) as exc:
            log.error("task %s run %s: the final model %s could not be fetched: %s", task_id, run,
                      record.digest[:12], exc)
            self._report(task_id, run, "exit", {"ok": False, "cause": f"the final model {record.digest[:12]} "
                                                                      f"could not be fetched: {exc}"})
            return
        metrics = dict(record.evaluation.metrics) if record.evaluation else {}
        if record.evaluation is not None and record.evaluation.loss is not None:
            metrics["loss"] = record.evaluation.loss
        self._report(task_id, run, ReporterKind.FINISHED,
                     {"rounds": record.completed, "metrics": metrics, "model": str(path), "digest": record.digest,
                      "reason": record.reason, "aggregator": record.aggregator})
        self._report(task_id, run, "exit", {"ok": True})
        with self._lock:
            self._recorded.pop((task_id, run), None)

    @staticmethod
    def _save(folder: Path, arrays: list[np.ndarray]) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MODEL_FILE
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, *arrays)
        partial.replace(path)
        return path
