"""``tasks.request`` throughput and latency with 1,000 registered devices and 50 running tasks
with criteria, beside ``tasks.ping`` (the same RPC path doing no work) in the same run.

    .venv/bin/python -m bench.requests [--devices 1000] [--tasks 50] [--calls 5000]

The cloud runs as its own process (``fedmq cloud``) on a Mosquitto of our own; the 50 tasks are
real running tasks whose server entry point idles, so their Flower servers cost nothing here --
what is measured is selection: criteria and requirements evaluated for every running task.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.rpc import percentiles, run_threads
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.bundle_client import push_folder

IDLE_TASK = {
    "fedmq.toml": '[task]\nname = "idle"\n[server]\nentry = "server.py"\n[client]\nentry = "client.py"\n'
                  '[requirements]\npackages = ["numpy>=1.20"]\n',
    "server.py": "import time\ntime.sleep(3600)\n",
    "client.py": "print('idle client')\n",
}
REGIONS = ["eu", "us", "br", "asia"]


def criteria_for(k: int) -> str:
    return (f"data_quantity > {k * 20} and region in {REGIONS[: 1 + k % 4]!r} "
            f"and memory_mb >= {256 * (k % 3)} and has(\"numpy>=1.{k % 5}\")")


def device_info(i: int) -> dict[str, Any]:
    rng = random.Random(i)
    return {"data_quantity": rng.randint(0, 1000), "memory_mb": float(rng.choice([512, 1024, 4096])),
            "cpu_count": rng.choice([1, 2, 4]), "packages": {"numpy": "2.4.6", "flwr": "1.41.0"},
            "labels": {"region": rng.choice(REGIONS)}}


def timed_calls(clients: list[RpcClient], method: str, calls: int, threads: int) -> dict[str, Any]:
    samples: list[float] = []
    offered: list[int] = []
    lock = threading.Lock()
    per_thread = calls // threads

    def worker(t: int) -> None:
        local, counts = [], []
        for n in range(per_thread):
            client = clients[(t * per_thread + n) % len(clients)]
            start = time.perf_counter()
            result = client.call("tasks", method, {}, timeout=60)
            local.append(time.perf_counter() - start)
            if method == "request":
                counts.append(len(result))
        with lock:
            samples.extend(local)
            offered.extend(counts)

    elapsed = run_threads([threading.Thread(target=worker, args=(t,)) for t in range(threads)])
    out = {**percentiles(samples), "calls_per_s": round(len(samples) / elapsed, 1), "threads": threads}
    if offered:
        out["mean_tasks_offered"] = round(sum(offered) / len(offered), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=16)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-requests-"))
    mosq = MosquittoProcess().start()
    log = (work / "cloud.log").open("w")
    cloud = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "--broker", mosq.url, "cloud", "--allow-unsigned", "--home",
                              str(work / "cloud"), "--client-id", "bench-cloud"], stdout=log, stderr=subprocess.STDOUT)
    conns: list[MqttConnection] = []
    try:
        deadline = time.time() + 30
        while "serving" not in (work / "cloud.log").read_text():
            if time.time() > deadline or cloud.poll() is not None:
                raise RuntimeError((work / "cloud.log").read_text())
            time.sleep(0.1)
        task_dir = work / "idle"
        task_dir.mkdir()
        for name, text in IDLE_TASK.items():
            (task_dir / name).write_text(text)
        op_conn = MqttConnection(new_client_id("op"), mosq.url).start()
        conns.append(op_conn)
        op = RpcClient(op_conn, "operator").start()
        digest = push_folder(op, task_dir).manifest.digest
        for k in range(opts.tasks):
            op.call("tasks", "create", {"name": f"t{k}", "task": f"t{k}", "bundle": digest,
                                        "criteria": criteria_for(k), "priority": k % 7})
            op.call("tasks", "start", {"task": f"t{k}"}, timeout=30)
        per_conn = 100
        clients: list[RpcClient] = []
        for i in range(opts.devices):
            if i % per_conn == 0:
                conns.append(MqttConnection(new_client_id("devs"), mosq.url).start())
            client = RpcClient(conns[-1], f"dev-{i}").start()
            client.call("devices", "update_info", {"info": device_info(i)})
            clients.append(client)
        report = {"bench": "requests", "devices": opts.devices, "running_tasks": opts.tasks,
                  "ping_baseline": timed_calls(clients, "ping", opts.calls // 2, opts.threads),
                  "request": timed_calls(clients, "request", opts.calls, opts.threads)}
        report["request_p50_over_ping_p50"] = round(report["request"]["p50_ms"] / report["ping_baseline"]["p50_ms"], 2)
        print(json.dumps(report, indent=2))
    finally:
        for conn in conns:
            conn.stop()
        cloud.terminate()
        try:
            cloud.wait(30)
        except subprocess.TimeoutExpired:
            cloud.kill()
        log.close()
        mosq.cleanup()
        shutil.rmtree(work, ignore_errors=True)



if __name__ == "__main__":
    main()
