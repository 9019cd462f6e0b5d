"""A simulated fleet on the real wire protocol: N devices in one process, on one selector loop
(paho clients driven by the loop, not a thread each), against a Mosquitto and a ``fedmq cloud``
the bench starts itself.

    .venv/bin/python -m bench.swarm [--sizes 1000,5000,10000] [--tasks 5] [--selection device]

Each device does what an edge agent does: connects with its last will (offline presence with its
session counter), publishes its retained birth, reports ``devices.update_info``, subscribes to the
task announcements and asks ``tasks.request`` when a running task is announced.  Per size the
bench reports: connect + register time; for ``tasks.start`` of tasks with criteria, the time until
every eligible device (computed here from the same criteria) has its offer (p50/p99/max, missed);
``devices.list`` / ``tasks.list`` latency under that load; presence after killing 10 % of the
connections at once (every killed device offline, each disconnection counted, nobody else
touched); cloud RSS and CPU seconds, broker RSS; errors.  Prints JSON, then a table.

``--selection device`` (privacy mode): the tasks select on the device.  A device evaluates each
running announcement's criteria and requirements on its own facts, with the edge agent's own
test -- its offer is that decision -- and takes up the first task it is eligible for with
``tasks.join``, as an idle agent does; the join's round trip is reported beside the offers.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from bench.requests import admits, bench_cloud, criteria_for, device_info, idle_task
from bench.rpc import percentiles
from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.criteria import device_facts, eligible, parse_criteria
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.presence import OFFLINE, ONLINE, Presence
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.bundle_client import push_folder

TOPICS = Topics()


@dataclass
class SimDevice:
    """One device's state; its paho client is driven by the swarm's loop."""

    index: int
    id: str
    client: mqtt.Client
    sock: socket.socket | None = None
    registered_at: float | None = None
    offered: dict[str, float] = field(default_factory=dict)  # task -> when its offer arrived
    asking: bool = False
    ask_again: bool = False
    pending: dict[str, str] = field(default_factory=dict)    # request id -> method
    killed: bool = False
    joined: str | None = None        # privacy mode: the one task it took up
    join_sent: float | None = None
    joined_at: float | None = None


class Swarm:
    """N paho clients on one ``selectors`` loop."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.selector = selectors.DefaultSelector()
        self.devices: list[SimDevice] = []
        self.errors: list[str] = []
        self.running: set[str] = set()

    # --- the loop -------------------------------------------------------------------------------
    def _watch(self, device: SimDevice, write: bool) -> None:
        if device.sock is None or device.killed:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self.selector.modify(device.sock, events, device)
        except KeyError:
            self.selector.register(device.sock, events, device)

    def spin(self, seconds: float) -> None:
        """Drive every client for ``seconds``: reads, writes, keepalives."""
        end = time.monotonic() + seconds
        last_misc = time.monotonic()
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            for key, mask in self.selector.select(timeout=min(left, 0.05)):
                device: SimDevice = key.data
                if device.killed:
                    continue
                if mask & selectors.EVENT_READ:
                    device.client.loop_read(100)
                if mask & selectors.EVENT_WRITE and not device.killed:
                    device.client.loop_write()
            if time.monotonic() - last_misc > 2.0:
                last_misc = time.monotonic()
                for device in self.devices:
                    if not device.killed:
                        device.client.loop_misc()

    def spin_until(self, done: Any, timeout: float) -> float:
        """Spin until ``done()``; seconds it took (``timeout`` if never)."""
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > timeout:
                break
            self.spin(0.1)
        return time.monotonic() - start

    # --- devices --------------------------------------------------------------------------------
    def add(self, index: int) -> SimDevice:
        device_id = f"sim-{index}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fedmq-edge-{device_id}",
                             protocol=mqtt.MQTTv311, clean_session=True)
        device = SimDevice(index, device_id, client)
        client.user_data_set(device)
        client.will_set(TOPICS.device_state(device_id), Presence(state=OFFLINE, session=1).encode(), qos=1,
                        retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_socket_register_write = lambda c, u, s: self._watch(u, True)
        client.on_socket_unregister_write = lambda c, u, s: self._watch(u, False)
        client.on_disconnect = self._on_disconnect
        client.connect(self.host, self.port, keepalive=120)
        device.sock = client.socket()
        self._watch(device, client.want_write())
        self.devices.append(device)
        return device

    def _on_connect(self, client: mqtt.Client, device: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"{device.id}: connect refused ({reason})")
            return
        client.subscribe([(TOPICS.reply(device.id, "sim") + "/#", 1), (TOPICS.all_tasks(), 1)])
        client.publish(TOPICS.device_state(device.id), Presence(state=ONLINE, session=1).encode(), qos=1, retain=True)
        self.call(device, "devices", "update_info", {"info": device_info(device.index)})

    def _on_disconnect(self, client: mqtt.Client, device: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if not device.killed:
            self.errors.append(f"{device.id}: disconnected ({reason})")

    def call(self, device: SimDevice, service: str, method: str, args: dict[str, Any]) -> None:
        request_id = uuid.uuid4().hex[:12]
        device.pending[request_id] = method
        body = {"v": 1, "id": request_id, "reply_to": TOPICS.reply(device.id, "sim") + "/r", "args": args}
        device.client.publish(f"{TOPICS.prefix}/rpc/{service}/{method}/{device.id}", codec.encode(body), qos=1)

    def _ask(self, device: SimDevice) -> None:
        if device.asking:
            device.ask_again = True
            return
        device.asking = True
        self.call(device, "tasks", "request", {})

    def _on_message(self, client: mqtt.Client, device: SimDevice, message: mqtt.MQTTMessage) -> None:
        try:
            body, _ = codec.decode(message.payload) if message.payload else ({}, None)
        except codec.CodecError as exc:
            self.errors.append(f"{device.id}: undecodable message on {message.topic}: {exc}")
            return
        if message.topic.startswith(f"{TOPICS.prefix}/reply/"):
            method = device.pending.pop(str(body.get("id")), None)
            if method is None:
                return
            if not body.get("ok"):
                self.errors.append(f"{device.id}: {method}: {body.get('error')}")
            elif method == "update_info":
                device.registered_at = time.monotonic()
            elif method == "join":
                device.joined_at = time.monotonic()
            elif method == "request":
                now = time.monotonic()
                for offer in body.get("result") or []:
                    device.offered.setdefault(offer["id"], now)
                device.asking = False
                if device.ask_again:
                    device.ask_again = False
                    self._ask(device)
            return
        if isinstance(body, dict) and body.get("state") == "running" and device.registered_at is not None:
            if body.get("selection") == "device":
                self._decide(device, body)
            elif body.get("id") not in device.offered:
                self._ask(device)  # a running task announced: ask what we may run, as an edge does

    def _decide(self, device: SimDevice, announced: dict[str, Any]) -> None:
        """Privacy mode, as the agent decides: on its own facts, then one join while idle."""
        task = str(announced.get("id"))
        if task in device.offered or not eligible(parse_criteria(str(announced.get("criteria", ""))),
                                                  announced.get("requirements") or {}, facts_of(device)):
            return
        device.offered[task] = time.monotonic()
        if device.joined is None:
            device.joined, device.join_sent = task, time.monotonic()
            self.call(device, "tasks", "join", {"task": task})

    def kill(self, device: SimDevice) -> None:
        """Drop the connection without DISCONNECT, as a device losing power does: the broker
        publishes its last will."""
        device.killed = True
        if device.sock is not None:
            try:
                self.selector.unregister(device.sock)
            except KeyError:
                pass
            try:
                device.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            device.sock.close()


def facts_of(device: SimDevice) -> dict[str, Any]:
    return device_facts(device_info(device.index), device.id)


def _timed(op: RpcClient, service: str, method: str, args: dict[str, Any], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        op.call(service, method, args, timeout=60)
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def run_size(devices: int, tasks: int, kill_fraction: float, selection: str = "cloud") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fedmq-swarm-"))
    mosq = MosquittoProcess(workdir=work / "mosquitto").start()
    op_conn: MqttConnection | None = None
    swarm = Swarm(mosq.host, mosq.port)
    cloud_stack = ExitStack()
    try:
        cloud = cloud_stack.enter_context(bench_cloud(mosq.url, work, "swarm-cloud", stop_timeout=120))
        op_conn = MqttConnection(new_client_id("op"), mosq.url).start()
        op = RpcClient(op_conn, "operator").start()
        digest = push_folder(op, idle_task(work)).manifest.digest
        criteria = {f"t{k}": criteria_for(k) for k in range(tasks)}
        for task, text in criteria.items():
            op.call("tasks", "create", {"name": task, "task": task, "bundle": digest, "criteria": text,
                                        "selection": selection})

        # connect + register
        started = time.monotonic()
        for i in range(devices):
            swarm.add(i)
            if i % 200 == 199:
                swarm.spin(0.01)
        connect_s = time.monotonic() - started
        register_s = swarm.spin_until(lambda: all(d.registered_at for d in swarm.devices), 300) + connect_s

        # tasks.start -> every eligible device offered
        # what the cloud (or, in privacy mode, each device) decides, decided here from the same facts
        expected = {f"t{k}": {d.id for d in swarm.devices if admits(k, facts_of(d))} for k in range(tasks)}
        start_times: dict[str, float] = {}
        # list RPCs timed while the fleet asks for its offers (the heaviest moment), from a thread
        lists: dict[str, Any] = {}
        timer = threading.Thread(target=lambda: lists.update({
            "devices.list": _timed(op, "devices", "list", {"limit": 200}, 20),
            "tasks.list": _timed(op, "tasks", "list", {}, 20)}))
        for task in criteria:
            op.call("tasks", "start", {"task": task}, timeout=60)
            start_times[task] = time.monotonic()
            swarm.spin(0.05)
        timer.start()

        def all_offered() -> bool:
            return all(task in d.offered for task, ids in expected.items() for d in swarm.devices if d.id in ids)

        swarm.spin_until(all_offered, 120)
        delays = [d.offered[task] - start_times[task] for task, ids in expected.items()
                  for d in swarm.devices if d.id in ids and task in d.offered]
        missed = sum(1 for task, ids in expected.items() for d in swarm.devices if d.id in ids and task not in d.offered)
        unexpected = sum(1 for task, ids in expected.items() for d in swarm.devices
                         if d.id not in ids and task in d.offered)
        ordered = sorted(delays) or [float("nan")]
        offers = {"eligible_pairs": sum(len(ids) for ids in expected.values()), "missed": missed,
                  "unexpected": unexpected, "p50_s": round(ordered[len(ordered) // 2], 3),
                  "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
                  "max_s": round(ordered[-1], 3)}
        if selection == "device":  # each idle device took up one task: the cloud's part
            swarm.spin_until(lambda: all(d.joined_at for d in swarm.devices if d.joined), 120)
            trips = sorted(d.joined_at - d.join_sent for d in swarm.devices if d.joined_at and d.join_sent)
            joined = [d.joined_at - start_times[d.joined] for d in swarm.devices if d.joined_at and d.joined]
            offers["joins"] = {"n": len(trips), "unanswered": sum(1 for d in swarm.devices if d.joined and not d.joined_at),
                               "round_trip": percentiles(trips),
                               "after_start_p99_s": round(sorted(joined)[int(0.99 * (len(joined) - 1))], 3) if joined else None}

        swarm.spin_until(lambda: not timer.is_alive(), 300)
        timer.join()

        # kill 10 % at once; presence must be exact
        before = {d["id"]: d for d in op.all_items("devices", "list")}
        victims = random.Random(7).sample(swarm.devices, max(1, int(devices * kill_fraction)))
        for device in victims:
            swarm.kill(device)
        killed = {d.id for d in victims}

        def presence_exact() -> bool:
            rows = {d["id"]: d for d in op.all_items("devices", "list", {"online": False})}
            return killed <= set(rows)

        settle_s = 0.0
        start = time.monotonic()
        while not presence_exact() and time.monotonic() - start < 60:
            swarm.spin(0.5)
        settle_s = time.monotonic() - start
        after = {d["id"]: d for d in op.all_items("devices", "list")}
        sims = {d.id for d in swarm.devices}
        presence = {
            "killed": len(killed), "seconds_to_all_offline": round(settle_s, 2),
            "killed_still_online": sum(1 for i in killed if after[i]["online"]),
            "others_offline": sum(1 for i in sims - killed if not after[i]["online"]),
            "disconnections_counted": sum(after[i]["disconnections"] - before[i]["disconnections"] for i in killed),
            "disconnections_elsewhere": sum(after[i]["disconnections"] - before[i]["disconnections"]
                                            for i in sims - killed),
        }
        cloud_ps, broker_ps = psutil.Process(cloud.pid), psutil.Process(mosq.process.pid)  # type: ignore[union-attr]
        cpu = cloud_ps.cpu_times()
        return {"devices": devices, "tasks": tasks, "selection": selection, "connect_s": round(connect_s, 2), "register_s": round(register_s, 2),
                "offers": offers, "lists_under_load": lists, "presence": presence,
                "cloud_rss_mb": round(cloud_ps.memory_info().rss / 2**20, 1),
                "cloud_cpu_s": round(cpu.user + cpu.system, 1),
                "broker_rss_mb": round(broker_ps.memory_info().rss / 2**20, 1),
                "errors": len(swarm.errors), "first_errors": swarm.errors[:5]}
    finally:
        for device in swarm.devices:
            if not device.killed:
                swarm.kill(device)
        if op_conn is not None:
            op_conn.stop()
        cloud_stack.close()
        mosq.stop()
        shutil.rmtree(work, ignore_errors=True)


def _raise_fd_limit(devices: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = devices + 1000
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit(f"{devices} devices need {need} file descriptors; the hard limit is {hard} "
                             "(raise it: ulimit -Hn, or /etc/security/limits.conf)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))  # Mosquitto, started after, inherits it


def _table(runs: list[dict[str, Any]]) -> str:
    rows = [("devices", lambda r: r["devices"]), ("connect + register s", lambda r: r["register_s"]),
            ("offer p50 / p99 / max s", lambda r: f"{r['offers']['p50_s']} / {r['offers']['p99_s']} / "
                                                  f"{r['offers']['max_s']}"),
            ("offers missed", lambda r: r["offers"]["missed"]),
            ("join p50 / p99 ms", lambda r: f"{r['offers']['joins']['round_trip']['p50_ms']} / "
                                            f"{r['offers']['joins']['round_trip']['p99_ms']}"
                                  if "joins" in r["offers"] else "-"),
            ("devices.list p50 ms", lambda r: r["lists_under_load"]["devices.list"]["p50_ms"]),
            ("tasks.list p50 ms", lambda r: r["lists_under_load"]["tasks.list"]["p50_ms"]),
            ("killed / still online", lambda r: f"{r['presence']['killed']} / {r['presence']['killed_still_online']}"),
            ("s to all offline", lambda r: r["presence"]["seconds_to_all_offline"]),
            ("cloud RSS MB / CPU s", lambda r: f"{r['cloud_rss_mb']} / {r['cloud_cpu_s']}"),
            ("broker RSS MB", lambda r: r["broker_rss_mb"]), ("errors", lambda r: r["errors"])]
    return "\n".join(f"{name:<26}" + "".join(f"{get(r)!s:>24}" for r in runs) for name, get in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--tasks", type=int, default=5, help="tasks with criteria started on the fleet")
    parser.add_argument("--kill", type=float, default=0.10, help="fraction of connections killed at once")
    parser.add_argument("--selection", choices=["cloud", "device"], default="cloud",
                        help="where the tasks' criteria are evaluated (device: privacy mode, tasks.join)")
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    _raise_fd_limit(max(sizes))
    runs = [run_size(n, opts.tasks, opts.kill, opts.selection) for n in sizes]
    report: dict[str, Any] = {"bench": "swarm", "runs": runs}
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        report["growth_largest_over_smallest"] = {
            "devices": large["devices"] / small["devices"],
            "register_s": round(large["register_s"] / max(small["register_s"], 1e-9), 2),
            "offer_p99_s": round(large["offers"]["p99_s"] / max(small["offers"]["p99_s"], 1e-9), 2),
            "devices_list_p50": round(large["lists_under_load"]["devices.list"]["p50_ms"]
                                      / small["lists_under_load"]["devices.list"]["p50_ms"], 2),
            "cloud_rss": round(large["cloud_rss_mb"] / small["cloud_rss_mb"], 2),
            "cloud_cpu": round(large["cloud_cpu_s"] / max(small["cloud_cpu_s"], 1e-9), 2),
            "broker_rss": round(large["broker_rss_mb"] / small["broker_rss_mb"], 2)}
    print(json.dumps(report, indent=2))
    print(_table(runs), file=sys.stderr)


if __name__ == "__main__":
    main()
