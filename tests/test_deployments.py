"""Deployments, the cloud's side, over a real broker with real credentials: a ``CloudApp`` on the
embedded broker with dynamic security, an operator, and devices that are plain MQTT connections
with device credentials -- each subscribes to its retained ``devices/<d>/models`` record, fetches
the model file from its retained chunks and answers ``deployments.report`` over RPC, as the edge
does, so these tests do not depend on the edge's code.  docs/lifecycle.md ("Deployments") is the
prose of this file."""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.connection import MqttConnection
from fedmq.broker.dynamic_security import DynamicSecurity
from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.roles import Role
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.schema import DesiredModels, ModelManifest
from fedmq.broker.topics import Topics
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.cloud.db import DeviceModel, Event, ModelVersion
from fedmq.cloud.deployments import COMPONENT
from fedmq.ftdl.chunks import ChunkFetch, wait_retained
from fedmq.ftdl.signing import SigningKey, TrustStore, generate_keypair

TOPICS = Topics()
TASK = Path(__file__).parent / "tasks" / "numpy_fl"
ADMIN = ("cloud", "admin-" + uuid.uuid4().hex[:8])
HEALTH = "accuracy >= 0.85"


@dataclass
class FakeDevice:
    """A device as the cloud sees one: its credentials, its retained record, its reports."""

    name: str
    url: str
    clientid: str
    records: queue.Queue[DesiredModels] = field(default_factory=queue.Queue)
    connection: MqttConnection | None = None
    rpc: RpcClient | None = None

    def connect(self) -> FakeDevice:
        self.connection = MqttConnection(self.clientid, self.url).start(timeout=5)
        self.rpc = RpcClient(self.connection, self.name).start()
        self.connection.subscribe(TOPICS.device_models(self.name), self._on_record, qos=1)
        return self

    def _on_record(self, message: Any) -> None:
        if message.payload:
            self.records.put(DesiredModels.decode(bytes(message.payload)))

    def disconnect(self) -> None:
        if self.connection is not None:
            self.connection.stop()
            self.connection = None

    def call(self, method: str, **args: Any) -> Any:
        assert self.rpc is not None
        return self.rpc.call("deployments", method, args, timeout=10)

    def record(self, wanted: Any = None, timeout: float = 10.0) -> DesiredModels:
        """The next record that satisfies ``wanted`` (a version of the model, or None: any)."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                record = self.records.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(record)
            if wanted is None or wanted(record):
                return record
        raise AssertionError(f"{self.name}: no matching record in {timeout} s; saw {seen}")

    def no_record(self, within: float = 0.5) -> None:
        try:
            extra = self.records.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"{self.name} got an unexpected record {extra}")

    def report(self, deployment: str, name: str, version: int, ok: bool = True, error: str | None = None,
               **metrics: Any) -> dict[str, Any]:
        return self.call("report", deployment=deployment, name=name, version=version, ok=ok, metrics=metrics,
                         error=error)


def runs(name: str, version: int | None) -> Any:
    def check(record: DesiredModels) -> bool:
        entry = record.models.get(name)
        return (entry.version if entry else None) == version
    return check


@dataclass
class Fleet:
    broker: EmbeddedBroker
    home: Path
    key: SigningKey
    trusted: Path
    cloud: CloudApp
    operator: RpcClient
    devices: list[FakeDevice] = field(default_factory=list)
    connections: list[MqttConnection] = field(default_factory=list)
    operator_url: str = ""
    key_path: Path | None = None

    def url_of(self, name: str, password: str | None) -> str:
        return f"mqtt://{name}:{password}@127.0.0.1:{self.broker.port}"

    def start_cloud(self) -> CloudApp:
        self.cloud = CloudApp(CloudConfig(broker=self.url_of(*ADMIN), home=self.home, client_id="fedmq-cloud",
                                          dynsec=True, trusted_keys=[self.trusted])).start()
        return self.cloud

    def op(self, method: str, **args: Any) -> Any:
        return self.operator.call("deployments", method, args, timeout=15)

    def new_devices(self, group: str, count: int) -> list[FakeDevice]:
        """``count`` devices labelled ``group``, connected, with their info reported."""
        made = []
        for index in range(count):
            name = f"{group}-{index}"
            creds = self.cloud.identities.add(name, Role.DEVICE)
            device = FakeDevice(name, self.url_of(name, creds.password), creds.clientid or name).connect()
            assert device.rpc is not None
            device.rpc.call("devices", "update_info", {"info": {"labels": {"group": group}}})
            self.devices.append(device)
            made.append(device)
        return made

    def register(self, name: str, version: int, bundle: str = "b" * 64) -> ModelVersion:
        """A registered model version, as the registry leaves one: the row and its file."""
        path = self.cloud.models.path(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"weights of {name}:{version} ".encode() * 500
        path.write_bytes(data)
        return ModelVersion.create(name=name, version=version, task="trainer", run=version,
                                   sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                                   metrics={"accuracy": 0.9}, lineage={"revision": {"bundle": bundle}})

    def deploy(self, name: str, version: int, group: str, **args: Any) -> dict[str, Any]:
        sha = ModelVersion.get((ModelVersion.name == name) & (ModelVersion.version == version)).sha256
        from fedmq.ftdl.signing import model_signing_message

        signature = self.key.sign(model_signing_message(name, version, sha))
        args.setdefault("health", HEALTH)
        return self.op("create", name=name, version=version, to=f"group == {group!r}", signature=signature,
                       key_id=self.key.key_id, **args)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("deployments")
    broker = EmbeddedBroker(security=DynamicSecurity(*ADMIN)).start()
    key_path, pub = generate_keypair(tmp / "keys", "operator")
    setup = Fleet(broker, tmp / "cloud", SigningKey.load(key_path), pub, None, None)  # type: ignore[arg-type]
    setup.start_cloud()
    creds = setup.cloud.identities.add("alice", Role.OPERATOR)
    conn = MqttConnection(creds.clientid or "fedmq-alice", setup.url_of("alice", creds.password)).start(timeout=5)
    setup.connections.append(conn)
    setup.operator = RpcClient(conn, "alice").start()
    setup.operator_url, setup.key_path = setup.url_of("alice", creds.password), key_path
    try:
        yield setup
    finally:
        for device in setup.devices:
            device.disconnect()
        for connection in setup.connections:
            connection.stop()
        setup.cloud.stop()
        broker.stop()


def kinds(deployment: dict[str, Any]) -> list[str]:
    return [step["kind"].removeprefix("deployment_") for step in deployment["timeline"]]


def wait_state(fleet: Fleet, deployment: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = fleet.op("get", deployment=deployment)
        if found["state"] == state:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{deployment} is {found['state']}, not {state}: {found['timeline']}")


def fetch_model(device: FakeDevice, sha256: str) -> bytes:
    """What the edge does: the retained manifest, then the chunks, verified."""
    assert device.connection is not None
    payload = wait_retained(device.connection, TOPICS.model_blob(sha256), 5)
    assert payload is not None, "no manifest on the broker"
    manifest = ModelManifest.decode(payload)
    data = ChunkFetch(device.connection, lambda i: TOPICS.model_blob(sha256, i), manifest.chunks).wait(10)
    assert hashlib.sha256(data).hexdigest() == sha256
    return data


def test_stages_advance_on_healthy_reports(fleet: Fleet) -> None:
    devices = fleet.new_devices("adv", 4)
    model = fleet.register("adv-model", 1)
    created = fleet.deploy("adv-model", 1, "adv", stages=[0.25, 0.5, 1.0], max_failure_rate=0.0)
    deployment = created["id"]
    assert created["state"] == "running" and created["stage"] == 1 and created["devices"] == {"sent": 1, "pending": 3}
    # Stage 1: the first device by id (none is online), with the signed identity and the code to serve it.
    record = devices[0].record(runs("adv-model", 1))
    entry = record.models["adv-model"]
    assert (entry.sha256, entry.size, entry.bundle, entry.deployment) == (model.sha256, model.size, "b" * 64, deployment)
    TrustStore.from_paths([fleet.trusted]).verify_model("adv-model", 1, entry.sha256, entry.key_id, entry.signature)
    assert fetch_model(devices[0], entry.sha256) == fleet.cloud.models.path("adv-model", 1).read_bytes()
    for device in devices[1:]:
        device.no_record(within=0.2)
    answer = devices[0].report(deployment, "adv-model", 1, accuracy=0.93, loss=0.2)
    assert answer["healthy"] and answer["reason"] == "loaded, accuracy 0.93 >= 0.85"
    # Stage 2 (50% of 4 = 2): one more device; stage 3 the other two.
    devices[1].record(runs("adv-model", 1))
    devices[1].report(deployment, "adv-model", 1, accuracy=0.9)
    for device in devices[2:]:
        device.record(runs("adv-model", 1))
        device.report(deployment, "adv-model", 1, accuracy=0.88)
    done = wait_state(fleet, deployment, "completed")
    assert kinds(done) == ["created", "stage_started", "device_reported", "stage_passed", "stage_started",
                           "device_reported", "stage_passed", "stage_started", "device_reported", "device_reported",
                           "stage_passed", "completed"]
    assert all(step["reason"] for step in done["timeline"])
    assert "stage 3 of 3: 0 of 2 unhealthy; failure rate 0.00 <= 0.00" in done["timeline"][-2]["reason"]
    assert [(d["device"], d["stage"], d["state"]) for d in done["devices_detail"]] == \
        [("adv-0", 1, "healthy"), ("adv-1", 2, "healthy"), ("adv-2", 3, "healthy"), ("adv-3", 3, "healthy")]
    # A retried report (its answer lost) is answered the same and recorded once.
    again = devices[0].report(deployment, "adv-model", 1, accuracy=0.93, loss=0.2)
    assert again["healthy"] and again["recorded"] is False
    assert len(fleet.op("get", deployment=deployment)["timeline"]) == len(done["timeline"])
    listed = fleet.operator.all_items("deployments", "list", {"name": "adv-model"})
    assert [(d["id"], d["state"], d["devices"]) for d in listed] == [(deployment, "completed", {"healthy": 4})]


def test_an_unhealthy_stage_rolls_back_only_the_devices_that_took_it(fleet: Fleet) -> None:
    devices = fleet.new_devices("rb", 4)
    v1, v2 = fleet.register("rb-model", 1), fleet.register("rb-model", 2)
    first = fleet.deploy("rb-model", 1, "rb")["id"]
    for device in devices:
        device.record(runs("rb-model", 1))
        device.report(first, "rb-model", 1, accuracy=0.9)
    wait_state(fleet, first, "completed")
    second = fleet.deploy("rb-model", 2, "rb", stages=[0.5, 1.0], max_failure_rate=0.0)["id"]
    for device in devices[:2]:
        device.record(runs("rb-model", 2))
    devices[0].report(second, "rb-model", 2, accuracy=0.91)
    answer = devices[1].report(second, "rb-model", 2, accuracy=0.41)
    assert not answer["healthy"] and answer["reason"] == "accuracy 0.41 < 0.85" and answer["state"] == "rolled_back"
    # Both devices of stage 1 are told to go back to version 1 (with its own deployment and signature)...
    for device in devices[:2]:
        back = device.record(runs("rb-model", 1)).models["rb-model"]
        assert back.deployment == first and back.sha256 == v1.sha256 and back.signature
    # ... and the two that never took version 2 hear nothing.
    for device in devices[2:]:
        device.no_record(within=0.3)
    rolled = fleet.op("get", deployment=second)
    assert rolled["state"] == "rolled_back"
    decision = rolled["timeline"][-1]
    assert decision["kind"] == "deployment_rolled_back"
    assert decision["reason"] == ("stage 1 of 2: 1 of 2 unhealthy (accuracy 0.41 < 0.85); "
                                  "failure rate 0.50 > 0.00")
    assert sorted(decision["data"]["devices"]) == ["rb-0", "rb-1"] and decision["data"]["automatic"]
    assert {d["device"]: d["state"] for d in rolled["devices_detail"]} == \
        {"rb-0": "rolled_back", "rb-1": "rolled_back", "rb-2": "pending", "rb-3": "pending"}
    # Version 2's file left the broker with the last reference to it; version 1's stays.
    assert devices[0].connection is not None
    assert wait_retained(devices[0].connection, TOPICS.model_blob(v2.sha256), 0.5) is None
    assert wait_retained(devices[0].connection, TOPICS.model_blob(v1.sha256), 2) is not None
    # The device back on version 1 says so; the report is taken for what it is.
    back = devices[1].report(second, "rb-model", 1)
    assert back["reason"] == "back on rb-model:1 after the rollback"


def test_a_silent_device_counts_as_failed_at_the_stage_timeout(fleet: Fleet) -> None:
    talking, silent = fleet.new_devices("quiet", 2)
    fleet.register("quiet-model", 1)
    deployment = fleet.deploy("quiet-model", 1, "quiet", stage_timeout_s=1.5, max_failure_rate=0.4)["id"]
    talking.record(runs("quiet-model", 1))
    silent.record(runs("quiet-model", 1))
    talking.report(deployment, "quiet-model", 1, accuracy=0.95)
    assert fleet.op("get", deployment=deployment)["state"] == "running"  # one still to hear from
    rolled = wait_state(fleet, deployment, "rolled_back", timeout=10)
    silence = next(s for s in rolled["timeline"] if s["kind"] == "deployment_device_reported" and
                   s["device"] == silent.name)
    assert silence["reason"] == "silent: no report within the stage timeout of 1.5 s"
    assert rolled["reason"].startswith("stage 1 of 1: 1 of 2 unhealthy (silent: no report") and \
        rolled["reason"].endswith("failure rate 0.50 > 0.40")
    # Neither had a version before: both are told to run none of that name.
    for device in (talking, silent):
        assert device.record(runs("quiet-model", None)).models == {}
    late = silent.report(deployment, "quiet-model", 1, accuracy=0.99)
    assert late["recorded"] is False and late["reason"].startswith("silent")


def test_pause_resume_and_manual_rollback(fleet: Fleet) -> None:
    first, second = fleet.new_devices("pause", 2)
    fleet.register("pause-model", 1)
    deployment = fleet.deploy("pause-model", 1, "pause", stages=[0.5, 1.0])["id"]
    first.record(runs("pause-model", 1))
    assert fleet.op("pause", deployment=deployment)["state"] == "paused"
    answer = first.report(deployment, "pause-model", 1, accuracy=0.97)
    assert answer["recorded"] and answer["state"] == "paused"  # recorded, not advanced
    second.no_record(within=0.5)
    assert fleet.op("get", deployment=deployment)["stage"] == 1
    with pytest.raises(RpcError) as err:
        fleet.op("pause", deployment=deployment)
    assert err.value.code is ErrorCode.CONFLICT
    resumed = fleet.op("resume", deployment=deployment)
    assert resumed["state"] == "running" and resumed["stage"] == 2  # stage 1 had all its reports
    second.record(runs("pause-model", 1))
    rolled = fleet.op("rollback", deployment=deployment, reason="the release notes were wrong")
    assert rolled["state"] == "rolled_back"
    assert rolled["reason"] == "rolled back by alice in stage 2: the release notes were wrong"
    for device in (first, second):
        assert device.record(runs("pause-model", None)).models == {}
    assert kinds(fleet.op("get", deployment=deployment)) == [
        "created", "stage_started", "paused", "device_reported", "resumed", "stage_passed", "stage_started",
        "rolled_back"]
    with pytest.raises(RpcError) as err:
        fleet.op("rollback", deployment=deployment)
    assert err.value.code is ErrorCode.CONFLICT and "rolled_back" in err.value.message


def test_a_device_that_reconnects_gets_its_retained_record(fleet: Fleet) -> None:
    (away,) = fleet.new_devices("away", 1)
    away.disconnect()
    fleet.register("away-model", 1)
    deployment = fleet.deploy("away-model", 1, "away")["id"]
    away.connect()
    entry = away.record(runs("away-model", 1)).models["away-model"]
    assert entry.deployment == deployment
    fetch_model(away, entry.sha256)
    away.report(deployment, "away-model", 1, accuracy=0.9)
    wait_state(fleet, deployment, "completed")


def test_a_restarted_cloud_resumes_from_the_database(fleet: Fleet) -> None:
    first, second, third = fleet.new_devices("restart", 3)
    fleet.register("restart-model", 1)
    deployment = fleet.deploy("restart-model", 1, "restart", stages=[0.33, 1.0], stage_timeout_s=3)["id"]
    first.record(runs("restart-model", 1))
    fleet.cloud.stop()
    fleet.start_cloud()  # the same home and database, a new process's memory
    first.report(deployment, "restart-model", 1, accuracy=0.9)  # heard by the new cloud: stage 2 starts
    second.record(runs("restart-model", 1))
    third.record(runs("restart-model", 1))
    second.report(deployment, "restart-model", 1, accuracy=0.9)
    fleet.cloud.stop()
    time.sleep(3.2)  # the stage's timeout passes while no cloud runs
    fleet.start_cloud()
    rolled = wait_state(fleet, deployment, "rolled_back", timeout=10)  # the new cloud's ticker decides
    assert "stage 2 of 2: 1 of 2 unhealthy (silent" in rolled["reason"]
    assert kinds(rolled)[-3:] == ["device_reported", "device_reported", "rolled_back"]


def test_bad_input_is_refused_and_changes_nothing(fleet: Fleet, tmp_path: Path) -> None:
    (device,) = fleet.new_devices("bad", 1)
    (other,) = fleet.new_devices("other", 1)
    fleet.register("bad-model", 1)
    before = fleet.operator.all_items("deployments", "list")
    events = Event.select().where(Event.component == COMPONENT).count()

    def refused(code: ErrorCode, words: str, **args: Any) -> None:
        with pytest.raises(RpcError) as err:
            fleet.deploy("bad-model", 1, "bad", **args) if "name" not in args else fleet.op("create", **args)
        assert err.value.code is code, err.value
        assert words in err.value.message, err.value.message

    refused(ErrorCode.INVALID_ARGS, "no model named 'nope'", name="nope", version=1)
    refused(ErrorCode.INVALID_ARGS, "has no version 7", name="bad-model", version=7)
    refused(ErrorCode.INVALID_ARGS, "stages must increase", stages=[0.5, 0.2, 1.0])
    refused(ErrorCode.INVALID_ARGS, "stages must end at 1.0", stages=[0.1, 0.5])
    refused(ErrorCode.INVALID_ARGS, "not a fraction in (0, 1]", stages=[0, 1.0])
    refused(ErrorCode.INVALID_ARGS, "health: invalid criteria", health="accuracy >=")
    refused(ErrorCode.INVALID_ARGS, "max_failure_rate", max_failure_rate=2)
    refused(ErrorCode.INVALID_ARGS, "select none", name="bad-model", version=1, to="group == 'nobody'")
    refused(ErrorCode.FORBIDDEN, "does not match model bad-model:1", name="bad-model", version=1, to="",
            signature=fleet.key.sign(b"something else"), key_id=fleet.key.key_id)
    # A model whose training bundle (on this cloud) has no [deploy] entry point: no device could serve it.
    folder = tmp_path / "no-deploy"
    shutil.copytree(TASK, folder)
    (folder / "fedmq.toml").write_text((TASK / "fedmq.toml").read_text().replace('[deploy]\nentry = "deploy.py"\n', ""))
    (folder / "deploy.py").unlink()
    fleet.register("bad-model", 2, bundle=push_folder(fleet.operator, folder, key=fleet.key).manifest.digest)
    refused(ErrorCode.INVALID_ARGS, "has no [deploy] entry point", name="bad-model", version=2)
    assert fleet.operator.all_items("deployments", "list") == before
    assert Event.select().where(Event.component == COMPONENT).count() == events
    assert not DeviceModel.select().where(DeviceModel.name == "bad-model").exists()
    # A device may not deploy; nor report for a deployment it is not in, nor for another device.
    with pytest.raises(RpcError) as err:
        device.call("create", name="bad-model", version=1)
    assert err.value.code is ErrorCode.FORBIDDEN
    deployment = fleet.deploy("bad-model", 1, "bad")["id"]
    with pytest.raises(RpcError) as err:
        other.report(deployment, "bad-model", 1, accuracy=0.99)
    assert err.value.code is ErrorCode.FORBIDDEN and "other-0 is not in deployment" in err.value.message
    with pytest.raises(RpcError) as err:
        other.call("report", deployment=deployment, name="bad-model", version=1, ok=True, device=device.name)
    assert err.value.code is ErrorCode.INVALID_ARGS  # there is no such argument: the caller is the device
    with pytest.raises(RpcError) as err:
        device.report(deployment, "bad-model", 2, accuracy=0.99)
    assert err.value.code is ErrorCode.INVALID_ARGS and "not version 2" in err.value.message
    with pytest.raises(RpcError) as err:
        device.report(deployment, "bad-model", 1, accuracy=float("nan"))
    assert err.value.code is ErrorCode.BAD_REQUEST  # refused by the RPC layer before the service sees it
    # One deployment at a time per model name.
    with pytest.raises(RpcError) as err:
        fleet.deploy("bad-model", 1, "bad")
    assert err.value.code is ErrorCode.CONFLICT and deployment in err.value.message
    state = fleet.op("get", deployment=deployment)
    assert state["state"] == "running" and kinds(state) == ["created", "stage_started"]
    with pytest.raises(RpcError) as err:
        fleet.op("get", deployment="nope")
    assert err.value.code is ErrorCode.NOT_FOUND
    fleet.op("rollback", deployment=deployment)


def fedmq(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmq.cli", "--broker", fleet.operator_url, "deploy", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_deploy_command(fleet: Fleet) -> None:
    first, second = fleet.new_devices("cli", 2)
    fleet.register("cli-model", 1)
    # The form (no verb: start), signed with the operator's key.
    started = fedmq(fleet, "cli-model:1", "--to", "group == 'cli'", "--stages", "50%,100%", "--health", HEALTH,
                    "--max-failure-rate", "0", "--key", str(fleet.key_path), "--id", "cli-1", "--output", "json")
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["signed"] and "deployment cli-1: cli-model:1 to 2 device(s)" in started.stderr
    first.record(runs("cli-model", 1))
    first.report("cli-1", "cli-model", 1, accuracy=0.9)
    second.record(runs("cli-model", 1))
    shown = fedmq(fleet, "status", "cli-1")
    assert shown.returncode == 0, shown.stderr
    for words in ("deployment cli-1: cli-model:1", "stage passed", "loaded, accuracy 0.9 >= 0.85", "signed"):
        assert words in shown.stdout, (words, shown.stdout)
    assert fedmq(fleet, "pause", "cli-1").returncode == 0
    assert "cli-1" in fedmq(fleet, "list", "--state", "paused").stdout
    assert fedmq(fleet, "resume", "cli-1").returncode == 0
    rolled = fedmq(fleet, "rollback", "cli-1", "--reason", "testing the command")
    assert rolled.returncode == 0 and "rolled back by alice in stage 2: testing the command" in rolled.stderr
    watched = fedmq(fleet, "status", "--watch")  # no id: the latest; it ended badly, so exit 1
    assert watched.returncode == 1 and "rolled back" in watched.stdout
    again = fedmq(fleet, "rollback", "cli-1")
    assert again.returncode == 1 and "conflict" in again.stderr
    bad = fedmq(fleet, "start", "cli-model", "--to", "")
    assert bad.returncode == 2 and "NAME:VERSION" in bad.stderr
    unknown = fedmq(fleet, "nope:3")
    assert unknown.returncode == 1 and "no model named 'nope'" in unknown.stderr


@pytest.mark.parametrize(("expression", "metrics", "verdict"), [
    ("accuracy >= 0.85", {"accuracy": 0.41}, (False, "accuracy 0.41 < 0.85")),
    ("accuracy >= 0.85", {"accuracy": 0.93}, (True, "accuracy 0.93 >= 0.85")),
    ("accuracy >= 0.85", {}, (False, "accuracy not reported")),
    ("accuracy >= 0.85 and loss < 1", {"accuracy": 0.9, "loss": 2}, (False, "loss 2 >= 1")),
    ("accuracy > 0.9 or loss < 0.1", {"accuracy": 0.5, "loss": 0.5},
     (False, "accuracy 0.5 <= 0.9 and loss 0.5 >= 0.1")),
    ("r2 >= 0.9", {"r2": 0.99999912}, (True, "r2 0.999999 >= 0.9")),
    ("accuracy >= 0.85", {"accuracy": 0.8499999999}, (False, "accuracy 0.8499999999 < 0.85")),  # not "0.85 < 0.85"
    ("", {}, (True, "no condition")),
])
def test_a_health_verdict_says_which_values_decided(expression: str, metrics: dict[str, Any],
                                                   verdict: tuple[bool, str]) -> None:
    from fedmq.broker.criteria import parse_criteria

    assert parse_criteria(expression).explain(metrics) == verdict
    assert parse_criteria(expression).matches(metrics) is verdict[0]
