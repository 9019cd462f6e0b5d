"""RPC over a real broker: each test runs on the embedded amqtt broker and on Mosquitto."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.roles import Role
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.rpc_server import RpcServer, rpc
from fedmq.broker.topics import Topics

from conftest import Inbox, Stack

TOPICS = Topics()
REQUEST_TOPIC = "fedmq/v1/rpc/echo/add/tester"


def raw_request(stack: Stack, body: Any, *, topic: str = REQUEST_TOPIC, kind: str = "json") -> None:
    payload = body if isinstance(body, bytes) else codec.encode(body, kind)
    stack.raw.publish(topic, payload, qos=1).wait_for_publish(5)


def inbox(stack: Stack, name: str = "raw") -> tuple[str, Inbox]:
    topic = f"fedmq/v1/reply/tester/{name}"
    return topic, Inbox(stack.raw, topic)


def test_call_in_both_codecs(rpc_stack: Stack) -> None:
    assert rpc_stack.client.call("echo", "add", {"a": 40}) == 42
    json_client = RpcClient(rpc_stack.client.connection, "tester", codec_name="json").start()
    assert json_client.call("echo", "whoami") == {"caller": "tester", "codec": "json"}
    assert rpc_stack.client.call("echo", "whoami") == {"caller": "tester", "codec": "msgpack"}


def test_every_service_answers_ping_and_describe(rpc_stack: Stack) -> None:
    pong = rpc_stack.client.call("echo", "ping")
    assert pong["pong"] is True and pong["service"] == "echo" and pong["uptime_s"] >= 0
    described = rpc_stack.client.call("echo", "describe")
    assert described["methods"]["add"]["args"]["required"] == ["a"]


def test_answers_in_the_codec_it_was_asked_in(rpc_stack: Stack) -> None:
    reply_to, replies = inbox(rpc_stack)
    raw_request(rpc_stack, {"id": "j1", "reply_to": reply_to, "args": {"a": 1}}, kind="json")
    raw_request(rpc_stack, {"id": "m1", "reply_to": reply_to, "args": {"a": 1}}, kind="msgpack")
    bodies = {}
    for _ in range(2):
        bodies.update({replies.get()[1]["id"]: True})
    assert set(bodies) == {"j1", "m1"}


@pytest.mark.parametrize("args, code, fragment", [
    ({"a": "1"}, ErrorCode.INVALID_ARGS, "a: Input should be a valid integer"),
    ({"a": 1, "c": 3}, ErrorCode.INVALID_ARGS, "c: Extra inputs are not permitted"),
    ({}, ErrorCode.INVALID_ARGS, "a: Field required"),
    ({"a": True}, ErrorCode.INVALID_ARGS, "valid integer"),
    ({"a": [1]}, ErrorCode.INVALID_ARGS, "valid integer"),
])
def test_wrong_arguments_get_invalid_args(rpc_stack: Stack, args: dict, code: ErrorCode, fragment: str) -> None:
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("echo", "add", args)
    assert err.value.code is code and fragment in err.value.message
    assert rpc_stack.client.call("echo", "add", {"a": 1}) == 3  # still serving


def test_unknown_method_and_service(rpc_stack: Stack) -> None:
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("echo", "nope")
    assert err.value.code is ErrorCode.UNKNOWN_METHOD and "add" in err.value.details["methods"]
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("nosuchservice", "ping", timeout=0.5)
    assert err.value.code is ErrorCode.TIMEOUT  # nobody serves it: a clear timeout, not a hang


def test_a_method_name_no_service_could_have_is_answered_not_dropped(rpc_stack: Stack) -> None:
    # A misspelt method typed into mosquitto_pub gets the list of methods, not silence.
    reply_to, replies = inbox(rpc_stack)
    raw_request(rpc_stack, {"id": "m1", "reply_to": reply_to}, topic="fedmq/v1/rpc/echo/__init__/tester")
    _, reply = replies.get()
    assert reply["error"]["code"] == "unknown_method" and "add" in reply["error"]["details"]["methods"]


def test_handler_errors_carry_codes_but_never_traces(rpc_stack: Stack) -> None:
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("echo", "boom")
    assert err.value.code is ErrorCode.INTERNAL and "ref" in err.value.message
    assert "passwd" not in err.value.message and "Traceback" not in err.value.message
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("echo", "missing", {"name": "x"})
    assert err.value.code is ErrorCode.NOT_FOUND and "'x'" in err.value.message
    assert rpc_stack.client.call("echo", "add", {"a": 1}) == 3


@pytest.mark.parametrize("body, fragment", [
    ([1, 2, 3], None),                                         # JSON array: no reply topic known
    ({"id": "x1"}, None),                                      # missing reply_to: logged drop
    ({"reply_to": "REPLY", "args": {"a": 1}}, "missing 'id'"),  # missing id: error reply
    ({"id": "x2", "reply_to": "REPLY", "args": [1]}, "'args' must be an object"),
    ({"id": "x3", "reply_to": "REPLY", "args": {}, "extra": 1}, "unknown envelope fields"),
    (b"\x00\xff garbage \xc1", None),                            # neither msgpack nor JSON
    (b"{ this is not json", None),
])
def test_malformed_requests_get_an_error_or_a_logged_drop(rpc_stack: Stack, body: Any, fragment: str | None) -> None:
    reply_to, replies = inbox(rpc_stack)
    if isinstance(body, dict) and body.get("reply_to") == "REPLY":
        body = {**body, "reply_to": reply_to}
    dropped = rpc_stack.server.stats["dropped"]
    raw_request(rpc_stack, body)
    if fragment is None:
        assert replies.empty_for(0.5)
        assert rpc_stack.server.stats["dropped"] == dropped + 1
    else:
        _, reply = replies.get()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
        assert fragment in reply["error"]["message"]
    assert rpc_stack.client.call("echo", "add", {"a": 1}) == 3


def test_a_one_megabyte_request_is_refused_with_a_clear_error(rpc_stack: Stack) -> None:
    reply_to, replies = inbox(rpc_stack)
    raw_request(rpc_stack, {"id": "big", "reply_to": reply_to, "args": {"a": 1, "pad": "x" * 1_000_000}})
    _, reply = replies.get(10)
    assert reply["error"]["code"] == "bad_request" and "exceeds the limit" in reply["error"]["message"]
    assert rpc_stack.client.call("echo", "add", {"a": 1}) == 3


def test_a_reply_topic_outside_the_callers_tree_is_never_used(rpc_stack: Stack) -> None:
    victim = Inbox(rpc_stack.raw, "fedmq/v1/reply/someone-else/inbox")
    raw_request(rpc_stack, {"id": "y", "reply_to": "fedmq/v1/reply/someone-else/inbox", "args": {"a": 1}})
    assert victim.empty_for(0.5)


def test_a_reply_for_an_unknown_correlation_id_is_ignored(rpc_stack: Stack) -> None:
    client = rpc_stack.client
    stray = codec.encode({"v": 1, "id": "not-ours", "ok": True, "result": 1})
    rpc_stack.raw.publish(client.inbox, stray, qos=1).wait_for_publish(5)
    rpc_stack.raw.publish(client.inbox, b"\xc1garbage", qos=1).wait_for_publish(5)
    assert client.call("echo", "add", {"a": 5}) == 7
    assert client.stray_replies >= 1


def test_a_redelivered_request_runs_once(rpc_stack: Stack) -> None:
    reply_to, replies = inbox(rpc_stack)
    body = {"id": "dup-1", "reply_to": reply_to, "args": {"key": "k"}}
    for _ in range(3):
        raw_request(rpc_stack, body, topic="fedmq/v1/rpc/echo/count/tester")
    # A duplicate arriving after the reply is answered again from the cache; one arriving while the
    # first still runs is absorbed by it.  Either way the handler runs once and every answer agrees.
    results = [replies.get()[1]["result"]]
    while True:
        try:
            results.append(replies.messages.get(timeout=0.5)[1]["result"])
        except Exception:
            break
    assert set(results) == {1} and 1 <= len(results) <= 3 and rpc_stack.state.runs["k"] == 1


def test_an_expired_request_is_not_served(rpc_stack: Stack) -> None:
    reply_to, replies = inbox(rpc_stack)
    raw_request(rpc_stack, {"id": "old", "reply_to": reply_to, "args": {"key": "late"},
                            "deadline": time.time() - 1}, topic="fedmq/v1/rpc/echo/count/tester")
    assert replies.empty_for(0.5) and "late" not in rpc_stack.state.runs


def test_concurrent_callers_get_their_own_replies(rpc_stack: Stack) -> None:
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(40):
            got = rpc_stack.client.call("echo", "add", {"a": offset + i, "b": 0})
            if got != offset + i:
                errors.append(f"{offset + i} -> {got}")

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_binary_results_travel_in_msgpack_and_as_base64_in_json(rpc_stack: Stack) -> None:
    assert rpc_stack.client.call("echo", "blob", {"size": 3}) == b"xxx"
    json_client = RpcClient(rpc_stack.client.connection, "tester", codec_name="json").start()
    assert json_client.call("echo", "blob", {"size": 3}) == "eHh4"


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
def test_mosquitto_pub_json_request_gets_a_json_reply(rpc_stack: Stack, mqtt_broker: Any) -> None:
    port = str(mqtt_broker.port)
    reply_topic = "fedmq/v1/reply/operator/console"
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", reply_topic,
                            "-C", "1", "-W", "10"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # let mosquitto_sub subscribe
    request = json.dumps({"id": "1", "reply_to": reply_topic, "args": {"a": 2, "b": 3}})
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1",
                    "-t", "fedmq/v1/rpc/echo/add/operator", "-m", request], check=True, timeout=10)
    out, _ = sub.communicate(timeout=15)
    assert json.loads(out) == {"v": 1, "id": "1", "ok": True, "result": 5}


def test_broker_restart_mid_stream(rpc_stack: Stack, mqtt_broker: Any) -> None:
    client = rpc_stack.client
    assert client.call("echo", "add", {"a": 1}) == 3
    results: list[Any] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            try:
                results.append(client.call("echo", "add", {"a": i, "b": 0}, timeout=1.0) == i)
            except RpcError as exc:
                results.append(exc.code.value)
            i += 1

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.5)
    mqtt_broker.restart()
    deadline = time.time() + 30
    while time.time() < deadline and not (client.connection.connected.is_set()
                                          and rpc_stack.server_conn.connected.is_set()):
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    thread.join(30)
    assert rpc_stack.server_conn.connect_count >= 2 and client.connection.connect_count >= 2
    # After the restart, fresh calls succeed without anyone reconnecting by hand.
    for i in range(20):
        assert client.call("echo", "add", {"a": i, "b": 0}, timeout=5) == i
    assert results.count(True) > 0


def test_mqtt5_response_topic_and_correlation_data(mosquitto_broker: Any) -> None:
    """amqtt speaks MQTT 3.1.1 only, so this runs on Mosquitto alone."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from fedmq.broker.rpc_server import RpcServer

    from conftest import EchoState, make_echo_service

    url5 = mosquitto_broker.url + "?protocol=5"
    server_conn = MqttConnection("svc-v5", url5).start()
    server = RpcServer(server_conn)
    server.add(make_echo_service(EchoState()))
    server.start()
    got: list[Any] = []
    done = threading.Event()
    v5 = MqttConnection(new_client_id("v5"), url5).start()
    try:
        def on_reply(message: Any) -> None:
            got.append((codec.decode(message.payload)[0], message.properties.CorrelationData))
            done.set()

        v5.subscribe("fedmq/v1/reply/tester/v5", on_reply)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "fedmq/v1/reply/tester/v5"
        props.CorrelationData = b"corr-42"
        # No reply_to in the payload: the response-topic property names it.
        v5.publish(REQUEST_TOPIC, codec.encode({"id": "v5", "args": {"a": 1}}), properties=props)
        assert done.wait(5)
        body, correlation = got[0]
        assert body["result"] == 3 and correlation == b"corr-42"
        # A 3.1.1 client still works against the same MQTT 5 service.
        client_conn = MqttConnection(new_client_id("c311"), mosquitto_broker.url).start()
        assert RpcClient(client_conn, "tester").start().call("echo", "add", {"a": 2}) == 4
        client_conn.stop()
    finally:
        v5.stop()
        server_conn.stop()
        server.stop()


