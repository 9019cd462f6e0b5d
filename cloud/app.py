"""``fedmq cloud``: the cloud services in one process, on one MQTT connection."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from broker.connection import MqttConnection
from broker.rpc_server import RpcServer
from broker.topics import DEFAULT_PREFIX, Topics
from cloud.bundle_service import make_bundle_service
from cloud.bundle_store import BundlePublisher, BundleStore
from ftdl.bundle import DEFAULT_CHUNK_SIZE
from ftdl.signing import TrustStore

log = logging.getLogger("fedmq.cloud")


@dataclass
class CloudConfig:
    broker: str = "mqtt://127.0.0.1:1883"
    prefix: str = DEFAULT_PREFIX
    home: Path = Path("fedmq-cloud")
    client_id: str = "fedmq-cloud"
    trusted_keys: list[Path] = field(default_factory=list)
    require_signed: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    shared_group: str | None = None


class CloudApp:
    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.connection = MqttConnection(config.client_id, config.broker, persistent=True)
        trust = TrustStore.from_paths(config.trusted_keys) if config.trusted_keys else None
        self.store = BundleStore(Path(config.home) / "bundles", trust=trust,
                                 require_signed=config.require_signed)
        self.publisher = BundlePublisher(self.connection, self.topics, self.store, config.chunk_size)
        self.server = RpcServer(self.connection, self.topics, shared_group=config.shared_group)
        self.server.add(make_bundle_service(self.store, self.publisher))
        self._stop = threading.Event()

    def start(self, timeout: float = 10.0) -> "CloudApp":
        self.connection.start(timeout=timeout)
        self.server.start()
        log.info("cloud services %s on %s", sorted(self.server.services), self.connection.settings.url)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.connection.stop()
        self.server.stop()

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
