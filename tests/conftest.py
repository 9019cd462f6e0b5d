"""Shared test helpers.  The broker fixtures come from fedmq's pytest plugin, loaded here (it is
opt-in: a task author's suite loads it with the same line, or ``pytest -p fedmq.broker.pytest_plugin``)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.errors import NotFound
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.rpc_server import CallContext, RpcServer, rpc

pytest_plugins = ["fedmq.broker.pytest_plugin"]


@dataclass
class EchoState:
    runs: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class EchoService:
    name = "echo"

    def __init__(self, state: EchoState) -> None:
        self.state = state

    @rpc
    def add(self, a: int, b: int = 2) -> int:
        return a + b

    @rpc
    def whoami(self, ctx: CallContext) -> dict[str, Any]:
        return {"caller": ctx.caller, "codec": ctx.codec.value}

    @rpc
    def count(self, key: str) -> int:
        with self.state.lock:
            self.state.runs[key] = self.state.runs.get(key, 0) + 1
            return self.state.runs[key]

    @rpc
    def slow_count(self, key: str, seconds: float) -> int:
        time.sleep(seconds)
        return self.count(key)

    @rpc
    def boom(self) -> None:
        raise ValueError("secret internals /etc/passwd")

    @rpc
    def missing(self, name: str) -> None:
        raise NotFound(f"no such thing {name!r}")

    @rpc
    def blob(self, size: int) -> bytes:
        return b"x" * size


def make_echo_service(state: EchoState) -> EchoService:
    return EchoService(state)


class Inbox:
    """A raw subscriber that collects decoded messages, for tests that speak the wire by hand."""

    def __init__(self, connection: MqttConnection, topic_filter: str) -> None:
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        connection.subscribe(topic_filter, self._on, qos=1)

    def _on(self, message: Any) -> None:
        try:
            body = codec.decode(message.payload)[0]
        except codec.CodecError:
            body = message.payload
        self.messages.put((message.topic, body))

    def get(self, timeout: float = 5.0) -> tuple[str, Any]:
        return self.messages.get(timeout=timeout)

    def empty_for(self, seconds: float) -> bool:
        try:
            self.messages.get(timeout=seconds)
            return False
        except queue.Empty:
            return True


@dataclass
class Stack:
    url: str
    state: EchoState
    server: RpcServer
    server_conn: MqttConnection
    client: RpcClient
    raw: MqttConnection


@pytest.fixture
def rpc_stack(mqtt_broker: Any) -> Iterator[Stack]:
    """An echo service and a client on the parametrised broker."""
    state = EchoState()
    server_conn = MqttConnection("svc-echo", mqtt_broker.url, persistent=True).start()
    server = RpcServer(server_conn)
    server.add(make_echo_service(state))
    server.start()
    client_conn = MqttConnection(new_client_id("test"), mqtt_broker.url).start()
    client = RpcClient(client_conn, "tester").start()
    raw = MqttConnection(new_client_id("raw"), mqtt_broker.url).start()
    stack = Stack(mqtt_broker.url, state, server, server_conn, client, raw)
    try:
        yield stack
    finally:
        for conn in (raw, client_conn, server_conn):
            conn.stop()
        server.stop()
