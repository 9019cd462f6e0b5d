"""pytest plugin (registered as the ``fedmq`` entry point): a real broker per test.

``mqtt_broker`` runs each test that uses it once on the embedded amqtt broker and once on a real
Mosquitto started from ``mosquitto.conf`` on a free port.  Task authors get it too, by installing
fedmq: ``def test_my_task(mqtt_broker): ...``.  Choose brokers with ``--fedmq-brokers=amqtt``.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import pytest

from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.mosquitto import MosquittoNotInstalled, MosquittoProcess

BROKER_KINDS = ("amqtt", "mosquitto")


class RunningBroker(Protocol):
    host: str
    port: int

    @property
    def url(self) -> str: ...
    def restart(self, timeout: float = ...) -> None: ...
    def stop(self, timeout: float = ...) -> None: ...
    def start(self, timeout: float = ...) -> object: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fedmq-brokers", default=",".join(BROKER_KINDS),
                     help="comma-separated brokers to run broker tests on (amqtt, mosquitto)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mqtt_broker" in metafunc.fixturenames:
        kinds = [k.strip() for k in metafunc.config.getoption("--fedmq-brokers").split(",") if k.strip()]
        unknown = set(kinds) - set(BROKER_KINDS)
        if unknown:
            raise pytest.UsageError(f"--fedmq-brokers: unknown broker(s) {sorted(unknown)}")
        metafunc.parametrize("mqtt_broker", kinds, indirect=True)


def start_broker(kind: str) -> RunningBroker:
    if kind == "amqtt":
        return EmbeddedBroker().start()
    try:
        return MosquittoProcess().start()
    except MosquittoNotInstalled as exc:
        raise pytest.UsageError(f"{exc} (or run with --fedmq-brokers=amqtt)") from exc


@pytest.fixture
def mqtt_broker(request: pytest.FixtureRequest) -> Iterator[RunningBroker]:
    """A fresh broker for one test; ``.kind`` says which, ``.url`` where."""
    kind = getattr(request, "param", "amqtt")
    broker = start_broker(kind)
    broker.kind = kind  # type: ignore[attr-defined]
    try:
        yield broker
    finally:
        if isinstance(broker, MosquittoProcess):
            broker.cleanup()
        else:
            broker.stop()


@pytest.fixture
def mosquitto_broker() -> Iterator[MosquittoProcess]:
    """Just Mosquitto, for features amqtt lacks (MQTT 5 properties, shared subscriptions)."""
    broker = start_broker("mosquitto")
    broker.kind = "mosquitto"  # type: ignore[attr-defined]
    try:
        yield broker  # type: ignore[misc]
    finally:
        broker.cleanup()  # type: ignore[attr-defined]


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """Just the embedded amqtt broker, for tests that need no second run on Mosquitto."""
    broker = EmbeddedBroker().start()
    try:
        yield broker
    finally:
        broker.stop()
