"""End to end: broker, cloud and two edge agents as separate processes; real Flower training of
the digits example in child processes.  AGATA's two experiments, and outages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedmq.demo import DemoCluster, run_scenario

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(mqtt_broker: Any, tmp_path: Path) -> Iterator[DemoCluster]:
    with DemoCluster(tmp_path / "demo", mqtt_broker.url) as running:
        yield running


def first(events: list[dict], kind: str, **match: Any) -> float:
    for e in events:
        if e["kind"] == kind and all(e.get(k) == v or e["data"].get(k) == v for k, v in match.items()):
            return e["ts"]
    raise AssertionError(f"no {kind} {match} in {[(e['kind'], e['device']) for e in events]}")


def test_experiment_1_timeline_and_accuracy(cluster: DemoCluster) -> None:
    result = run_scenario(cluster, "basic", 3)
    assert result["task"]["state"] == "finished" and result["accuracy"] >= 0.90
    events = result["events"]
    created, started = first(events, "task_created"), first(events, "task_started")
    finished = first(events, "task_finished")
    rounds = [first(events, "round_done", round=r) for r in (1, 2, 3)]
    assert created <= started < rounds[0] < rounds[1] < rounds[2] <= finished
    for device in cluster.devices:
        requested = first(events, "device_requested", device=device)
        fetched = first(events, "bundle_fetched", device=device)
        client = first(events, "client_started", device=device)
        done = first(events, "client_finished", device=device)
        assert started <= requested <= fetched <= client < rounds[0] and rounds[-1] < done
    steps = [row["step"] for row in result["timeline"]]
    assert steps[0] == "task_created" and "task_finished" in steps and "round 3" in steps


def test_experiment_2_failover(cluster: DemoCluster) -> None:
    result = run_scenario(cluster, "failover", 3)
    assert result["task"]["state"] == "finished" and result["accuracy"] >= 0.90
    events = result["events"]
    for device in cluster.devices:
        error = first(events, "client_error", device=device, task="E")
        switched = first(events, "client_started", device=device, task="C")
        assert first(events, "client_started", device=device, task="E") < error < switched
        assert device in result["failover_s"]
        state = json.loads((cluster.workdir / "edges" / device / "state.json").read_text())
        assert state["quarantine"]["E"]["failures"] >= 1  # persisted
    assert not any(e["kind"] == "client_started" and e["task"] == "E" and e["ts"] > first(events, "client_started", task="C")
                   for e in events)  # nobody went back to E while quarantined


def wait_round(cluster: DemoCluster, task: str, at_least: int, timeout: float = 120) -> None:
    cluster.wait_for(lambda: (cluster.call("tasks", "get", {"task": task}, timeout=5)["round"] or 0) >= at_least,
                     timeout, f"round {at_least} of {task}")


def edge_clients(cluster: DemoCluster) -> list[int]:
    """Task client processes still running under the edge agents."""
    pids = []
    for name in cluster.devices:
        proc = cluster.procs.get(name)
        if proc is None:
            continue
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "ftdl.bootstrap" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
    return pids


def settle(cluster: DemoCluster, predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not settled: {what}")


def start_slow_task(cluster: DemoCluster, rounds: int = 8) -> None:
    cluster.wait_for(cluster.devices_online, 60, "edges online")
    digest = cluster.push("digits")
    cluster.call("tasks", "create", {"name": "slow", "task": "slow", "bundle": digest,
                                     "args": {"rounds": rounds, "delay_s": 0.6}})
    cluster.call("tasks", "start", {"task": "slow"})


def test_broker_killed_during_training(cluster: DemoCluster, mqtt_broker: Any) -> None:
    start_slow_task(cluster)
    wait_round(cluster, "slow", 2)
    if mqtt_broker.kind == "mosquitto":
        mqtt_broker.kill()
        time.sleep(1.0)
        mqtt_broker.start()
    else:
        mqtt_broker.restart()  # amqtt comes back empty: no retained messages, no sessions
    # Training goes on over gRPC; MQTT comes back; everything ends consistent.
    settle(cluster, lambda: cluster.call("tasks", "get", {"task": "slow"}, timeout=5)["state"] == "finished",
           120, "task finished after the broker came back")
    settle(cluster, cluster.devices_online, 60, "devices online again")
    settle(cluster, lambda: not edge_clients(cluster), 30, "no client left running")
    def both_finished() -> bool:  # the edges' last events travel through the broker to the cloud
        events = cluster.items("events", "list", {"task": "slow"})
        return {e["device"] for e in events if e["kind"] == "client_finished"} >= set(cluster.devices)

    settle(cluster, both_finished, 30, "both clients reported finishing")
    # The agents are usable: a new task runs to the end.
    digest = cluster.push("digits")
    cluster.call("tasks", "create", {"name": "after", "task": "after", "bundle": digest, "args": {"rounds": 2}})
    cluster.call("tasks", "start", {"task": "after"})
    assert cluster.wait_task("after", 120)["state"] == "finished"


def test_cloud_killed_during_training(cluster: DemoCluster) -> None:
    start_slow_task(cluster, rounds=40)
    wait_round(cluster, "slow", 2)
    cluster.kill("cloud")
    time.sleep(1.0)
    cluster.start_cloud()
    settle(cluster, lambda: cluster.call("tasks", "get", {"task": "slow"}, timeout=5)["state"] == "failed", 60,
           "the interrupted task marked failed")
    assert "interrupted" in cluster.call("tasks", "get", {"task": "slow"})["last_error"]
    settle(cluster, lambda: not edge_clients(cluster), 30, "the agents stopped their clients")
    settle(cluster, cluster.devices_online, 60, "devices online")
    for device in cluster.devices:  # stopped by the cloud, not a failure: not quarantined
        state = json.loads((cluster.workdir / "edges" / device / "state.json").read_text())
        assert "slow" not in state["quarantine"]
    digest = cluster.push("digits")
    cluster.call("tasks", "create", {"name": "again", "task": "again", "bundle": digest, "args": {"rounds": 2}})
    cluster.call("tasks", "start", {"task": "again"})
    final = cluster.wait_task("again", 120)
    assert final["state"] == "finished" and final["metrics"]["central_accuracy"] > 0.85


def test_the_demo_fails_fast_with_every_devices_cause(embedded_broker: Any, tmp_path: Path) -> None:
    """A task that fails on every device ends the demo within seconds, with each device's
    cause, instead of a timeout minutes later (the FileNotFoundError of a relative data path)."""
    import shutil

    from fedmq.demo import EXAMPLES, DemoError, FleetView

    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("__pycache__"))
    client = examples / "digits" / "client.py"
    client.write_text("raise FileNotFoundError(\"No such file or directory: 'data/dev-1/train.npz'\")\n"
                      + client.read_text())
    seen: list[tuple[str, str]] = []
    with DemoCluster(tmp_path / "demo", embedded_broker.url, examples=examples) as cluster:
        view = FleetView(cluster.devices, lambda device, text: seen.append((device, text)))
        started = time.monotonic()
        with pytest.raises(DemoError) as failure:
            run_scenario(cluster, "basic", 3, view)
        elapsed = time.monotonic() - started
    message = str(failure.value)
    assert message.startswith("every device failed task C")
    for device in cluster.devices:
        assert f"{device}: exit code 1: FileNotFoundError" in message
        assert any(d == device and text.startswith("failed C: exit code 1: FileNotFoundError")
                   and "quarantined until" in text for d, text in seen)
    assert elapsed < 60
