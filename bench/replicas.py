"""``tasks.request`` on one cloud replica, then two, on one Mosquitto (shared subscriptions) and
the machine's PostgreSQL -- and one replica SIGKILLed in the middle of the load.

    .venv/bin/python -m bench.replicas [--devices 1000] [--tasks 50] [--pg postgresql://postgres@127.0.0.1:5432/test]

1. One replica (``fedmq cloud --shared-group cloud --db …``): half the fleet asks for its tasks
   (each device's first request, then two repeats).
2. A second replica joins: the other half of the fleet does the same.  The ratio is the figure
   (on 2 cores, both replicas, the broker, PostgreSQL and the callers share the same CPUs: expect
   well under 2x; the CPU each process spent per call says where the time goes).
3. Offers: every device's first answer against the rows and ``device_requested`` events in
   PostgreSQL -- none lost, none twice.
4. Failover: the fleet keeps asking (``retries``: a call that times out is sent again under the
   same request id) while the second replica is SIGKILLed: every call answered, none failed.

Prints one JSON document (stdout) and a short table (stderr).  A schema of its own is created and dropped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil

from bench.requests import bench_cloud, cpu_s, criteria_for, device_info, idle_task
from bench.rpc import percentiles, run_threads
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import RpcError
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.bundle_client import push_folder

THREADS = 16
PER_CONN = 100


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] and p.info["name"].startswith("postgres")]


def requests_phase(clients: list[RpcClient], repeats: int, processes: dict[str, Any]) -> dict[str, Any]:
    """Each client's first request, then ``repeats`` more, from THREADS callers."""
    samples: list[float] = []
    first: dict[str, list[str]] = {}
    lock = threading.Lock()
    chunks = [clients[t::THREADS] for t in range(THREADS)]

    def worker(chunk: list[RpcClient]) -> None:
        local = []
        for n in range(repeats + 1):
            for client in chunk:
                start = time.perf_counter()
                offers = client.call("tasks", "request", {}, timeout=60)
                local.append(time.perf_counter() - start)
                if n == 0:
                    with lock:
                        first[client.caller] = [o["id"] for o in offers]
        with lock:
            samples.extend(local)

    before = cpu_s(processes)
    elapsed = run_threads([threading.Thread(target=worker, args=(c,)) for c in chunks])
    after = cpu_s(processes)
    return {**percentiles(samples), "calls_per_s": round(len(samples) / elapsed, 1),
            "cpu_ms_per_call": {k: round((after[k] - before[k]) * 1000 / len(samples), 3) for k in processes},
            "first_offers": first}


