"""The idle ``fedmq edge`` agent's footprint: RSS, high-water mark and CPU with nothing to run.

A Mosquitto and a ``fedmq cloud`` (``bench_cloud``) are started; then one ``fedmq edge`` as a
user runs it (the ``fedmq`` console script, ``--device-id``, ``--work-dir``, ``--allow-unsigned``).
Once the cloud has its info (it registered and asked for tasks) and a settling pause has passed,
its ``/proc/PID/status`` VmRSS and VmHWM are read and its CPU seconds counted over ``--idle-s``.
For comparison: a bare ``python -c "import paho.mqtt.client"`` in the same run (the floor any
paho-based agent stands on), and the 15 largest imports (``-X importtime``, cumulative, top
level) of the edge's entry path.

    .venv/bin/python -m bench.edge_idle [--idle-s 10]    # prints JSON
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.requests import bench_cloud
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.rpc_client import RpcClient

FEDMQ = Path(sys.executable).with_name("fedmq")
# What a plain ``fedmq edge`` loads before its agent runs (fedmq.cli:run, its lean path, the agent).
ENTRY = "import fedmq.cli, fedmq.cli.edge_run, fedmq.edge.agent"


def status_kb(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks (USER_HZ 100)


def baseline_kb() -> dict[str, int]:
    """A bare python with paho imported, sleeping: the same /proc figures."""
    proc = subprocess.Popen([sys.executable, "-c", "import paho.mqtt.client, sys, time; print('ok', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        time.sleep(0.5)
        return status_kb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def top_imports(code: str, n: int = 15) -> list[dict[str, Any]]:
    """The ``n`` largest top-level imports (cumulative microseconds) of ``code``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if match and 2 <= len(match.group(2)) <= 4:  # depths 1 and 2: what the entry pulls in
            rows.append({"module": match.group(3), "cumulative_ms": round(int(match.group(1)) / 1000, 1)})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:n]


def heavy_modules(pid_code: str) -> list[str]:
    heavy = ("torch", "flwr", "numpy", "pydantic", "typer", "rich", "click", "cryptography", "msgpack", "asyncio")
    out = subprocess.run([sys.executable, "-c", pid_code + f"\nimport sys; print(' '.join(m for m in {heavy!r} "
                          "if m in sys.modules))"], capture_output=True, text=True).stdout
    return out.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-edge-") as tmp, MosquittoProcess() as mosq:
        work = Path(tmp)
        with bench_cloud(mosq.url, work, "bench-edge-idle-cloud"):
            log = (work / "edge.log").open("w")
            edge = subprocess.Popen([str(FEDMQ), "--broker", mosq.url, "edge", "--device-id", "idle-1",
                                     "--work-dir", str(work / "edge"), "--allow-unsigned"],
                                    stdout=log, stderr=subprocess.STDOUT)
            conn = MqttConnection(new_client_id("bench-edge-idle"), mosq.url).start()
            try:
                rpc = RpcClient(conn, "operator")
                deadline = time.time() + 30
                while True:  # registered: the cloud has its info
                    devices = rpc.call("devices", "list")
                    items = devices["items"] if isinstance(devices, dict) else devices
                    if any(d.get("id") == "idle-1" and d.get("info") for d in items):
                        break
                    if time.time() > deadline or edge.poll() is not None:
                        raise RuntimeError((work / "edge.log").read_text())
                    time.sleep(0.2)
                time.sleep(opts.settle_s)
                cpu0, t0 = cpu_s(edge.pid), time.monotonic()
                time.sleep(opts.idle_s)
                cpu1, t1 = cpu_s(edge.pid), time.monotonic()
                figures = status_kb(edge.pid)
            finally:
                conn.stop()
                edge.terminate()
                edge.wait(15)
                log.close()
    base = baseline_kb()
    report = {
        "bench": "edge_idle", "broker": "mosquitto", "idle_s": opts.idle_s,
        "rss_mb": round(figures["VmRSS"] / 1024, 1), "hwm_mb": round(figures["VmHWM"] / 1024, 1),
        "cpu_percent_idle": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
        "baseline_paho_rss_mb": round(base["VmRSS"] / 1024, 1), "baseline_paho_hwm_mb": round(base["VmHWM"] / 1024, 1),
        "entry_heavy_modules": heavy_modules("import fedmq.edge.agent"),
        "top_imports_edge_entry": top_imports(ENTRY),
        "top_imports_edge_agent": top_imports("import fedmq.edge.agent"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
