"""``tasks.request`` throughput and latency with 1,000 registered devices and 50 running tasks
with criteria, beside ``tasks.ping`` (the same RPC path doing no work) in the same run.

    .venv/bin/python -m bench.requests [--sizes 1000x50,10000x200] [--calls 5000] [--selection device]

``--selection device`` (privacy mode) creates the tasks to select on the device: each simulated
device evaluates the announced criteria on its own facts, as an edge agent does, and takes up the
task its policy picks with ``tasks.join`` -- measured beside ping, then the (now empty-handed)
``tasks.request`` a device still makes for cloud-selected tasks.

The cloud runs as its own process (``fedmq cloud``) on a Mosquitto of our own; the 50 tasks are
real running tasks whose server entry point idles, so their Flower servers cost nothing here --
what is measured is selection: criteria and requirements evaluated for every running task.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench.rpc import percentiles, run_threads
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.criteria import device_facts, eligible, parse_criteria
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.bundle_client import push_folder

IDLE_TASK = {
    "fedmq.toml": '[task]\nname = "idle"\n[server]\nentry = "server.py"\n[client]\nentry = "client.py"\n'
                  '[requirements]\npackages = ["numpy>=1.20"]\n',
    "server.py": "import time\ntime.sleep(3600)\n",
    "client.py": "print('idle client')\n",
}
IDLE_REQUIREMENTS = {"packages": ["numpy>=1.20"]}  # IDLE_TASK's [requirements], as the cloud keeps them
REGIONS = ["eu", "us", "br", "asia"]


@contextmanager
def bench_cloud(broker_url: str, work: Path, client_id: str, stop_timeout: float = 60,
                flags: tuple[str, ...] = ()) -> Iterator[subprocess.Popen]:
    """``fedmq cloud`` in its own process, as an operator runs it; yielded once it serves, and
    stopped (SIGTERM, then SIGKILL after ``stop_timeout``) afterwards.  Its log is
    ``work/<client_id>.log``; ``flags`` are more of its options (``--shared-group``, ``--db``)."""
    log_path = work / f"{client_id}.log"
    log = log_path.open("w")
    cloud = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "--broker", broker_url, "cloud", "--allow-unsigned",
                              "--home", str(work / "cloud"), "--client-id", client_id, *flags],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while "serving" not in log_path.read_text():
            if time.time() > deadline or cloud.poll() is not None:
                raise RuntimeError(log_path.read_text())
            time.sleep(0.1)
        yield cloud
    finally:
        cloud.terminate()
        try:
            cloud.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            cloud.kill()
        log.close()


def idle_task(work: Path) -> Path:
    """The idle task's folder (its server entry point sleeps: selection is what is measured)."""
    task_dir = work / "idle"
    task_dir.mkdir()
    for name, text in IDLE_TASK.items():
        (task_dir / name).write_text(text)
    return task_dir


def criteria_for(k: int) -> str:
    return (f"data_quantity > {k * 20} and region in {REGIONS[: 1 + k % 4]!r} "
            f"and memory_mb >= {256 * (k % 3)} and has(\"numpy>=1.{k % 5}\")")


def admits(k: int, facts: dict[str, Any]) -> bool:
    """Whether task ``t<k>`` (its criteria and the idle task's requirements) admits a device with
    ``facts``: decided here with the test the cloud and the agents use."""
    return eligible(parse_criteria(criteria_for(k)), IDLE_REQUIREMENTS, facts)


def device_info(i: int) -> dict[str, Any]:
    rng = random.Random(i)
    return {"data_quantity": rng.randint(0, 1000), "memory_mb": float(rng.choice([512, 1024, 4096])),
            "cpu_count": rng.choice([1, 2, 4]), "packages": {"numpy": "2.4.6", "flwr": "1.41.0"},
            "labels": {"region": rng.choice(REGIONS)}}


