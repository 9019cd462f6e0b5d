"""Serverless mode end to end: a real broker (the demo's embedded amqtt), a real `fedmq cloud` and
three real `fedmq edge` agents as processes, the numpy test task trained with no Flower server.
The cloud only observes: rounds, metrics, the timeline (who aggregated each round) and the final
model in the run history; a stop reaches the participants and clears the run's retained topics."""

from __future__ import annotations

import importlib.util
import io
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.topics import Topics
from fedmq.cloud.bundle_client import push_folder
from fedmq.demo import DemoCluster, DemoError

pytestmark = pytest.mark.slow
TASK = Path(__file__).parent / "tasks" / "numpy_fl"
DEVICES = ("dev-1", "dev-2", "dev-3")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    with DemoCluster(tmp_path_factory.mktemp("serverless") / "demo", devices=DEVICES) as running:
        running.wait_for(running.devices_online, 60, "three edges online")
        yield running


def start(cluster: DemoCluster, task: str, args: dict[str, Any]) -> None:
    assert cluster.operator is not None
    digest = push_folder(cluster.operator, TASK, key=cluster.key).manifest.digest
    cluster.call("tasks", "create", {"name": "linreg", "bundle": digest, "task": task, "args": args})
    cluster.call("tasks", "start", {"task": task})


def model_of(cluster: DemoCluster, task: str) -> list[np.ndarray]:
    data, offset = b"", 0
    while True:
        piece = cluster.call("tasks", "model", {"task": task, "offset": offset})
        data += piece["data"]
        offset += len(piece["data"])
        if offset >= piece["size"]:
            break
    with np.load(io.BytesIO(data)) as npz:
        return [npz[k] for k in npz.files]


def retained_under(url: str, topic_filter: str, settle_s: float = 1.5) -> list[str]:
    found: list[str] = []
    conn = MqttConnection(new_client_id("probe"), url).start()
    try:
        conn.subscribe(topic_filter, lambda m: found.append(m.topic) if m.retain and m.payload else None)
        time.sleep(settle_s)
    finally:
        conn.stop()
    return found


