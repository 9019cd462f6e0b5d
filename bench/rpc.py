"""RPC latency and throughput, beside a raw paho QoS 1 round trip measured in the same run.

    .venv/bin/python -m bench.rpc [--calls 2000] [--throughput-calls 10000] [--brokers mosquitto,amqtt]

Prints one JSON document.  The baseline is what the broker and paho cost with nothing of fedmq
in between: client A publishes QoS 1, client B answers QoS 1, A times the round trip -- both with
TCP_NODELAY, as fedmq ships.  ``rpc_p50_over_raw_p50`` is the figure to watch (target <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.rpc_server import RpcServer, rpc


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": round(pick(0.50), 3), "p99_ms": round(pick(0.99), 3),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 3), "n": len(ordered)}


def run_threads(workers: list[threading.Thread]) -> float:
    """Start all, wait for all; seconds from the first start to the last end."""
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def raw_paho_round_trip(host: str, port: int, n: int) -> dict[str, float]:
    def nodelay(_c: Any, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=new_client_id(name))
        c.on_socket_open = nodelay
        c.connect(host, port)
        c.loop_start()
        return c

    got = threading.Event()
    pinger, ponger = client("ping"), client("pong")
    ponger.on_message = lambda c, u, m: c.publish("bench/pong", m.payload, qos=1)
    pinger.on_message = lambda c, u, m: got.set()
    for c, topic in ((ponger, "bench/ping"), (pinger, "bench/pong")):
        c.subscribe(topic, qos=1)[1]
    time.sleep(0.5)
    samples = []
    for i in range(n + 50):
        got.clear()
        start = time.perf_counter()
        pinger.publish("bench/ping", b"x" * 64, qos=1)
        if not got.wait(5):
            raise RuntimeError("raw round trip lost a message")
        if i >= 50:  # warm-up
            samples.append(time.perf_counter() - start)
    for c in (pinger, ponger):
        c.disconnect()
        c.loop_stop()
    return percentiles(samples)


class BenchService:
    name = "bench"

    @rpc
    def echo(self, x: int) -> int:
        return x


def serve_echo(url: str, ready: Any, stop: Any) -> None:
    """The service under test, in its own process as it is deployed (no GIL shared with callers)."""
    conn = MqttConnection("bench-svc", url).start()
    server = RpcServer(conn, workers=8)
    server.add(BenchService())
    server.start()
    ready.set()
    stop.wait()
    conn.stop()
    server.stop()


def rpc_bench(url: str, n: int, throughput_calls: int, connections: int, threads: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=serve_echo, args=(url, ready, stop), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("bench service did not start")
    client_conn = MqttConnection(new_client_id("bench"), url).start()
    client = RpcClient(client_conn, "bench").start()
    for i in range(50):
        client.call("bench", "echo", {"x": i})
    samples = []
    for i in range(n):
        start = time.perf_counter()
        client.call("bench", "echo", {"x": i})
        samples.append(time.perf_counter() - start)
    latency = percentiles(samples)

    # Throughput: several connections, several caller threads each, all calls in flight at once.
    conns = [MqttConnection(new_client_id("tp"), url).start() for _ in range(connections)]
    clients = [RpcClient(c, f"tp{i}").start() for i, c in enumerate(conns)]
    per_thread = throughput_calls // (connections * threads)
    errors: list[str] = []

    def caller(rpc: RpcClient) -> None:
        for i in range(per_thread):
            try:
                if rpc.call("bench", "echo", {"x": i}, timeout=30) != i:
                    errors.append("wrong result")
            except Exception as exc:
                errors.append(str(exc))

    workers = [threading.Thread(target=caller, args=(rpc,)) for rpc in clients for _ in range(threads)]
    elapsed = run_threads(workers)
    total = per_thread * len(workers)
    for c in [*conns, client_conn]:
        c.stop()
    stop.set()
    proc.join(10)
    return {"latency": latency, "throughput": {
        "calls": total, "seconds": round(elapsed, 3), "calls_per_s": round(total / elapsed, 1),
        "concurrent_callers": len(workers), "connections": connections, "errors": len(errors)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--throughput-calls", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--brokers", default="mosquitto,amqtt")
    opts = parser.parse_args()
    report: dict[str, Any] = {"bench": "rpc", "calls": opts.calls, "brokers": {}}
    for kind in opts.brokers.split(","):
        broker: Any = MosquittoProcess() if kind == "mosquitto" else EmbeddedBroker()
        broker.start()
        try:
            raw = raw_paho_round_trip(broker.host, broker.port, opts.calls)
            rpc = rpc_bench(broker.url, opts.calls, opts.throughput_calls, opts.connections, opts.threads)
        finally:
            (broker.cleanup if hasattr(broker, "cleanup") else broker.stop)()
        report["brokers"][kind] = {
            "raw_paho_qos1_round_trip": raw, "rpc": rpc,
            "rpc_p50_over_raw_p50": round(rpc["latency"]["p50_ms"] / raw["p50_ms"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