def profiled(folder: Path | None, name: str, pid: int, phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``phase`` with py-spy sampling the cloud (``--profile DIR``: DIR/<phase>.txt, py-spy's
    raw collapsed stacks) -- to see where a phase's time goes, not a dependency of fedmq."""
    if folder is None:
        return phase()
    folder.mkdir(parents=True, exist_ok=True)
    beside = Path(sys.executable).with_name("py-spy")  # pip install py-spy into the venv: not on PATH
    spy = subprocess.Popen([str(beside) if beside.is_file() else "py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw",
                            "-o", str(folder / f"{name}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attaches
    try:
        return phase()
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


def cpu_s(processes: dict[str, psutil.Process]) -> dict[str, float]:
    times = {name: proc.cpu_times() for name, proc in processes.items()}
    return {name: t.user + t.system for name, t in times.items()}


def chosen_task(i: int, tasks: int) -> str | None:
    """What device ``i``'s agent takes up in privacy mode: its highest-priority eligible task (the
    at_most_one policy), decided on its own facts with the agent's own test."""
    facts = device_facts(device_info(i), f"dev-{i}")
    mine = [k for k in range(tasks) if admits(k, facts)]
    return f"t{max(mine, key=lambda k: (k % 7, -k))}" if mine else None


def timed_calls(clients: list[RpcClient], method: str, calls: int, threads: int,
                processes: dict[str, psutil.Process],
                args_of: Callable[[RpcClient], dict[str, Any]] = lambda _client: {}) -> dict[str, Any]:
    """``calls`` calls from ``threads`` callers; latency, throughput, and the CPU each process
    (cloud, broker, this bench's callers) spent per call -- where the time goes."""
    samples: list[float] = []
    offered: list[int] = []
    lock = threading.Lock()
    per_thread = calls // threads

    def worker(t: int) -> None:
        local, counts = [], []
        for n in range(per_thread):
            client = clients[(t * per_thread + n) % len(clients)]
            start = time.perf_counter()
            result = client.call("tasks", method, args_of(client), timeout=60)
            local.append(time.perf_counter() - start)
            if method == "request":
                counts.append(len(result))
        with lock:
            samples.extend(local)
            offered.extend(counts)

    before = cpu_s(processes)
    elapsed = run_threads([threading.Thread(target=worker, args=(t,)) for t in range(threads)])
    after = cpu_s(processes)
    out = {**percentiles(samples), "calls_per_s": round(len(samples) / elapsed, 1), "threads": threads,
           "cpu_ms_per_call": {name: round((after[name] - before[name]) * 1000 / len(samples), 3)
                               for name in processes}}
    if offered:
        out["mean_tasks_offered"] = round(sum(offered) / len(offered), 2)
    return out


def run_size(devices: int, tasks: int, calls: int, threads: int, profile: Path | None = None,
             selection: str = "cloud") -> dict[str, Any]:
    """One cloud, one Mosquitto, ``devices`` registered and ``tasks`` running: ping, then request
    (or, tasks selecting on the device, join)."""
    work = Path(tempfile.mkdtemp(prefix="fedmq-bench-requests-"))
    mosq = MosquittoProcess().start()
    conns: list[MqttConnection] = []
    try:
        return _measure(mosq, work, conns, devices, tasks, calls, threads, profile, selection)
    finally:
        for conn in conns:
            conn.stop()
        mosq.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def _measure(mosq: MosquittoProcess, work: Path, conns: list[MqttConnection], devices: int, tasks: int,
             calls: int, threads: int, profile: Path | None, selection: str) -> dict[str, Any]:
    with bench_cloud(mosq.url, work, "bench-cloud") as cloud:
        processes = {"cloud": psutil.Process(cloud.pid), "broker": psutil.Process(mosq.process.pid),  # type: ignore[union-attr]
                     "callers": psutil.Process()}
        task_dir = idle_task(work)
        op_conn = MqttConnection(new_client_id("op"), mosq.url).start()
        conns.append(op_conn)
        op = RpcClient(op_conn, "operator").start()
        digest = push_folder(op, task_dir).manifest.digest
        for k in range(tasks):
            op.call("tasks", "create", {"name": f"t{k}", "task": f"t{k}", "bundle": digest,
                                        "criteria": criteria_for(k), "priority": k % 7, "selection": selection})
            op.call("tasks", "start", {"task": f"t{k}"}, timeout=30)
        per_conn = 100
        clients: list[RpcClient] = []
        started = time.perf_counter()
        for i in range(devices):
            if i % per_conn == 0:
                conns.append(MqttConnection(new_client_id("devs"), mosq.url).start())
            clients.append(RpcClient(conns[-1], f"dev-{i}").start())
        # Registration as a fleet does it: many devices at once (16 callers), not one by one.
        chunks = [clients[t::threads] for t in range(threads)]
        run_threads([threading.Thread(target=lambda cs=cs: [c.call("devices", "update_info",
                                                                   {"info": device_info(int(c.caller[4:]))},
                                                                   timeout=60) for c in cs])
                     for cs in chunks])
        register_s = time.perf_counter() - started
        if selection == "device":
            return _measure_joins(clients, devices, tasks, calls, threads, processes, register_s)
        report: dict[str, Any] = {"devices": devices, "running_tasks": tasks, "register_s": round(register_s, 1),
                                  "selection": selection,
                                  "ping_baseline": timed_calls(clients, "ping", calls // 2, threads, processes),
                                  # Each device's first request (it is offered ~15 tasks: rows and
                                  # events written), then the fleet's repeats (its re-checks).
                                  "request_first": profiled(profile, "first", cloud.pid, lambda: timed_calls(
                                      clients, "request", devices, threads, processes)),
                                  "request_repeat": profiled(profile, "repeat", cloud.pid, lambda: timed_calls(
                                      clients, "request", calls, threads, processes))}
        first, repeat = report["request_first"], report["request_repeat"]
        calls_all = first["n"] + repeat["n"]
        seconds_all = first["n"] / first["calls_per_s"] + repeat["n"] / repeat["calls_per_s"]
        report["request"] = {"calls_per_s": round(calls_all / seconds_all, 1), "n": calls_all,
                             "p50_ms": max(first["p50_ms"], repeat["p50_ms"]),
                             "p99_ms": max(first["p99_ms"], repeat["p99_ms"]),
                             "note": "first and repeat requests together; p50/p99 the worse of the two"}
        ping, request = report["ping_baseline"], report["request"]
        report["request_over_ping"] = {"throughput": round(request["calls_per_s"] / ping["calls_per_s"], 2),
                                       "p50": round(request["p50_ms"] / ping["p50_ms"], 2),
                                       "p99": round(request["p99_ms"] / ping["p99_ms"], 2)}
        return report


def _measure_joins(clients: list[RpcClient], devices: int, tasks: int, calls: int, threads: int,
                   processes: dict[str, psutil.Process], register_s: float) -> dict[str, Any]:
    """Privacy mode: each eligible device's join (one row and one event), repeats of it, and the
    request a device still makes (no cloud-selected task: nothing to evaluate)."""
    chosen = {c.caller: chosen_task(int(c.caller[4:]), tasks) for c in clients}
    joining = [c for c in clients if chosen[c.caller] is not None]
    join_args: Callable[[RpcClient], dict[str, Any]] = lambda c: {"task": chosen[c.caller]}  # noqa: E731
    report: dict[str, Any] = {
        "devices": devices, "running_tasks": tasks, "register_s": round(register_s, 1), "selection": "device",
        "devices_eligible": len(joining),
        "ping_baseline": timed_calls(clients, "ping", calls // 2, threads, processes),
        "join_first": timed_calls(joining, "join", len(joining), threads, processes, join_args),
        "join_repeat": timed_calls(joining, "join", calls, threads, processes, join_args),
        "request_repeat": timed_calls(clients, "request", calls, threads, processes)}
    first, repeat = report["join_first"], report["join_repeat"]
    calls_all = first["n"] + repeat["n"]
    seconds_all = first["n"] / first["calls_per_s"] + repeat["n"] / repeat["calls_per_s"]
    report["join"] = {"calls_per_s": round(calls_all / seconds_all, 1), "n": calls_all,
                      "p50_ms": max(first["p50_ms"], repeat["p50_ms"]), "p99_ms": max(first["p99_ms"], repeat["p99_ms"]),
                      "note": "first and repeat joins together; p50/p99 the worse of the two"}
    ping = report["ping_baseline"]
    report["join_over_ping"] = {phase: {"throughput": round(report[phase]["calls_per_s"] / ping["calls_per_s"], 2),
                                        "p99": round(report[phase]["p99_ms"] / ping["p99_ms"], 2)}
                                for phase in ("join_first", "join_repeat", "join", "request_repeat")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000x50",
                        help="DEVICESxTASKS, comma-separated; each in a fresh cloud and broker, e.g. 1000x50,10000x200")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--profile", type=Path, help="sample the cloud with py-spy per phase into this folder")
    parser.add_argument("--selection", choices=["cloud", "device"], default="cloud",
                        help="where the tasks' criteria are evaluated (device: privacy mode, tasks.join)")
    opts = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in opts.sizes.split(",")]
    runs = [run_size(devices, tasks, opts.calls, opts.threads,
                     opts.profile / f"{devices}x{tasks}" if opts.profile else None, opts.selection)
            for devices, tasks in sizes]
    report: dict[str, Any] = {"bench": "requests", "runs": runs}
    if len(runs) > 1:  # the cost must not grow with the fleet: largest against smallest, per kind
        # of call (a first request writes 15 offers, a repeat nothing): with more devices than
        # calls the mix itself changes, so the mixed figure is not the one that tells growth.
        report["largest_over_smallest"] = {phase: {
            "throughput": round(runs[-1][phase]["calls_per_s"] / runs[0][phase]["calls_per_s"], 2),
            "p50": round(runs[-1][phase]["p50_ms"] / runs[0][phase]["p50_ms"], 2),
            "p99": round(runs[-1][phase]["p99_ms"] / runs[0][phase]["p99_ms"], 2)}
            for phase in (("join_first", "join_repeat", "join", "request_repeat", "ping_baseline")
                          if opts.selection == "device" else
                          ("request_first", "request_repeat", "request", "ping_baseline"))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
