"""A 10 MB bundle to 20 concurrent edges through Mosquitto, beside two baselines in the same run.

    .venv/bin/python -m bench.bundles [--size-mb 10] [--edges 20] [--chunk-kb 64] [--window 32] [--rounds 3]

1. fedmq: the operator pushes the bundle (RPC upload, signed); the cloud publishes it as
   retained chunks; N edge processes fetch, verify (chunks, digest, signature) and unpack it.
2. The broker's own ceiling: the same chunk bytes published retained with ``mosquitto_pub`` and
   read by N concurrent ``mosquitto_sub`` (C clients, no verification, nothing written).
3. AGATA's way: N concurrent HTTP downloads (curl) of the archive from a local HTTP server.

The three run interleaved, ``--rounds`` times (a shared machine's load then falls on all of them
alike); the report gives each round and the medians.  Every path's timer starts with its clients
already created: the fedmq edges are started, connected and hold their trust store before ``go``
(as a device's agent is), the C clients wait at a gate in a started shell, so only ``exec`` and
their own start-up (milliseconds) are inside their timers; curl's own ``time_total`` (which
excludes even that) is reported beside.  curl writes its file, as a device must keep the bytes.

Prints one JSON document: aggregate MB/s (N x size / time to last device) and time to last
device for each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
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
from fedmq.edge.bundle_fetch import BundleFetcher
from fedmq.ftdl.bundle import DEFAULT_CHUNK_SIZE
from fedmq.ftdl.signing import SigningKey, TrustStore, generate_keypair

TASK = Path(__file__).resolve().parent.parent / "tests" / "tasks" / "numpy_fl"


def edge_fetch(url: str, digest: str, cache: str, pub: str, window: int | None, go: Any, ready: Any, out: Any) -> None:
    conn = MqttConnection(new_client_id("bench-edge"), url).start()
    fetcher = BundleFetcher(conn, Topics(), cache, trust=TrustStore.from_paths([pub]), window=window)
    ready.release()
    go.wait()
    cpu = time.process_time()
    start = time.perf_counter()
    result = fetcher.fetch(digest, manifest_timeout=120, stall_timeout=120)
    out.put((time.perf_counter() - start, result.downloaded_chunks, result.bytes, time.process_time() - cpu))
    conn.stop()


def gated_fan_out(args_list: list[list[str]], *, keep_output: bool = False) -> tuple[float, list[bytes]]:
    """Start N processes held at a gate (a shell waiting for a line on stdin), open the gate, and
    return the seconds from the gate to the last exit, and each one's stdout (if kept: keep it
    small, the pipes are read one process after the other).  Like the fedmq edges, which are started
    and connected before ``go``, process creation is outside the timer; what is left inside is
    ``exec`` and the client's own start-up (a few ms for curl and mosquitto_sub)."""
    procs = [subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "gate", *a], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE if keep_output else subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for a in args_list]
    time.sleep(0.5 + 0.02 * len(procs))  # every shell has started and blocks on read
    start = time.perf_counter()
    for proc in procs:
        proc.stdin.write(b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{args_list[0][0]} failed: {err.decode()[:300]}")
        outputs.append(out or b"")
    return time.perf_counter() - start, outputs


def fedmq_round(url: str, digest: str, work: Path, pub: Path, edges: int, window: int | None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    go, ready, out = ctx.Event(), ctx.Semaphore(0), ctx.Queue()
    procs = [ctx.Process(target=edge_fetch, args=(url, digest, str(work / f"edge{i}"), str(pub), window,
                                                  go, ready, out)) for i in range(edges)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire(timeout=120)
    start = time.perf_counter()
    go.set()
    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.perf_counter() - start > 600:
                raise RuntimeError(f"fedmq edges failed (exit codes {dead})") from None
    last = time.perf_counter() - start
    for proc in procs:
        proc.join(30)
    times = sorted(r[0] for r in results)
    return {"time_to_last_device_s": round(last, 3),
            "per_device_s": {"min": round(times[0], 3), "median": round(times[len(times) // 2], 3),
                             "max": round(times[-1], 3)},
            "cpu_per_device_s": round(sorted(r[3] for r in results)[len(results) // 2], 3)}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=10)
    parser.add_argument("--edges", type=int, default=20)
    parser.add_argument("--chunk-kb", type=int, default=DEFAULT_CHUNK_SIZE // 1024)
    parser.add_argument("--window", type=int, default=None,
                        help="chunks in flight per edge (default: the fetcher's, 8 MiB of chunks)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of all three paths, interleaved, so a busy machine hits them alike")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-bundles-"))
    mosq = MosquittoProcess().start()
    report: dict[str, Any] = {"bench": "bundles", "edges": opts.edges, "chunk_bytes": opts.chunk_kb * 1024,
                              "window": opts.window, "rounds": opts.rounds}
    http: subprocess.Popen[bytes] | None = None
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

        # The broker's ceiling: the same chunk bytes published retained with mosquitto_pub.
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
        port = free_port()
        http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(archive.parent)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port)

        rounds: list[dict[str, Any]] = []
        for n in range(opts.rounds):
            # 1. fedmq edges, each its own process, started and connected before the timer.
            fedmq = fedmq_round(mosq.url, digest, work / f"round{n}", pub_path, opts.edges, opts.window)
            shutil.rmtree(work / f"round{n}", ignore_errors=True)
            # 2. mosquitto_sub x N (C clients; no verification, nothing written).
            sub_s, _ = gated_fan_out([["mosquitto_sub", "-h", mosq.host, "-p", str(mosq.port), "-q", "1",
                                    "-t", "bench/raw/+", "-C", str(count), "-N", "-W", "300"]
                                   for _ in range(opts.edges)])
            # 3. AGATA's way: curl x N from a local HTTP server, each writing its file (as a device must).
            downloads = work / f"http{n}"
            downloads.mkdir()
            http_s, outputs = gated_fan_out([["curl", "-sf", "-o", str(downloads / f"edge{i}.tar.gz"), "-w", "%{time_total}",
                                     f"http://127.0.0.1:{port}/{archive.name}"] for i in range(opts.edges)],
                                           keep_output=True)
            curl_own = max(float(o) for o in outputs)
            shutil.rmtree(downloads, ignore_errors=True)
            rounds.append({"fedmq": fedmq, "mosquitto_sub_s": round(sub_s, 3), "http_s": round(http_s, 3),
                           "http_curl_time_total_max_s": round(curl_own, 3)})
            print(f"round {n + 1}: fedmq {fedmq['time_to_last_device_s']} s, mosquitto_sub {sub_s:.3f} s, "
                  f"http {http_s:.3f} s", file=sys.stderr)

        last = median([r["fedmq"]["time_to_last_device_s"] for r in rounds])
        sub_s = median([r["mosquitto_sub_s"] for r in rounds])
        http_s = median([r["http_s"] for r in rounds])
        report["rounds_detail"] = rounds
        report["fedmq"] = {"time_to_last_device_s": last, "aggregate_mb_per_s": round(mb * opts.edges / last, 2),
                           "cpu_per_device_s": median([r["fedmq"]["cpu_per_device_s"] for r in rounds]),
                           "includes": "chunk + whole-digest + signature verification, safe unpack; "
                                       "timer from go (edges started, connected, trust loaded)"}
        report["mosquitto_clients"] = {"time_to_last_device_s": sub_s, "aggregate_mb_per_s": round(mb * opts.edges / sub_s, 2),
                                       "publish_s": round(pub_s, 3), "chunks": count,
                                       "includes": "exec + connect; no verification, nothing written"}
        report["http"] = {"time_to_last_device_s": http_s, "aggregate_mb_per_s": round(mb * opts.edges / http_s, 2),
                          "curl_time_total_max_s": median([r["http_curl_time_total_max_s"] for r in rounds]),
                          "server": "python -m http.server (threaded)",
                          "includes": "exec + connect, file written; no verification"}
        report["fedmq_over_mosquitto_clients_time"] = round(last / sub_s, 2)
        report["fedmq_over_http_time"] = round(last / http_s, 2)
        op_conn.stop()
        cloud.stop()
    finally:
        if http is not None:
            http.terminate()
            http.wait()
        mosq.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