def test_a_serverless_task_trains_on_three_edges_and_the_cloud_records_the_run(cluster: DemoCluster) -> None:
    started = time.monotonic()
    start(cluster, "sl-1", {"mode": "serverless", "min_participants": 3, "quiet_s": 0.5})
    cluster.wait_task("sl-1", timeout=180)
    task = cluster.call("tasks", "get", {"task": "sl-1"})
    assert task["state"] == "finished", task
    assert task["flower"] is None and task["round"] == 3 and task["total_rounds"] == 3  # [server] rounds = 3

    rounds = cluster.call("tasks", "metrics", {"task": "sl-1"})["items"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for row in rounds:  # fit metrics of the round and the evaluation of its global, as in Flower mode
        assert row["fit_clients"] == 3 and row["examples"] == 600 and row["aggregator"] in DEVICES
        assert row["loss"] < 0.5 and row["r2"] > 0.9
    assert rounds[-1]["loss"] < rounds[0]["loss"]

    (w,) = model_of(cluster, "sl-1")  # the final global, saved where a Flower server saves it
    assert np.allclose(w, [2.0, -1.0, 0.5], atol=0.05)

    events = cluster.items("events", "list", {"task": "sl-1"})
    published = [e for e in events if e["kind"] == "fl_global_published"]
    assert sorted(e["data"]["round"] for e in published) == [0, 1, 2, 3, 4]  # each round once; 4: the final record
    for row in rounds:  # the metrics name the device whose fl_global_published event says it aggregated the round
        assert [e["device"] for e in published if e["data"]["round"] == row["round"]] == [row["aggregator"]]
    assert {e["device"] for e in events if e["kind"] == "fl_finished"} == set(DEVICES)
    assert all(e["run"] == 1 for e in events if e["kind"].startswith("fl_"))
    kinds = [e["kind"] for e in events]
    assert "round_done" in kinds and "server_finished" in kinds and kinds.index("task_finished") > kinds.index(
        "round_done")
    steps = [row["step"] for row in cluster.call("events", "timeline", {"task": "sl-1"})["timeline"]]
    assert [s for s in steps if s.endswith("aggregated")] == [
        "global 0 aggregated", "global 1 aggregated", "global 2 aggregated", "global 3 aggregated",
        "final 4 aggregated"]
    assert "round 3" in steps and "task_finished" in steps
    print(f"serverless run of 3 rounds on 3 edges: {time.monotonic() - started:.1f} s")


def test_stop_reaches_the_participants_and_clears_the_runs_retained_topics(cluster: DemoCluster) -> None:
    # slow rounds (a longer fit), so the devices' steps stay within the cloud's per-device event rate
    start(cluster, "sl-2", {"mode": "serverless", "min_participants": 3, "quiet_s": 0.5, "rounds": 10_000,
                            "steps": 20_000})
    cluster.wait_for(lambda: (cluster.call("tasks", "get", {"task": "sl-2"})["round"] or 0) >= 2, 120, "round 2")
    assert retained_under(cluster.url, Topics().fl_tree("sl-2"))  # records and blobs while it runs
    cluster.call("tasks", "stop", {"task": "sl-2"})
    try:
        cluster.wait_for(lambda: {e["device"] for e in cluster.items("events", "list", {"task": "sl-2"})
                                  if e["kind"] == "client_stopped"} == set(DEVICES), 60, "every client stopped")
    except DemoError as exc:  # say what each device did instead, and what its log ends with
        raise AssertionError(f"{exc}\n{devices_story(cluster, 'sl-2')}") from None
    # cleared 20 s after the end (time for the participants to stop and leave their last will)
    cluster.wait_for(lambda: not retained_under(cluster.url, Topics().fl_tree("sl-2")), 60, "the fl topics cleared")
    assert cluster.call("tasks", "get", {"task": "sl-2"})["state"] == "stopped"


def devices_story(cluster: DemoCluster, task: str) -> str:
    lines = []
    events = cluster.items("events", "list", {"task": task})
    for device in DEVICES:
        kinds = [e["kind"] for e in events if e["device"] == device and not e["kind"].startswith(("fl_", "client_r"))]
        log = (cluster.workdir / "logs" / f"{device}.log")
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        lines += [f"{device}: {kinds}", *(f"    {line}" for line in tail)]
    return "\n".join(lines)


def held_out_accuracy(examples: Path, weights: list[np.ndarray]) -> float:
    """The digits example's own evaluation on its held-out test split (what its Flower server reports)."""
    folder = str(examples / "digits")
    spec = importlib.util.spec_from_file_location("fedmq_digits_model", Path(folder) / "model.py")
    assert spec is not None and spec.loader is not None
    model = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)  # model.py imports its neighbour prepare.py, as it does in the task folder
    try:
        spec.loader.exec_module(model)
        net = model.make_model()
        model.set_weights(net, weights)
        x_test, y_test = model.test_split(0)
        return float(model.evaluate(net, x_test, y_test)[1])
    finally:
        sys.path.remove(folder)


def test_digits_learns_as_well_without_a_server_as_with_flower(cluster: DemoCluster) -> None:
    """The same bundle, data, devices and rounds in both modes; each final model (from the run
    history) scored on the held-out test split."""
    assert cluster.operator is not None
    digest = push_folder(cluster.operator, cluster.examples / "digits", key=cluster.key).manifest.digest
    accuracy, took = {}, {}
    for mode in ("flower", "serverless"):
        task, began = f"digits-{mode}", time.monotonic()
        extra = {"mode": "serverless", "quiet_s": 0.5} if mode == "serverless" else {}
        cluster.call("tasks", "create", {"name": "digits", "bundle": digest, "task": task,
                                         "args": {"rounds": 5, "min_clients": 3, **extra}})
        cluster.call("tasks", "start", {"task": task})
        cluster.wait_task(task, timeout=300)
        assert cluster.call("tasks", "get", {"task": task})["state"] == "finished"
        accuracy[mode], took[mode] = held_out_accuracy(cluster.examples, model_of(cluster, task)), time.monotonic() - began
    print("digits, 5 rounds on 3 devices:", {m: f"accuracy {accuracy[m]:.4f} in {took[m]:.1f} s" for m in accuracy})
    assert min(accuracy.values()) >= 0.90 and abs(accuracy["flower"] - accuracy["serverless"]) <= 0.02, accuracy

