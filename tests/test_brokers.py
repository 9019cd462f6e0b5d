"""Every broker fedmq runs behaves as MQTT says: retained messages go to the subscriptions that
match them and to nobody else, a reconnecting client sees each announcement once, persistent
sessions keep what was published while their client was away, and client churn loses nothing
and logs nothing.  Each test runs on the embedded broker (the demo's) and on a real Mosquitto.

Two tests run amqtt's stock broker to show the misbehaviour ``broker/embedded.py`` fixes around;
when they start failing, amqtt has fixed it and the workaround can go.
"""

from __future__ import annotations

import logging
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.embedded import EmbeddedBroker

RETAINED = {
    "fedmq/v1/tasks/a": b"task a",
    "fedmq/v1/tasks/b": b"task b",
    "fedmq/v1/devices/d1/state": b"online",
    "fedmq/v1/bundles/" + "0" * 64 + "/manifest": b"manifest",
    "fedmq/v1/bundles/" + "0" * 64 + "/0": b"chunk",
    "foo/bar": b"the one",
}
# What a running cloud holds while others connect: the filters whose matches stock amqtt replays.
CLOUD_FILTERS = ("fedmq/v1/tasks/+", "fedmq/v1/devices/+/state", "fedmq/v1/bundles/#")


class StockEmbeddedBroker(EmbeddedBroker):
    broker_class = Broker


def raw_client(url_port: int, client_id: str | None = None, clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or new_client_id("raw"),
                         clean_session=clean)
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    return client


class Collector:
    """Every message a raw client receives, subscribed or not."""

    def __init__(self) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()

    def __call__(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload), bool(message.retain)))

    def drain(self, quiet_s: float = 1.0) -> list[tuple[str, bytes, bool]]:
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                return got


def seed_retained(port: int) -> mqtt.Client:
    """Retained state as fedmq leaves it, plus a 'cloud' subscribed to its usual filters."""
    publisher = raw_client(port, "seed")
    for topic, payload in RETAINED.items():
        publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    cloud = raw_client(port, "cloud-like")
    cloud.on_message = Collector()
    for topic_filter in CLOUD_FILTERS:
        result, _mid = cloud.subscribe(topic_filter, 1)
        assert result == mqtt.MQTT_ERR_SUCCESS
    time.sleep(0.3)
    publisher.disconnect()
    publisher.loop_stop()
    return cloud


