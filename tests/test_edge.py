"""The edge agent's parts, and the agent in-process against a real broker and cloud."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.schema import Offer
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.edge.agent import EdgeAgent, EdgeConfig
from fedmq.edge.config import load_edge_config
from fedmq.edge.info import data_quantity, gather
from fedmq.edge.policy import at_most_one, get_policy
from fedmq.edge.state import AgentState


def test_the_agent_never_imports_torch_or_flower() -> None:
    code = ("import sys, fedmq.cli, fedmq.edge.agent, fedmq.edge.config\n"
            "heavy = [m for m in ('torch', 'flwr', 'numpy', 'sklearn', 'grpc') if m in sys.modules]\n"
            "print(heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_at_most_one() -> None:
    a, b = (Offer(id=name, name=name, revision=1, bundle="0" * 64) for name in ("a", "b"))
    offers = [a, b]
    assert at_most_one(offers, set(), set()) == [a]
    assert at_most_one(offers, set(), {"a"}) == [b]
    assert at_most_one(offers, {"x"}, set()) == []
    assert at_most_one(offers, set(), {"a", "b"}) == []
    with pytest.raises(ValueError, match="unknown policy"):
        get_policy("all_at_once")


def test_quarantine_backoff_and_persistence(tmp_path: Path) -> None:
    state = AgentState.load(tmp_path / "state.json")
    assert state.next_session() == 1 and state.next_session() == 2
    first = state.quarantine_task("E", revision=1, cause="boom", now=1000.0)
    second = state.quarantine_task("E", revision=1, cause="boom", now=1000.0)
    assert first.until == 1030.0 and second.until == 1060.0 and second.failures == 2
    assert state.blocked({"E": 1}, now=1050.0) == {"E"}
    assert state.blocked({"E": 2}, now=1050.0) == set()      # a new revision lifts it
    assert state.blocked({"E": 1}, now=1061.0) == set()      # backoff over
    reloaded = AgentState.load(tmp_path / "state.json")
    assert reloaded.session == 2 and reloaded.quarantine["E"].failures == 2
    (tmp_path / "state.json").write_text("{not json")
    damaged = AgentState.load(tmp_path / "state.json")
    assert damaged.session > 2 and damaged.quarantine == {}  # never goes backwards


def test_config_file_env_and_flags(tmp_path: Path) -> None:
    file = tmp_path / "edge.toml"
    file.write_text('device_id = "from-file"\nbroker = "mqtt://a:1"\nrecheck_interval_s = 5\n[labels]\nregion = "eu"\n')
    config = load_edge_config(file, {"broker": "mqtt://b:2", "device_id": None, "trusted_keys": []})
    assert (config.device_id, config.broker, config.recheck_interval_s) == ("from-file", "mqtt://b:2", 5)
    assert config.labels == {"region": "eu"}
    with pytest.raises(ValueError, match="device id is required"):
        load_edge_config(None, {})
    file.write_text('device_id = "x"\nbrokr = "typo"\n')
    with pytest.raises(ValueError, match="unknown edge settings"):
        load_edge_config(file, {})


def test_info_is_gathered_without_ml_imports(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"samples": 719}))
    assert data_quantity(tmp_path / "data") == 719
    (tmp_path / "files").mkdir()
    for i in range(3):
        (tmp_path / "files" / f"{i}.jpg").write_bytes(b"x")
    assert data_quantity(tmp_path / "files") == 3 and data_quantity(None) == 0
    info = gather(tmp_path / "data", tmp_path, {"region": "eu"}, {"t": {"accuracy": 0.9}}, "t")
    assert info["data_quantity"] == 719 and info["accuracy"] == 0.9 and info["current_task"] == "t"
    assert "flwr" in info["packages"] and info["cpu_count"] >= 1


@pytest.fixture
def stack(embedded_broker: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    cloud = CloudApp(CloudConfig(broker=embedded_broker.url, home=tmp_path / "cloud", client_id="cloud-edge-test",
                                 allow_unsigned=True)).start()
    config = EdgeConfig(device_id="dev-x", broker=embedded_broker.url, work_dir=tmp_path / "edge",
                        recheck_interval_s=60.0, allow_unsigned=True)
    agent = EdgeAgent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    op_conn = MqttConnection(new_client_id("op"), embedded_broker.url).start()
    op = RpcClient(op_conn, "operator").start()
    yield {"agent": agent, "op": op, "cloud": cloud, "url": embedded_broker.url}
    agent.stop()
    thread.join(20)
    op_conn.stop()
    cloud.stop()


def wait(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met")


def test_presence_births_and_last_wills_with_sessions(stack: dict[str, Any]) -> None:
    op, agent = stack["op"], stack["agent"]
    row = wait(lambda: (r := op.call("devices", "get_info", {"device": "dev-x"}))["online"] and r["info"] and r)
    session = row["session"]
    sock = agent.connection.client.socket()
    sock.shutdown(socket.SHUT_RDWR)  # the link dies: the broker publishes the last will
    row = wait(lambda: (r := op.call("devices", "get_info", {"device": "dev-x"}))["session"] > session
               and r["online"] and r)
    assert row["disconnections"] == 1 and row["info"]["cpu_count"] >= 1


def test_an_idle_agent_does_not_spin(stack: dict[str, Any]) -> None:
    agent = stack["agent"]
    wait(lambda: agent.cycles >= 1)
    time.sleep(1.0)
    before = agent.cycles
    time.sleep(3.0)
    assert agent.cycles == before  # nothing changed, nothing done


def test_a_stop_announcement_or_command_reaches_the_agent(stack: dict[str, Any], tmp_path: Path) -> None:
    """A running client is stopped when its task stops; the stop is not a failure."""
    from fedmq.cloud.bundle_client import push_folder

    op, agent = stack["op"], stack["agent"]
    task_dir = tmp_path / "sleepy"
    task_dir.mkdir()
    (task_dir / "fedmq.toml").write_text('[task]\nname = "sleepy"\n[server]\nentry = "s.py"\n[client]\nentry = "c.py"\n')
    (task_dir / "s.py").write_text("import time\ntime.sleep(600)\n")
    (task_dir / "c.py").write_text("import time\ntime.sleep(600)\n")
    digest = push_folder(op, task_dir).manifest.digest
    op.call("tasks", "create", {"name": "sleepy", "task": "sleepy", "bundle": digest})
    op.call("tasks", "start", {"task": "sleepy"})
    wait(lambda: agent.current is not None and agent.current.task == "sleepy")
    process = agent.current.process
    op.call("tasks", "stop", {"task": "sleepy"})
    outcome = process.wait(20)
    assert outcome is not None and outcome.stopped
    wait(lambda: agent.current is None)
    assert "sleepy" not in agent.state.quarantine


def test_retries_back_off_with_jitter() -> None:
    """A fleet that lost the cloud together does not come back at the same instant."""
    import random

    from fedmq.edge.agent import RETRY_MAX_S, retry_delay

    rng = random.Random(7)
    firsts = {round(retry_delay(1, rng), 3) for _ in range(50)}
    assert len(firsts) > 40 and all(0.5 <= d <= 1.0 for d in firsts)   # spread, not one value
    assert all(8 <= retry_delay(5, rng) <= 16 for _ in range(50))       # doubling
    assert all(RETRY_MAX_S / 2 <= retry_delay(40, rng) <= RETRY_MAX_S for _ in range(50))  # capped


def test_the_agent_knows_the_name_the_flower_helper_gives_a_vanished_server() -> None:
    """The agent matches the reported exception's name (it imports no Flower): the two must agree."""
    from fedmq.edge.agent import SERVER_GONE
    from fedmq.ftdl.flower import ServerGone

    assert ServerGone.__name__ == SERVER_GONE and issubclass(ServerGone, ConnectionError)