def test_with_dynamic_security_each_participant_connects_as_an_identity_bound_to_its_device(tmp_path: Path) -> None:
    """Mosquitto with dynamic security binds a device's credentials to the agent's one client id;
    its participant gets an identity of its own (``fl.<device>``, from ``tasks.participate``) that
    may speak on the device's fl level and nowhere else."""
    from fedmq.broker.mosquitto import MosquittoProcess
    from fedmq.broker.roles import Role
    from fedmq.cloud.app import CloudApp, CloudConfig
    from fedmq.edge.agent import EdgeAgent
    from fedmq.edge.config import EdgeConfig

    admin = ("cloud", "admin-" + uuid.uuid4().hex[:8])
    broker = MosquittoProcess(admin=admin, workdir=tmp_path / "broker").start()

    def url_of(name: str, password: str | None) -> str:
        return f"mqtt://{name}:{password}@127.0.0.1:{broker.port}"

    cloud = CloudApp(CloudConfig(broker=url_of(*admin), home=tmp_path / "cloud", client_id="fedmq-cloud",
                                 dynsec=True)).start()
    agents: list[tuple[EdgeAgent, threading.Thread]] = []
    try:
        for device in DEVICES:
            creds = cloud.identities.add(device, Role.DEVICE)
            agent = EdgeAgent(EdgeConfig(device_id=device, work_dir=tmp_path / device, allow_unsigned=True,
                                         broker=url_of(device, creds.password)))
            runner = threading.Thread(target=agent.run, daemon=True)
            runner.start()
            agents.append((agent, runner))
        cloud.tasks.create(name="linreg", folder=str(TASK), task_id="sl-d",
                           args={"mode": "serverless", "min_participants": 3, "quiet_s": 0.5})
        cloud.tasks.start("sl-d")
        deadline = time.monotonic() + 180
        while cloud.tasks.get("sl-d").state == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        task = cloud.tasks.get("sl-d")
        assert task.state == "finished" and task.current_round == 3, (task.state, task.last_error)
        assert (cloud.history.run_path("sl-d", 1) / "model.npz").is_file()
        assert {p.name for p in cloud.identities.all() if p.role == Role.PARTICIPANT} == {f"fl.{d}" for d in DEVICES}

        # what a participant's credential may do: its device's fl level, not another's
        seen: list[str] = []
        spy = MqttConnection(new_client_id("spy"), url_of(*admin)).start()
        spy.subscribe("fedmq/v1/tasks/sl-d/fl/#", lambda m: seen.append(m.topic) if not m.retain else None)
        creds = cloud.identities.for_participant("dev-1")
        assert creds.clientid is not None
        participant = MqttConnection(creds.clientid, url_of(creds.name, creds.password)).start()
        for level in ("dev-1", "dev-2"):
            participant.publish(f"fedmq/v1/tasks/sl-d/fl/{level}/update", b"x", qos=1).wait_for_publish(5)
        time.sleep(1.5)
        participant.stop()
        spy.stop()
        assert seen == ["fedmq/v1/tasks/sl-d/fl/dev-1/update"]
    finally:
        for agent, runner in agents:
            agent.stop()
            runner.join(15)
        cloud.stop()
        broker.cleanup()