def test_shared_subscription_spreads_calls_over_replicas(mosquitto_broker: Any) -> None:
    """amqtt has no shared subscriptions; replicas need Mosquitto or a cluster broker."""
    mqtt_broker = mosquitto_broker
    from fedmq.broker.rpc_server import RpcServer, rpc
    served: dict[str, int] = {"r1": 0, "r2": 0}
    conns, servers = [], []

    class Work:
        name = "work"

        def __init__(self, replica: str) -> None:
            self.replica = replica

        @rpc
        def which(self) -> str:
            served[self.replica] += 1
            return self.replica

    for replica in served:
        conn = MqttConnection(f"svc-{replica}", mqtt_broker.url).start()
        server = RpcServer(conn, shared_group="cloud")
        server.add(Work(replica))
        server.start()
        conns.append(conn)
        servers.append(server)
    client_conn = MqttConnection(new_client_id("c"), mqtt_broker.url).start()
    try:
        client = RpcClient(client_conn, "tester").start()
        for _ in range(40):
            client.call("work", "which")
        assert served["r1"] + served["r2"] == 40 and served["r1"] > 0 and served["r2"] > 0
    finally:
        for conn in [client_conn, *conns]:
            conn.stop()
        for server in servers:
            server.stop()


def test_asyncio_callers(rpc_stack: Stack) -> None:
    import asyncio

    async def many() -> list[int]:
        return await asyncio.gather(*(rpc_stack.client.acall("echo", "add", {"a": i, "b": 0}) for i in range(20)))

    assert asyncio.run(many()) == list(range(20))

    async def failing() -> None:
        await rpc_stack.client.acall("echo", "add", {"a": "x"})

    with pytest.raises(RpcError) as err:
        asyncio.run(failing())
    assert err.value.code is ErrorCode.INVALID_ARGS


