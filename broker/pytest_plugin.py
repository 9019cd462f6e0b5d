"""pytest plugin (opt-in: ``pytest_plugins = ["fedmq.broker.pytest_plugin"]`` in a conftest, or
``pytest -p fedmq.broker.pytest_plugin``): a real broker per test.

``mqtt_broker`` runs each test that uses it once on the embedded amqtt broker and once on a real
Mosquitto started from ``mosquitto.conf`` on a free port.  Task authors get it too, with the
line above: ``def test_my_task(mqtt_broker): ...``.  Choose brokers with ``--fedmq-brokers=amqtt``;
without Mosquitto installed its half is skipped, saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pytest

from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.mosquitto import MosquittoNotInstalled, MosquittoProcess, mosquitto_binary

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
        metafunc.parametrize("mqtt_broker", [pytest.param(kind, marks=_needs(kind)) for kind in kinds], indirect=True)


def _needs(kind: str) -> list[pytest.MarkDecorator]:
    """Without Mosquitto installed, its half of the broker tests is skipped and says why."""
    if kind != "mosquitto":
        return []
    try:
        mosquitto_binary()
    except MosquittoNotInstalled as exc:
        return [pytest.mark.skip(reason=f"{exc} (or bash scripts/install.sh --test as root)")]
    return []


def start_broker(kind: str) -> RunningBroker:
    if kind == "amqtt":
        return EmbeddedBroker().start()
    try:
        return MosquittoProcess().start()
    except MosquittoNotInstalled as exc:
        pytest.skip(f"{exc} (or bash scripts/install.sh --test as root)")


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
