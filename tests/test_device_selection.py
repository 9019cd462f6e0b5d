"""Privacy mode: a task that selects on the device (``selection = "device"``).  The cloud never
evaluates its criteria; a device evaluates the retained announcement on its own facts (private
labels included, which it never reports) and takes the task up with ``tasks.join``: one row and
one event for the task it runs.  Real brokers, a real cloud, real edge agents."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import RpcError
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.cloud.fleet_file import FleetFileError, load_fleet
from fedmq.edge.agent import EdgeAgent, EdgeConfig
from fedmq.edge.config import load_edge_config

NUMPY_TASK = Path(__file__).parent / "tasks" / "numpy_fl"
DEVICE_INFO = {"data_quantity": 500, "memory_mb": 2048, "python": "3.11.9", "packages": {"numpy": "2.1.0"}}


def sleepy_task(folder: Path) -> Path:
    """A task whose client waits to be stopped: what matters here is who starts it."""
    folder.mkdir()
    (folder / "fedmq.toml").write_text('[task]\nname = "sleepy"\n[server]\nentry = "s.py"\n[client]\nentry = "c.py"\n')
    (folder / "s.py").write_text("import time\ntime.sleep(600)\n")
    (folder / "c.py").write_text("import time\ntime.sleep(600)\n")
    return folder


@pytest.fixture
def fleet(mqtt_broker: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    cloud = CloudApp(CloudConfig(broker=mqtt_broker.url, home=tmp_path / "cloud", client_id=new_client_id("cloud"),
                                 allow_unsigned=True)).start()
    conns: list[MqttConnection] = []

    def client(caller: str) -> RpcClient:
        conn = MqttConnection(new_client_id(caller), mqtt_broker.url).start()
        conns.append(conn)
        return RpcClient(conn, caller).start()

    op = client("operator")
    digest = push_folder(op, sleepy_task(tmp_path / "sleepy")).manifest.digest
    yield {"cloud": cloud, "op": op, "client": client, "digest": digest, "url": mqtt_broker.url}
    for conn in conns:
        conn.stop()
    cloud.stop()


def codes(call: Any) -> str:
    with pytest.raises(RpcError) as caught:
        call()
    return caught.value.code.value


def test_the_cloud_never_offers_a_device_selected_task_and_join_records_it_once(fleet: dict[str, Any]) -> None:
    op, digest = fleet["op"], fleet["digest"]
    created = op.call("tasks", "create", {"name": "private", "task": "private", "bundle": digest,
                                          "criteria": 'site == "clinic-7"', "selection": "device",
                                          "args": {"rounds": 2}})
    assert created["selection"] == "device"
    op.call("tasks", "create", {"name": "open", "task": "open", "bundle": digest})
    made = subprocess.run([sys.executable, "-m", "fedmq.cli", "--broker", fleet["url"], "task", "create", "later",
                           "--id", "later", "--bundle", digest, "--selection", "device", "--output", "json"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and json.loads(made.stdout)["selection"] == "device", made.stderr
    for task in ("private", "open"):
        op.call("tasks", "start", {"task": task})
    device = fleet["client"]("dev-1")
    device.call("devices", "update_info", {"info": DEVICE_INFO})

    # The cloud does not evaluate it (no site is reported): request offers only the cloud-selected task.
    assert [o["id"] for o in device.call("tasks", "request")] == ["open"]
    offer = device.call("tasks", "join", {"task": "private"})
    assert (offer["id"], offer["args"], offer["run"]) == ("private", {"rounds": 2}, 1) and offer["flower"]
    assert device.call("tasks", "join", {"task": "private"}) == offer  # a repeat writes nothing
    steps = [(row["step"], row.get("device")) for row in
             op.call("events", "timeline", {"task": "private"})["timeline"]]
    assert steps.count(("device_joined", "dev-1")) == 1 and not any(s == "device_requested" for s, _ in steps)

    # Clear refusals, nothing recorded.
    assert codes(lambda: device.call("tasks", "join", {"task": "open"})) == "invalid_args"  # selects in the cloud
    assert codes(lambda: device.call("tasks", "join", {"task": "later"})) == "conflict"     # not running
    assert codes(lambda: device.call("tasks", "join", {"task": "nope"})) == "not_found"
    assert codes(lambda: device.call("tasks", "join", {"task": 7})) == "invalid_args"
    assert codes(lambda: op.call("tasks", "join", {"task": "private"})) == "forbidden"    # an operator is no device

    # A stop reaches the device that joined (its row is an offer like any other).
    assert fleet["cloud"].selection.take_active("private") == ["dev-1"]


@contextmanager
def edges(url: str, work: Path, sites: dict[str, str]) -> Iterator[dict[str, EdgeAgent]]:
    """Real edge agents in this process, each with a private site and a public region."""
    agents = {name: EdgeAgent(EdgeConfig(device_id=name, broker=url, work_dir=work / name, allow_unsigned=True,
                                         private_labels={"site": site}, labels={"region": "eu"}))
              for name, site in sites.items()}
    threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents.values()]
    for thread in threads:
        thread.start()
    try:
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()
        for thread in threads:
            thread.join(20)


def until(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.time() + timeout
    while not (value := predicate()):
        assert time.time() < deadline, what
        time.sleep(0.1)
    return value


def test_edges_decide_on_facts_that_never_leave_them(fleet: dict[str, Any], tmp_path: Path) -> None:
    op = fleet["op"]
    with edges(fleet["url"], tmp_path, {"dev-in": "clinic-7", "dev-out": "clinic-9"}) as agents:
        op.call("tasks", "create", {"name": "private", "task": "private", "bundle": fleet["digest"],
                                    "criteria": 'site == "clinic-7" and region == "eu"', "selection": "device"})
        op.call("tasks", "start", {"task": "private"})
        until(lambda: agents["dev-in"].current is not None, "the eligible device never started the task")
        assert agents["dev-in"].current.task == "private"
        time.sleep(2.0)  # the other device had the same announcement as long
        assert agents["dev-out"].current is None
        timeline = op.call("events", "timeline", {"task": "private"})["timeline"]
        assert {row.get("device") for row in timeline if row["step"] == "device_joined"} == {"dev-in"}
        for name in agents:  # the private label was never reported; the public one was
            info = op.call("devices", "get_info", {"device": name})["info"]
            assert info["labels"] == {"region": "eu"} and "clinic" not in repr(info)


def test_a_device_selected_flower_task_trains_on_exactly_the_eligible_devices(fleet: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    """Real Flower rounds over gRPC on loopback, with the cohort chosen by the devices themselves."""
    op = fleet["op"]
    digest = push_folder(op, NUMPY_TASK).manifest.digest
    op.call("tasks", "create", {"name": "linreg", "task": "linreg", "bundle": digest, "selection": "device",
                                "criteria": 'site == "clinic-7"', "args": {"rounds": 2, "min_clients": 2}})
    with edges(fleet["url"], tmp_path, {"dev-a": "clinic-7", "dev-b": "clinic-7", "dev-c": "clinic-9"}):
        op.call("tasks", "start", {"task": "linreg"})
        task = until(lambda: (t := op.call("tasks", "get", {"task": "linreg"}))["state"] != "running" and t,
                     "the task never ended", timeout=120)
    assert task["state"] == "finished" and task["round"] == 2, task
    run = op.call("tasks", "run", {"task": "linreg"})
    assert sorted(run["cohort"]) == ["dev-a", "dev-b"], run
    assert run["revision"]["selection"] == "device"  # the run's record says how its cohort was chosen


def test_private_labels_come_from_the_config_file(tmp_path: Path) -> None:
    file = tmp_path / "edge.toml"
    file.write_text('device_id = "d"\n[labels]\nregion = "eu"\n[private_labels]\nsite = "clinic-7"\n')
    config = load_edge_config(file, {})
    assert (config.labels, config.private_labels) == ({"region": "eu"}, {"site": "clinic-7"})


def test_a_fleet_file_says_where_a_task_selects(tmp_path: Path) -> None:
    file = tmp_path / "fleet.toml"
    file.write_text('[tasks.private]\nbundle = "' + "a" * 64 + '"\nselection = "device"\n')
    assert str(load_fleet(file).spec.tasks["private"].selection) == "device"
    file.write_text('[tasks.private]\nbundle = "' + "a" * 64 + '"\nselection = "sideways"\n')
    with pytest.raises(FleetFileError, match=r"fleet.toml:3: .*unknown selection 'sideways'"):
        load_fleet(file)
