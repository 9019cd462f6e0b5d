"""``fedmq edge``: the long-running agent of one device.

Event-driven, never polling in a loop: the agent sleeps on one ``threading.Event`` that is set
by whatever may change the answer to "what should I run?" -- a task announcement, a command, a
(re)connect, a client that ended, a round that changed the device's statistics -- with a slow
periodic re-check (default 60 s) only as a safety net.  Each wake-up reports the device's info if
it changed, asks ``tasks.request``, and lets the policy decide.

Outbound connections only; presence is a retained birth on every connect and a retained last
will, both carrying a session counter the agent keeps on disk.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, Will
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.events import EventKind, EventRecord, publish_event
from fedmq.broker.presence import OFFLINE, ONLINE, Presence
from fedmq.broker.roles import CLIENT_IDS, Role
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.schema import DeviceCommand, Offer, SelectionMode, TaskAnnouncement, TaskState
from fedmq.broker.topics import TopicError, Topics, check_id
from fedmq.broker.urls import with_credentials
from fedmq.broker.wire import RecordError, read
from fedmq.edge.config import EdgeConfig
from fedmq.edge.info import gather
from fedmq.edge.models import DeployerSettings, ModelDeployer
from fedmq.edge.policy import get_policy
from fedmq.edge.state import AgentState

if TYPE_CHECKING:  # loaded when a task is first offered: an idle agent does without them
    from fedmq.edge.bundle_fetch import BundleFetcher
    from fedmq.ftdl import TaskEvent
    from fedmq.ftdl.process import TaskProcess

log = logging.getLogger("fedmq.edge")
FINISH_GRACE_S = 15.0
RETRY_BASE_S, RETRY_MAX_S = 1.0, 30.0
# The client's own reports, forwarded as the device's events.
# Keys are fedmq.ftdl.channel.ReporterKind's values (a StrEnum: equal to its strings).
_FORWARDED = {"error": EventKind.CLIENT_ERROR_REPORT, "progress": EventKind.CLIENT_PROGRESS,
              "info": EventKind.CLIENT_INFO, "trigger_result": EventKind.CLIENT_TRIGGER_RESULT,
              "trigger_refused": EventKind.CLIENT_TRIGGER_REFUSED, "data": EventKind.CLIENT_DATA}


# The name of fedmq.ftdl.flower.ServerGone, as the client's bootstrap reports it (not imported: the
# idle agent loads no Flower).
SERVER_GONE = "ServerGone"


def retry_delay(failures: int, rng: random.Random) -> float:
    """Seconds before the ``failures``-th retry: doubling from 1 s to 30 s, each drawn at random
    between half and all of that ("equal jitter"), so devices that lost the cloud together do
    not all come back at the same instant."""
    ceiling = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, failures - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass
class _Current:
    task: str
    revision: int
    run: int
    process: TaskProcess
    stopping: bool = False


class EdgeAgent:
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.device = check_id(config.device_id, "device id")
        self.topics = Topics(config.prefix)
        self.work = Path(config.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state = AgentState.load(self.work / "state.json")
        self.policy = get_policy(config.policy)
        self._session = self.state.session
        self.connection = MqttConnection(CLIENT_IDS[Role.DEVICE].format(self.device), config.broker, persistent=True,
                                         will_factory=self._will, alternates=config.alternates)
        self.rpc = RpcClient(self.connection, self.device, self.topics)
        self._trust: Any = None
        if config.trusted_keys:  # a bad key is refused at start, not at the first bundle
            from fedmq.ftdl.signing import TrustStore
            self._trust = TrustStore.from_paths(config.trusted_keys)
        self._fetcher: BundleFetcher | None = None
        self.announcements: dict[str, TaskAnnouncement] = {}
        self.current: _Current | None = None
        self.task_stats: dict[str, dict[str, Any]] = {}
        self._info_dirty = True
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._retry_at = 0.0
        self._failures = 0
        self._random = random.Random()
        self._finished_runs: dict[tuple[str, int], None] = {}  # runs this device's client completed
        self._reported_at = 0.0
        self.cycles = 0
        # Deployed models (edge/models.py): one subscription while idle, the rest on first use.
        self.models = ModelDeployer(
            self.connection, self.topics, self.rpc,
            DeployerSettings(self.device, self.work / "models", config.data_dir, config.allow_unsigned,
                             config.deploy_time_limit_s, config.rpc_timeout_s),
            fetcher=lambda: self.fetcher, trust=lambda: self._trust, publish_event=self.publish_event,
            on_change=self._models_changed, backoff=lambda failures: retry_delay(failures, self._random))

    @property
    def fetcher(self) -> BundleFetcher:
        """Made on first use: bundles (and their signatures) are only a concern once offered one."""
        with self._lock:  # the decision cycle and the deployed models' worker may both ask first
            if self._fetcher is None:
                from fedmq.edge.bundle_fetch import BundleFetcher
                from fedmq.ftdl.signing import TrustStore
                self._fetcher = BundleFetcher(self.connection, self.topics, self.work / "cache",
                                              trust=self._trust or TrustStore(),
                                              allow_unsigned=self.config.allow_unsigned)
            return self._fetcher

    # --- presence --------------------------------------------------------------------------
    def _will(self) -> Will:
        # Called by the connection before every connect: a new session each time.
        self._session = self.state.next_session()
        return Will(self.topics.device_state(self.device), Presence(state=OFFLINE, session=self._session).encode(),
                    qos=1, retain=True)

    def _on_connect(self, _session_present: bool) -> None:
        self.connection.publish(self.topics.device_state(self.device),
                                Presence(state=ONLINE, session=self._session).encode(),
                                qos=1, retain=True)
        self._info_dirty = True
        self.wake()

    # --- lifecycle -------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        """Serve until ``stop()`` (or Ctrl-C in ``fedmq edge``)."""
        self.connection.add_connect_listener(self._on_connect)
        self.connection.start(wait=False)
        self.connection.subscribe(self.topics.all_tasks(), self._on_announcement, qos=1, wait=False)
        self.connection.subscribe(self.topics.device_cmd(self.device), self._on_command, qos=1, wait=False)
        self.models.start()
        try:
            while not self._stop.is_set():
                self._wake.wait(self._next_timeout())
                self._wake.clear()
                if self._stop.is_set():
                    break
                if not self.connection.connected.is_set():
                    continue
                self.cycles += 1
                self._cycle()
        finally:
            self._shutdown()

    def _next_timeout(self) -> float:
        if self._retry_at:
            return max(0.05, min(self.config.recheck_interval_s, self._retry_at - time.time()))
        return self.config.recheck_interval_s

    def _shutdown(self) -> None:
        self.models.stop()
        current = self.current
        if current is not None:
            current.stopping = True
            current.process.stop(grace_s=5.0)
        if self.connection.connected.is_set():
            # A clean disconnect fires no last will: say goodbye ourselves.
            self.connection.publish(self.topics.device_state(self.device),
                                    Presence(state=OFFLINE, session=self._session).encode(), qos=1,
                                    retain=True).wait_for_publish(5)
        self.connection.stop()

    # --- the decision cycle --------------------------------------------------------------------
    def _cycle(self) -> None:
        self._retry_at = 0.0
        try:
            if self._info_dirty or time.time() - self._reported_at > self.config.report_interval_s:
                self._info_dirty = False
                self._reported_at = time.time()
                self.rpc.call("devices", "update_info", {"info": self.info()}, timeout=self.config.rpc_timeout_s)
            answer = self.rpc.call("tasks", "request", timeout=self.config.rpc_timeout_s)
        except RpcError as exc:
            # The cloud may be restarting or the broker away: try again soon, without spinning,
            # and spread out, so a fleet does not come back at the same instant.
            self._info_dirty = True
            self._failures += 1
            delay = retry_delay(self._failures, self._random)
            self._retry_at = time.time() + delay
            log.warning("%s: cloud not answering (%s); retrying in %.1f s", self.device, exc, delay)
            return
        self._failures = 0
        try:
            offers = [read(Offer, o) for o in answer]
        except RecordError as exc:
            log.error("%s: tasks.request answered offers this agent cannot read: %s", self.device, exc)
            return
        with self._lock:
            running = {self.current.task} if self.current else set()
        mine = self._eligible_here()
        offers = sorted(offers + mine, key=lambda o: -o.priority)  # stable: the cloud's order within a priority
        offers = [o for o in offers if (o.id, o.run) not in self._finished_runs]  # done here already
        revisions = {o.id: o.revision for o in offers}
        for chosen in self.policy(offers, running, self.state.blocked(revisions)):
            offer = self._join(chosen) if chosen in mine else chosen
            if offer is None:
                continue
            self._start(offer)
            if self.current is not None:
                break

    def _eligible_here(self) -> list[Offer]:
        """Running tasks that select on the device whose announced criteria and requirements this
        device meets on its own facts, private labels included: the facts stay here, and only
        the task it takes up is told to the cloud (``tasks.join``)."""
        announced = [a for a in list(self.announcements.values())
                     if a.selection == SelectionMode.DEVICE and a.state == TaskState.RUNNING]
        if not announced:
            return []
        from fedmq.broker.criteria import CriteriaError, device_facts, eligible, parse_criteria

        facts = device_facts(self.info(), self.device, private=self.config.private_labels)
        found = []
        for task in announced:
            try:
                criteria = parse_criteria(task.criteria)
            except CriteriaError as exc:  # the cloud refuses these at create: a newer dialect?
                log.warning("%s: cannot evaluate the criteria of task %s: %s", self.device, task.id, exc)
                continue
            if eligible(criteria, task.requirements, facts):
                found.append(Offer(id=task.id, name=task.name, revision=task.revision, bundle=task.bundle,
                                   flower=task.flower, priority=task.priority, run=task.run))
        return found

    def _done_here(self, task: str, run: int) -> None:
        """A run this device will not take (up) again: it completed here, or joining it was refused."""
        self._finished_runs[(task, run)] = None
        while len(self._finished_runs) > 256:
            self._finished_runs.pop(next(iter(self._finished_runs)))

    def _join(self, offer: Offer) -> Offer | None:
        """Take up a device-selected task: the cloud records it and answers the full offer (its
        arguments are not in the announcement)."""
        try:
            return read(Offer, self.rpc.call("tasks", "join", {"task": offer.id}, timeout=self.config.rpc_timeout_s))
        except RpcError as exc:
            log.warning("%s: could not join task %s: %s", self.device, offer.id, exc)
            if exc.code in (ErrorCode.TIMEOUT, ErrorCode.INTERNAL):  # the cloud is away: again soon
                self._retry_at = time.time() + retry_delay(1, self._random)
            else:  # refused (ended meanwhile, or finished here before a restart): not this run again
                self._done_here(offer.id, offer.run)
        except RecordError as exc:
            log.error("%s: tasks.join answered an offer this agent cannot read: %s", self.device, exc)
        return None

    def info(self) -> dict[str, Any]:
        return gather(self.config.data_dir, self.work, self.config.labels, self.task_stats,
                      self.current.task if self.current else None, models=self.models.running())

    def _models_changed(self) -> None:
        """What the device runs changed: the cloud hears it in the next info."""
        self._info_dirty = True
        self.wake()

    def _start(self, offer: Offer) -> None:
        from fedmq.ftdl import start_task
        from fedmq.ftdl.bundle import BundleError
        from fedmq.ftdl.manifest import SERVERLESS_MODE, ManifestError, load_manifest
        from fedmq.ftdl.reporter import ENV_FLOWER_ADDRESS, ENV_OUTPUT_DIR, ENV_RUN

        task, revision, run = offer.id, offer.revision, offer.run
        try:  # the fetcher's own events (started, fetched, refused) go out as this task's
            result = self.fetcher.fetch(offer.bundle,
                                        on_event=lambda kind, data: self.publish_event(task, kind, data, run))
        except BundleError as exc:
            # A bundle we must not run is this task failing here: quarantine and move on.
            self._failed(task, revision, f"bundle refused ({exc.code}): {exc.message}")
            return
        if self._stale(task, run):
            return
        log_dir = self.work / "runs" / task / str(run)
        try:
            manifest = load_manifest(result.path)
            serverless = manifest.training_mode(offer.args) == SERVERLESS_MODE
            env = {ENV_FLOWER_ADDRESS: offer.flower or ""}
            rpc = None  # a Flower client gets no broker credentials: the device's own stay with the agent
            if serverless:
                rpc = self._participant(task)
                if rpc is None:
                    return
                env.update({ENV_RUN: str(run), ENV_OUTPUT_DIR: str(log_dir)})
            process = start_task(
                result.path, "client", task_id=task, log_dir=log_dir,
                on_event=lambda event: self._client_event(task, revision, run, event),
                args=manifest.client_args(offer.args), data_dir=self.config.data_dir, rpc=rpc, env=env,
                time_limit_s=self.config.client_time_limit_s)
        except (ManifestError, OSError) as exc:
            self._failed(task, revision, f"cannot start the client: {exc}")
            return
        with self._lock:
            self.current = _Current(task, revision, run, process)
        self._info_dirty = True
        self.publish_event(task, EventKind.CLIENT_STARTED, {"revision": revision, "flower": offer.flower,
                                                            "mode": "serverless" if serverless else "flower"}, run)

    def _participant(self, task: str) -> dict[str, str] | None:
        """A serverless participant speaks on the broker itself, on a connection of its own, on
        this device's fl level: with the credentials the cloud gives it (``tasks.participate``),
        or the device's own under the participant's client id.  None: the cloud did not answer
        (tried again soon; not the task's failure)."""
        try:
            answer = self.rpc.call("tasks", "participate", {"task": task}, timeout=self.config.rpc_timeout_s)
        except RpcError as exc:
            log.warning("%s: no participant credentials for %s (%s); trying again soon", self.device, task, exc)
            self._retry_at = time.time() + retry_delay(1, self._random)
            return None
        broker = self.config.broker
        if answer.get("username"):
            broker = with_credentials(broker, answer["username"], answer.get("password"))
        return {"broker": broker, "prefix": self.config.prefix, "caller": self.device,
                "client_id": str(answer.get("client_id") or "")}

    def _stale(self, task: str, run: int) -> bool:
        announced = self.announcements.get(task)
        return announced is not None and (announced.state != TaskState.RUNNING or announced.run != run)

    def _failed(self, task: str, revision: int, cause: str, run: int | None = None) -> None:
        entry = self.state.quarantine_task(task, revision, cause)
        self.publish_event(task, EventKind.CLIENT_ERROR, {"cause": cause, "quarantined_until": entry.until,
                                                  "failures": entry.failures}, run)
        log.warning("%s: task %s failed here (%s); quarantined for %.0f s", self.device, task, cause,
                    entry.until - time.time())
        self.wake()  # the next eligible task starts at once

    # --- events from the client process -----------------------------------------------------
    def _client_event(self, task: str, revision: int, run: int, event: TaskEvent) -> None:
        data = event.data
        if event.kind == "stats":  # ReporterKind.STATS
            metrics = data.get("metrics") or {}
            stats = self.task_stats.setdefault(task, {})
            stats["round"] = data.get("round")
            for key in ("accuracy", "loss", "num_examples"):
                if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool):
                    stats[key] = metrics[key]
            if isinstance(metrics.get("num_examples"), int):
                stats["contribution"] = float(metrics["num_examples"])
            self.publish_event(task, EventKind.CLIENT_ROUND, data, run)
            if "loss" in metrics:  # an evaluate closed the round: refresh what the cloud knows
                self._info_dirty = True
                self.wake()
        elif event.kind == "exit":
            with self._lock:
                current = self.current
                if current is not None and current.task == task and current.run == run:
                    self.current = None
            stopped = bool(current and current.stopping) or data.get("stopped")
            if data.get("ok"):
                self._done_here(task, run)
                self.publish_event(task, EventKind.CLIENT_FINISHED, {"duration_s": data.get("duration_s")}, run)
            elif stopped:
                self.publish_event(task, EventKind.CLIENT_STOPPED, {"cause": data.get("cause")}, run)
            elif (data.get("error") or {}).get("type") == SERVER_GONE:
                # Its server went away (the cloud's host died): the task did not fail here.  The
                # cloud says what becomes of the run; asking again soon finds out.
                cause = str((data.get("error") or {}).get("message") or "the Flower server went away")
                log.warning("%s: task %s: %s; not quarantined", self.device, task, cause)
                self.publish_event(task, EventKind.CLIENT_STOPPED, {"cause": cause, "server_gone": True}, run)
                self._retry_at = time.time() + retry_delay(1, self._random)
            else:
                self._failed(task, revision, str(data.get("cause")), run)
            self._info_dirty = True
            self.wake()
        elif event.kind in _FORWARDED:
            self.publish_event(task, _FORWARDED[event.kind], data, run)

    def publish_event(self, task: str, kind: str, data: dict[str, Any], run: int | None = None) -> None:
        publish_event(self.connection, self.topics, EventRecord(
            component=f"edge.{self.device}", kind=kind, task=task, device=self.device, run=run, data=data),
            as_device=True)

    # --- what the broker tells us -----------------------------------------------------------
    def _on_announcement(self, message: mqtt.MQTTMessage) -> None:
        task = message.topic.rsplit("/", 1)[-1]
        if not message.payload:
            self.announcements.pop(task, None)
            self._stop_if_current(task, "the task was deleted")
            self.wake()
            return
        try:
            check_id(task, "task")
            body, _ = codec.decode(message.payload)
            announced = read(TaskAnnouncement, body)
        except (TopicError, codec.CodecError, RecordError) as exc:
            log.debug("%s: ignored an announcement on %s: %s", self.device, message.topic, exc)
            return
        self.announcements[task] = announced
        current = self.current
        if current is not None and current.task == task and (
                announced.state != TaskState.RUNNING or announced.run != current.run):
            # A finished server lets its clients end by themselves; anything else stops them now.
            finished = announced.state == TaskState.FINISHED and announced.run == current.run
            self._stop_if_current(task, f"the task is {announced.state}", grace_s=FINISH_GRACE_S if finished else 0.0)
        self.wake()

    def _on_command(self, message: mqtt.MQTTMessage) -> None:
        try:
            body, _ = codec.decode(message.payload)
            command = read(DeviceCommand, body)
        except (codec.CodecError, RecordError) as exc:
            log.warning("%s: ignored a command on %s: %s", self.device, message.topic, exc)
            return
        if command.cmd == "stop":
            self._stop_if_current(command.task, command.reason or "stop command")
        self.wake()

    def _stop_if_current(self, task: str, reason: str, grace_s: float = 0.0) -> None:
        with self._lock:
            current = self.current
            if current is None or current.task != task or current.stopping:
                return

        def stop() -> None:  # off paho's thread: stopping waits for the child
            if grace_s and current.process.wait(grace_s) is not None:
                return  # it ended by itself
            current.stopping = True
            log.info("%s: stopping %s: %s", self.device, task, reason)
            current.process.stop(grace_s=5.0)

        threading.Thread(target=stop, daemon=True).start()
