"""Shared test helpers.  The broker fixtures come from fedmq's pytest plugin (broker.pytest_plugin)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from broker import codec
from broker.connection import MqttConnection, new_client_id
from broker.envelope import RpcError
from broker.rpc_client import RpcClient
from broker.rpc_server import CallContext, RpcServer, Service


@dataclass
class EchoState:
    runs: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_echo_service(state: EchoState) -> Service:
    service = Service("echo")

    @service.method
    def add(a: int, b: int = 2) -> int:
        return a + b

    @service.method
    def whoami(ctx: CallContext) -> dict[str, Any]:
        return {"caller": ctx.caller, "codec": ctx.codec.value}

    @service.method
    def count(key: str) -> int:
        with state.lock:
            state.runs[key] = state.runs.get(key, 0) + 1
            return state.runs[key]

    @service.method
    def boom() -> None:
        raise ValueError("secret internals /etc/passwd")

    @service.method
    def missing(name: str) -> None:
        raise RpcError("not_found", f"no such thing {name!r}")

    @service.method
    def blob(size: int) -> bytes:
        return b"x" * size

    return service


class Inbox:
    """A raw subscriber that collects decoded messages, for tests that speak the wire by hand."""

    def __init__(self, connection: MqttConnection, topic_filter: str) -> None:
        self.messages: "queue.Queue[tuple[str, Any]]" = queue.Queue()
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
