"""Group commit: writes from many threads in one transaction.

On SQLite every commit is an fsync, and device requests and presence updates each wrote their own
transaction: at fleet scale the commits, not the work, were the cost.  A writer thread takes
everything queued, runs it in one transaction, then wakes the threads that wait for it; what a
write asked to do after the commit (publish its events) runs in that waiting thread, or for a
``write_later`` in the writer.

Two ways in, for two promises:
- ``write(fn)`` blocks until ``fn`` is committed and raises what it raised: an answer sent after
  it (an offer) is never lost, whatever happens to the process next.
- ``write_later(fn)`` returns at once: for what the broker hands the cloud again anyway (presence
  is retained), it is committed within ``max_delay_s``.

``close()`` (the cloud's stop, on SIGTERM too) commits whatever is queued before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from peewee import Database

from fedmq.cloud.db import write_transaction

log = logging.getLogger("fedmq.cloud.write_batch")
AfterCommit = Callable[[], None]
Write = Callable[[], AfterCommit | None]
MAX_DELAY_S = 0.005
MAX_BATCH = 1000


@dataclass
class _Pending:
    write: Write
    done: threading.Event | None = None  # None: nobody waits
    error: BaseException | None = None
    after: AfterCommit | None = field(default=None)


class _WriteFailed(Exception):
    """A write of a batch raised: the batch is rolled back and run again write by write."""


def _run_after(after: AfterCommit) -> None:
    try:
        after()
    except Exception:
        log.exception("an after-commit action failed")


class WriteBatcher:
    def __init__(self, db: Database, max_delay_s: float = MAX_DELAY_S, max_batch: int = MAX_BATCH) -> None:
        self.db, self.max_delay_s, self.max_batch = db, max_delay_s, max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self.stats = {"batches": 0, "writes": 0, "largest": 0}
        self._thread = threading.Thread(target=self._run, name="write-batch", daemon=True)
        self._thread.start()

    def write(self, fn: Write) -> None:
        """Run ``fn`` inside the next batch's transaction; return once it is committed.  ``fn``
        only writes to the database: when another write of its batch raises, everything is
        rolled back and ``fn`` runs a second time, in a savepoint of its own."""
        if self._closed or threading.current_thread() is self._thread:
            self._direct(fn)  # after close, or a write from inside a batch: no waiting on ourselves
            return
        pending = _Pending(fn, threading.Event())
        self._queue.put(pending)
        assert pending.done is not None
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        if pending.after is not None:
            # The caller's thread, not the writer's: publishing 15 offers' events inside the one
            # writer thread held up every other device's commit behind it.
            _run_after(pending.after)

    def write_later(self, fn: Write) -> None:
        """Queue ``fn``; it is committed within ``max_delay_s`` (or at ``close``)."""
        if self._closed:
            self._direct(fn)
            return
        self._queue.put(_Pending(fn))

    def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _direct(self, fn: Write) -> None:
        with write_transaction(self.db):
            after = fn()
        if after is not None:
            after()

    def _take(self) -> tuple[list[_Pending], bool]:
        """The next batch, and whether close() was asked.  A batch is everything queued now; a
        write someone waits for is committed at once (what queues meanwhile forms the next
        batch: no added latency), a batch of queued writes waits up to max_delay_s for company."""
        batch: list[_Pending] = []
        closing = False

        def add(item: _Pending | None) -> None:
            nonlocal closing
            if item is None:
                closing = True
            else:
                batch.append(item)

        def drain() -> None:
            while not closing and len(batch) < self.max_batch:
                try:
                    add(self._queue.get_nowait())
                except queue.Empty:
                    return

        add(self._queue.get())
        drain()
        deadline = time.monotonic() + self.max_delay_s
        while not closing and len(batch) < self.max_batch and all(p.done is None for p in batch):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                add(self._queue.get(timeout=left))
            except queue.Empty:
                break
            drain()
        return batch, closing

    def _run(self) -> None:
        while True:
            batch, last = self._take()
            if batch:
                self._commit(batch)
            if last:
                rest = []  # a write that raced close() past its check
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        rest.append(item)
                if rest:
                    self._commit(rest)
                return

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            if not self._all_at_once(batch):  # one write raised: again, each in its savepoint
                with write_transaction(self.db):
                    for pending in batch:
                        pending.after = self._savepoint(pending)
        except BaseException as exc:  # the commit itself failed: every write in it failed
            log.exception("a batch of %d writes failed to commit", len(batch))
            for pending in batch:
                pending.error = pending.error or exc
        self.stats["batches"] += 1
        self.stats["writes"] += len(batch)
        self.stats["largest"] = max(self.stats["largest"], len(batch))
        for pending in batch:
            if pending.error is None and pending.after is not None and pending.done is None:
                _run_after(pending.after)  # a write someone waits for: they run it (write())
            if pending.done is not None:
                pending.done.set()
            elif pending.error is not None:
                log.error("a queued write failed: %s", pending.error)

    def _all_at_once(self, batch: list[_Pending]) -> bool:
        """The batch in one transaction with no savepoints: what almost always happens, at half
        the statements (each statement gives up the GIL and waits to get it back behind the
        request threads: the savepoints made the writer the fleet's bottleneck).  False, with
        nothing written, when a write raised."""
        afters: list[AfterCommit | None] = []
        try:
            with write_transaction(self.db):
                for pending in batch:
                    try:
                        afters.append(pending.write())
                    except Exception as exc:
                        raise _WriteFailed from exc
        except _WriteFailed:
            return False
        for pending, after in zip(batch, afters, strict=True):
            pending.after = after
        return True

    def _savepoint(self, pending: _Pending) -> AfterCommit | None:
        """One write in its own savepoint: a write that raises is undone alone, and its caller
        gets the error; the rest of the batch commits."""
        try:
            with self.db.atomic():
                return pending.write()
        except Exception as exc:
            pending.error = exc
            return None

