"""A 10 MB bundle to 20 concurrent edges through Mosquitto, beside two baselines in the same run.

    .venv/bin/python -m bench.bundles [--size-mb 10] [--edges 20] [--chunk-kb 64]

1. fedmq: the operator pushes the bundle (RPC upload, signed); the cloud publishes it as
   retained chunks; N edge processes fetch, verify (chunks, digest, signature) and unpack it.
2. The broker's own ceiling: the same chunk bytes published retained with ``mosquitto_pub`` and
   read by N concurrent ``mosquitto_sub`` (C clients, no verification, nothing written).
3. AGATA's way: N concurrent HTTP downloads (curl) of the archive from a local HTTP server.

Prints one JSON document: aggregate MB/s (N x size / time to last device) and time to last
device for each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.net import free_port, wait_for_port
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.ftdl.signing import SigningKey, TrustStore, generate_keypair

TASK = Path(__file__).resolve().parent.parent / "tests" / "tasks" / "numpy_fl"


def edge_fetch(url: str, digest: str, cache: str, pub: str, go: Any, ready: Any, out: Any) -> None:
    from fedmq.edge.bundle_fetch import BundleFetcher

    conn = MqttConnection(new_client_id("bench-edge"), url).start()
    fetcher = BundleFetcher(conn, Topics(), cache, trust=TrustStore.from_paths([pub]))
    ready.release()
    go.wait()
    start = time.perf_counter()
    result = fetcher.fetch(digest, manifest_timeout=120, stall_timeout=120)
    out.put((time.perf_counter() - start, result.downloaded_chunks, result.bytes))
    conn.stop()


def fan_out(args_list: list[list[str]]) -> float:
    """Start N processes at once; seconds until the last one exits."""
    start = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for a in args_list]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{args_list[0][0]} failed: {err.decode()[:300]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=10)
    parser.add_argument("--edges", type=int, default=20)
    parser.add_argument("--chunk-kb", type=int, default=64)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-bundles-"))
    mosq = MosquittoProcess().start()
    report: dict[str, Any] = {"bench": "bundles", "edges": opts.edges, "chunk_bytes": opts.chunk_kb * 1024}
    try:
        task = work / "task"
        shutil.copytree(TASK, task)
        (task / "weights.bin").write_bytes(os.urandom(int(opts.size_mb * 1024 * 1024)))
        key_path, pub_path = generate_keypair(work / "keys", "operator")
        cloud = CloudApp(CloudConfig(broker=mosq.url, home=work / "cloud", chunk_size=opts.chunk_kb * 1024,
                                     client_id="bench-cloud")).start()
        op_conn = MqttConnection(new_client_id("bench-op"), mosq.url).start()
        start = time.perf_counter()
        pushed = push_folder(RpcClient(op_conn, "operator").start(), task, key=SigningKey.load(key_path))
        push_s = time.perf_counter() - start
        digest, size = pushed.manifest.digest, pushed.manifest.size
        mb = size / 1e6
        report.update(bundle_bytes=size, push={"seconds": round(push_s, 3), "mb_per_s": round(mb / push_s, 2)})

        # 1. fedmq edges, each its own process.
        ctx = multiprocessing.get_context("spawn")
        go, ready, out = ctx.Event(), ctx.Semaphore(0), ctx.Queue()
        procs = [ctx.Process(target=edge_fetch, args=(mosq.url, digest, str(work / f"edge{i}"), str(pub_path),
                                                      go, ready, out)) for i in range(opts.edges)]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.acquire(timeout=120)
        start = time.perf_counter()
        go.set()
        results = [out.get(timeout=600) for _ in procs]
        last = time.perf_counter() - start
        for proc in procs:
            proc.join(30)
        times = sorted(r[0] for r in results)
        report["fedmq"] = {"time_to_last_device_s": round(last, 3), "aggregate_mb_per_s": round(mb * opts.edges / last, 2),
                           "per_device_s": {"min": round(times[0], 3), "median": round(times[len(times) // 2], 3),
                                            "max": round(times[-1], 3)},
                           "includes": "chunk + whole-digest + signature verification, safe unpack"}

        # 2. The broker's ceiling: the same chunk bytes via mosquitto_pub (retained) / mosquitto_sub.
        archive = cloud.store.archive_path(digest)
        chunk = opts.chunk_kb * 1024
        data = archive.read_bytes()
        chunk_dir = work / "chunks"
        chunk_dir.mkdir()
        count = 0
        for offset in range(0, len(data), chunk):
            (chunk_dir / str(count)).write_bytes(data[offset:offset + chunk])
            count += 1
        start = time.perf_counter()
        for i in range(count):
            subprocess.run(["mosquitto_pub", "-h", mosq.host, "-p", str(mosq.port), "-q", "1", "-r",
                            "-t", f"bench/raw/{i}", "-f", str(chunk_dir / str(i))], check=True)
        pub_s = time.perf_counter() - start
        sub_s = fan_out([["mosquitto_sub", "-h", mosq.host, "-p", str(mosq.port), "-q", "1", "-t", "bench/raw/+",
                          "-C", str(count), "-N", "-W", "300"] for _ in range(opts.edges)])
        report["mosquitto_clients"] = {"time_to_last_device_s": round(sub_s, 3),
                                       "aggregate_mb_per_s": round(mb * opts.edges / sub_s, 2),
                                       "publish_s": round(pub_s, 3), "chunks": count}

        # 3. AGATA's way: HTTP.
        port = free_port()
        http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(archive.parent)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", port)
            http_s = fan_out([["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/{archive.name}"]
                              for _ in range(opts.edges)])
        finally:
            http.terminate()
            http.wait()
        report["http"] = {"time_to_last_device_s": round(http_s, 3),
                          "aggregate_mb_per_s": round(mb * opts.edges / http_s, 2),
                          "server": "python -m http.server (threaded), no verification"}
        report["fedmq_over_mosquitto_clients_time"] = round(last / sub_s, 2)
        report["fedmq_over_http_time"] = round(last / http_s, 2)
        op_conn.stop()
        cloud.stop()
    finally:
        mosq.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