def test_a_reused_request_id_is_a_conflict_never_another_calls_answer(rpc_stack: Stack) -> None:
    """An operator reusing id 4242 once got ``tasks.start``'s cached answer to ``tasks.stop``."""
    reply_to, replies = inbox(rpc_stack)
    raw_request(rpc_stack, {"id": "4242", "reply_to": reply_to, "args": {"a": 1}})
    assert replies.get()[1]["result"] == 3
    # The same id for another method is another request: it runs and gets its own answer.
    raw_request(rpc_stack, {"id": "4242", "reply_to": reply_to, "args": {"key": "k4242"}},
                topic="fedmq/v1/rpc/echo/count/tester")
    assert replies.get()[1]["result"] == 1 and rpc_stack.state.runs["k4242"] == 1
    # The same id and method with other arguments is refused, and nothing runs.
    raw_request(rpc_stack, {"id": "4242", "reply_to": reply_to, "args": {"key": "other"}},
                topic="fedmq/v1/rpc/echo/count/tester")
    _, reply = replies.get()
    assert reply["ok"] is False and reply["error"]["code"] == "conflict"
    assert "use a new id per request" in reply["error"]["message"] and "other" not in rpc_stack.state.runs


def test_the_reply_cache_is_bounded_in_bytes(rpc_stack: Stack) -> None:
    """400 requests with large replies once grew a service by 222 MB."""
    from fedmq.broker.reply_cache import MAX_BYTES

    for _ in range(60):
        assert len(rpc_stack.client.call("echo", "blob", {"size": 400_000})) == 400_000
    entries, held = rpc_stack.server.replies.size
    assert held <= MAX_BYTES and entries < 60


