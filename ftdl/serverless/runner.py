"""One participant of a serverless task: trains a Flower ``NumPyClient`` round after round with
no server, aggregating when elected.

Round ``r`` as each participant runs it:

1. It holds global ``r-1`` (verified) and evaluates it (from round 1 on).
2. If sampled for ``r`` and ``r`` is within the rounds, it fits on it and publishes its weights
   blob; then, sampled or not, its retained ``update`` record: round, base digest, blob, example
   count, fit metrics and the evaluation of ``r-1``.
3. It elects the aggregator of ``r`` over the roster global ``r-1`` names, minus whoever is offline
   or not electable now.  If that is itself, it waits until every live sampled participant's
   update for ``(r, base)`` is in (or the round's deadline passes with at least one), verifies and
   averages them, and publishes global ``r`` -- or, past the last round or on reaching the target,
   the final record.  A participant whose elected aggregator's last will arrives re-elects at
   once; the new aggregator works from the updates already retained, so the round is neither
   lost nor counted twice (a round is keyed by ``(r, base)``; the first rightful global for it
   is the only one a participant accepts).
4. It accepts global ``r`` from the aggregator it elects (judged on the view when the record
   arrived), fetches and verifies it, and goes on.

Round 0 is the initial model: once ``min_participants`` are online and membership has been quiet
for ``quiet_s``, the participant elected for round 0 publishes its ``get_parameters``.  A late
joiner (or one that restarted) adopts the newest global it finds and joins from the next round.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedmq.broker.connection import MqttConnection, Will
from fedmq.broker.events import EventRecord, publish_event
from fedmq.broker.presence import OFFLINE, ONLINE
from fedmq.broker.topics import DEFAULT_PREFIX, Topics
from fedmq.ftdl.chunks import ChunkError
from fedmq.ftdl.reporter import ENV_RUN
from fedmq.ftdl.serverless.aggregate import AggregateFn, resolve, weighted_average
from fedmq.ftdl.serverless.blobs import ArraySpec, BlobManifest, Blobs, specs
from fedmq.ftdl.serverless.config import ServerlessConfig
from fedmq.ftdl.serverless.election import Candidate, elect, sample, score
from fedmq.ftdl.serverless.events import FlEvent
from fedmq.ftdl.serverless.records import (
    Contribution,
    Evaluation,
    GlobalRecord,
    Member,
    ParticipantState,
    Point,
    UpdateRecord,
)
from fedmq.ftdl.serverless.view import SeenGlobal, View

log = logging.getLogger("fedmq.ftdl.serverless")



class NumPyClientLike(Protocol):
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]: ...
    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any: ...
    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any: ...


class ServerlessError(RuntimeError):
    """The run cannot go on here (no quorum in time, a model of the wrong shape, ...)."""


@dataclass
class RunResult:
    rounds: int
    digest: str
    reason: str
    metrics: dict[str, Any]
    arrays: list[np.ndarray]
    accepted: list[tuple[int, str, str]] = field(default_factory=list)  # (round, digest, aggregator)
    aggregated: list[int] = field(default_factory=list)                 # rounds this participant aggregated


def participant_connection(url: str, *, task: str, device: str, run: str, client_id: str | None = None,
                           topics: Topics | None = None, eligible: bool = True) -> MqttConnection:
    """A connection whose last will marks this participant offline in the task (a fresh session
    counter on every connect: milliseconds since the epoch), and whose every (re)connect announces
    it online.  Start it, then hand it to ``ServerlessRunner``."""
    topics = topics or Topics()
    topic = topics.fl(task, device, "state")
    holder: dict[str, int] = {"session": 0}

    def will() -> Will:
        holder["session"] = max(holder["session"] + 1, time.time_ns() // 1_000_000)
        return Will(topic, ParticipantState(state=OFFLINE, session=holder["session"], run=run,
                                            eligible=eligible).encode(), qos=1, retain=True)

    connection = MqttConnection(client_id or f"fedmq-fl-{device}-{uuid.uuid4().hex[:6]}", url, will_factory=will)

    def birth(_session_present: bool) -> None:
        connection.publish(topic, ParticipantState(state=ONLINE, session=holder["session"], run=run,
                                                   eligible=eligible).encode(), qos=1, retain=True)

    connection.add_connect_listener(birth)
    connection.serverless_session = lambda: holder["session"]  # type: ignore[attr-defined]
    return connection


class ServerlessRunner:
    def __init__(self, client: NumPyClientLike, connection: MqttConnection, *, task: str, device: str,
                 run: str = "0", config: ServerlessConfig | None = None, topics: Topics | None = None,
                 aggregate: str | AggregateFn | None = None, reporter: Any = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 fit_config: dict[str, Any] | None = None) -> None:
        self.client, self.connection = client, connection
        self.task, self.device, self.run = task, device, run
        self.config = config or ServerlessConfig()
        self.topics = topics or Topics()
        self.aggregate_fn = resolve(aggregate if aggregate is not None else self.config.aggregate)
        self.reporter = reporter
        self.on_event = on_event
        self.fit_config = fit_config or {}
        self.view = View(self.topics, task, run)
        self.blobs = Blobs(connection, self.topics, task, chunk_size=self.config.chunk_size)
        self.spec: list[ArraySpec] = []
        self.result = RunResult(0, "", "", {}, [])
        self._my_globals: list[BlobManifest] = []
        self._my_update: BlobManifest | None = None
        self._elected: dict[int, str] = {}
        self._published: set[tuple[int, str | None]] = set()      # (round, base) this one has aggregated
        self._rejected: set[tuple[str, str | None]] = set()       # (device, blob) refused updates

    # --- plumbing --------------------------------------------------------------------------
    @property
    def session(self) -> int:
        getter = getattr(self.connection, "serverless_session", None)
        return int(getter()) if getter else 0

    def emit(self, kind: FlEvent, **data: Any) -> None:
        record = EventRecord(component=f"fl:{self.device}", kind=kind.value, task=self.task, device=self.device,
                             run=int(self.run) if self.run.isdigit() else None,  # the cloud files it by run
                             data={"run": self.run, **data})
        try:
            publish_event(self.connection, self.topics, record, as_device=True)
        except Exception:  # an event is never worth the run
            log.exception("could not publish %s", kind)
        if self.on_event is not None:
            self.on_event(kind.value, record.data)

    def _publish_record(self, leaf: str, payload: bytes) -> None:
        self.connection.publish(self.topics.fl(self.task, self.device, leaf), payload, qos=1,
                                retain=True).wait_for_publish(30)

    def _report(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.reporter is not None:
            getattr(self.reporter, method)(*args, **kwargs)

    # --- the run ---------------------------------------------------------------------------
    def run_to_end(self) -> RunResult:
        self.spec = specs(self.client.get_parameters({}))
        self.view.subscribe(self.connection)
        self.emit(FlEvent.JOINED, session=self.session)
        current = self._initial()
        while True:
            arrays = self._load(current)
            self._accepted(current)
            if current.final:
                return self._finish(current, arrays)
            current = self._round(current, arrays)

    def _load(self, record: GlobalRecord) -> list[np.ndarray]:
        """Fetch and verify a global model (every participant does, before using it)."""
        return self.blobs.fetch(record.owner, record.digest, expect=self.spec,
                                stall_timeout=self.config.round_deadline_s)

    def _accepted(self, record: GlobalRecord) -> None:
        self.result.accepted.append((record.round, record.digest, record.aggregator))
        self.emit(FlEvent.GLOBAL_ACCEPTED, round=record.round, digest=record.digest, aggregator=record.aggregator,
                  final=record.final)
        if record.evaluation is not None:
            stats = {"loss": record.evaluation.loss, **record.evaluation.metrics,
                     "eval_examples": record.evaluation.num_examples}
            self._report("send_stats", record.evaluation.round, {k: v for k, v in stats.items() if v is not None})
        if record.round >= 1 and not record.final:
            self._report("send_stats", record.round, {"fit_clients": len(record.contributors),
                                                      **{f"train_{k}": v for k, v in record.metrics.items()}})
            self._report("send_progress", record.round, self.config.rounds)
        # one's own blobs nobody needs any more: the update of an aggregated round, old globals --
        # but blobs are named by content, and an update may be byte for byte a global of one's own
        # (two devices with the same data average to the update itself): that blob stays
        if self._my_update is not None:
            if self._my_update.digest not in {g.digest for g in self._my_globals}:
                self.blobs.clear(self.device, self._my_update)
            self._my_update = None
        while len(self._my_globals) > 2 and not record.final:
            old = self._my_globals.pop(0)
            if old.digest not in {g.digest for g in self._my_globals}:
                self.blobs.clear(self.device, old)

    def _finish(self, record: GlobalRecord, arrays: list[np.ndarray]) -> RunResult:
        metrics = dict(record.evaluation.metrics) if record.evaluation else {}
        if record.evaluation is not None and record.evaluation.loss is not None:
            metrics["loss"] = record.evaluation.loss
        self.result.rounds, self.result.digest, self.result.reason = record.completed, record.digest, record.reason
        self.result.metrics, self.result.arrays = metrics, arrays
        self.emit(FlEvent.FINISHED, rounds=record.completed, digest=record.digest, reason=record.reason,
                  metrics=metrics)
        self._publish_record("state", ParticipantState(state=OFFLINE, session=self.session, run=self.run).encode())
        return self.result

    # --- round 0 ---------------------------------------------------------------------------
    def _initial(self) -> GlobalRecord:
        deadline = time.monotonic() + self.config.join_timeout_s
        quiet_since, members = time.monotonic(), frozenset[Candidate]()
        first_seen: float | None = None
        with self.view.changed:
            while True:
                newest = self._newest()
                if newest is not None and newest.round >= 1:
                    return newest  # a run under way: join it from the next round
                zero = [g.record for g in self.view.globals.values() if g.record.round == 0]
                now = time.monotonic()
                if zero:
                    first_seen = first_seen or now
                    if now - first_seen >= min(self.config.quiet_s, 0.5):  # competing ones: the best wins
                        return max(zero, key=lambda r: score(self.task, 0, Candidate(r.aggregator, r.session)))
                live = frozenset(self.view.live())
                if live != members:
                    members, quiet_since = live, now
                quorum = len(self.view.online()) >= self.config.min_participants  # electable or not
                settled = quorum and now - quiet_since >= self.config.quiet_s
                if settled and not zero and (0, None) not in self._published:
                    winner = elect(self.task, 0, live)
                    if winner is not None and winner.device == self.device:
                        self.view.changed.release()
                        try:
                            self._publish_initial(sorted(live))
                        finally:
                            self.view.changed.acquire()
                        continue
                if now > deadline:
                    raise ServerlessError(f"fewer than {self.config.min_participants} participants joined "
                                          f"within {self.config.join_timeout_s:g} s (saw {len(self.view.online())})")
                self.view.wait(0.2)

    def _newest(self) -> GlobalRecord | None:
        records = [g.record for g in self.view.globals.values()]
        if not records:
            return None
        return max(records, key=lambda r: (r.round, score(self.task, r.round, Candidate(r.aggregator, r.session))))

    def _publish_initial(self, live: list[Candidate]) -> None:
        arrays = self.client.get_parameters({})
        manifest = self.blobs.publish(self.device, arrays)
        self._my_globals.append(manifest)
        self._elected[0] = self.device
        self.emit(FlEvent.ELECTED, round=0, aggregator=self.device, electorate=[c.device for c in live])
        record = GlobalRecord(run=self.run, round=0, digest=manifest.digest, owner=self.device,
                              aggregator=self.device, session=self.session,
                              roster=[Member(device=c.device, session=c.session) for c in live])
        self._publish_record("global", record.encode())
        self.result.aggregated.append(0)
        self._published.add((0, None))
        self.emit(FlEvent.GLOBAL_PUBLISHED, round=0, digest=manifest.digest, contributors=[], final=False)

    # --- rounds 1.. ------------------------------------------------------------------------
    def _electorate(self, prev: GlobalRecord, away: set[str] | frozenset[str]) -> list[Candidate]:
        roster = [Candidate(m.device, m.session) for m in prev.roster if m.device not in away]
        return roster or [c for c in self.view.live() if c.device not in away]

    def _round(self, prev: GlobalRecord, arrays: list[np.ndarray]) -> GlobalRecord:
        r = prev.round + 1
        started = time.monotonic()
        config = {**self.fit_config, "server_round": r, "mode": "serverless"}
        evaluation = None
        if prev.round >= 1:
            loss, n, metrics = self.client.evaluate(arrays, config)
            evaluation = Evaluation(round=prev.round, loss=_finite(loss), num_examples=int(n),
                                    metrics=_scalars(metrics))
        with self.view.changed:
            sampled = self.device in sample(self.task, r, self._electorate(prev, self.view.away()),
                                            self.config.fraction) or self.device not in {m.device for m in prev.roster}
        blob, n_fit, fit_metrics = None, 0, {}
        if r <= self.config.rounds and sampled:
            new, n_fit, fit_metrics = self.client.fit(arrays, config)
            new = [np.asarray(a) for a in new]
            if specs(new) != self.spec:
                raise ServerlessError("fit returned weights of another shape than the model's")
            manifest = self.blobs.publish(self.device, new)
            self._my_update, blob = manifest, manifest.digest
        update = UpdateRecord(run=self.run, round=r, base=prev.digest, device=self.device, session=self.session,
                              blob=blob, num_examples=int(n_fit), metrics=_scalars(fit_metrics),
                              evaluation=evaluation)
        self._publish_record("update", update.encode())   # acknowledged: the update counts from here
        if blob is not None:
            self.emit(FlEvent.UPDATE_PUBLISHED, round=r, blob=blob, num_examples=int(n_fit), base=prev.digest)
        return self._await_global(r, prev, started)

    def _rightful(self, seen: SeenGlobal, r: int, prev: GlobalRecord) -> bool:
        record = seen.record
        if record.round != r or record.base != prev.digest:
            return False
        winner = elect(self.task, r, self._electorate(prev, seen.away))
        return winner is not None and winner.device == record.aggregator

    def _await_global(self, r: int, prev: GlobalRecord, started: float) -> GlobalRecord:
        with self.view.changed:
            while True:
                valid = [s.record for s in self.view.globals.values() if self._rightful(s, r, prev)]
                if valid:
                    return max(valid, key=lambda g: score(self.task, r, Candidate(g.aggregator, g.session)))
                newest = self._newest()
                if newest is not None and newest.round > r:
                    return newest  # this participant fell behind: catch up with the newest global
                winner = elect(self.task, r, self._electorate(prev, self.view.away()))
                if winner is not None and self._elected.get(r) != winner.device:
                    lost = self._elected.get(r)
                    self._elected[r] = winner.device
                    if lost is not None:
                        self.emit(FlEvent.FAILOVER, round=r, lost=lost, aggregator=winner.device)
                    self.emit(FlEvent.ELECTED, round=r, aggregator=winner.device,
                              electorate=[c.device for c in self._electorate(prev, self.view.away())])
                if winner is not None and winner.device == self.device and (r, prev.digest) not in self._published:
                    record = self._collect(r, prev, started)
                    if record is not None:
                        self.view.changed.release()
                        try:
                            self._publish_global(record, prev)
                        finally:
                            self.view.changed.acquire()
                        continue
                self.view.wait(0.25)

    def _collect(self, r: int, prev: GlobalRecord, started: float) -> list[UpdateRecord] | None:
        """The updates to aggregate, once complete enough (holding the view's lock); else None."""
        electorate = self._electorate(prev, self.view.away())
        online = self.view.online()
        sampled = sample(self.task, r, electorate, self.config.fraction)
        updates = [u for u in self.view.updates.values() if u.round == r and u.base == prev.digest]
        usable = [u for u in updates if (u.device, u.blob) not in self._rejected]
        have = {u.device for u in usable}
        # everyone sampled and online, and any late joiner that is online, is waited for
        missing = {d for d in online if d in sampled or d not in {m.device for m in prev.roster}} - have
        timed_out = time.monotonic() - started > self.config.round_deadline_s
        if missing and not (timed_out and usable):
            return None
        if missing:
            self.emit(FlEvent.ROUND_TIMEOUT, round=r, missing=sorted(missing))
        return usable if usable else None

    def _publish_global(self, updates: list[UpdateRecord], prev: GlobalRecord) -> None:
        r = prev.round + 1
        evaluations = [u.evaluation for u in updates if u.evaluation is not None and u.evaluation.round == prev.round]
        evaluation = _average_evaluations(prev.round, evaluations) if evaluations else None
        history = list(prev.history)
        target = self.config.target
        if evaluation is not None and target is not None:
            value = evaluation.loss if target.metric == "loss" else evaluation.metrics.get(target.metric)
            if isinstance(value, (int, float)):
                history.append(Point(round=prev.round, value=float(value)))
        reason = ""
        if r > self.config.rounds:
            reason = f"{self.config.rounds} rounds done"
        elif target is not None and prev.round >= 1:
            reason = target.stop_reason([p.value for p in history]) or ""
        with self.view.changed:
            roster = sorted({*self.view.live()}, key=lambda c: c.device)
        common: dict[str, Any] = dict(
            run=self.run, round=r, base=prev.digest, aggregator=self.device, session=self.session,
            roster=[Member(device=c.device, session=c.session) for c in roster], evaluation=evaluation,
            history=history)
        record: GlobalRecord | None
        if reason:  # the run ends with the previous global as its model
            record = GlobalRecord(digest=prev.digest, owner=prev.owner, final=True, reason=reason, **common)
        else:
            record = self._aggregate(updates, prev, common)
            if record is None:
                return
        self._publish_record("global", record.encode())
        self._published.add((r, prev.digest))
        self.result.aggregated.append(r)
        self.emit(FlEvent.GLOBAL_PUBLISHED, round=r, digest=record.digest, final=record.final, reason=reason,
                  contributors=[c.device for c in record.contributors], metrics=record.metrics,
                  evaluation=evaluation.to_wire() if evaluation else None)

    def _aggregate(self, updates: list[UpdateRecord], prev: GlobalRecord,
                   common: dict[str, Any]) -> GlobalRecord | None:
        r = prev.round + 1
        accepted: list[tuple[UpdateRecord, list[np.ndarray]]] = []
        refusals = []
        for update in updates:
            if update.blob is None:
                continue
            try:
                arrays = self.blobs.fetch(update.device, update.blob, expect=self.spec,
                                          manifest_timeout=10.0, stall_timeout=30.0)
            except ChunkError as exc:
                self._rejected.add((update.device, update.blob))
                refusals.append({"device": update.device, "blob": update.blob, "reason": exc.code})
                self.emit(FlEvent.UPDATE_REJECTED, round=r, device=update.device, blob=update.blob,
                          reason=exc.code, message=exc.message)
                continue
            accepted.append((update, arrays))
        if not accepted:
            return None  # nothing usable yet: wait for more (the refused ones are not asked again)
        new = self.aggregate_fn([(arrays, u.num_examples) for u, arrays in accepted])
        if specs(new) != self.spec:
            raise ServerlessError("the aggregation function changed the model's shapes")
        manifest = self.blobs.publish(self.device, new)
        self._my_globals.append(manifest)
        fit_metrics = weighted_average([(u.num_examples, u.metrics) for u, _ in accepted])
        contributors = [Contribution(device=u.device, blob=str(u.blob), num_examples=u.num_examples)
                        for u, _ in accepted]
        examples = sum(u.num_examples for u, _ in accepted)
        return GlobalRecord(digest=manifest.digest, owner=self.device, contributors=contributors,
                            rejected=refusals, metrics={**fit_metrics, "examples": examples}, **common)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _scalars(metrics: Any) -> dict[str, Any]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(k, str) and isinstance(v, (bool, int, float, str))
            and not (isinstance(v, float) and not np.isfinite(v))}