def subscribe_and_collect(port: int, topic_filter: str) -> list[tuple[str, bytes, bool]]:
    collector = Collector()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=new_client_id("newcomer"))
    client.on_message = collector
    client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(topic_filter, 1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return collector.drain()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("topic_filter, expected", [
    ("foo/bar", ["foo/bar"]),
    ("fedmq/v1/tasks/+", ["fedmq/v1/tasks/a", "fedmq/v1/tasks/b"]),
    ("fedmq/v1/devices/d1/state", ["fedmq/v1/devices/d1/state"]),
    ("nothing/here", []),
])
def test_a_subscriber_gets_exactly_the_retained_messages_its_filter_matches(
        mqtt_broker: Any, topic_filter: str, expected: list[str]) -> None:
    cloud = seed_retained(mqtt_broker.port)
    try:
        got = subscribe_and_collect(mqtt_broker.port, topic_filter)
    finally:
        cloud.disconnect()
        cloud.loop_stop()
    assert sorted(topic for topic, _, _ in got) == expected  # each once, nothing else
    assert all(retained and payload == RETAINED[topic] for topic, payload, retained in got)


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto_sub")
def test_mosquitto_sub_on_one_topic_prints_one_message(mqtt_broker: Any) -> None:
    """The issue as a user met it: ``mosquitto_sub -t foo/bar`` printed every retained message."""
    cloud = seed_retained(mqtt_broker.port)
    try:
        done = subprocess.run(["mosquitto_sub", "-p", str(mqtt_broker.port), "-t", "foo/bar", "-v",
                               "-q", "1", "-W", "2"], capture_output=True, text=True, timeout=10)
    finally:
        cloud.disconnect()
        cloud.loop_stop()
    assert done.stdout.splitlines() == ["foo/bar the one"]


def test_stock_amqtt_still_replays_other_clients_retained_messages_on_connect() -> None:
    """Why ``broker/embedded.py`` patches amqtt: its own broker sends a newcomer everything the
    other clients' filters match, before it has subscribed to anything."""
    with StockEmbeddedBroker() as stock:
        cloud = seed_retained(stock.port)
        try:
            got = subscribe_and_collect(stock.port, "foo/bar")
        finally:
            cloud.disconnect()
            cloud.loop_stop()
    topics = [topic for topic, _, _ in got]
    assert "fedmq/v1/tasks/a" in topics and "fedmq/v1/bundles/" + "0" * 64 + "/0" in topics


def test_a_reconnecting_device_sees_each_announcement_once(mqtt_broker: Any) -> None:
    """A persistent-session client that reconnects (and re-subscribes, as MqttConnection does)
    gets each retained announcement once, not once per matching filter on the broker."""
    cloud = seed_retained(mqtt_broker.port)
    seen: queue.Queue[str] = queue.Queue()
    device = MqttConnection(f"fedmq-edge-{uuid.uuid4().hex[:6]}", mqtt_broker.url, persistent=True)
    try:
        device.start()
        device.subscribe("fedmq/v1/tasks/+", lambda m: seen.put(m.topic))
        first = drain(seen)
        device.stop()
        device.start()  # the connection subscribes again by itself, as after any reconnect
        again = drain(seen)
    finally:
        device.stop()
        cloud.disconnect()
        cloud.loop_stop()
    assert sorted(first) == ["fedmq/v1/tasks/a", "fedmq/v1/tasks/b"]
    assert sorted(again) == ["fedmq/v1/tasks/a", "fedmq/v1/tasks/b"]


def drain(messages: queue.Queue[str], quiet_s: float = 1.0) -> list[str]:
    got = []
    while True:
        try:
            got.append(messages.get(timeout=quiet_s))
        except queue.Empty:
            return got


def test_a_persistent_session_gets_what_was_published_while_it_was_away(mqtt_broker: Any) -> None:
    """Commands to a sleeping device wait at the broker (QoS 1, clean session off)."""
    client_id = f"fedmq-edge-{uuid.uuid4().hex[:6]}"
    got: queue.Queue[bytes] = queue.Queue()
    device = MqttConnection(client_id, mqtt_broker.url, persistent=True).start()
    device.subscribe("fedmq/v1/devices/sleepy/cmd", lambda m: got.put(bytes(m.payload)), qos=1)
    device.stop()
    sender = MqttConnection(new_client_id("cloud"), mqtt_broker.url).start()
    for n in range(5):
        sender.publish("fedmq/v1/devices/sleepy/cmd", f"stop {n}".encode(), qos=1).wait_for_publish(5)
    sender.stop()
    device = MqttConnection(client_id, mqtt_broker.url, persistent=True)
    device.subscribe("fedmq/v1/devices/sleepy/cmd", lambda m: got.put(bytes(m.payload)), qos=1, wait=False)
    device.start()
    try:
        received = [got.get(timeout=5) for _ in range(5)]
    finally:
        device.stop()
    assert received == [f"stop {n}".encode() for n in range(5)]


def test_stock_amqtt_drops_an_open_brokers_persistent_sessions() -> None:
    """Why the embedded broker admits clients with its own plugin: amqtt's anonymous plugin marks
    every client anonymous, and amqtt queues nothing for an anonymous persistent session."""
    with StockEmbeddedBroker() as stock:
        stock_config = stock._config()
    assert "amqtt.plugins.authentication.AnonymousAuthPlugin" not in stock_config["plugins"]
    broker = StockEmbeddedBroker()
    broker._config = lambda: {  # type: ignore[method-assign]
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    with broker:
        got: queue.Queue[bytes] = queue.Queue()
        device = MqttConnection("fedmq-edge-stock", broker.url, persistent=True).start()
        device.subscribe("cmd", lambda m: got.put(bytes(m.payload)), qos=1)
        device.stop()
        sender = MqttConnection(new_client_id("cloud"), broker.url).start()
        sender.publish("cmd", b"stop", qos=1).wait_for_publish(5)
        sender.stop()
        device = MqttConnection("fedmq-edge-stock", broker.url, persistent=True).start()
        try:
            assert got.empty() and drain(got) == []  # type: ignore[arg-type]
        finally:
            device.stop()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() + (f" {r.exc_info[1]!r}" if r.exc_info else "")
                for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def broker_log() -> Iterator[_Records]:
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("amqtt", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


CHUNKS = 200


def churn(port: int, seconds: float, stream_messages: int = 300) -> tuple[list[int], int, list[BaseException]]:
    """A fleet mid-download on the broker at ``port``: a fetcher holds exact subscriptions to
    retained bundle chunks, clients come and go (each subscribing filters nobody held before),
    and a steady subscriber receives a numbered QoS 1 stream.  Returns what the steady
    subscriber got, how many clients came and went, and the workers' errors."""
    seeder = raw_client(port, new_client_id("seed"))
    for index in range(CHUNKS):
        seeder.publish(f"fedmq/v1/bundles/{'1' * 64}/{index}", b"c" * 1024, qos=1, retain=True)
    seeder.publish("fedmq/v1/bundles/done", b"", qos=1).wait_for_publish(10)
    fetcher = raw_client(port, new_client_id("fetcher"))
    fetcher.on_message = Collector()
    fetcher.subscribe([(f"fedmq/v1/bundles/{'1' * 64}/{index}", 1) for index in range(CHUNKS)])
    steady_got: queue.Queue[str] = queue.Queue()
    steady = MqttConnection(new_client_id("steady"), f"mqtt://127.0.0.1:{port}").start()
    steady.subscribe("churn/stream", lambda m: steady_got.put(m.payload.decode()), qos=1)
    stop = threading.Event()
    cycles = [0]
    errors: list[BaseException] = []

    def come_and_go(worker: int) -> None:
        while not stop.is_set():
            try:
                tag = uuid.uuid4().hex[:8]
                client = raw_client(port, f"churn-{worker}-{tag}")
                client.subscribe([("fedmq/v1/tasks/+", 1), (f"churn/{tag}/+", 1)])
                time.sleep(0.05)
                client.disconnect()
                client.loop_stop()
                cycles[0] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    def fetch_more() -> None:  # a device walking through chunk topics, one exact filter each
        client = raw_client(port, new_client_id("walker"))
        while not stop.is_set():
            topic = f"fedmq/v1/bundles/{uuid.uuid4().hex * 2}/0"
            client.subscribe(topic, 1)
            time.sleep(0.002)
            client.unsubscribe(topic)
        client.disconnect()
        client.loop_stop()

    workers = [threading.Thread(target=come_and_go, args=(n,), daemon=True) for n in range(8)]
    workers.append(threading.Thread(target=fetch_more, daemon=True))
    for thread in workers:
        thread.start()
    publisher = MqttConnection(new_client_id("stream"), f"mqtt://127.0.0.1:{port}").start()
    try:
        for n in range(stream_messages):
            publisher.publish("churn/stream", str(n).encode(), qos=1)
            time.sleep(seconds / stream_messages)
        stop.set()
        for thread in workers:
            thread.join(10)
        received = drain(steady_got, 2.0)
    finally:
        stop.set()
        for conn in (publisher, steady):
            conn.stop()
        for client in (seeder, fetcher):
            client.disconnect()
            client.loop_stop()
    return sorted(int(p) for p in received), cycles[0], errors


def test_client_churn_loses_nothing_and_logs_nothing(mqtt_broker: Any, broker_log: _Records) -> None:
    """Clients connect, subscribe and disconnect from many threads while a download is under way:
    every message of a steady stream arrives once, and the broker logs no error (stock amqtt
    raised 'dictionary changed size during iteration' here, into the demo's terminal)."""
    received, cycles, errors = churn(mqtt_broker.port, seconds=4.0)
    assert not errors
    assert cycles > 50
    assert received == list(range(300))
    assert broker_log.errors() == []


def connect_during_subscription_changes(port: int, newcomers: int = 30) -> None:
    """The race behind amqtt's traceback: clients connect while the broker holds many filters
    with retained matches and another client keeps subscribing filters nobody held before."""
    seeder = raw_client(port, new_client_id("seed"))
    for index in range(CHUNKS):
        seeder.publish(f"race/{index}", b"c" * 1024, qos=1, retain=True)
    seeder.publish("race/done", b"", qos=1).wait_for_publish(10)
    holder = raw_client(port, new_client_id("holder"))
    holder.subscribe([(f"race/{index}", 1) for index in range(CHUNKS)])
    time.sleep(0.5)
    stop = threading.Event()

    def subscribe_new_filters() -> None:
        client = raw_client(port, new_client_id("walker"))
        while not stop.is_set():
            client.subscribe(f"new/{uuid.uuid4().hex}", 1)
            time.sleep(0.001)
        client.disconnect()
        client.loop_stop()

    walker = threading.Thread(target=subscribe_new_filters, daemon=True)
    walker.start()
    try:
        for n in range(newcomers):
            client = raw_client(port, new_client_id(f"newcomer-{n}"))
            time.sleep(0.1)
            client.disconnect()
            client.loop_stop()
    finally:
        stop.set()
        walker.join(10)
        for client in (seeder, holder):
            client.disconnect()
            client.loop_stop()


def test_connecting_while_subscriptions_change_logs_nothing(mqtt_broker: Any, broker_log: _Records) -> None:
    connect_during_subscription_changes(mqtt_broker.port)
    assert broker_log.errors() == []


def test_stock_amqtt_still_breaks_when_clients_connect_during_subscription_changes(broker_log: _Records) -> None:
    """The traceback users saw in the demo's terminal, from amqtt's own broker."""
    with StockEmbeddedBroker() as stock:
        connect_during_subscription_changes(stock.port)
    assert any("dictionary changed size during iteration" in line for line in broker_log.errors())
