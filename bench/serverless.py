"""Per-round wall time of serverless training against Flower's gRPC, on one Mosquitto.

    .venv/bin/python -m bench.serverless [--rounds 6] [--sizes 1000,2621440] [--devices 3]

The same task (``bench/tasks/weights``: N float32 weights, each client moves them halfway toward
a target of its own, so a round is almost all transport) on the same three ``fedmq edge``
processes and one ``fedmq cloud``, once per mode and model size.  A round's time is the spread of
the cloud's ``round_done`` events over the rounds after the first, divided by their count: start-up
(the Flower server, the participants' join and election of round 0) is left out, and both modes
are measured by the same clock on the same events.  The figure is the ratio serverless / Flower
per size (goal: at most 1.5x).  In serverless mode every participant downloads every other
participant's update (the aggregator all of them) and the global, where Flower sends each client
the global and receives its update: expect the gap to grow with the model.

Prints one JSON document (stdout) and a short table (stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.cloud.bundle_client import push_folder
from fedmq.demo import DemoCluster

TASK = Path(__file__).resolve().parent / "tasks" / "weights"
MODES = ("flower", "serverless")


def per_round_s(events: list[dict[str, Any]]) -> tuple[float, int]:
    """Mean seconds per round after the first, from the cloud's ``round_done`` events."""
    done = sorted(e["ts"] for e in events if e["kind"] == "round_done")
    if len(done) < 2:
        raise RuntimeError(f"only {len(done)} round_done events: nothing to measure")
    return (done[-1] - done[0]) / (len(done) - 1), len(done)


def run_one(cluster: DemoCluster, bundle: str, mode: str, params: int, rounds: int, n: int,
            chunk_size: int | None) -> dict[str, Any]:
    task = f"{mode}-{params}"
    args: dict[str, Any] = {"rounds": rounds, "params": params, "min_clients": n}
    if mode == "serverless":
        args.update(mode="serverless", quiet_s=0.5)
        if chunk_size:
            args["chunk_size"] = chunk_size
    cluster.call("tasks", "create", {"name": "bench-weights", "task": task, "bundle": bundle, "args": args})
    began = time.monotonic()
    cluster.call("tasks", "start", {"task": task})
    final = cluster.wait_task(task, timeout=900)
    if final["state"] != "finished":
        raise RuntimeError(f"{task} ended {final['state']}: {final.get('last_error')}")
    seconds, count = per_round_s(cluster.items("events", "list", {"task": task}))
    return {"per_round_s": round(seconds, 4), "rounds_measured": count - 1,
            "whole_run_s": round(time.monotonic() - began, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sizes", default="1000,2621440", help="model sizes in float32 weights (2621440 = 10 MiB)")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="the blobs' chunk size in bytes (default: the engine's, 64 KiB)")
    parser.add_argument("--mosquitto-conf", type=Path, default=None,
                        help="a Mosquitto config to derive the broker's from (default: the repository's)")
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    devices = tuple(f"dev-{i + 1}" for i in range(opts.devices))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-serverless-") as tmp, MosquittoProcess(config=opts.mosquitto_conf) as mosq, \
            DemoCluster(Path(tmp) / "cluster", mosq.url, devices=devices) as cluster:
        cluster.wait_for(cluster.devices_online, 60, "the edges online")
        assert cluster.operator is not None
        bundle = push_folder(cluster.operator, TASK, key=cluster.key).manifest.digest
        for params in sizes:
            row: dict[str, Any] = {"params": params, "model_mib": round(params * 4 / 2**20, 3)}
            for mode in MODES:
                row[mode] = run_one(cluster, bundle, mode, params, opts.rounds, len(devices), opts.chunk_size)
                print(f"{mode:10s} {row['model_mib']:8.3f} MiB  {row[mode]['per_round_s']:.3f} s/round",
                      file=sys.stderr)
            row["ratio_serverless_to_flower"] = round(row["serverless"]["per_round_s"] /
                                                      row["flower"]["per_round_s"], 2)
            results[str(params)] = row
    report = {"bench": "serverless", "broker": "mosquitto",
              "mosquitto_conf": str(opts.mosquitto_conf or "mosquitto.conf"), "devices": len(devices), "rounds": opts.rounds,
              "chunk_size": opts.chunk_size,
              "goal": "serverless per-round time <= 1.5x Flower's", "sizes": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
