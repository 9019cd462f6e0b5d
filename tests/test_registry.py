"""The model registry end to end: a real broker (the demo's embedded amqtt), a real `fedmq cloud`
and two real `fedmq edge` agents as processes, the numpy test task.  Finished runs are registered
as NAME:VERSION by RPC and by the `fedmq model` command as a person types it; a task's
register_if decides on its own runs (Flower and serverless), with the reason in an event."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.bundle_client import push_folder
from fedmq.demo import DemoCluster

pytestmark = pytest.mark.slow
TASK = Path(__file__).parent / "tasks" / "numpy_fl"
QUICK = {"rounds": 2}  # two rounds of the numpy task: a few seconds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    with DemoCluster(tmp_path_factory.mktemp("registry") / "demo") as running:  # dev-1, dev-2
        running.wait_for(running.devices_online, 60, "two edges online")
        yield running


@pytest.fixture(scope="module")
def bundle(cluster: DemoCluster) -> str:
    assert cluster.operator is not None
    return push_folder(cluster.operator, TASK, key=cluster.key).manifest.digest


def run_once(cluster: DemoCluster, task: str) -> None:
    cluster.call("tasks", "start", {"task": task})
    assert cluster.wait_task(task, timeout=180)["state"] == "finished"


def fedmq(cluster: DemoCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    """The command line, as a stranger types it."""
    return subprocess.run([sys.executable, "-m", "fedmq.cli", "--broker", cluster.url, *argv],
                          capture_output=True, text=True, timeout=90)


def read_all(cluster: DemoCluster, service: str, method: str, args: dict[str, Any], size: int) -> tuple[bytes, str]:
    data, offset, digest = b"", 0, ""
    while True:
        piece = cluster.call(service, method, {**args, "offset": offset, "size": size})
        digest = digest or piece["sha256"]
        data += piece["data"]
        offset += len(piece["data"])
        if offset >= piece["size"]:
            return data, digest


def events_of(cluster: DemoCluster, task: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in cluster.items("events", "list", {"task": task}) if e["kind"] == kind]


def rpc_error(cluster: DemoCluster, service: str, method: str, args: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as err:
        cluster.call(service, method, args)
    return err.value


def test_runs_register_by_rpc_and_by_the_command_line_as_versions_one_and_two(cluster: DemoCluster,
                                                                            bundle: str) -> None:
    cluster.call("tasks", "create", {"name": "linreg", "bundle": bundle, "task": "reg", "args": QUICK})
    run_once(cluster, "reg")
    first = cluster.call("models", "register", {"task": "reg", "run": 1, "name": "linreg", "note": "first"})
    assert (first["name"], first["version"], first["task"], first["run"], first["created"]) == \
        ("linreg", 1, "reg", 1, True)
    assert first["created_by"] == "operator" and first["note"] == "first" and first["metrics"]["r2"] > 0.9
    again = cluster.call("models", "register", {"task": "reg", "run": 1, "name": "linreg"})  # a retry
    assert (again["version"], again["created"]) == (1, False)

    # the model's bytes are the run's, and its sha256 is theirs (read in small pieces: offsets count)
    run_bytes, run_sha = read_all(cluster, "tasks", "model", {"task": "reg", "run": 1}, 128 * 1024)
    model_bytes, model_sha = read_all(cluster, "models", "artifact", {"name": "linreg", "version": 1}, 100)
    assert model_bytes == run_bytes and len(model_bytes) > 100
    assert model_sha == run_sha == first["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert first["size"] == len(model_bytes)

    # a new revision, a second run, registered from the command line (TASK:RUN), twice
    cluster.call("tasks", "update", {"task": "reg", "args": {**QUICK, "steps": 30}})
    run_once(cluster, "reg")
    typed = fedmq(cluster, "model", "register", "reg:2", "--name", "linreg")
    assert typed.returncode == 0, typed.stderr
    assert "reg:2 registered linreg:2" in typed.stderr and "linreg:2" in typed.stdout
    typed = fedmq(cluster, "model", "register", "reg:2", "--name", "linreg")
    assert typed.returncode == 0 and "reg:2 already registered as linreg:2" in typed.stderr, typed.stderr
    assert [e["data"]["version"] for e in events_of(cluster, "reg", "model_registered")] == [1, 2]  # not 4

    listed = fedmq(cluster, "model", "list")
    assert listed.returncode == 0, listed.stderr
    assert "linreg:1" in listed.stdout and "linreg:2" in listed.stdout and "first" in listed.stdout
    assert [(m["name"], m["version"]) for m in cluster.items("models", "list", {"name": "linreg"})] == \
        [("linreg", 1), ("linreg", 2)]

    shown = cluster.call("models", "show", {"name": "linreg"})  # the latest, with its lineage
    assert shown["version"] == 2 and shown["lineage"]["run"] == 2 and shown["lineage"]["state"] == "finished"
    assert shown["lineage"]["revision"]["args"]["steps"] == 30 and shown["lineage"]["revision"]["bundle"] == bundle
    assert shown["lineage"]["cohort"] == ["dev-1", "dev-2"] and set(shown["lineage"]["data"]) == {"dev-1", "dev-2"}
    assert shown["lineage"]["model"]["sha256"] == shown["sha256"]
    typed = fedmq(cluster, "model", "show", "linreg:2")
    assert typed.returncode == 0, typed.stderr
    assert "reg:2" in typed.stdout and shown["sha256"] in typed.stdout and "r2" in typed.stdout
    assert "dev-1" in typed.stdout and "dev-2" in typed.stdout

    diff = cluster.call("models", "diff", {"name": "linreg", "a": 1, "b": 2})
    assert diff["lineage"]["run"] == [1, 2] and diff["lineage"]["revision.revision"] == [1, 2]
    assert diff["lineage"]["revision.args.steps"] == [None, 30]
    assert "started" not in diff["lineage"] and "revision.bundle" not in diff["lineage"]  # times, what is equal
    assert not diff["same_model"] and set(diff["metrics"]) >= {"loss", "r2"}
    typed = fedmq(cluster, "model", "diff", "linreg:1", "linreg:2")
    assert typed.returncode == 0, typed.stderr
    assert "revision.args.steps" in typed.stdout and "30" in typed.stdout and "r2" in typed.stdout


def test_register_if_decides_when_a_run_finishes_serverless_or_flower_and_says_why(cluster: DemoCluster,
                                                                                 bundle: str) -> None:
    # serverless: the final model comes from the participants; r2 is well above 0.9 -> registered
    created = cluster.call("tasks", "create", {
        "name": "linreg", "bundle": bundle, "task": "pol-yes", "register_if": "r2 >= 0.9 and loss < 0.5",
        "model_name": "linreg-auto", "args": {**QUICK, "mode": "serverless", "min_participants": 2, "quiet_s": 0.5}})
    assert created["register_if"] == "r2 >= 0.9 and loss < 0.5" and created["model_name"] == "linreg-auto"
    typed = fedmq(cluster, "task", "get", "pol-yes", "--output", "table")
    assert "r2 >= 0.9 and loss < 0.5 -> linreg-auto" in typed.stdout, typed.stdout
    run_once(cluster, "pol-yes")
    (event,) = cluster.wait_for(lambda: events_of(cluster, "pol-yes", "model_registered"), 30, "the registration")
    assert (event["data"]["name"], event["data"]["version"], event["run"]) == ("linreg-auto", 1, 1)
    assert event["data"]["by"] == "policy" and event["data"]["register_if"] == "r2 >= 0.9 and loss < 0.5"
    reason = event["data"]["reason"]
    assert re.fullmatch(r"r2 [0-9.]+ >= 0\.9 and loss [0-9.e-]+ < 0\.5", reason), reason  # the values that decided
    version = cluster.call("models", "show", {"name": "linreg-auto", "version": 1})
    assert version["created_by"] == "policy" and version["lineage"]["revision"]["mode"] == "serverless"
    model_bytes, _ = read_all(cluster, "models", "artifact", {"name": "linreg-auto"}, 128 * 1024)
    assert hashlib.sha256(model_bytes).hexdigest() == version["sha256"]

    # Flower: a bar the run cannot reach -> not registered, and the event says by how much
    cluster.call("tasks", "create", {"name": "linreg", "bundle": bundle, "task": "pol-no", "args": QUICK,
                                     "register_if": "loss < 0.000001"})
    run_once(cluster, "pol-no")
    (event,) = cluster.wait_for(lambda: events_of(cluster, "pol-no", "model_not_registered"), 30, "the decision")
    assert event["data"]["name"] == "linreg" and event["data"]["register_if"] == "loss < 0.000001"
    assert re.fullmatch(r"loss [0-9.e-]+ >= 1e-06", event["data"]["reason"]), event["data"]
    assert not events_of(cluster, "pol-no", "model_registered")
    assert not cluster.items("models", "list", {"name": "linreg"}) or all(
        m["task"] != "pol-no" for m in cluster.items("models", "list", {"name": "linreg"}))

    # the policy changes with the task (a new revision); "" turns it off
    updated = cluster.call("tasks", "update", {"task": "pol-no", "register_if": "loss < 1", "model_name": "lr"})
    assert (updated["register_if"], updated["model_name"]) == ("loss < 1", "lr")
    updated = cluster.call("tasks", "update", {"task": "pol-no", "register_if": ""})
    assert updated["register_if"] is None and updated["model_name"] == "lr"


def test_refusals_say_what_is_wrong(cluster: DemoCluster, bundle: str) -> None:
    assert rpc_error(cluster, "models", "register", {"task": "nope", "name": "m"}).code is ErrorCode.NOT_FOUND
    cluster.call("tasks", "create", {"name": "linreg", "bundle": bundle, "task": "err", "args": {"rounds": 1}})
    assert "has not run yet" in rpc_error(cluster, "models", "register", {"task": "err", "name": "m"}).message
    run_once(cluster, "err")
    error = rpc_error(cluster, "models", "register", {"task": "err", "run": 9, "name": "m"})
    assert error.code is ErrorCode.NOT_FOUND and "no run 9" in error.message
    assert rpc_error(cluster, "models", "register", {"task": "err", "name": "a:b"}).code is ErrorCode.INVALID_ARGS
    assert rpc_error(cluster, "models", "show", {"name": "never"}).code is ErrorCode.NOT_FOUND

    # a run that saved no model (its file gone from the cloud host)
    (cluster.workdir / "cloud" / "runs" / "err" / "1" / "model.npz").unlink()
    error = rpc_error(cluster, "models", "register", {"task": "err", "name": "m"})
    assert error.code is ErrorCode.NOT_FOUND and "saved no model" in error.message

    # a run still going, then stopped: not finished
    cluster.call("tasks", "create", {"name": "linreg", "bundle": bundle, "task": "long", "args": {"rounds": 10_000}})
    cluster.call("tasks", "start", {"task": "long"})
    error = rpc_error(cluster, "models", "register", {"task": "long", "name": "m"})
    assert error.code is ErrorCode.CONFLICT and "has not finished (it is running)" in error.message
    cluster.call("tasks", "stop", {"task": "long"})
    assert "(it is stopped)" in rpc_error(cluster, "models", "register", {"task": "long", "name": "m"}).message

    # a bad register_if is refused when the task is made or changed, and nothing is made
    error = rpc_error(cluster, "tasks", "create", {"name": "linreg", "bundle": bundle, "task": "bad",
                                                   "register_if": "accuracy >= "})
    assert error.code is ErrorCode.INVALID_ARGS and error.message.startswith("register_if: invalid criteria at")
    assert rpc_error(cluster, "tasks", "get", {"task": "bad"}).code is ErrorCode.NOT_FOUND
    error = rpc_error(cluster, "tasks", "update", {"task": "err", "register_if": "__import__('os')"})
    assert error.code is ErrorCode.INVALID_ARGS and "register_if" in error.message
    error = rpc_error(cluster, "tasks", "create", {"name": "lin reg", "bundle": bundle, "task": "sp",
                                                   "register_if": "loss < 1"})
    assert error.code is ErrorCode.INVALID_ARGS and "give model_name" in error.message

    # the command line: the service's refusal exits 1, a malformed TASK:RUN is a usage error
    typed = fedmq(cluster, "model", "register", "nope:1", "--name", "m")
    assert typed.returncode == 1 and "not_found" in typed.stderr, typed.stderr
    typed = fedmq(cluster, "model", "register", "err:abc", "--name", "m")
    assert typed.returncode == 2 and "RUN a number" in typed.stderr, typed.stderr

    # a device may neither register nor read the registry
    connection = MqttConnection(new_client_id("dev-1"), cluster.url).start()
    try:
        device = RpcClient(connection, "dev-1").start()
        for method, args in (("register", {"task": "reg", "name": "m"}), ("list", {})):
            with pytest.raises(RpcError) as err:
                device.call("models", method, args, timeout=10)
            assert err.value.code is ErrorCode.FORBIDDEN and f"may not call models.{method}" in err.value.message
    finally:
        connection.stop()