def failover_phase(clients: list[RpcClient], seconds: float, kill_after: float, victim: Any) -> dict[str, Any]:
    """The fleet asks for ``seconds``; ``victim`` is SIGKILLed after ``kill_after``."""
    stop = threading.Event()
    counts = {"calls": 0, "answered": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()
    chunks = [clients[t::THREADS] for t in range(THREADS)]

    def worker(chunk: list[RpcClient]) -> None:
        i = 0
        while not stop.is_set():
            client = chunk[i % len(chunk)]
            i += 1
            try:
                client.call("tasks", "request", {}, timeout=3, retries=3)
                outcome = "answered"
            except RpcError as exc:
                outcome = "failed"
                with lock:
                    errors.append(str(exc))
            with lock:
                counts["calls"] += 1
                counts[outcome] += 1

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for thread in threads:
        thread.start()
    time.sleep(kill_after)
    victim.send_signal(signal.SIGKILL)
    killed_at = counts["calls"]
    time.sleep(seconds - kill_after)
    stop.set()
    for thread in threads:
        thread.join()
    return {**counts, "calls_before_kill": killed_at, "errors": errors[:5]}


def offer_accounting(pg_url: str, schema: str, first: dict[str, list[str]]) -> dict[str, Any]:
    """Every first answer against what PostgreSQL holds: rows and events, each exactly once."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    cursor = conn.cursor()
    cursor.execute(f"SELECT task, device FROM {schema}.taskdevice")
    rows = set(cursor.fetchall())
    cursor.execute(f"SELECT task, device, count(*) FROM {schema}.event WHERE kind = 'device_requested' "
                   "GROUP BY task, device")
    events = {(t, d): n for t, d, n in cursor.fetchall()}
    conn.close()
    answered = {(task, device) for device, tasks in first.items() for task in tasks}
    return {"offers_answered": len(answered), "rows": len(rows & answered),
            "lost_rows": len(answered - rows), "lost_events": len(answered - set(events)),
            "duplicate_events": sum(1 for n in events.values() if n > 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    opts = parser.parse_args()
    report = run(opts.devices, opts.tasks, opts.repeats, opts.pg)
    print(json.dumps(report, indent=2))
    one, two = report["one_replica"], report["two_replicas"]
    rows = [("tasks.request calls/s", one["calls_per_s"], two["calls_per_s"]),
            ("p50 ms", one["p50_ms"], two["p50_ms"]), ("p99 ms", one["p99_ms"], two["p99_ms"])]
    table = [f"{'':24}{'1 replica':>12}{'2 replicas':>12}", *(f"{n:24}{x:>12}{y:>12}" for n, x, y in rows),
             f"2 / 1: {report['two_over_one']}   offers lost {report['offers']['lost_rows']}, "
             f"twice {report['offers']['duplicate_events']}   failover: {report['failover']['answered']} of "
             f"{report['failover']['calls']} answered, {report['failover']['failed']} failed"]
    print("\n".join(table), file=sys.stderr)  # stdout stays one JSON document


def run(devices: int, tasks: int, repeats: int, pg_url: str) -> dict[str, Any]:
    import psycopg2

    schema = f"fedmq_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE SCHEMA {schema}")
    db = f"{pg_url}?options=-csearch_path%3D{schema}"
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-replicas-"))
    mosq = MosquittoProcess().start()
    conns: list[MqttConnection] = []
    flags = ("--shared-group", "cloud", "--db", db)
    try:
        with ExitStack() as stack:
            a = stack.enter_context(bench_cloud(mosq.url, work, "replica-a", flags=flags))
            op_conn = MqttConnection(new_client_id("op"), mosq.url).start()
            conns.append(op_conn)
            op = RpcClient(op_conn, "operator").start()
            digest = push_folder(op, idle_task(work)).manifest.digest
            for k in range(tasks):
                op.call("tasks", "create", {"name": f"t{k}", "task": f"t{k}", "bundle": digest,
                                            "criteria": criteria_for(k), "priority": k % 7})
                op.call("tasks", "start", {"task": f"t{k}"}, timeout=30)
            clients: list[RpcClient] = []
            for i in range(devices):
                if i % PER_CONN == 0:
                    conns.append(MqttConnection(new_client_id("devs"), mosq.url).start())
                clients.append(RpcClient(conns[-1], f"dev-{i}").start())
            run_threads([threading.Thread(target=lambda cs=cs: [
                c.call("devices", "update_info", {"info": device_info(int(c.caller[4:]))}, timeout=60) for c in cs])
                for cs in (clients[t::THREADS] for t in range(THREADS))])
            half = devices // 2
            base = {"broker": psutil.Process(mosq.process.pid),  # type: ignore[union-attr]
                    "callers": psutil.Process(), "postgres": _Group(postgres_processes())}
            one = requests_phase(clients[:half], repeats, {"replica_a": psutil.Process(a.pid), **base})
            b = stack.enter_context(bench_cloud(mosq.url, work, "replica-b", flags=flags))
            time.sleep(1.0)  # its shared subscriptions are in place
            two = requests_phase(clients[half:], repeats, {"replica_a": psutil.Process(a.pid),
                                                            "replica_b": psutil.Process(b.pid), **base})
            offers = offer_accounting(pg_url, schema, {**one.pop("first_offers"), **two.pop("first_offers")})
            failover = failover_phase(clients, seconds=8, kill_after=3, victim=b)
            return {"bench": "replicas", "devices": devices, "running_tasks": tasks, "repeats": repeats,
                    "one_replica": one, "two_replicas": two,
                    "two_over_one": round(two["calls_per_s"] / one["calls_per_s"], 2),
                    "offers": offers, "failover": failover}
    finally:
        for conn in conns:
            conn.stop()
        mosq.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        admin.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


class _Group:
    """Several processes' CPU as one (PostgreSQL's backends), for ``cpu_s``."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes

    def cpu_times(self) -> Any:
        total = [0.0, 0.0]
        for proc in self.processes:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total[0] += times.user
            total[1] += times.system
        return type("CpuTimes", (), {"user": total[0], "system": total[1]})()


if __name__ == "__main__":
    main()
