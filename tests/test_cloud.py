"""The cloud control plane over a real broker, with real Flower server processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.presence import Presence
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.cloud.db import SCHEMA_VERSION

TASK = Path(__file__).parent / "tasks" / "numpy_fl"
TOPICS = Topics()
FEDMQ = [sys.executable, "-m", "fedmq.cli"]
DEVICE_INFO = {"data_quantity": 150, "memory_mb": 2048.0, "cpu_count": 2, "packages": {"numpy": "2.4.6", "flwr": "1.41.0"},
               "labels": {"region": "eu"}}


class Watch:
    """Collects retained/live messages on a topic filter."""

    def __init__(self, conn: MqttConnection, topic_filter: str) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        conn.subscribe(topic_filter, lambda m: self.items.put((m.topic, codec.decode(m.payload)[0] if m.payload else None)))

    def until(self, predicate: Any, timeout: float = 15.0) -> Any:
        deadline = time.time() + timeout
        seen = []
        while time.time() < deadline:
            try:
                _topic, body = self.items.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(body)
            if predicate(body):
                return body
        raise AssertionError(f"no matching message in {timeout} s; saw {seen[-5:]}")


@pytest.fixture
def cloud_on(tmp_path: Path) -> Iterator[Any]:
    apps: list[CloudApp] = []

    def start(url: str, **kw: Any) -> CloudApp:
        # These tests run the unsigned test task; tests/test_security.py covers the signed-only default.
        kw.setdefault("allow_unsigned", True)
        app = CloudApp(CloudConfig(broker=url, home=tmp_path / "cloud", client_id=new_client_id("cloud"), **kw)).start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture
def client_factory(tmp_path: Path) -> Iterator[Any]:
    conns: list[MqttConnection] = []

    def make(url: str, caller: str = "operator") -> RpcClient:
        conn = MqttConnection(new_client_id(caller), url).start()
        conns.append(conn)
        return RpcClient(conn, caller).start()

    yield make
    for conn in conns:
        conn.stop()


def spawn_cloud(url: str, home: Path, client_id: str, log_path: Path, *flags: str) -> subprocess.Popen:
    """``fedmq cloud`` as its own process, returned once it says it is serving."""
    log_path.write_text("")
    with log_path.open("a") as log:
        proc = subprocess.Popen([*FEDMQ, "--broker", url, "cloud", "--home", str(home), "--client-id", client_id,
                                 "--allow-unsigned", *flags],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while "serving" not in log_path.read_text():
        assert time.time() < deadline and proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    return proc


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_create_start_request_stop(mqtt_broker: Any, cloud_on: Any, client_factory: Any) -> None:
    cloud = cloud_on(mqtt_broker.url)
    op = client_factory(mqtt_broker.url)
    digest = push_folder(op, TASK).manifest.digest
    a = op.call("tasks", "create", {"name": "a", "task": "task-a", "bundle": digest, "priority": 5,
                                    "criteria": 'data_quantity >= 100 and has("numpy>=1.20")'})
    assert a["state"] == "created" and a["requirements"]["packages"] == ["flwr>=1.41", "numpy>=1.26"]
    op.call("tasks", "create", {"name": "b", "task": "task-b", "bundle": digest, "criteria": "region == 'eu'"})
    op.call("tasks", "create", {"name": "c", "task": "task-c", "bundle": digest})  # never started
    op.call("tasks", "create", {"name": "d", "task": "task-d", "bundle": digest, "criteria": "memory_mb > 100000"})
    op.call("tasks", "create", {"name": "e", "task": "task-e", "bundle": digest,
                                "requirements": {"packages": ["torch>=99"]}})
    for task in ("task-a", "task-b", "task-d", "task-e"):
        started = op.call("tasks", "start", {"task": task})
        assert started["state"] == "running" and started["flower"].startswith("127.0.0.1:")
    assert pid_alive(cloud.servers.pid("task-a"))

    dev1 = client_factory(mqtt_broker.url, "dev-1")
    dev1.call("devices", "update_info", {"info": DEVICE_INFO})
    dev2 = client_factory(mqtt_broker.url, "dev-2")
    dev2.call("devices", "update_info", {"info": {**DEVICE_INFO, "data_quantity": 10, "labels": {"region": "us"}}})
    offers = dev1.call("tasks", "request")
    assert [o["id"] for o in offers] == ["task-a", "task-b"]  # priority, then age; exactly the matches
    assert offers[0]["flower"] == op.call("tasks", "get", {"task": "task-a"})["flower"]
    assert dev2.call("tasks", "request") == []

    watch_cmd = Watch(dev1.connection, "fedmq/v1/devices/dev-1/cmd")
    watch_task = Watch(dev1.connection, "fedmq/v1/tasks/task-a")
    watch_task.until(lambda b: b and b["state"] == "running")
    server_pid = cloud.servers.pid("task-a")
    stopped = op.call("tasks", "stop", {"task": "task-a"})
    assert stopped["state"] == "stopped"
    watch_task.until(lambda b: b and b["state"] == "stopped" and b["id"] == "task-a")
    command = watch_cmd.until(lambda b: b and b.get("task") == "task-a")
    assert command["cmd"] == "stop"
    assert not pid_alive(server_pid)
    assert [o["id"] for o in dev1.call("tasks", "request")] == ["task-b"]  # no longer offered

    timeline = op.call("events", "timeline", {"task": "task-a"})["timeline"]
    steps = [row["step"] for row in timeline]
    assert steps[:3] == ["task_created", "task_started", "device_requested"] and steps[-1] == "task_stopped"
    listed = op.all_items("tasks", "list", {"state": "running"})
    assert {t["id"] for t in listed} == {"task-b", "task-d", "task-e"}
    op.call("tasks", "delete", {"task": "task-b"})
    Watch(dev1.connection, "fedmq/v1/tasks/task-b")  # cleared: no retained announcement left
    assert op.all_items("tasks", "list", {"state": "running"}) and not any(
        t["id"] == "task-b" for t in op.all_items("tasks", "list"))


def test_finished_run_updates_state_rounds_and_metrics(embedded_broker: Any, cloud_on: Any, client_factory: Any,
                                                       tmp_path: Path) -> None:
    """A real 2-round Flower run: two client processes join the cloud's server."""
    from fedmq import ftdl
    cloud_on(embedded_broker.url)
    op = client_factory(embedded_broker.url)
    digest = push_folder(op, TASK).manifest.digest
    op.call("tasks", "create", {"name": "lin", "task": "lin", "bundle": digest, "args": {"rounds": 2}})
    flower = op.call("tasks", "start", {"task": "lin"})["flower"]
    clients = [ftdl.start_task(TASK, "client", task_id="lin", log_dir=tmp_path / f"c{i}", on_event=lambda e: None,
                               args={"seed": i}, env={"FEDMQ_FLOWER_ADDRESS": flower}) for i in range(2)]
    for client in clients:
        assert client.wait(90).ok
    deadline = time.time() + 30
    while time.time() < deadline and op.call("tasks", "get", {"task": "lin"})["state"] == "running":
        time.sleep(0.2)
    task = op.call("tasks", "get", {"task": "lin"})
    assert task["state"] == "finished" and task["round"] == 2 and task["total_rounds"] == 2
    assert task["metrics"]["r2"] > 0.9
    steps = [r["step"] for r in op.call("events", "timeline", {"task": "lin"})["timeline"]]
    assert steps == ["task_created", "task_started", "round 1", "round 2", "task_finished"]
    with pytest.raises(RpcError) as err:
        op.call("tasks", "stop", {"task": "lin"})
    assert err.value.code is ErrorCode.CONFLICT

    # The run's history: parameters, per-round metrics, logs, the final model.
    runs = op.all_items("tasks", "runs", {"task": "lin"})
    assert runs[0]["run"] == 1 and runs[0]["state"] == "finished" and runs[0]["revision"]["args"] == {"rounds": 2}
    assert runs[0]["revision"]["bundle"] == digest
    rows = op.all_items("tasks", "metrics", {"task": "lin"})
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["r2"] > 0.9 and "loss" in rows[0]
    assert any("Flower" in line or "flwr" in line or "INFO" in line
               for line in op.call("tasks", "logs", {"task": "lin"})["lines"])
    env = {**os.environ, "FEDMQ_BROKER": embedded_broker.url, "COLUMNS": "200"}
    model = tmp_path / "model.npz"
    done = subprocess.run([*FEDMQ, "task", "model", "lin", "-o", str(model)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    import numpy as np

    assert np.load(model)["arr_0"].shape == (3,)
    plot, csv_file = tmp_path / "lin.png", tmp_path / "lin.csv"
    done = subprocess.run([*FEDMQ, "task", "metrics", "lin", "--csv", str(csv_file), "--plot", str(plot)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert plot.stat().st_size > 10_000 and csv_file.read_text().startswith("round,")
    for bad in ({"task": "lin", "run": 7}, {"task": "nope"}):
        with pytest.raises(RpcError) as err:
            op.call("tasks", "metrics", bad)
        assert err.value.code is ErrorCode.NOT_FOUND


@pytest.fixture
def bad_input_cloud(embedded_broker: Any, cloud_on: Any, client_factory: Any) -> dict[str, Any]:
    cloud = cloud_on(embedded_broker.url)
    op = client_factory(embedded_broker.url)
    digest = push_folder(op, TASK).manifest.digest
    return {"cloud": cloud, "op": op, "digest": digest, "url": embedded_broker.url}


def expect(code: ErrorCode, call: Any) -> RpcError:
    with pytest.raises(RpcError) as err:
        call()
    assert err.value.code is code, err.value
    return err.value


@pytest.mark.parametrize("criteria", [
    "__import__('os').system('touch /tmp/fedmq-pwned')", "().__class__.__bases__[0].__subclasses__()",
    "(lambda: True)()", "x" + " and x" * 400, "[" * 40 + "1" + "]" * 40, "data_quantity >",
])
def test_criteria_injection_is_refused_and_nothing_is_stored(bad_input_cloud: dict, criteria: str) -> None:
    op = bad_input_cloud["op"]
    error = expect(ErrorCode.INVALID_ARGS, lambda: op.call("tasks", "create", {
        "name": "x", "bundle": bad_input_cloud["digest"], "criteria": criteria}))
    assert "invalid criteria" in error.message
    assert op.all_items("tasks", "list") == [] and not Path("/tmp/fedmq-pwned").exists()


def test_bad_requests_get_clear_codes_and_change_nothing(bad_input_cloud: dict) -> None:
    op, digest = bad_input_cloud["op"], bad_input_cloud["digest"]
    for method in ("get", "start", "stop", "delete"):
        expect(ErrorCode.NOT_FOUND, lambda method=method: op.call("tasks", method, {"task": "nope"}))
    expect(ErrorCode.NOT_FOUND, lambda: op.call("tasks", "update", {"task": "nope", "priority": 1}))
    expect(ErrorCode.NOT_FOUND, lambda: op.call("tasks", "create", {"name": "x", "bundle": "a" * 64}))
    expect(ErrorCode.INVALID_ARGS, lambda: op.call("tasks", "create", {"name": "x", "bundle": "../etc"}))
    expect(ErrorCode.INVALID_ARGS, lambda: op.call("tasks", "create", {"name": "x", "bundle": digest, "task": "a/b"}))
    expect(ErrorCode.INVALID_ARGS, lambda: op.call("tasks", "create", {"name": "x", "bundle": digest, "priority": "high"}))
    expect(ErrorCode.INVALID_ARGS, lambda: op.call("tasks", "create", {"name": "x", "bundle": digest, "flower_port": 80}))
    expect(ErrorCode.INVALID_ARGS, lambda: op.all_items("tasks", "list", {"state": "bogus"}))
    assert op.all_items("tasks", "list") == []

    op.call("tasks", "create", {"name": "t", "task": "t1", "bundle": digest})
    op.call("tasks", "start", {"task": "t1"})
    expect(ErrorCode.CONFLICT, lambda: op.call("tasks", "start", {"task": "t1"}))
    expect(ErrorCode.CONFLICT, lambda: op.call("tasks", "update", {"task": "t1", "bundle": digest}))
    op.call("tasks", "stop", {"task": "t1"})
    expect(ErrorCode.CONFLICT, lambda: op.call("tasks", "stop", {"task": "t1"}))
    assert op.call("tasks", "get", {"task": "t1"})["state"] == "stopped"


def test_two_creates_racing_on_one_id(bad_input_cloud: dict, client_factory: Any) -> None:
    clients = [client_factory(bad_input_cloud["url"]) for _ in range(4)]
    results: list[Any] = []

    def create(client: RpcClient) -> None:
        try:
            results.append(client.call("tasks", "create", {"name": "r", "task": "race", "bundle": bad_input_cloud["digest"]}))
        except RpcError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=create, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(isinstance(r, dict) for r in results) == 1 and results.count(ErrorCode.CONFLICT) == 3
    assert [t["id"] for t in bad_input_cloud["op"].all_items("tasks", "list")] == ["race"]


def test_a_port_already_in_use(bad_input_cloud: dict) -> None:
    op = bad_input_cloud["op"]
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        op.call("tasks", "create", {"name": "p", "task": "p1", "bundle": bad_input_cloud["digest"], "flower_port": port})
        error = expect(ErrorCode.CONFLICT, lambda: op.call("tasks", "start", {"task": "p1"}))
        assert str(port) in error.message
    assert op.call("tasks", "get", {"task": "p1"})["state"] == "created"


def test_device_info_with_wrong_types(bad_input_cloud: dict, client_factory: Any) -> None:
    dev = client_factory(bad_input_cloud["url"], "dev-9")
    dev.call("devices", "update_info", {"info": DEVICE_INFO})
    for bad in ({"data_quantity": "lots"}, {"memory_mb": -1}, {"packages": {"torch": 2}}, {"unknown_key": 1},
                {"data_quantity": True}, {"tasks": {"t": {"accuracy": "high"}}}, {"extra": {"blob": "x" * 70000}}):
        expect(ErrorCode.INVALID_ARGS, lambda bad=bad: dev.call("devices", "update_info", {"info": bad}))
    assert bad_input_cloud["op"].call("devices", "get_info", {"device": "dev-9"})["info"]["data_quantity"] == 150
    expect(ErrorCode.NOT_FOUND, lambda: bad_input_cloud["op"].call("devices", "get_info", {"device": "ghost"}))
    expect(ErrorCode.NOT_FOUND, lambda: client_factory(bad_input_cloud["url"], "dev-new").call("tasks", "request"))


def test_nan_and_infinity_are_refused_and_json_lists_keep_working(bad_input_cloud: dict, client_factory: Any) -> None:
    """One device's NaN (accepted over msgpack) once broke devices.list over JSON for everyone;
    Infinity in a task's args did the same to tasks.list."""
    url, digest = bad_input_cloud["url"], bad_input_cloud["digest"]
    dev = client_factory(url, "dev-nan")  # msgpack, which can carry NaN
    dev.call("devices", "update_info", {"info": DEVICE_INFO})
    expect(ErrorCode.BAD_REQUEST, lambda: dev.call("devices", "update_info",
                                                   {"info": {**DEVICE_INFO, "data_quantity": float("nan")}}))
    expect(ErrorCode.BAD_REQUEST, lambda: bad_input_cloud["op"].call("tasks", "create", {
        "name": "inf", "bundle": digest, "args": {"lr": float("inf")}}))
    conn = MqttConnection(new_client_id("json-op"), url).start()
    try:
        json_op = RpcClient(conn, "operator", codec_name="json").start()
        devices = json_op.all_items("devices", "list")
        assert [d["info"]["data_quantity"] for d in devices if d["id"] == "dev-nan"] == [150]
        assert json_op.all_items("tasks", "list") == []
    finally:
        conn.stop()


def test_the_cloud_banner_never_shows_the_broker_password(embedded_broker: Any, tmp_path: Path) -> None:
    url = embedded_broker.url.replace("mqtt://", "mqtt://cloud:hunter2-secret@")
    proc = spawn_cloud(url, tmp_path / "home", new_client_id("cloud"), tmp_path / "cloud.log")
    try:
        banner = (tmp_path / "cloud.log").read_text()
        assert "serving" in banner and " as cloud " in banner and "hunter2" not in banner, banner
    finally:
        proc.terminate()
        proc.wait(30)


def test_one_failing_criterion_never_breaks_request(bad_input_cloud: dict, client_factory: Any) -> None:
    op, digest = bad_input_cloud["op"], bad_input_cloud["digest"]
    op.call("tasks", "create", {"name": "bad", "task": "bad", "bundle": digest, "criteria": "data_quantity > 'abc'",
                                "priority": 9})
    op.call("tasks", "create", {"name": "good", "task": "good", "bundle": digest})
    for task in ("bad", "good"):
        op.call("tasks", "start", {"task": task})
    dev = client_factory(bad_input_cloud["url"], "dev-3")
    dev.call("devices", "update_info", {"info": DEVICE_INFO})
    assert [o["id"] for o in dev.call("tasks", "request")] == ["good"]


def test_presence_with_session_counter(bad_input_cloud: dict) -> None:
    cloud = bad_input_cloud["cloud"]
    raw = MqttConnection(new_client_id("raw"), bad_input_cloud["url"]).start()
    op = bad_input_cloud["op"]

    def publish(state: str, session: int) -> None:
        raw.publish(TOPICS.device_state("dev-p"), Presence(state=state, session=session).encode(), retain=True).wait_for_publish(5)

    def settle(predicate: Any) -> dict:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                row = op.call("devices", "get_info", {"device": "dev-p"})
                if predicate(row):
                    return row
            except RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError("presence did not settle")

    publish("online", 1)
    settle(lambda r: r["online"] and r["session"] == 1)
    publish("offline", 1)
    settle(lambda r: not r["online"] and r["disconnections"] == 1)
    publish("online", 2)
    settle(lambda r: r["online"] and r["session"] == 2)
    publish("offline", 1)  # the stale last will of session 1 arrives late
    raw.publish(TOPICS.device_state("dev-p"), b"garbage", retain=False).wait_for_publish(5)
    time.sleep(0.5)
    row = settle(lambda r: True)
    assert row["online"] and row["session"] == 2 and row["disconnections"] == 1
    raw.stop()
    assert cloud.registry is not None


def test_cloud_restart_keeps_state_and_fails_interrupted_tasks(mqtt_broker: Any, tmp_path: Path,
                                                                client_factory: Any) -> None:
    home = tmp_path / "cloud-home"


    def start_cloud() -> subprocess.Popen:
        return spawn_cloud(mqtt_broker.url, home, "cloud-restart", tmp_path / "cloud.log")

    cloud = start_cloud()
    try:
        op = client_factory(mqtt_broker.url)
        digest = push_folder(op, TASK).manifest.digest
        op.call("tasks", "create", {"name": "keep", "task": "keep", "bundle": digest, "criteria": "data_quantity > 1"})
        op.call("tasks", "create", {"name": "run", "task": "run", "bundle": digest})
        op.call("tasks", "start", {"task": "run"})
        dev = client_factory(mqtt_broker.url, "dev-r")
        dev.call("devices", "update_info", {"info": DEVICE_INFO})
        assert [o["id"] for o in dev.call("tasks", "request")] == ["run"]
        server_pid = next(p.pid for p in psutil.Process(cloud.pid).children(recursive=True)
                          if "ftdl.bootstrap" in " ".join(p.cmdline()))
        cloud.send_signal(signal.SIGKILL)
        cloud.wait(10)
        cloud = start_cloud()  # its Flower server ended with it (and would be killed now if not)
        task = op.call("tasks", "get", {"task": "run"}, timeout=15)
        assert task["state"] == "failed" and "interrupted" in task["last_error"]
        assert op.call("tasks", "get", {"task": "keep"})["criteria"] == "data_quantity > 1"
        assert op.call("devices", "get_info", {"device": "dev-r"})["info"]["data_quantity"] == 150
        steps = [r["step"] for r in op.call("events", "timeline", {"task": "run"})["timeline"]]
        assert steps == ["task_created", "task_started", "device_requested", "task_failed"]
        deadline = time.time() + 5
        while pid_alive(server_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not pid_alive(server_pid)
        assert op.call("tasks", "start", {"task": "run"})["run"] == 2  # the operator can run it again
    finally:
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(15)
        except subprocess.TimeoutExpired:
            cloud.kill()


def test_postgresql(embedded_broker: Any, tmp_path: Path, client_factory: Any) -> None:
    import psycopg2

    schema = f"fedmq_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE SCHEMA {schema}")
    url = f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    try:
        for round_ in range(2):  # the second start finds the schema and keeps the data
            app = CloudApp(CloudConfig(broker=embedded_broker.url, home=tmp_path / "pg", db=url, allow_unsigned=True,
                                       client_id=new_client_id("cloud-pg"))).start()
            try:
                op = client_factory(embedded_broker.url)
                if round_ == 0:
                    digest = push_folder(op, TASK).manifest.digest
                    op.call("tasks", "create", {"name": "pg", "task": "pg", "bundle": digest})
                    device = client_factory(embedded_broker.url, "dev-pg")
                    device.call("devices", "update_info", {"info": DEVICE_INFO})
                    op.call("tasks", "start", {"task": "pg"}, timeout=30)
                    # A first offer's rows and events go in as one prepared statement each
                    # (executemany through psycopg2 here).
                    assert [o["id"] for o in device.call("tasks", "request", {})] == ["pg"]
                    kinds = [e["kind"] for e in op.call("events", "list", {"task": "pg"})["items"]]
                    assert "device_requested" in kinds
                    op.call("tasks", "stop", {"task": "pg"}, timeout=30)
                else:
                    assert op.call("tasks", "get", {"task": "pg"})["name"] == "pg"
                    assert op.call("devices", "get_info", {"device": "dev-pg"})["info"]["cpu_count"] == 2
            finally:
                app.stop()
        cursor = admin.cursor()
        cursor.execute(f"SELECT max(version) FROM {schema}.schemaversion")
        assert cursor.fetchone()[0] == SCHEMA_VERSION  # every migration, once
    finally:
        admin.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def test_cli_tables(embedded_broker: Any, cloud_on: Any, client_factory: Any) -> None:
    cloud_on(embedded_broker.url)
    op = client_factory(embedded_broker.url)
    digest = push_folder(op, TASK).manifest.digest
    env = {**os.environ, "FEDMQ_BROKER": embedded_broker.url, "COLUMNS": "200"}
    run = lambda *a: subprocess.run([*FEDMQ, *a], capture_output=True, text=True, env=env, timeout=60)  # noqa: E731
    created = run("task", "create", "cli-task", "--bundle", digest, "--id", "cli-1", "--criteria", "cpu_count >= 1")
    assert created.returncode == 0, created.stderr
    client_factory(embedded_broker.url, "dev-cli").call("devices", "update_info", {"info": DEVICE_INFO})
    listed = run("task", "list")
    assert "cli-1" in listed.stdout and "created" in listed.stdout
    assert "dev-cli" in run("device", "list").stdout
    bad = run("task", "create", "x", "--bundle", digest, "--criteria", "__import__('os')")
    assert bad.returncode == 1 and "invalid_args" in bad.stderr
    assert json.loads(run("task", "get", "cli-1").stdout)["criteria"] == "cpu_count >= 1"


def test_sigterm_stops_the_cloud_and_its_flower_servers(embedded_broker: Any, tmp_path: Path,
                                                        client_factory: Any) -> None:
    cloud = spawn_cloud(embedded_broker.url, tmp_path / "h", "cloud-term", tmp_path / "cloud.log")
    op = client_factory(embedded_broker.url)
    digest = push_folder(op, TASK).manifest.digest
    op.call("tasks", "create", {"name": "t", "task": "t", "bundle": digest})
    op.call("tasks", "start", {"task": "t"})
    servers = [p.pid for p in psutil.Process(cloud.pid).children(recursive=True)
               if "ftdl.bootstrap" in " ".join(p.cmdline())]
    assert servers
    cloud.terminate()
    assert cloud.wait(30) == 0
    deadline = time.time() + 10
    while any(pid_alive(pid) for pid in servers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in servers)  # no orphaned Flower server
