"""``fedmq cloud``: the cloud services in one process, on one MQTT connection."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.dynsec import DynsecClient
from fedmq.broker.presence import OFFLINE, Presence
from fedmq.broker.roles import Role
from fedmq.broker.rpc_server import RpcServer
from fedmq.broker.topics import DEFAULT_PREFIX, Topics
from fedmq.broker.urls import with_absolute_files
from fedmq.cloud.broker_accounts import DynsecAccounts
from fedmq.cloud.bundle_service import BundleService
from fedmq.cloud.bundle_store import BundleStore
from fedmq.cloud.db import Device, open_database
from fedmq.cloud.deployment_service import DeploymentService
from fedmq.cloud.deployments import Deployments
from fedmq.cloud.device_service import DeviceService
from fedmq.cloud.devices import DeviceRegistry
from fedmq.cloud.event_service import EventService
from fedmq.cloud.events import EventLog
from fedmq.cloud.fleet_service import FleetService
from fedmq.cloud.fleet_state import FleetState
from fedmq.cloud.identities import IdentityRegistry, OpenBroker
from fedmq.cloud.identity_service import IdentityService
from fedmq.cloud.inbound import Inbound
from fedmq.cloud.model_registry import ModelRegistry
from fedmq.cloud.model_service import ModelService
from fedmq.cloud.mqtt_publisher import MqttPublisher
from fedmq.cloud.replicas import ReplicaPresence
from fedmq.cloud.run_history import RunHistory
from fedmq.cloud.selection import SNAPSHOT_TTL_S, Selection
from fedmq.cloud.serverless_runs import ServerlessRuns
from fedmq.cloud.task_lifecycle import TaskLifecycle
from fedmq.cloud.task_servers import ServerSupervisor, TaskSettings
from fedmq.cloud.task_service import TaskService
from fedmq.cloud.write_batch import MAX_DELAY_S, WriteBatcher
from fedmq.ftdl.bundle import DEFAULT_CHUNK_SIZE
from fedmq.ftdl.paths import absolute
from fedmq.ftdl.serverless.blobs import Blobs
from fedmq.ftdl.signing import TrustStore

log = logging.getLogger("fedmq.cloud")
ALL_SERVICES = ("bundles", "devices", "tasks", "events", "identities", "models", "fleet", "deployments")


@dataclass
class CloudConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    prefix: str = DEFAULT_PREFIX
    home: Path = Path("fedmq-cloud")
    db: str | None = None
    client_id: str = "fedmq-cloud"
    trusted_keys: list[Path] = field(default_factory=list)
    require_signed: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    shared_group: str | None = None
    write_delay_s: float = MAX_DELAY_S  # the group commit's wait for unanswered writes (presence)
    services: tuple[str, ...] = ALL_SERVICES
    flower_bind: str = "0.0.0.0"
    flower_advertise: str = "127.0.0.1"
    dynsec: bool = False          # manage identities with the broker's dynamic-security plugin
    allow_unsigned: bool = False  # development only: run server code from unsigned bundles

    def __post_init__(self) -> None:
        # Made absolute here, once: the task servers run with their bundle as working directory,
        # and their run folders (logs, the saved model) must land under this home.
        self.home = absolute(self.home)
        self.trusted_keys = [absolute(p) for p in self.trusted_keys]
        self.broker = with_absolute_files(self.broker)  # ?ca= is handed on to task servers


class CloudApp:
    """The cloud in one process: the domain (lifecycle, selection, run history, registry, bundle
    store, event log), wired to MQTT through one connection -- the publisher port for what it
    says, the inbound handlers for what it hears, the RPC server for what it is asked."""

    def __init__(self, config: CloudConfig) -> None:
        unknown = set(config.services) - set(ALL_SERVICES)
        if unknown:
            raise ValueError(f"unknown services {sorted(unknown)}; choose from {', '.join(ALL_SERVICES)}")
        self.config = config
        self.home = Path(config.home)
        self.topics = Topics(config.prefix)
        self.db = open_database(config.db, self.home)
        # A replica is known by its client id (replicas of a shared group each have their own);
        # its presence is made below, once the lifecycle it reports lost replicas to exists.
        self.connection = MqttConnection(config.client_id, config.broker, persistent=True,
                                         will_factory=lambda: self.replica.will())  # noqa: PLW0108
        trust = TrustStore.from_paths(config.trusted_keys) if config.trusted_keys else None
        self.store = BundleStore(self.home / "bundles", trust=trust, require_signed=config.require_signed)
        self.publisher = MqttPublisher(self.connection, self.topics, self.store, config.chunk_size)
        self.events = EventLog(self.db, self.publisher)
        settings = TaskSettings(home=self.home, broker_url=config.broker, prefix=config.prefix,
                                flower_bind=config.flower_bind, flower_advertise=config.flower_advertise,
                                allow_unsigned_code=config.allow_unsigned)
        own = self.connection.settings.username or config.client_id
        self.accounts = DynsecAccounts(DynsecClient(self.connection), config.prefix) if config.dynsec else OpenBroker()
        self.identities = IdentityRegistry(self.db, self.accounts, own={own: Role.SERVICE})
        self.own_identity = own
        self.identities.revoked_listeners.append(self._on_revoked)
        # One group commit for the cloud's hot writes (offers, device info, presence).
        self.batcher = WriteBatcher(self.db, max_delay_s=config.write_delay_s)
        # Replicas share the database: what another one wrote is read again after a second.
        self.selection = Selection(self.db, self.events, self.batcher,
                                   cache_ttl_s=SNAPSHOT_TTL_S if config.shared_group else None)
        self.servers = ServerSupervisor(settings)
        self.history = RunHistory(self.home)
        self.tasks = TaskLifecycle(self.db, settings, self.store, self.publisher, self.events, self.selection,
                                   self.servers, self.history, self.identities, replica=config.client_id)
        # The registry's policy decides on every finished run, whichever services this process serves.
        self.models = ModelRegistry(self.db, self.home, self.history, self.events)
        self.tasks.finished_listeners.append(self.models.on_run_finished)
        self.deployments = Deployments(self.db, self.events, self.publisher, self.models, store=self.store,
                                       trust=trust, require_signed=config.require_signed)
        self.replica = ReplicaPresence(self.connection, self.topics, config.client_id, self.tasks.replica_lost)
        self.registry = DeviceRegistry(self.db, self.events, self.batcher)
        self.registry.listeners.append(self.selection.device_changed)
        self.serverless = ServerlessRuns(self.tasks, self.history, self._fetch_model)
        self.inbound = Inbound(self.registry, self.tasks, self.events, self.serverless, self.topics)
        # Replicas take requests (and devices' steps) on a clean session of their own: Mosquitto
        # keeps handing a disconnected persistent session its share of a shared subscription, so
        # a dead replica's share would wait for it; a clean session's share goes to the living.
        self.shared_connection = (MqttConnection(f"{config.client_id}-shared", config.broker)
                                  if config.shared_group else self.connection)
        self.server = RpcServer(self.shared_connection, self.topics, shared_group=config.shared_group,
                                roles=self.identities.role_of)
        services = {"bundles": lambda: BundleService(self.store, self.publisher),
                    "devices": lambda: DeviceService(self.registry),
                    "tasks": lambda: TaskService(self.tasks, self.selection, self.history),
                    "events": EventService,
                    "fleet": lambda: FleetService(FleetState(self.db, self.tasks, self.store, self.events,
                                                             self.deployments)),
                    "identities": lambda: IdentityService(self.identities),
                    "models": lambda: ModelService(self.models),
                    "deployments": lambda: DeploymentService(self.deployments)}
        for name in config.services:
            self.server.add(services[name]())
        self._stop = threading.Event()
        self._started_once = False

    def start(self, timeout: float = 10.0) -> CloudApp:
        self.connection.add_connect_listener(self._on_connect)
        # Handlers first, then the connection: what the persistent session queued while the cloud
        # was away (edges' events, requests) is delivered the moment it connects.
        if "devices" in self.config.services:
            self.connection.subscribe(self.topics.all_device_states(), self.inbound.on_presence, wait=False)
        if "tasks" in self.config.services:
            # QoS 1 on the persistent session: steps devices report while the cloud is away wait for
            # it.  Replicas share them (each recorded once) on the clean session: live delivery.
            events = self.topics.all_device_events()
            self.shared_connection.subscribe(
                f"$share/{self.config.shared_group}/{events}" if self.config.shared_group else events,
                self.inbound.on_device_event, qos=1, wait=False)
            # Replicas: who is alive (a dead one's tasks fail here), and a stop made elsewhere.
            self.connection.subscribe(self.topics.all_replica_states(), self.replica.on_state, qos=1, wait=False)
            self.connection.subscribe(self.topics.all_tasks(), self.inbound.on_announcement, qos=1, wait=False)
            # Serverless runs, observed: every replica hears them, the task's owner records them.
            self.connection.subscribe(self.topics.all_fl_globals(), self.inbound.on_fl_global, qos=1, wait=False)
        self.server.start(wait=False)
        if isinstance(self.accounts, DynsecAccounts):
            self._ensure_own_role(timeout)
        self.connection.start(timeout=timeout)
        if self.shared_connection is not self.connection:
            self.shared_connection.start(timeout=timeout)
        if "tasks" in self.config.services:
            failed = self.tasks.reconcile()
            if failed:
                log.warning("tasks interrupted by the previous cloud's end, now failed: %s", failed)
        self.connection.wait_subscribed(timeout)
        self.shared_connection.wait_subscribed(timeout)
        if "deployments" in self.config.services:
            self.deployments.start()  # the ticker: stage timeouts, and what a restart left undecided
        log.info("cloud services %s on %s", sorted(self.server.services), self.connection.settings.url)
        return self

    def _fetch_model(self, task_id: str, owner: str, digest: str) -> list[Any]:
        """A serverless run's final model, fetched and verified from its owner's blobs."""
        return Blobs(self.connection, self.topics, task_id).fetch(owner, digest)

    def _on_revoked(self, name: str, role: Role) -> None:
        """A revoked device is offline from that moment, for the registry and every dashboard."""
        if role is Role.DEVICE:
            device = Device.get_or_none(Device.id == name)
            if device is not None and device.online:
                self.publisher.presence(name, Presence(state=OFFLINE, session=device.session))

    def _ensure_own_role(self, timeout: float) -> None:
        """The cloud's own topics, as a role of its own on the broker -- set up over a short-lived
        connection before the cloud's session connects: the broker disconnects every client whose
        roles change, and that must not be the session (once; later starts find the role)."""
        setup = MqttConnection(new_client_id("fedmq-cloud-setup"), self.config.broker, drops_expected=True)
        try:
            setup.start(timeout=timeout)
            DynsecAccounts(DynsecClient(setup), self.config.prefix).ensure_own(self.own_identity, Role.SERVICE)
        finally:
            setup.stop()

    def _on_connect(self, session_present: bool) -> None:
        self.replica.birth()
        # A broker that restarted without persistence (amqtt) lost the retained announcements and
        # bundles: put them back.  Off paho's thread, since publishing waits for acknowledgements.
        if (self._started_once or not session_present) and {"tasks", "deployments"} & set(self.config.services):
            threading.Thread(target=self._republish, name="republish", daemon=True).start()
        self._started_once = True

    def _republish(self) -> None:
        if "tasks" in self.config.services:
            try:
                self.tasks.republish()
            except Exception:
                log.exception("republishing announcements failed")
        if "deployments" in self.config.services:
            try:
                self.deployments.republish()  # model files, then each device's desired models
            except Exception:
                log.exception("republishing desired models failed")

    def stop(self) -> None:
        self._stop.set()
        self.deployments.stop()
        if "tasks" in self.config.services:
            self.tasks.shutdown()
        self.replica.goodbye()
        self.connection.stop()
        if self.shared_connection is not self.connection:
            self.shared_connection.stop()
        self.server.stop()
        self.batcher.close()  # what is queued is committed before the database closes
        self.db.close()

    def serve_forever(self) -> None:
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
