"""What the agent keeps across restarts: its presence session counter and its quarantine.

One small JSON file, replaced atomically on every change.  A task that failed here is
quarantined with exponential backoff (30 s doubling to 1 h); a new revision of the task (the
operator changed something) lifts it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 3600.0


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON atomically: a crash leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@dataclass
class Quarantine:
    revision: int
    failures: int
    until: float
    cause: str


@dataclass
class AgentState:
    path: Path
    session: int = 0
    quarantine: dict[str, Quarantine] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        state = cls(path)
        try:
            data = json.loads(path.read_text())
            state.session = int(data.get("session", 0))
            state.quarantine = {k: Quarantine(**v) for k, v in (data.get("quarantine") or {}).items()}
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError):
            # A damaged state file must not keep a device off the fleet; start clean but keep
            # the session moving forward so presence stays ordered.
            state.session = int(time.time())
        return state

    def save(self) -> None:
        write_json(self.path, {"session": self.session,
                               "quarantine": {k: asdict(v) for k, v in self.quarantine.items()}})

    def next_session(self) -> int:
        with self._lock:
            self.session += 1
            self.save()
            return self.session

    def quarantine_task(self, task: str, revision: int, cause: str, now: float | None = None) -> Quarantine:
        with self._lock:
            previous = self.quarantine.get(task)
            failures = previous.failures + 1 if previous and previous.revision == revision else 1
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (failures - 1))
            entry = Quarantine(revision, failures, (now or time.time()) + delay, cause[:500])
            self.quarantine[task] = entry
            self.save()
            return entry

    def blocked(self, revisions: dict[str, int], now: float | None = None) -> set[str]:
        """Task ids still quarantined for the revision now offered."""
        now = now or time.time()
        return {task for task, q in self.quarantine.items()
                if q.until > now and revisions.get(task, q.revision) == q.revision}
