"""The Node-RED dashboards against a real broker, cloud and edges, driven in headless Chromium.

Node-RED is installed from the npm registry by the install script (``dashboards/``); screenshots
land in ``artifacts/dashboards/``."""

from __future__ import annotations

import json
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.roles import Role
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.demo import DemoCluster

from tests_support import Browser, node_red

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("npm") is None,
    reason="the dashboards' browser test needs Chromium and npm: bash scripts/install.sh --test (as root or with sudo)")]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "dashboards"

ROW = ("Array.from(document.querySelectorAll('.fedmq-tasks tr')).map(r => Array.from(r.cells).map(c => c.innerText))"
       ".find(cells => cells[0] === '{task}')")


@pytest.fixture
def fleet(mosquitto_broker: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with DemoCluster(tmp_path / "demo", mosquitto_broker.url) as cluster:
        cluster.wait_for(cluster.devices_online, 60, "edges online")
        digest = cluster.push("digits")
        cluster.call("tasks", "create", {"name": "digits", "task": "C", "bundle": digest,
                                         "args": {"rounds": 8, "delay_s": 0.8}})
        cluster.call("tasks", "create", {"name": "digits-later", "task": "D", "bundle": digest, "args": {"rounds": 2}})
        with node_red(cluster.url, "operator", tmp_path / "node-red") as (red, base):
            yield {"cluster": cluster, "url": base, "red": red}


def test_dashboards_watch_and_steer(fleet: dict[str, Any]) -> None:
    cluster, base = fleet["cluster"], fleet["url"]
    browser = Browser()
    try:
        cluster.call("tasks", "start", {"task": "C"})
        browser.goto(f"{base}/fleet")
        browser.wait_for("document.body.innerText.includes('dev-1') && document.body.innerText.includes('dev-2')"
                         " && document.body.innerText.includes('online')", 60, "the device rows")
        browser.wait_for("document.body.innerText.includes('719')", 30, "data quantity of dev-1")
        browser.screenshot(ARTIFACTS / "fleet.png")

        browser.goto(f"{base}/tasks")
        first = browser.wait_for(f"(r => r && r[2] === 'running' && /^[1-9]\\d*\\/8$/.test(r[5]) && r[5])({ROW.format(task='C')})",
                                 120, "task C running with a round count")
        browser.wait_for(f"(r => r && r[5] !== '{first}' && r[5])({ROW.format(task='C')})", 60,
                         "the round count to move on")
        browser.screenshot(ARTIFACTS / "tasks.png")

        browser.goto(f"{base}/run")
        browser.wait_for("document.querySelectorAll('canvas').length >= 2", 30, "the charts")
        browser.wait_for("document.body.innerText.includes('round_metrics') || "
                         "document.body.innerText.includes('client_round')", 60, "the event log")
        time.sleep(4)  # the charts refresh every 3 s
        browser.screenshot(ARTIFACTS / "run.png")

        browser.goto(f"{base}/tasks")
        click_start(browser, "D")  # steer: pick the created task D and press Start
        browser.wait_for("document.body.innerText.includes('ok: D is running')", 30, "the reply to Start")
        browser.wait_for(f"(r => r && r[2] === 'running')({ROW.format(task='D')})", 30, "task D running")
        browser.screenshot(ARTIFACTS / "tasks-started.png")
        assert cluster.call("tasks", "get", {"task": "D"})["state"] in ("running", "finished")

    finally:
        browser.close()


def test_a_killed_node_red_or_malformed_commands_never_harm_the_cloud(fleet: dict[str, Any]) -> None:
    cluster = fleet["cluster"]
    raw = MqttConnection(new_client_id("evil-dashboard"), cluster.url).start()
    try:
        reply = "fedmq/v1/reply/dashboard/evil"
        for topic, payload in [
            ("fedmq/v1/rpc/tasks/start/dashboard", b"\x00\xffnot json"),
            ("fedmq/v1/rpc/tasks/start/dashboard", b"[1, 2, 3]"),
            ("fedmq/v1/rpc/tasks/start/dashboard", json.dumps({"id": "1", "reply_to": reply, "args": {"task": 42}}).encode()),
            ("fedmq/v1/rpc/tasks/stop/dashboard", json.dumps({"id": "2", "reply_to": reply, "args": {"task": "nope"}}).encode()),
            ("fedmq/v1/rpc/tasks/delete/dashboard", json.dumps({"id": "3", "reply_to": "fedmq/v1/tasks/C", "args": {"task": "C"}}).encode()),
            ("fedmq/v1/rpc/tasks/start/dashboard", b"{" * 100_000),
        ]:
            raw.publish(topic, payload, qos=1).wait_for_publish(5)
        fleet["red"].send_signal(signal.SIGKILL)
        fleet["red"].wait(10)
        assert cluster.call("tasks", "ping")["pong"] is True
        assert {t["id"] for t in cluster.items("tasks", "list")} == {"C", "D"}  # nothing deleted
        assert cluster.call("tasks", "start", {"task": "D"})["state"] == "running"
        assert cluster.wait_task("D", 120)["state"] == "finished"
        assert codec.detect(b"{}") is codec.Codec.JSON
    finally:
        raw.stop()


def click_start(browser: Browser, task: str) -> None:
    browser.wait_for(ROW.format(task=task), 30, f"task {task}'s row")
    browser.js("Array.from(document.querySelectorAll('.fedmq-tasks tr')).find(r => r.cells[0] && "
               f"r.cells[0].innerText === '{task}').click()")
    browser.wait_for(f"document.body.innerText.includes('selected: {task}')", 15, "the selection")
    browser.js("document.querySelector('.fedmq-start button, button.fedmq-start').click()")


def test_dashboards_connect_with_a_viewers_own_credentials(tmp_path: Path) -> None:
    """On a broker with credentials the dashboards are an identity like any other: a viewer's
    Node-RED logs in with its password and bound client id, watches, and is refused steering."""
    admin = ("cloud", "admin-" + uuid.uuid4().hex[:8])
    with MosquittoProcess(admin=admin, workdir=tmp_path / "broker") as mosq:
        def url(name: str, password: str | None) -> str:
            return f"mqtt://{name}:{password}@127.0.0.1:{mosq.port}"

        cloud = CloudApp(CloudConfig(broker=url(*admin), home=tmp_path / "cloud", client_id="fedmq-cloud",
                                     dynsec=True, allow_unsigned=True)).start()
        conn = None
        try:
            viewer = cloud.identities.add("wall", Role.VIEWER)
            op = cloud.identities.add("alice", Role.OPERATOR)
            conn = MqttConnection(new_client_id("alice"), url("alice", op.password)).start()
            alice = RpcClient(conn, "alice").start()
            digest = push_folder(alice, Path(__file__).parent / "tasks" / "numpy_fl").manifest.digest
            alice.call("tasks", "create", {"name": "wall-test", "task": "W", "bundle": digest})
            with node_red(url("wall", viewer.password), "wall", tmp_path / "node-red") as (_red, base):
                browser = Browser()
                try:
                    browser.goto(f"{base}/tasks")
                    click_start(browser, "W")
                    browser.wait_for("document.body.innerText.includes('forbidden: wall (role viewer) may not call "
                                     "tasks.start')", 30, "the viewer's refusal")
                finally:
                    browser.close()
            assert alice.call("tasks", "get", {"task": "W"})["state"] == "created"
        finally:
            if conn is not None:
                conn.stop()
            cloud.stop()