def test_an_answer_too_big_for_the_broker_is_an_error_never_published(rpc_stack: Stack) -> None:
    """An oversized reply once made the broker drop the service, and paho resent it forever."""
    connects = rpc_stack.server_conn.connect_count
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("echo", "blob", {"size": 2_000_000})
    assert err.value.code is ErrorCode.INTERNAL and "exceeds the reply limit" in err.value.message
    assert rpc_stack.server.stats["oversized"] == 1
    assert rpc_stack.client.call("echo", "add", {"a": 1}) == 3
    assert rpc_stack.server_conn.connect_count == connects  # never dropped by the broker


def test_deep_nesting_is_refused_without_a_traceback(rpc_stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A 100,000-deep JSON request once logged a RecursionError traceback."""
    reply_to, replies = inbox(rpc_stack)
    deep = "[" * 100_000 + "]" * 100_000
    raw_request(rpc_stack, f'{{"id": "deep", "reply_to": "{reply_to}", "args": {{"a": {deep}}}}}'.encode())
    shallow_enough = {"id": "d40", "reply_to": reply_to, "args": {"a": json.loads("[" * 40 + "]" * 40)}}
    raw_request(rpc_stack, shallow_enough)
    _, reply = replies.get()
    assert reply["id"] == "d40" and reply["error"]["code"] == "bad_request" and "deeper" in reply["error"]["message"]
    assert rpc_stack.client.call("echo", "add", {"a": 1}) == 3
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_values_json_cannot_carry_are_refused_at_the_door(rpc_stack: Stack, value: float) -> None:
    """NaN accepted over msgpack once made every JSON caller's list fail to encode."""
    with pytest.raises(RpcError) as err:
        rpc_stack.client.call("echo", "add", {"a": 1, "b": value})  # the client speaks msgpack
    assert err.value.code is ErrorCode.BAD_REQUEST and "args" in err.value.message


class _Slow:
    name = "slow"

    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    @rpc(roles=frozenset({Role.DEVICE}))
    def work(self) -> int:
        time.sleep(0.2)
        with self.lock:
            self.done += 1
        return self.done

    @rpc(roles=frozenset({Role.OPERATOR}))
    def look(self) -> int:
        return self.done


def test_an_operator_never_queues_behind_a_fleet(mosquitto_broker: Any) -> None:
    """When the whole fleet asks at once, an operator's call is served beside it, not after it."""
    service = _Slow()
    server_conn = MqttConnection(new_client_id("svc"), mosquitto_broker.url).start()
    server = RpcServer(server_conn, roles=lambda caller: Role.OPERATOR if caller == "alice" else Role.DEVICE)
    server.add(service)
    server.start()
    conns = [MqttConnection(new_client_id("c"), mosquitto_broker.url).start() for _ in range(2)]
    try:
        devices = [RpcClient(conns[0], f"dev-{i}").start() for i in range(80)]
        pending = [d.call_future("slow", "work", timeout=60) for d in devices]  # 80 x 0.2 s on 8 workers
        time.sleep(0.3)  # the backlog is queued
        seen = RpcClient(conns[1], "alice").start().call("slow", "look", timeout=30)
        # Behind the fleet (one queue) it would be answered only once 72 of the 80 had finished.
        assert seen < 40
        for call in pending:
            call.future.result(60)
        assert service.done == 80
    finally:
        for conn in conns:
            conn.stop()
        server_conn.stop()
        server.stop()


def test_a_retry_under_the_same_id_is_served_once_and_answered(rpc_stack: Stack) -> None:
    """The first attempt times out while the server is still at it; the retry (same request id,
    a new deadline) is not a conflict and not a second run: the one answer reaches the caller."""
    assert rpc_stack.client.call("echo", "slow_count", {"key": "retry", "seconds": 1.5},
                                 timeout=1.0, retries=2) == 1
    assert rpc_stack.state.runs["retry"] == 1
    with pytest.raises(RpcError) as err:  # no retries: the timeout is the caller's answer
        rpc_stack.client.call("echo", "slow_count", {"key": "once", "seconds": 1.5}, timeout=0.5)
    assert err.value.code is ErrorCode.TIMEOUT
