"""fedmq apply / fedmq diff: the desired state from a file, against a real cloud on the embedded
broker, with the CLI run as a person would (``python -m fedmq.cli apply fleet.toml``, from the
folder holding the file, so the relative bundle folder is tested as typed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.events import EventKind
from fedmq.broker.rpc_client import RpcClient
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.db import Deployment, Event, ModelVersion, Task
from fedmq.cloud.fleet_file import load_fleet
from fedmq.ftdl.signing import SigningKey, generate_keypair

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}, "COLUMNS": "200"}
TASK = Path(__file__).parent / "tasks" / "numpy_fl"
EXAMPLES = Path(__file__).parent.parent / "examples"

FLEET = """\
fleet = "test-fleet"

[tasks.lin-a]
name = "linreg"
bundle = "numpy_fl"
args = { rounds = 2 }
criteria = "data_quantity >= 100"
tags = ["demo"]
priority = 5
register_if = "loss < 0.5"
model_name = "linreg-model"

[tasks.lin-b]
bundle = "numpy_fl"
requirements = { memory_mb = 256 }
"""


@dataclass
class Fleet:
    url: str
    folder: Path
    app: CloudApp
    op: RpcClient

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedmq.cli", "--broker", self.url, *args], cwd=self.folder,
                              capture_output=True, text=True, timeout=120, env=ENV)

    def items_bundles(self) -> list[Any]:
        return self.op.all_items("bundles", "list", None, timeout=30)

    def write(self, text: str) -> str:
        (self.folder / "fleet.toml").write_text(text)
        return hashlib.sha256(text.encode()).hexdigest()

    def call(self, service: str, method: str, args: dict[str, Any] | None = None) -> Any:
        return self.op.call(service, method, args or {}, timeout=30)

    @staticmethod
    def task_events() -> list[Event]:
        return list(Event.select().where(Event.task.is_null(False)).order_by(Event.id))

    @staticmethod
    def summaries() -> list[Event]:
        return list(Event.select().where(Event.kind == EventKind.FLEET_APPLIED).order_by(Event.id))


@pytest.fixture
def fleet(embedded_broker: Any, tmp_path: Path) -> Iterator[Fleet]:
    folder = tmp_path / "repo"
    shutil.copytree(TASK, folder / "numpy_fl")
    app = CloudApp(CloudConfig(broker=embedded_broker.url, home=tmp_path / "cloud", client_id=new_client_id("cloud"),
                               allow_unsigned=True)).start()
    conn = MqttConnection(new_client_id("op"), embedded_broker.url).start()
    try:
        yield Fleet(embedded_broker.url, folder, app, RpcClient(conn, "operator").start())
    finally:
        conn.stop()
        app.stop()


def test_apply_twice_changes_nothing_the_second_time_and_events_carry_the_digest(fleet: Fleet) -> None:
    digest = fleet.write(FLEET)
    first = fleet.cli("apply", "fleet.toml")
    assert first.returncode == 0, first.stderr
    assert "create" in first.stdout and "lin-a" in first.stdout and "lin-b" in first.stdout
    a, b = fleet.call("tasks", "get", {"task": "lin-a"}), fleet.call("tasks", "get", {"task": "lin-b"})
    assert (a["name"], a["args"], a["criteria"], a["tags"], a["priority"], a["state"]) == \
        ("linreg", {"rounds": 2}, "data_quantity >= 100", ["demo"], 5, "created")
    assert (a["register_if"], a["model_name"]) == ("loss < 0.5", "linreg-model")
    assert b["name"] == "lin-b"  # the file's requirements over the bundle's
    assert (b["requirements"]["packages"], b["requirements"]["memory_mb"]) == (["flwr>=1.41", "numpy>=1.26"], 256)
    assert a["bundle"] == b["bundle"] and len(fleet.items_bundles()) == 1
    assert Task.get_by_id("lin-a").lifecycle["managed_by"] == "test-fleet"
    created = [e for e in fleet.task_events() if e.kind == EventKind.TASK_CREATED]
    assert {e.task for e in created} == {"lin-a", "lin-b"}
    assert all(e.data["source"] == {"file": "fleet.toml", "digest": digest} for e in created)
    summary = fleet.summaries()[-1]
    assert summary.data["source"]["digest"] == digest and summary.data["counts"] == {"create": 2}

    events_before = len(fleet.task_events())
    second = fleet.cli("apply", "fleet.toml")
    assert second.returncode == 0, second.stderr
    assert "nothing to change" in second.stderr and "create" not in second.stdout
    assert len(fleet.task_events()) == events_before  # no task event at all
    assert fleet.summaries()[-1].data["changes"] == [] and len(fleet.summaries()) == 2
    in_sync = fleet.cli("diff", "fleet.toml")
    assert in_sync.returncode == 0 and "in sync" in in_sync.stderr


def test_drift_is_shown_by_diff_and_undone_by_apply(fleet: Fleet) -> None:
    fleet.write(FLEET)
    assert fleet.cli("apply", "fleet.toml").returncode == 0
    fleet.call("tasks", "update", {"task": "lin-a", "priority": 9, "criteria": "data_quantity >= 1",
                                   "register_if": "", "model_name": "other"})
    drift = fleet.cli("diff", "fleet.toml")
    assert drift.returncode == 2, drift.stderr  # terraform plan -detailed-exitcode
    assert "update" in drift.stdout and "priority" in drift.stdout and "9 -> 5" in drift.stdout
    as_json = json.loads(fleet.cli("diff", "fleet.toml", "--output", "json").stdout)
    assert as_json == [{"action": "update", "kind": "task", "id": "lin-a",
                        "fields": {"criteria": ["data_quantity >= 1", "data_quantity >= 100"], "priority": [9, 5],
                                   "register_if": ["", "loss < 0.5"], "model_name": ["other", "linreg-model"]}}]
    restored = fleet.cli("apply", "fleet.toml")
    assert restored.returncode == 0, restored.stderr
    task = fleet.call("tasks", "get", {"task": "lin-a"})
    assert (task["priority"], task["criteria"], task["register_if"], task["model_name"]) == \
        (5, "data_quantity >= 100", "loss < 0.5", "linreg-model")
    assert Task.get_by_id("lin-a").lifecycle["managed_by"] == "test-fleet"  # the policy's update kept the mark
    assert fleet.cli("diff", "fleet.toml").returncode == 0


def test_prune_deletes_only_the_managed_tasks_the_file_dropped(fleet: Fleet) -> None:
    fleet.write(FLEET)
    assert fleet.cli("apply", "fleet.toml").returncode == 0
    digest = fleet.call("tasks", "get", {"task": "lin-a"})["bundle"]
    fleet.call("tasks", "create", {"name": "by-hand", "task": "by-hand", "bundle": digest})
    fleet.write(FLEET.split("[tasks.lin-b]", maxsplit=1)[0])
    kept = fleet.cli("apply", "fleet.toml")  # without --prune a dropped task stays
    assert kept.returncode == 0 and "nothing to change" in kept.stderr
    preview = json.loads(fleet.cli("diff", "fleet.toml", "--prune", "--output", "json").stdout)
    assert preview == [{"action": "delete", "kind": "task", "id": "lin-b", "fields": {"state": ["created", None]}}]
    pruned = fleet.cli("apply", "fleet.toml", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert {t["id"] for t in fleet.call("tasks", "list")["items"]} == {"lin-a", "by-hand"}


def test_running_and_stopped_states_start_and_stop_the_task(fleet: Fleet) -> None:
    fleet.write(FLEET.replace("priority = 5", 'priority = 5\nstate = "running"'))
    started = fleet.cli("apply", "fleet.toml", "--output", "json")
    assert started.returncode == 0, started.stderr
    actions = [(c["action"], c["id"]) for c in json.loads(started.stdout)]
    assert actions == [("create", "lin-a"), ("start", "lin-a"), ("create", "lin-b")]
    assert fleet.call("tasks", "get", {"task": "lin-a"})["state"] == "running"
    fleet.write(FLEET.replace("priority = 5", 'priority = 5\nstate = "stopped"'))
    stopped = fleet.cli("apply", "fleet.toml", "--output", "json")
    assert [(c["action"], c["fields"]) for c in json.loads(stopped.stdout)] == \
        [("stop", {"state": ["running", "stopped"]})]
    assert fleet.call("tasks", "get", {"task": "lin-a"})["state"] == "stopped"
    assert fleet.cli("diff", "fleet.toml").returncode == 0


BAD_FILES = [
    ("syntax", FLEET.replace("priority = 5", "priority = "), "fleet.toml:9:12: TOML syntax"),
    ("unknown key", FLEET.replace("priority = 5", "priority = 5\nbundel = 'x'"),
     "fleet.toml:10: tasks.lin-a.bundel: unknown key"),
    ("wrong type", FLEET.replace("priority = 5", 'priority = "high"'),
     "fleet.toml:9: tasks.lin-a.priority: Input should be a valid integer"),
    ("bad criteria", FLEET.replace('"data_quantity >= 100"', "\"__import__('os')\""),
     "fleet.toml:7: tasks.lin-a.criteria: invalid criteria"),
    ("bad model name", FLEET.replace('"linreg-model"', '"linreg:2"'),
     "fleet.toml:11: tasks.lin-a.model_name: invalid model name 'linreg:2'"),
    ("unknown state", FLEET.replace("priority = 5", 'priority = 5\nstate = "paused"'),
     "fleet.toml:10: tasks.lin-a.state: unknown state 'paused'"),
    ("bad stages", FLEET + '\n[deployments.d]\nmodel = "m:1"\nstages = [0.5]\n',
     "fleet.toml:19: deployments.d.stages: stages must end at 1.0"),
    ("no such folder", FLEET.replace('bundle = "numpy_fl"\nrequirements', 'bundle = "nope"\nrequirements'),
     "fleet.toml:14: tasks.lin-b.bundle: no task folder"),
]


def test_bad_files_name_the_line_and_change_nothing(fleet: Fleet) -> None:
    for index, (what, text, expected) in enumerate(BAD_FILES):
        fleet.write(text)
        for verb in ("apply", "diff") if index == 0 else ("apply",):  # both verbs share the check
            result = fleet.cli(verb, "fleet.toml")
            assert result.returncode == 4, (what, verb, result.stderr)
            assert expected in result.stderr, (what, verb, result.stderr)
    assert fleet.call("tasks", "list")["items"] == [] and fleet.items_bundles() == []
    assert fleet.task_events() == [] and fleet.summaries() == []


def test_the_cloud_validates_the_desired_state_again(fleet: Fleet) -> None:
    source = {"file": "fleet.toml", "digest": "0" * 64}

    def refused(desired: dict[str, Any], code: ErrorCode = ErrorCode.INVALID_ARGS) -> str:
        with pytest.raises(RpcError) as caught:
            fleet.call("fleet", "apply", {"desired": desired, "source": source})
        assert caught.value.code is code, caught.value
        return caught.value.message

    assert "tasks.x.criteria: invalid criteria" in refused({"tasks": {"x": {"bundle": "a" * 64,
                                                                           "criteria": "__import__('os')"}}})
    assert "not a bundle digest" in refused({"tasks": {"x": {"bundle": "numpy_fl"}}})
    assert "not in the cloud's store" in refused({"tasks": {"x": {"bundle": "a" * 64}}})
    assert "tasks.x.when: unknown key" in refused({"tasks": {"x": {"bundle": "a" * 64, "when": 1}}})
    assert fleet.call("tasks", "list")["items"] == []
    # A task another fleet manages is not this file's to change.
    fleet.write(FLEET)
    assert fleet.cli("apply", "fleet.toml").returncode == 0
    digest = fleet.call("tasks", "get", {"task": "lin-a"})["bundle"]
    assert "managed by fleet 'test-fleet'" in refused({"fleet": "other", "tasks": {"lin-a": {"bundle": digest}}},
                                                      ErrorCode.CONFLICT)
    # A task made by hand that a file names is adopted: managed by that fleet from now on.
    fleet.call("tasks", "create", {"name": "hand", "task": "hand", "bundle": digest})
    adopted = fleet.call("fleet", "apply", {"desired": {"fleet": "other", "tasks": {"hand": {"bundle": digest,
                                                                                             "priority": 1}}},
                                            "source": source})
    assert adopted == [{"action": "update", "kind": "task", "id": "hand",
                        "fields": {"priority": [0, 1], "managed_by": [None, "other"]}}]
    assert Task.get_by_id("hand").lifecycle == {"managed_by": "other"}


def test_the_example_fleet_file_is_valid_and_its_bundle_folder_exists() -> None:
    example = load_fleet(EXAMPLES / "fleet.toml")
    assert example.spec.tasks and all((EXAMPLES / t.bundle / "fedmq.toml").is_file()
                                      for t in example.spec.tasks.values())


def test_a_deployment_in_the_file_is_started_once_signed_and_never_changed_in_place(fleet: Fleet) -> None:
    fleet.write(FLEET)
    assert fleet.cli("apply", "fleet.toml").returncode == 0
    bundle = fleet.call("tasks", "get", {"task": "lin-a"})["bundle"]  # numpy_fl has a [deploy] entry point
    path = fleet.app.models.path("linreg-model", 1)  # a registered version, as the registry leaves one
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights " * 100)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    ModelVersion.create(name="linreg-model", version=1, task="lin-a", run=1, sha256=sha, size=800,
                        metrics={"loss": 0.1}, lineage={"revision": {"bundle": bundle}})
    conn = MqttConnection(new_client_id("dev"), fleet.url).start()
    try:
        RpcClient(conn, "dev-1").start().call("devices", "update_info", {"info": {"data_quantity": 150}})
    finally:
        conn.stop()
    key_path, _ = generate_keypair(fleet.folder.parent / "keys", "operator")
    deployment = '\n[deployments.linreg-v1]\nmodel = "linreg-model:1"\nto = "data_quantity >= 100"\n' \
                 'stages = [0.5, 1]\nhealth = "loss < 0.5"\n'
    digest = fleet.write(FLEET + deployment)
    applied = fleet.cli("apply", "fleet.toml", "--key", str(key_path), "--output", "json")
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout) == [{"action": "create", "kind": "deployment", "id": "linreg-v1", "fields": {
        "model": [None, "linreg-model:1"], "to": [None, "data_quantity >= 100"], "stages": [None, [0.5, 1.0]],
        "health": [None, "loss < 0.5"], "sha256": [None, sha]}}]
    row = Deployment.get_by_id("linreg-v1")
    assert (row.stages, row.health, row.created_by, row.key_id) == \
        ([0.5, 1.0], "loss < 0.5", "fedmq apply (test-fleet)", SigningKey.load(key_path).key_id)
    created = Event.get(Event.kind == EventKind.DEPLOYMENT_CREATED)
    assert created.data["deployment"] == "linreg-v1" and created.data["source"]["digest"] == digest
    assert fleet.cli("diff", "fleet.toml").returncode == 0  # created once: in sync whatever becomes of it
    fleet.write(FLEET + deployment.replace("[0.5, 1]", "[1.0]"))
    changed = fleet.cli("apply", "fleet.toml")
    assert changed.returncode == 1 and "not changed in place" in changed.stderr, changed.stderr
    fleet.write(FLEET + deployment.replace("linreg-v1", "linreg-v2").replace(":1", ":7"))
    unknown = fleet.cli("diff", "fleet.toml")
    assert unknown.returncode == 1 and "no model linreg-model:7 in the registry" in unknown.stderr
    assert [d.id for d in Deployment.select()] == ["linreg-v1"]
