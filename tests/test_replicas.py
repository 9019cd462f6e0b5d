"""Two ``fedmq cloud --shared-group`` replicas on a real Mosquitto (shared subscriptions) and the
machine's PostgreSQL: one answer per request, and what becomes of a running task's Flower server
when the replica that runs it stops it, is asked by the other to stop it, or dies."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_cloud import DEVICE_INFO, TASK, pid_alive, spawn_cloud
from test_security import wait_for

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.bundle_client import push_folder

REPLICAS = ("cloud-a", "cloud-b")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A schema of its own in the machine's PostgreSQL (database ``test``), dropped after."""
    import psycopg2

    schema = f"fedmq_replicas_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        admin.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture
def replicas(mosquitto_broker: Any, pg_url: str, tmp_path: Path) -> Iterator[dict[str, subprocess.Popen]]:
    procs: dict[str, subprocess.Popen] = {}
    try:
        # One after the other (the first creates the schema), sharing the database and the home
        # folder (bundles, uploads in progress, run history), as on a shared filesystem.
        for name in REPLICAS:
            procs[name] = spawn_cloud(mosquitto_broker.url, tmp_path / "home", name, tmp_path / f"{name}.log",
                                      "--shared-group", "cloud", "--db", pg_url)
        yield procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def operator(url: str) -> RpcClient:
    return RpcClient(MqttConnection(new_client_id("op"), url).start(), "operator").start()


def server_pid(cloud: subprocess.Popen) -> int:
    return next(p.pid for p in psutil.Process(cloud.pid).children(recursive=True)
                if "ftdl.bootstrap" in " ".join(p.cmdline()))


def test_two_replicas_never_both_answer_one_request(mosquitto_broker: Any, replicas: Any) -> None:
    """400 requests, each published once: every one answered exactly once, by either replica."""
    topics = Topics()
    caller = "op-count"
    answers: Counter[str] = Counter()
    served_by: Counter[int] = Counter()
    lock = threading.Lock()
    listener = MqttConnection(new_client_id("listen"), mosquitto_broker.url).start()
    sender = MqttConnection(new_client_id("send"), mosquitto_broker.url).start()
    try:
        def on_reply(message: Any) -> None:
            body, _ = codec.decode(message.payload)
            with lock:
                answers[body["id"]] += 1
                served_by[body["result"]["pid"]] += 1

        listener.subscribe(f"{topics.reply_base(caller)}/#", on_reply)
        ids = [f"r{i}" for i in range(400)]
        for request_id in ids:
            envelope = {"v": 1, "id": request_id, "method": "ping", "args": {},
                        "reply_to": f"{topics.reply_base(caller)}/inbox"}
            sender.publish(f"{topics.prefix}/rpc/tasks/ping/{caller}", codec.encode(envelope, codec.Codec.JSON), qos=1)
        wait_for(lambda: sum(answers.values()) >= len(ids))
        time.sleep(1.0)  # a second answer would arrive by now
        assert set(answers) == set(ids) and set(answers.values()) == {1}
        assert sorted(served_by) == sorted(p.pid for p in replicas.values())  # both took a share
    finally:
        listener.stop()
        sender.stop()


def owner_and_pid(op: RpcClient, replicas: dict[str, subprocess.Popen], task: str) -> tuple[str, int]:
    owner = op.call("tasks", "get", {"task": task})["owner"]
    assert owner in replicas
    return owner, server_pid(replicas[owner])


def test_a_stop_served_by_the_other_replica_stops_the_owners_server(mosquitto_broker: Any, replicas: Any,
                                                                    tmp_path: Path) -> None:
    op = operator(mosquitto_broker.url)
    try:
        digest = push_folder(op, TASK).manifest.digest
        op.call("tasks", "create", {"name": "t", "task": "t", "bundle": digest})
        op.call("tasks", "start", {"task": "t"}, timeout=30)
        owner, pid = owner_and_pid(op, replicas, "t")
        other = next(name for name in replicas if name != owner)
        # Mosquitto hands a shared subscription's messages round robin: once a ping is answered
        # by the owner, the next tasks call goes to the other replica.
        wait_for(lambda: op.call("tasks", "ping")["pid"] == replicas[owner].pid)
        assert op.call("tasks", "stop", {"task": "t"}, timeout=30)["state"] == "stopped"
        wait_for(lambda: not pid_alive(pid))
        stopped = [e for e in op.call("events", "list", {"task": "t"})["items"] if e["kind"] == "task_stopped"]
        assert [e["data"]["replica"] for e in stopped] == [other]  # the other replica served the stop
        assert op.call("tasks", "get", {"task": "t"})["owner"] is None
        assert op.call("tasks", "start", {"task": "t"}, timeout=30)["run"] == 2  # startable again
    finally:
        op.connection.stop()


def test_a_killed_replicas_running_tasks_fail_and_their_servers_end(mosquitto_broker: Any, replicas: Any) -> None:
    """Defined behaviour: the Flower server is a child of the replica that started the task (its
    owner).  SIGKILL that replica: its server ends with it (a task never outlives its supervisor),
    the survivor hears the last will and fails the task with the reason, tells its devices to
    stop, and keeps serving; the task can be started again, now on the survivor."""
    op = operator(mosquitto_broker.url)
    device = RpcClient(MqttConnection(new_client_id("dev"), mosquitto_broker.url).start(), "dev-r").start()
    try:
        digest = push_folder(op, TASK).manifest.digest
        op.call("tasks", "create", {"name": "t", "task": "t", "bundle": digest})
        op.call("tasks", "start", {"task": "t"}, timeout=30)
        device.call("devices", "update_info", {"info": DEVICE_INFO})
        assert [o["id"] for o in device.call("tasks", "request")] == ["t"]
        owner, pid = owner_and_pid(op, replicas, "t")
        survivor = next(name for name in replicas if name != owner)
        replicas[owner].send_signal(signal.SIGKILL)
        replicas[owner].wait(10)
        wait_for(lambda: not pid_alive(pid))
        task = wait_for(lambda: (t := op.call("tasks", "get", {"task": "t"}, timeout=30))["state"] == "failed" and t)
        assert f"replica {owner}" in task["last_error"] and task["owner"] is None
        failed = [e for e in op.call("events", "list", {"task": "t"})["items"] if e["kind"] == "task_failed"]
        assert len(failed) == 1  # handled once
        restarted = op.call("tasks", "start", {"task": "t"}, timeout=30)
        assert restarted["run"] == 2 and restarted["owner"] == survivor
    finally:
        device.connection.stop()
        op.connection.stop()
