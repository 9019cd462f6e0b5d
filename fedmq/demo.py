"""``fedmq demo``: the whole system on one machine, as separate processes, in one command.

Starts a broker (the embedded one unless ``--broker`` names another), the cloud and two edge
agents with their own partitions of the digits data, pushes the example bundle signed with a
fresh operator key, runs AGATA's experiment 1 (or 2 with ``--scenario failover``), shows live
progress, and ends with the final accuracy and the timeline (``events.json`` and a table).
Every process it started is stopped when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from broker import codec
from broker.connection import MqttConnection, new_client_id
from broker.embedded import EmbeddedBroker
from broker.events import EventRecord
from broker.net import free_port
from broker.rpc_client import RpcClient
from broker.topics import Topics
from cloud.bundle_client import push_folder
from cloud.events import timeline
from ftdl.signing import SigningKey, generate_keypair

log = logging.getLogger("fedmq.demo")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEVICES = ("dev-1", "dev-2")


class DemoError(RuntimeError):
    pass


@dataclass
class DemoCluster:
    """The processes of a demo (or a test): broker, cloud, edges -- each startable and killable."""

    workdir: Path
    broker_url: str | None = None
    devices: tuple[str, ...] = DEVICES
    examples: Path = EXAMPLES
    recheck_interval_s: float = 60.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    embedded: EmbeddedBroker | None = None
    operator: RpcClient | None = None
    key: SigningKey | None = None

    @property
    def url(self) -> str:
        assert self.broker_url is not None
        return self.broker_url

    def start(self) -> "DemoCluster":
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "logs").mkdir(parents=True)
        if not (self.examples / "digits" / "fedmq.toml").is_file():
            raise DemoError(f"no example bundles in {self.examples}: run fedmq demo from a source checkout")
        if self.broker_url is None:
            self.embedded = EmbeddedBroker(port=free_port()).start()
            self.broker_url = self.embedded.url
        key_path, pub_path = generate_keypair(self.workdir / "keys", "operator")
        self.key = SigningKey.load(key_path)
        self.pub = pub_path
        self._prepare_data()
        self.start_cloud()
        conn = MqttConnection(new_client_id("demo-operator"), self.url).start(timeout=10)
        self.operator = RpcClient(conn, "operator").start()
        self.wait_for(lambda: self._ping("tasks"), 30, "the cloud to answer")
        for device in self.devices:
            self.start_edge(device)
        return self

    def _prepare_data(self) -> None:
        sys.path.insert(0, str(self.examples / "digits"))
        try:
            from prepare import write_partitions  # the example's own partitioning
        finally:
            sys.path.pop(0)
        self.data_sizes = write_partitions(self.workdir / "data", list(self.devices))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_file = (self.workdir / "logs" / f"{name}.log").open("ab")
        # Own session: a Ctrl-C in the terminal reaches the demo, which stops children in order.
        proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", *argv], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        self.procs[name] = proc
        return proc

    def start_cloud(self) -> None:
        self._spawn("cloud", ["cloud", "--broker", self.url, "--home", str(self.workdir / "cloud"),
                              "--client-id", "demo-cloud", "--flower-bind", "127.0.0.1",
                              "--trusted-key", str(self.pub), "--require-signed"])

    def start_edge(self, device: str) -> None:
        self._spawn(device, ["edge", "--device-id", device, "--broker", self.url,
                             "--work-dir", str(self.workdir / "edges" / device),
                             "--data-dir", str(self.workdir / "data" / device), "--trust", str(self.pub),
                             "--recheck-interval", str(self.recheck_interval_s)])

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def terminate(self, name: str, timeout: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM, not SIGINT: a process started from a non-interactive shell inherits SIGINT as
        # ignored; every fedmq command stops cleanly on SIGTERM.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop everything this cluster started: edges, then the cloud, then the broker."""
        if self.operator is not None:
            self.operator.connection.stop()
            self.operator = None
        for name in [n for n in self.procs if n != "cloud"] + ["cloud"]:
            self.terminate(name)
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __enter__(self) -> "DemoCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- operator actions ----------------------------------------------------------------------
    def call(self, service: str, method: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        assert self.operator is not None
        return self.operator.call(service, method, args or {}, timeout=timeout)

    def _ping(self, service: str) -> bool:
        try:
            self.call(service, "ping", timeout=2)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise DemoError(f"{name} exited ({proc.returncode}); see {self.workdir / 'logs' / (name + '.log')}")
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise DemoError(f"timed out after {timeout:g} s waiting for {what}")

    def push(self, name: str) -> str:
        assert self.operator is not None
        return push_folder(self.operator, self.examples / name, key=self.key).manifest.digest

    def devices_online(self) -> bool:
        rows = self.call("devices", "list", {"online": True})
        return {r["id"] for r in rows} >= set(self.devices)

    def wait_task(self, task: str, timeout: float = 300.0,
                  on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Follow the retained announcement until the task leaves ``running``."""
        done = threading.Event()
        latest: dict[str, Any] = {}

        def on_announcement(message: Any) -> None:
            if not message.payload:
                return
            body, _ = codec.decode(message.payload)
            latest.update(body)
            if on_update:
                on_update(body)
            if body.get("state") in ("finished", "failed", "stopped"):
                done.set()

        conn = MqttConnection(new_client_id("demo-watch"), self.url).start()
        try:
            conn.subscribe(Topics().task(task), on_announcement)
            self.wait_for(done.is_set, timeout, f"task {task} to finish")
        finally:
            conn.stop()
        return self.call("tasks", "get", {"task": task})


def run_scenario(cluster: DemoCluster, scenario: str, rounds: int, progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run experiment 1 (``basic``) or 2 (``failover``); return the result summary."""
    cluster.wait_for(cluster.devices_online, 60, "both edge agents to come online")
    good = cluster.push("digits")
    tasks = []
    if scenario == "failover":
        broken = cluster.push("broken")
        cluster.call("tasks", "create", {"name": "E-broken", "task": "E", "bundle": broken, "priority": 10,
                                         "criteria": "data_quantity >= 100"})
        tasks.append("E")
    cluster.call("tasks", "create", {"name": "C-digits" if scenario == "failover" else "digits", "task": "C",
                                     "bundle": good, "criteria": "data_quantity >= 100", "args": {"rounds": rounds}})
    tasks.append("C")
    for task in tasks:
        cluster.call("tasks", "start", {"task": task})
    final = cluster.wait_task("C", on_update=progress)
    if scenario == "failover":
        cluster.call("tasks", "stop", {"task": "E"})

    def clients_done() -> list[dict[str, Any]] | None:
        found = cluster.call("events", "list", {"task": "C"})["events"]
        ended = {e["device"] for e in found if e["kind"] in ("client_finished", "client_stopped", "client_error")}
        return found if ended >= set(cluster.devices) else None

    try:  # the clients end a moment after their server: let the timeline include them
        events = cluster.wait_for(clients_done, 30, "the clients to end")
    except DemoError:
        events = cluster.call("events", "list", {"task": "C"})["events"]
    for task in tasks:
        if task != "C":
            events += cluster.call("events", "list", {"task": task})["events"]
    events.sort(key=lambda e: e["ts"])
    try:
        result_metrics = cluster.call("tasks", "metrics", {"task": "C"})["rounds"]
    except Exception:  # noqa: BLE001 - a run with no rounds has nothing to draw
        result_metrics = []
    result: dict[str, Any] = {
        "metrics": result_metrics,
        "scenario": scenario, "task": final, "accuracy": final["metrics"].get("central_accuracy"),
        "timeline": timeline([EventRecord(**e) for e in events]), "events": events}
    if scenario == "failover":
        result["failover_s"] = {}
        for device in cluster.devices:
            error = next((e["ts"] for e in events if e["kind"] == "client_error" and e["device"] == device), None)
            start = next((e["ts"] for e in events if e["kind"] == "client_started" and e["task"] == "C"
                          and e["device"] == device), None)
            if error and start:
                result["failover_s"][device] = round(start - error, 3)
    return result


def main(broker: str | None, scenario: str, workdir: Path, rounds: int, console: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if scenario not in ("basic", "failover"):
        raise DemoError("scenario must be basic or failover")
    interrupted = threading.Event()

    def on_term(*_: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    cluster = DemoCluster(workdir, broker)
    try:
        console.print(f"[bold]fedmq demo[/bold] ({scenario}): starting broker, cloud and {len(cluster.devices)} edge agents…")
        cluster.start()
        console.print(f"broker {cluster.url}; logs in {workdir / 'logs'}")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as bar:
            bar_id = bar.add_task("training C", total=rounds)

            def progress(body: dict[str, Any]) -> None:
                if body.get("id") == "C":
                    bar.update(bar_id, completed=body.get("round") or 0, total=body.get("total_rounds") or rounds,
                               description=f"training C ({body.get('state')})")

            result = run_scenario(cluster, scenario, rounds, progress)
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
    (workdir / "events.json").write_text(json.dumps(result["events"], indent=2))
    if result["metrics"]:
        try:
            from fedmq.plots import plot_metrics

            plot_metrics(result["metrics"], workdir / "metrics.png", f"task C ({scenario}) — loss and accuracy per round")
        except RuntimeError as exc:  # matplotlib not installed: the demo still stands
            console.print(f"(no plot: {exc})")
    summary = {k: v for k, v in result.items() if k != "events"}
    (workdir / "result.json").write_text(json.dumps(summary, indent=2))
    table = Table("t (s)", "step", "task", "where", title=f"timeline ({scenario})")
    for row in result["timeline"]:
        table.add_row(f"{row['t_s']:.2f}", row["step"], row["task"], row["device"] or row["component"])
    console.print(table)
    state = result["task"]["state"]
    console.print(f"task C {state}; final accuracy on the held-out digits: "
                  f"[bold]{result['accuracy']:.3f}[/bold]" if result["accuracy"] is not None else f"task C {state}")
    if scenario == "failover":
        console.print(f"failover (error on E -> C training), per device: {result['failover_s']}")
    console.print(f"events: {workdir / 'events.json'}   summary: {workdir / 'result.json'}   "
                  f"plot: {workdir / 'metrics.png'}")
    return summary
