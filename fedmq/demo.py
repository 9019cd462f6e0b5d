"""``fedmq demo``: the whole system on one machine, as separate processes, in one command.

Starts a broker (the embedded one unless ``--broker`` names another), the cloud and two edge
agents with their own partitions of the digits data, pushes the example bundle signed with a
fresh operator key, runs AGATA's experiment 1 (or 2 with ``--scenario failover``), shows live
progress, and ends with the final accuracy and the timeline (``events.json`` and a table).
Every process it started is stopped when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.events import EventRecord
from fedmq.broker.net import free_port
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import TopicError, Topics
from fedmq.cloud.bundle_client import push_folder
from fedmq.cloud.events import timeline
from fedmq.cloud.task_client import wait_for_task
from fedmq.ftdl.paths import absolute
from fedmq.ftdl.signing import SigningKey, generate_keypair

EXAMPLES = Path(str(resources.files("fedmq.examples")))  # package data: works from a wheel too
DEVICES = ("dev-1", "dev-2")
SERVERLESS_DEVICES = ("dev-1", "dev-2", "dev-3")
SCENARIOS = ("basic", "failover", "serverless")


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

    def __post_init__(self) -> None:
        self.workdir = absolute(self.workdir)  # every path handed to the processes is absolute

    @property
    def url(self) -> str:
        assert self.broker_url is not None
        return self.broker_url

    def start(self) -> DemoCluster:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "logs").mkdir(parents=True)
        if not (self.examples / "digits" / "fedmq.toml").is_file():
            raise DemoError(f"no example bundles in {self.examples}: the installation is incomplete")
        if self.broker_url is None:
            _log_to(self.workdir / "logs" / "broker.log", "amqtt", "transitions")
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
        """The example's own partitioning (examples/digits/prepare.py), loaded from its file."""
        path = self.examples / "digits" / "prepare.py"
        spec = importlib.util.spec_from_file_location("fedmq_digits_prepare", path)
        if spec is None or spec.loader is None:
            raise DemoError(f"cannot load {path}")
        prepare = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prepare)
        prepare.write_partitions(self.workdir / "data", list(self.devices))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_file = (self.workdir / "logs" / f"{name}.log").open("ab")
        # Own session: a Ctrl-C in the terminal reaches the demo, which stops children in order.
        proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", *argv], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log_file.close()
        self.procs[name] = proc
        return proc

    def start_cloud(self) -> None:
        self._spawn("cloud", ["--broker", self.url, "cloud", "--home", str(self.workdir / "cloud"),
                              "--client-id", "demo-cloud", "--flower-bind", "127.0.0.1",
                              "--trusted-key", str(self.pub), "--require-signed"])

    def start_edge(self, device: str) -> None:
        self._spawn(device, ["--broker", self.url, "edge", "--device-id", device,
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

    def __enter__(self) -> DemoCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- operator actions ----------------------------------------------------------------------
    def call(self, service: str, method: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        assert self.operator is not None
        return self.operator.call(service, method, args or {}, timeout=timeout)

    def items(self, service: str, method: str, args: dict[str, Any] | None = None) -> list[Any]:
        assert self.operator is not None
        return self.operator.all_items(service, method, args, timeout=30.0)

    def _ping(self, service: str) -> bool:
        try:
            self.call(service, "ping", timeout=2)
            return True
        except Exception:
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
        rows = self.items("devices", "list", {"online": True})
        return {r["id"] for r in rows} >= set(self.devices)

    def exited(self) -> str | None:
        """Why the cluster cannot go on: a process of it that exited, with where to look."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited ({proc.returncode}); see {self.workdir / 'logs' / (name + '.log')}"
        return None

    def wait_task(self, task: str, timeout: float = 300.0,
                  on_update: Callable[[dict[str, Any]], None] | None = None,
                  give_up: Callable[[], str | None] | None = None) -> dict[str, Any]:
        """Follow the retained announcement until the task leaves ``running``; stop early when a
        process died or ``give_up`` names a reason."""
        def stop_waiting() -> str | None:
            return self.exited() or (give_up() if give_up else None)

        conn = MqttConnection(new_client_id("demo-watch"), self.url).start()
        try:
            wait_for_task(conn, Topics(), task, timeout, on_update=on_update, stop_waiting=stop_waiting)
        except (RuntimeError, LookupError, TimeoutError) as exc:
            raise DemoError(str(exc)) from None
        finally:
            conn.stop()
        return self.call("tasks", "get", {"task": task})


def _log_to(path: Path, *loggers: str) -> None:
    """Send these libraries' logs to a file of the demo instead of the user's terminal."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in loggers:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


@dataclass
class DevicePhase:
    text: str = "waiting for an offer"
    task: str | None = None
    failed: dict[str, str] = field(default_factory=dict)  # task -> why it failed here


class FleetView:
    """What each device is doing, read from the events the edges and the cloud publish on
    ``tasks/+/events`` -- the same stream the dashboards show."""

    def __init__(self, devices: tuple[str, ...], on_change: Callable[[str, str], None] | None = None) -> None:
        self.devices = devices
        self.phases = {device: DevicePhase() for device in devices}
        self.totals: dict[str, int] = {}
        self.on_change = on_change or (lambda device, text: None)
        self._lock = threading.Lock()

    def on_announcement(self, body: dict[str, Any]) -> None:
        if isinstance(body.get("total_rounds"), int):
            self.totals[str(body.get("id"))] = body["total_rounds"]

    def on_event(self, message: Any) -> None:
        try:
            body, _ = codec.decode(message.payload)
        except codec.CodecError:
            return
        try:
            task = Topics().event_task(message.topic)
        except TopicError:
            return
        event = EventRecord.from_wire(body, task)
        if event is None or event.device not in self.phases:
            return
        text = self._describe(event)
        if text is None:
            return
        with self._lock:
            phase = self.phases[event.device]
            if event.kind == "client_error":
                phase.failed[task] = str(event.data.get("cause"))
            changed = phase.text != text
            phase.text, phase.task = text, task
        if changed:
            self.on_change(event.device, text)

    def _describe(self, event: EventRecord) -> str | None:
        task, data = event.task, event.data
        if event.kind == "device_requested":
            return f"offered {task}"
        if event.kind == "bundle_fetch_started":
            return f"fetching {task} ({data.get('missing')} of {data.get('chunks')} chunks to get)"
        if event.kind == "bundle_fetched":
            return f"fetched {task} ({data.get('bytes')} bytes in {data.get('seconds')} s)"
        if event.kind == "client_started":
            return f"starting {task}"
        if event.kind == "client_round":
            total = self.totals.get(str(task))
            return f"training {task} round {data.get('round')}/{total or '?'}"
        if event.kind == "client_error":
            until = data.get("quarantined_until")
            when = time.strftime("%H:%M:%S %Z", time.localtime(until)) if isinstance(until, (int, float)) else "?"
            return f"failed {task}: {data.get('cause')} (quarantined until {when})"
        if event.kind == "fl_elected" and event.data.get("aggregator") == event.device:
            return f"aggregating {task} round {data.get('round')}"
        if event.kind == "fl_failover":
            return f"took over {task} round {data.get('round')} from {', '.join(data.get('lost') or ['?'])}"
        if event.kind == "fl_global_accepted":
            return f"training {task} from global {data.get('round')}"
        if event.kind == "client_finished":
            return f"finished {task}"
        if event.kind == "client_stopped":
            return f"stopped {task}"
        return None

    def all_failed(self, task: str) -> str | None:
        """When every device has failed ``task``, why (one line per device); otherwise None."""
        with self._lock:
            causes = {device: phase.failed.get(task) for device, phase in self.phases.items()}
        if all(causes.values()):
            return f"every device failed task {task}:\n" + "\n".join(
                f"  {device}: {cause}" for device, cause in causes.items())
        return None

    def rows(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(device, phase.text) for device, phase in self.phases.items()]


def run_scenario(cluster: DemoCluster, scenario: str, rounds: int, view: FleetView | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run experiment 1 (``basic``) or 2 (``failover``); return the result summary.  Fails fast
    (``DemoError`` with each device's cause) once every device has failed task C."""
    view = view or FleetView(cluster.devices)
    assert cluster.operator is not None
    cluster.operator.connection.subscribe(Topics().all_task_events(), view.on_event, qos=1)

    def on_update(body: dict[str, Any]) -> None:
        view.on_announcement(body)
        if progress is not None:
            progress(body)

    cluster.wait_for(cluster.devices_online, 60, "the edge agents to come online")
    good = cluster.push("digits")
    if scenario == "serverless":
        return _serverless(cluster, good, rounds, view, on_update)
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
    final = cluster.wait_task("C", timeout=240.0, on_update=on_update, give_up=lambda: view.all_failed("C"))
    if scenario == "failover":
        cluster.call("tasks", "stop", {"task": "E"})

    def clients_done() -> list[dict[str, Any]] | None:
        found = cluster.items("events", "list", {"task": "C"})
        ended = {e["device"] for e in found if e["kind"] in ("client_finished", "client_stopped", "client_error")}
        return found if ended >= set(cluster.devices) else None

    try:  # the clients end a moment after their server: let the timeline include them
        events = cluster.wait_for(clients_done, 30, "the clients to end")
    except DemoError:
        events = cluster.items("events", "list", {"task": "C"})
    for task in tasks:
        if task != "C":
            events += cluster.items("events", "list", {"task": task})
    events.sort(key=lambda e: e["ts"])
    try:
        result_metrics = cluster.items("tasks", "metrics", {"task": "C"})
    except Exception:
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


KILL_ROUND = 2  # the serverless demo loses the aggregator of this round


def _serverless(cluster: DemoCluster, bundle: str, rounds: int, view: FleetView,
                on_update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Digits with no server on three devices; the device elected to aggregate round 2 loses power
    (its agent SIGKILLed: its participant follows it at once, so the broker publishes the
    participant's last will) and the other two re-elect and finish the run."""
    killed: dict[str, Any] = {}
    lock = threading.Lock()

    def on_event(message: Any) -> None:
        try:
            body, _ = codec.decode(message.payload)
        except codec.CodecError:
            return
        if not isinstance(body, dict) or body.get("kind") != "fl_elected":
            return
        data = body.get("data") or {}
        aggregator = data.get("aggregator")
        with lock:
            if killed or data.get("round") != KILL_ROUND or aggregator not in cluster.devices:
                return
            killed.update(device=aggregator, round=KILL_ROUND, ts=time.time())
        threading.Thread(target=cluster.kill, args=(aggregator,), daemon=True).start()

    assert cluster.operator is not None
    cluster.operator.connection.subscribe(Topics().all_task_events(), on_event, qos=1)
    cluster.call("tasks", "create", {"name": "digits-serverless", "task": "C", "bundle": bundle,
                                     "criteria": "data_quantity >= 100",
                                     "args": {"mode": "serverless", "rounds": rounds,
                                              "min_participants": len(cluster.devices), "quiet_s": 0.5}})
    cluster.call("tasks", "start", {"task": "C"})
    final = cluster.wait_task("C", timeout=300.0, on_update=on_update, give_up=lambda: view.all_failed("C"))
    if not killed:
        raise DemoError(f"no device was elected to aggregate round {KILL_ROUND} "
                        f"(did the run have {KILL_ROUND} rounds?)")
    survivors = set(cluster.devices) - {killed["device"]}

    def clients_done() -> list[dict[str, Any]] | None:
        found = cluster.items("events", "list", {"task": "C"})
        ended = {e["device"] for e in found if e["kind"] in ("client_finished", "client_stopped", "client_error")}
        return found if ended >= survivors else None

    try:
        events = cluster.wait_for(clients_done, 30, "the clients to end")
    except DemoError:
        events = cluster.items("events", "list", {"task": "C"})
    events.sort(key=lambda e: e["ts"])
    metrics = cluster.items("tasks", "metrics", {"task": "C"})
    took_over = next((e for e in events if e["kind"] == "fl_failover" and e["ts"] >= killed["ts"]), None)
    published = next((e for e in events if e["kind"] == "fl_global_published" and e["ts"] >= killed["ts"]), None)
    accuracy = next((row[k] for row in reversed(metrics) for k in ("accuracy", "central_accuracy")
                     if isinstance(row.get(k), (int, float))), None)
    return {"metrics": metrics, "scenario": "serverless", "task": final, "accuracy": accuracy,
            "timeline": timeline([EventRecord(**e) for e in events]), "events": events,
            "killed": {**killed, "took_over_by": (took_over["data"] or {}).get("aggregator") if took_over else None,
                       "failover_s": round(took_over["ts"] - killed["ts"], 3) if took_over else None,
                       "next_global_s": round(published["ts"] - killed["ts"], 3) if published else None}}


class DemoScreen:
    """The demo's live view: task C's rounds and each device's phase.  On a terminal a table
    redrawn in place; elsewhere (CI, a log) one line per change."""

    def __init__(self, console: Any, devices: tuple[str, ...], rounds: int) -> None:
        self.console = console
        self.rounds = rounds
        self.task_line = "task C: not started"
        self.view = FleetView(devices, self._on_device)
        self._live: Any = None

    def __enter__(self) -> DemoScreen:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None

    def _render(self) -> Any:
        from rich.table import Table

        table = Table(title=self.task_line, title_justify="left", show_edge=False)
        table.add_column("device")
        table.add_column("phase")
        for device, text in self.view.rows():
            style = "red" if text.startswith("failed") else "green" if text.startswith("finished") else ""
            table.add_row(device, f"[{style}]{text}[/]" if style else text)
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _on_device(self, device: str, text: str) -> None:
        if self._live is None:
            self.console.print(f"{device}: {text}", highlight=False, markup=False)
        self._refresh()

    def on_task(self, body: dict[str, Any]) -> None:
        if body.get("id") != "C":
            return
        line = (f"task C: {body.get('state')}, round {body.get('round') or 0}/"
                f"{body.get('total_rounds') or self.rounds}")
        if line != self.task_line:
            self.task_line = line
            if self._live is None:
                self.console.print(line, highlight=False)
            self._refresh()


def main(broker: str | None, scenario: str, workdir: Path, rounds: int, console: Any) -> dict[str, Any]:
    from rich.table import Table

    if scenario not in SCENARIOS:
        raise DemoError(f"scenario must be one of {', '.join(SCENARIOS)}")
    workdir = absolute(workdir)

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    cluster = DemoCluster(workdir, broker, devices=SERVERLESS_DEVICES if scenario == "serverless" else DEVICES)
    started = time.monotonic()
    try:
        console.print(f"[bold]fedmq demo[/bold] ({scenario}): starting broker, cloud and "
                      f"{len(cluster.devices)} edge agents…")
        cluster.start()
        console.print(f"broker {cluster.url}; logs in {workdir / 'logs'}")
        with DemoScreen(console, cluster.devices, rounds) as screen:
            result = run_scenario(cluster, scenario, rounds, screen.view, screen.on_task)
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
    result["seconds"] = round(time.monotonic() - started, 1)
    (workdir / "events.json").write_text(json.dumps(result["events"], indent=2))
    if result["metrics"]:
        try:
            from fedmq.plots import plot_metrics

            plot_metrics(result["metrics"], workdir / "metrics.png",
                         f"task C ({scenario}) — loss and accuracy per round")
        except RuntimeError as exc:  # matplotlib not installed: the demo still stands
            console.print(f"(no plot: {exc})")
    summary = {k: v for k, v in result.items() if k != "events"}
    (workdir / "result.json").write_text(json.dumps(summary, indent=2))
    table = Table("t (s)", "step", "task", "where", title=f"timeline ({scenario})")
    for row in result["timeline"]:
        table.add_row(f"{row['t_s']:.2f}", row["step"], row["task"], row["device"] or row["component"])
    console.print(table)
    state = result["task"]["state"]
    judged = "the participants' evaluation" if scenario == "serverless" else "on the held-out digits"
    console.print(f"task C {state}; final accuracy ({judged}): "
                  f"[bold]{result['accuracy']:.3f}[/bold]" if result["accuracy"] is not None else f"task C {state}")
    if scenario == "failover":
        per_device = ", ".join(f"{d} {s:.3f} s" for d, s in result["failover_s"].items())
        console.print(f"failover (error on E -> C's client started), per device: {per_device}")
    if scenario == "serverless":
        k = result["killed"]
        console.print(f"killed {k['device']}, the aggregator of round {k['round']}; "
                      f"{k['took_over_by'] or 'nobody'} took over after {k['failover_s']} s; "
                      f"the next global came {k['next_global_s']} s after the kill")
    console.print(f"events: {workdir / 'events.json'}   summary: {workdir / 'result.json'}   "
                  f"plot: {workdir / 'metrics.png'}   ({result['seconds']:.0f} s)")
    return summary