def _average_evaluations(round_: int, evaluations: Sequence[Evaluation]) -> Evaluation:
    total = sum(e.num_examples for e in evaluations)
    losses = [(e.num_examples, {"loss": e.loss}) for e in evaluations if e.loss is not None]
    loss = weighted_average(losses).get("loss") if losses else None
    return Evaluation(round=round_, loss=loss, num_examples=total,
                      metrics=weighted_average([(e.num_examples, e.metrics) for e in evaluations]))


def save_model(arrays: list[np.ndarray], directory: str | None, name: str = "model.npz") -> str | None:
    if not directory:
        return None
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, *arrays)
    return str(path)


def run_from_env(client: NumPyClientLike, *, args: dict[str, Any], reporter: Any = None,
                 aggregate: str | AggregateFn | None = None) -> RunResult:
    """Run as the ftdl child of a device: coordinates from the environment (``FEDMQ_BROKER`` with
    the participant's credentials, ``FEDMQ_PREFIX``, ``FEDMQ_CALLER`` as the device id,
    ``FEDMQ_CLIENT_ID``, ``FEDMQ_TASK_ID``, ``FEDMQ_RUN``), parameters from the task's arguments."""
    from fedmq.ftdl.reporter import ENV_BROKER, ENV_CALLER, ENV_CLIENT_ID, ENV_OUTPUT_DIR, ENV_PREFIX, ENV_TASK_ID

    missing = [name for name in (ENV_BROKER, ENV_CALLER, ENV_TASK_ID) if not os.environ.get(name)]
    if missing:
        raise ServerlessError(f"serverless mode needs {', '.join(missing)} in the environment")
    topics = Topics(os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX)
    task, device, run = os.environ[ENV_TASK_ID], os.environ[ENV_CALLER], os.environ.get(ENV_RUN, "0")
    connection = participant_connection(os.environ[ENV_BROKER], task=task, device=device, run=run,
                                        client_id=os.environ.get(ENV_CLIENT_ID), topics=topics).start()
    try:
        runner = ServerlessRunner(client, connection, task=task, device=device, run=run,
                                  config=ServerlessConfig.from_args(args), topics=topics, aggregate=aggregate,
                                  reporter=reporter)
        result = runner.run_to_end()
    finally:
        connection.stop()
    model = save_model(result.arrays, os.environ.get(ENV_OUTPUT_DIR))
    if reporter is not None:
        reporter.finish(rounds=result.rounds, metrics=result.metrics, model=model, digest=result.digest,
                        reason=result.reason)
    return result
