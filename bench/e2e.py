"""End-to-end timings on a real Mosquitto, beside AGATA's published figures.

    .venv/bin/python -m bench.e2e [--repeats 3] [--idle-s 10]

- start -> client: from ``tasks.start`` (the cloud's ``task_started``) to each device's client
  process started, and to its first training round reported;
- push latency: ``task_started`` -> the device's ``tasks.request`` (AGATA polled every 10 s);
- failover: the broken task E's client error -> the good task C's client started, per device;
- idle agent: RSS and CPU of each ``fedmq edge`` process over ``--idle-s`` seconds with nothing
  to do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.demo import DemoCluster, run_scenario

AGATA = {"client_start_s": [1.9, 5.2], "error_handling_s": 0.81, "polling_interval_s": 10}


def ts(events: list[dict[str, Any]], kind: str, **match: Any) -> float | None:
    for e in events:
        if e["kind"] == kind and all(e.get(k) == v for k, v in match.items()):
            return e["ts"]
    return None


def summary(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=10.0)
    opts = parser.parse_args()
    starts, first_rounds, pushes, failovers = [], [], [], []
    idle: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-e2e-") as tmp, MosquittoProcess() as mosq:
        for repeat in range(opts.repeats):
            for scenario in ("basic", "failover"):
                with DemoCluster(Path(tmp) / f"{scenario}{repeat}", mosq.url) as cluster:
                    result = run_scenario(cluster, scenario, 3, lambda body: None)
                    events = result["events"]
                    started = ts(events, "task_started", task="C")
                    for device in cluster.devices:
                        if scenario == "basic":
                            starts.append(ts(events, "client_started", device=device) - started)
                            first_rounds.append(ts(events, "client_round", device=device) - started)
                            pushes.append(ts(events, "device_requested", device=device, task="C") - started)
                        else:
                            failovers.append(result["failover_s"][device])
                    if scenario == "basic" and repeat == opts.repeats - 1:
                        time.sleep(2.0)  # let the agents settle after the run
                        procs = {d: psutil.Process(cluster.procs[d].pid) for d in cluster.devices}
                        before = {d: sum(p.cpu_times()[:2]) for d, p in procs.items()}
                        time.sleep(opts.idle_s)
                        for device, proc in procs.items():
                            cpu = sum(proc.cpu_times()[:2]) - before[device]
                            idle[device] = {"rss_mb": round(proc.memory_info().rss / 2**20, 1),
                                            "cpu_percent": round(100 * cpu / opts.idle_s, 3)}
    report = {"bench": "e2e", "broker": "mosquitto", "repeats": opts.repeats,
              "start_to_client_started_s": summary(starts), "start_to_first_round_s": summary(first_rounds),
              "push_latency_s": summary(pushes), "failover_s": summary(failovers), "idle_agent": idle,
              "agata_published": AGATA}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
