"""Who may do what, on brokers with real credentials: roles checked by the services, identities
provisioned through dynamic security (Mosquitto's plugin, and the embedded broker's copy of it),
client ids bound to identities, device-named events, signed code only, and the reproductions of
what a device could once do.  docs/security.md is the prose of this file."""

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

import psutil
import pytest

from fedmq.broker import codec
from fedmq.broker.acl import render_acl_file
from fedmq.broker.connection import BrokerUnavailable, MqttConnection, new_client_id
from fedmq.broker.dynamic_security import DynamicSecurity
from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.presence import ONLINE, Presence
from fedmq.broker.roles import Role
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.cloud.bundle_store import BundleStore
from fedmq.cloud.task_servers import ServerSupervisor
from fedmq.ftdl.bundle import BundleError, build_bundle
from fedmq.ftdl.process import ProcessIdentity, process_identity
from fedmq.ftdl.signing import SigningKey, TrustStore, generate_keypair

REPO = Path(__file__).resolve().parent.parent
TASK = Path(__file__).parent / "tasks" / "numpy_fl"
TOPICS = Topics()
ADMIN = ("cloud", "admin-" + uuid.uuid4().hex[:8])
DEVICE_INFO = {"data_quantity": 150, "cpu_count": 2, "memory_mb": 2048.0, "packages": {"numpy": "2.0.0", "flwr": "1.42.0"}}


def test_the_shipped_acl_file_is_the_role_table_rendered() -> None:
    assert (REPO / "mosquitto.acl").read_text() == render_acl_file()


@dataclass
class Secured:
    """A broker with credentials, a cloud managing identities on it, and one client per role."""

    kind: str
    url_of: Any
    cloud: CloudApp
    clients: dict[Role, RpcClient] = field(default_factory=dict)
    names: dict[Role, str] = field(default_factory=dict)
    connections: list[MqttConnection] = field(default_factory=list)
    key: SigningKey | None = None

    def connect(self, name: str, password: str | None, clientid: str | None) -> MqttConnection:
        conn = MqttConnection(clientid or new_client_id(name), self.url_of(name, password))
        conn.start(timeout=5)
        self.connections.append(conn)
        return conn


def _broker(kind: str, workdir: Path) -> Any:
    if kind == "amqtt":
        return EmbeddedBroker(security=DynamicSecurity(*ADMIN)).start()
    return MosquittoProcess(admin=ADMIN, workdir=workdir).start()


@pytest.fixture(params=["amqtt", "mosquitto"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secured]:
    (tmp_path / "broker").mkdir()
    broker = _broker(request.param, tmp_path / "broker")
    port = broker.port

    def url_of(name: str, password: str | None) -> str:
        return f"mqtt://{name}:{password}@127.0.0.1:{port}" if password else f"mqtt://{name}@127.0.0.1:{port}"

    key_path, pub = generate_keypair(tmp_path / "keys", "operator")
    cloud = CloudApp(CloudConfig(broker=url_of(*ADMIN), home=tmp_path / "cloud", client_id="fedmq-cloud",
                                 dynsec=True, trusted_keys=[pub])).start()
    setup = Secured(request.param, url_of, cloud, key=SigningKey.load(key_path))
    try:
        registry = cloud.identities
        for role, name in ((Role.OPERATOR, "alice"), (Role.VIEWER, "viewer-1"), (Role.DEVICE, "dev-1"),
                           (Role.SERVICE, "svc-1")):
            creds = registry.add(name, role)
            conn = setup.connect(name, creds.password, creds.clientid)
            setup.clients[role], setup.names[role] = RpcClient(conn, name).start(), name
        creds = registry.for_task("steer")  # what a task's server-side code gets
        conn = setup.connect(creds.name, creds.password, creds.clientid)
        setup.clients[Role.TASK], setup.names[Role.TASK] = RpcClient(conn, creds.name).start(), creds.name
        setup.clients[Role.DEVICE].call("devices", "update_info", {"info": DEVICE_INFO})
        yield setup
    finally:
        for conn in setup.connections:
            conn.stop()
        cloud.stop()
        if isinstance(broker, MosquittoProcess):
            broker.cleanup()
        else:
            broker.stop()


# Arguments for every method that are valid in shape but harmless when admitted: an admitted call
# fails with not_found / invalid_args rather than changing anything.
NOPE = "0" * 64
HARMLESS: dict[str, dict[str, Any]] = {
    "tasks.create": {"name": "m", "bundle": NOPE}, "tasks.get": {"task": "nope"}, "tasks.list": {},
    "tasks.update": {"task": "nope", "priority": 1}, "tasks.start": {"task": "nope"}, "tasks.stop": {"task": "nope"},
    "tasks.delete": {"task": "nope"}, "tasks.request": {}, "tasks.participate": {"task": "nope"},
    "tasks.join": {"task": "nope"},
    "tasks.runs": {"task": "nope"},
    "tasks.metrics": {"task": "nope"}, "tasks.logs": {"task": "nope"}, "tasks.model": {"task": "nope"},
    "devices.update_info": {"info": DEVICE_INFO}, "devices.get_info": {"device": "dev-1"}, "devices.list": {},
    "bundles.upload_begin": {"manifest": {}}, "bundles.upload_chunk": {"digest": NOPE, "index": 0, "data": b"x"},
    "bundles.upload_commit": {"digest": NOPE}, "bundles.publish": {"digest": NOPE}, "bundles.list": {},
    "bundles.get": {"digest": NOPE}, "bundles.remove": {"digest": NOPE},
    "events.list": {"task": "nope"}, "events.timeline": {"task": "nope"},
    "identities.add": {"name": "bad name!", "role": "viewer"}, "identities.rotate": {"name": "nope"},
    "identities.revoke": {"name": "nope"}, "identities.list": {},
    "tasks.run": {"task": "nope"},
    "models.register": {"task": "nope"}, "models.list": {}, "models.show": {"name": "nope"},
    "models.diff": {"name": "nope", "a": 1, "b": 2}, "models.artifact": {"name": "nope"},
    "deployments.create": {"name": "nope", "version": 1}, "deployments.list": {},
    "deployments.get": {"deployment": "nope"}, "deployments.pause": {"deployment": "nope"},
    "deployments.resume": {"deployment": "nope"}, "deployments.rollback": {"deployment": "nope"},
    "deployments.report": {"deployment": "nope", "name": "nope", "version": 1, "ok": True},
    "fleet.diff": {"desired": {"tasks": {"nope": {"bundle": NOPE}}}, "source": {"file": "f.toml", "digest": NOPE}},
    "fleet.apply": {"desired": {"tasks": {"nope": {"bundle": NOPE}}}, "source": {"file": "f.toml", "digest": NOPE}},
}
SERVICES = ("tasks", "devices", "bundles", "events", "identities", "models", "deployments", "fleet")
_READ = {"tasks.get", "tasks.list", "tasks.runs", "tasks.run", "tasks.metrics", "tasks.logs", "tasks.model",
         "devices.get_info", "devices.list", "bundles.list", "bundles.get", "events.list", "events.timeline",
         "models.list", "models.show", "models.diff", "models.artifact", "deployments.list", "deployments.get",
         "fleet.diff"}
# What the roles may do, written out: the services' declarations must say the same.
EXPECTED = {
    Role.OPERATOR: set(HARMLESS) - {"tasks.request", "tasks.participate", "tasks.join", "devices.update_info",
                                    "deployments.report"},
    Role.VIEWER: _READ,
    Role.DEVICE: {"tasks.request", "tasks.participate", "tasks.join", "devices.update_info", "devices.get_info",
                  "deployments.report"},
    Role.SERVICE: _READ | {"bundles.publish", "identities.add", "identities.rotate", "identities.revoke",
                           "identities.list"},
    Role.TASK: _READ | {"tasks.update", "tasks.start", "tasks.stop", "deployments.pause", "deployments.resume",
                        "deployments.rollback"},
}


def state_of(cloud: CloudApp, operator: RpcClient) -> str:
    """Everything a denied call could have changed, as one digest."""
    seen = {name: operator.all_items(*name.split(".")) for name in
            ("tasks.list", "devices.list", "bundles.list", "identities.list")}
    for device in seen["devices.list"]:
        device.pop("last_seen", None)
    for task in seen["tasks.list"]:
        task.pop("updated", None)
    return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


def test_permission_matrix(secured: Secured) -> None:
    """Each role x every method of every service: admitted or forbidden as declared, and a
    forbidden call changes nothing."""
    operator = secured.clients[Role.OPERATOR]
    declared: dict[str, set[Role]] = {}
    for service in SERVICES:
        for method, spec in operator.call(service, "describe")["methods"].items():
            if method not in ("ping", "describe"):
                declared[f"{service}.{method}"] = {Role(r) for r in spec["roles"]}
    assert set(declared) == set(HARMLESS)  # the table covers every method there is
    for role, allowed in EXPECTED.items():
        assert {m for m, roles in declared.items() if role in roles} == allowed, role
    outcomes: dict[tuple[Role, str], str] = {}
    for role, client in secured.clients.items():
        for name, args in HARMLESS.items():
            service, method = name.split(".")
            before = state_of(secured.cloud, operator) if name not in EXPECTED[role] else None
            try:
                client.call(service, method, args, timeout=10)
                outcomes[(role, name)] = "ok"
            except RpcError as exc:
                outcomes[(role, name)] = exc.code.value
                if exc.code is ErrorCode.FORBIDDEN:
                    assert f"may not call {name}" in exc.message and role.value in exc.message
            if before is not None:
                assert outcomes[(role, name)] == "forbidden", (role, name, outcomes[(role, name)])
                assert state_of(secured.cloud, operator) == before, (role, name)
            else:
                assert outcomes[(role, name)] != "forbidden", (role, name)
    assert sum(1 for o in outcomes.values() if o == "forbidden") == \
        sum(len(HARMLESS) - len(EXPECTED[r]) for r in secured.clients)


def test_a_device_speaks_only_for_itself(secured: Secured) -> None:
    device = secured.clients[Role.DEVICE]
    with pytest.raises(RpcError) as err:
        device.call("devices", "get_info", {"device": "alice"})
    assert err.value.code is ErrorCode.FORBIDDEN
    assert device.call("devices", "get_info", {"device": "dev-1"})["info"]["cpu_count"] == 2
    # Calling in another device's name is not even delivered (the broker binds the caller level).
    spoof = RpcClient(device.connection, "dev-2")
    with pytest.raises(RpcError) as err:
        spoof.call("tasks", "request", timeout=1.5)
    assert err.value.code is ErrorCode.TIMEOUT


def test_no_credential_but_an_operators_can_take_another_clients_id(secured: Secured) -> None:
    """Connecting as the cloud's client id kicked the cloud off the broker; now refused."""
    creds = secured.cloud.identities.add("dev-9", Role.DEVICE)
    for stolen in ("fedmq-cloud", "fedmq-edge-dev-1"):
        thief = MqttConnection(stolen, secured.url_of("dev-9", creds.password))
        with pytest.raises(BrokerUnavailable):
            thief.start(timeout=2, fail_fast=True)
        thief.stop()
    assert secured.clients[Role.OPERATOR].call("tasks", "ping")["pong"]  # the cloud is still there
    assert secured.clients[Role.DEVICE].call("tasks", "request") == []


def test_revocation_disconnects_at_once_and_keeps_out(secured: Secured) -> None:
    registry = secured.cloud.identities
    creds = registry.add("dev-gone", Role.DEVICE)
    conn = secured.connect("dev-gone", creds.password, creds.clientid)
    assert conn.connected.is_set()
    operator = secured.clients[Role.OPERATOR]
    conn.publish(TOPICS.device_state("dev-gone"), Presence(state=ONLINE, session=1).encode(), qos=1,
                 retain=True).wait_for_publish(5)

    def online() -> bool | None:
        return next((d["online"] for d in operator.all_items("devices", "list") if d["id"] == "dev-gone"), None)

    wait_for(lambda: online() is True, 10)
    registry.revoke("dev-gone")
    deadline = time.monotonic() + 5
    while conn.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not conn.connected.is_set()
    # Its last will is not delivered (its ACL is gone with it): the cloud says it is offline.
    wait_for(lambda: online() is False, 10)
    again = MqttConnection(creds.clientid or "x", secured.url_of("dev-gone", creds.password))
    with pytest.raises(BrokerUnavailable):
        again.start(timeout=2, fail_fast=True)
    again.stop()
    # Rotation: the old password stops working, the new one works.
    creds = registry.add("dev-rot", Role.DEVICE)
    live = secured.connect("dev-rot", creds.password, creds.clientid)
    fresh = registry.rotate("dev-rot")
    wait_for(lambda: not live.connected.is_set(), 5)  # closed at once, and cannot come back
    live.stop()
    old = MqttConnection(creds.clientid or "x", secured.url_of("dev-rot", creds.password))
    with pytest.raises(BrokerUnavailable):
        old.start(timeout=2, fail_fast=True)
    old.stop()
    assert secured.connect("dev-rot", fresh.password, fresh.clientid).connected.is_set()


def test_a_device_cannot_run_code_on_the_cloud_host_nor_steer_tasks(secured: Secured, tmp_path: Path) -> None:
    """The worst case once measured: a device uploaded an unsigned bundle, created a task from it
    (or from a host folder), started it, and its server code ran on the cloud host."""
    device, operator = secured.clients[Role.DEVICE], secured.clients[Role.OPERATOR]
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "fedmq.toml").write_text('[task]\nname = "evil"\n[server]\nentry = "server.py"\n')
    (evil / "server.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(RpcError) as err:
        push_folder(device, evil)
    assert err.value.code is ErrorCode.FORBIDDEN
    for args in ({"name": "evil", "folder": str(evil)}, {"name": "evil", "bundle": NOPE}):
        with pytest.raises(RpcError) as err:
            device.call("tasks", "create", args)
        assert err.value.code is ErrorCode.FORBIDDEN
    # Even an operator's unsigned bundle does not run on the cloud host of a default cloud.
    digest = push_folder(operator, evil).manifest.digest
    operator.call("tasks", "create", {"name": "evil", "task": "evil", "bundle": digest})
    with pytest.raises(RpcError) as err:
        operator.call("tasks", "start", {"task": "evil"})
    assert err.value.code is ErrorCode.FORBIDDEN and "signed by a key it trusts" in err.value.message
    time.sleep(0.5)
    assert not marker.exists()
    # Steering a running task is the operator's (and tasks'), never a device's.
    signed = push_folder(operator, TASK, key=secured.key).manifest.digest
    operator.call("tasks", "create", {"name": "run", "task": "run", "bundle": signed, "args": {"rounds": 50}})
    assert operator.call("tasks", "start", {"task": "run"})["state"] == "running"
    for method, args in (("stop", {}), ("delete", {}), ("update", {"criteria": "cpu_count > 0"})):
        with pytest.raises(RpcError) as err:
            device.call("tasks", method, {"task": "run", **args})
        assert err.value.code is ErrorCode.FORBIDDEN
    with pytest.raises(RpcError) as err:
        device.call("bundles", "remove", {"digest": signed})
    assert err.value.code is ErrorCode.FORBIDDEN
    with pytest.raises(RpcError) as err:
        device.call("devices", "list")
    assert err.value.code is ErrorCode.FORBIDDEN
    task = operator.call("tasks", "get", {"task": "run"})
    assert task["state"] == "running" and task["criteria"] == "" and operator.call("bundles", "get", {"digest": signed})
    operator.call("tasks", "stop", {"task": "run"})


def test_events_count_only_under_the_devices_own_name(secured: Secured) -> None:
    """A device published client_error in another device's name; the topic now decides."""
    operator, device = secured.clients[Role.OPERATOR], secured.clients[Role.DEVICE]
    digest = push_folder(operator, TASK, key=secured.key).manifest.digest
    operator.call("tasks", "create", {"name": "ev", "task": "ev", "bundle": digest})
    raw = device.connection
    forged = {"kind": "client_error", "device": "dev-2", "data": {"cause": "forged"}}
    raw.publish(TOPICS.device_events("ev", "dev-1"), codec.encode(forged, "json"), qos=1).wait_for_publish(5)
    raw.publish(TOPICS.device_events("ev", "dev-2"), codec.encode({**forged, "device": "dev-2"}, "json"),
                qos=1).wait_for_publish(5)  # the broker refuses the topic
    own = {"kind": "client_info", "data": {"note": "mine"}}
    raw.publish(TOPICS.device_events("ev", "dev-1"), codec.encode(own, "json"), qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = operator.all_items("events", "list", {"task": "ev"})
        if any(e["kind"] == "client_info" for e in events):
            break
        time.sleep(0.1)
    kinds = [(e["kind"], e["device"]) for e in events if e["component"].startswith("edge.")]
    assert kinds == [("client_info", "dev-1")]  # the forgeries counted for nobody
    assert any(e["kind"] == "device_events_dropped" and e["device"] == "dev-1" for e in events)


def test_a_device_flooding_big_events_never_knocks_the_cloud_off(secured: Secured) -> None:
    """A device's flood of events once grew events.list past the broker's packet limit: the broker
    cut the cloud off at every answer, for as long as it ran.  Now: size and rate per device,
    pages bounded in bytes, and the cloud stays connected."""
    operator, device = secured.clients[Role.OPERATOR], secured.clients[Role.DEVICE]
    digest = push_folder(operator, TASK, key=secured.key).manifest.digest
    operator.call("tasks", "create", {"name": "fl", "task": "fl", "bundle": digest})
    topic = TOPICS.device_events("fl", "dev-1")
    connects = secured.cloud.connection.connect_count
    big = {"kind": "client_info", "data": {"note": "x" * 15_000}}  # just under the 16 KiB bound
    for _ in range(3):
        device.connection.publish(topic, codec.encode({"kind": "client_info", "data": {"note": "y" * 20_000}}),
                                  qos=1).wait_for_publish(5)
    for _ in range(400):
        device.connection.publish(topic, codec.encode(big), qos=1)
    device.connection.publish(topic, codec.encode(big), qos=1).wait_for_publish(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = operator.all_items("events", "list", {"task": "fl"})
        if any(e["kind"] == "device_events_dropped" for e in events) and \
                sum(e["kind"] == "client_info" for e in events) >= 200:
            break
        time.sleep(0.2)
    kept = sum(e["kind"] == "client_info" for e in events)
    assert 200 <= kept < 400  # the burst, plus what the rate refilled meanwhile; the rest dropped
    assert any(e["kind"] == "device_events_dropped" and "16384" in e["data"]["reason"] for e in events)
    first = operator.call("events", "list", {"task": "fl"})  # the default limit, 200 rows of 15 KB
    assert 0 < len(first["items"]) < 200 and first["next"]  # a page ends at its byte budget
    assert secured.cloud.connection.connect_count == connects  # never cut off by the broker
    assert operator.call("events", "ping")["pong"] is True


def test_a_task_gets_credentials_of_its_own(secured: Secured, tmp_path: Path) -> None:
    """A task's server once got the cloud's own broker password in FEDMQ_BROKER."""
    operator = secured.clients[Role.OPERATOR]
    folder = tmp_path / "envtask"
    folder.mkdir()
    (folder / "fedmq.toml").write_text('[task]\nname = "envtask"\n[server]\nentry = "server.py"\n')
    (folder / "server.py").write_text(
        "import json, os\nfrom fedmq.ftdl import TaskReporter\n"
        "TaskReporter.get().send_info(broker=os.environ.get('FEDMQ_BROKER'), caller=os.environ.get('FEDMQ_CALLER'),"
        " client_id=os.environ.get('FEDMQ_CLIENT_ID'))\nimport time\ntime.sleep(6)  # a run that lasts a moment\n")
    digest = push_folder(operator, folder, key=secured.key).manifest.digest
    operator.call("tasks", "create", {"name": "envtask", "task": "envtask", "bundle": digest})
    operator.call("tasks", "start", {"task": "envtask"})
    deadline = time.monotonic() + 30
    info: dict[str, Any] = {}
    while time.monotonic() < deadline and not info:
        events = operator.all_items("events", "list", {"task": "envtask"})
        info = next((e["data"] for e in events if e["kind"] == "server_info"), {})
        time.sleep(0.2)
    assert info["caller"] == "task.envtask" and info["client_id"] == "fedmq-task.envtask"
    assert ADMIN[1] not in info["broker"] and "task.envtask:" in info["broker"]
    # The credentials work for what a task may do, and end with the run.
    task = MqttConnection(info["client_id"], info["broker"]).start(timeout=5)
    try:
        assert RpcClient(task, "task.envtask").start().call("tasks", "get", {"task": "envtask"})["id"] == "envtask"
    finally:
        task.stop()
    deadline = time.monotonic() + 30
    while operator.call("tasks", "get", {"task": "envtask"})["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    after = MqttConnection(info["client_id"], info["broker"])
    with pytest.raises(BrokerUnavailable):
        after.start(timeout=2, fail_fast=True)
    after.stop()


# --- without a broker -------------------------------------------------------------------------------
def test_signed_stays_signed(tmp_path: Path) -> None:
    """A folder of the same content once replaced the signed manifest with an unsigned one."""
    key_path, pub = generate_keypair(tmp_path / "keys", "op")
    other_path, _ = generate_keypair(tmp_path / "other", "intruder")
    store = BundleStore(tmp_path / "store", trust=TrustStore.from_paths([pub]))
    signed = build_bundle(TASK, tmp_path / "a.tar.gz", key=SigningKey.load(key_path))
    unsigned = build_bundle(TASK, tmp_path / "b.tar.gz")
    assert signed.digest == unsigned.digest
    store.adopt(signed, tmp_path / "a.tar.gz")
    assert store.adopt(unsigned, tmp_path / "b.tar.gz").signature == signed.signature  # reused
    assert store.manifest(signed.digest).signer == signed.signer
    resigned = build_bundle(TASK, tmp_path / "c.tar.gz", key=SigningKey.load(other_path))
    with pytest.raises(BundleError) as err:
        store.adopt(resigned, tmp_path / "c.tar.gz")
    assert err.value.code == "signed" and store.manifest(signed.digest).signature == signed.signature
    # An unsigned entry may be signed later (pushing the signed bundle repairs it).
    fresh = BundleStore(tmp_path / "fresh")
    fresh.adopt(unsigned, tmp_path / "b.tar.gz")
    fresh.begin(signed)
    assert fresh.manifest(signed.digest).signature == signed.signature
    strict = BundleStore(tmp_path / "strict", require_signed=True, trust=TrustStore.from_paths([pub]))
    with pytest.raises(BundleError) as err:
        strict.adopt(unsigned, tmp_path / "b.tar.gz")
    assert err.value.code == "unsigned"


def test_a_reused_pid_is_never_signalled() -> None:
    """A restarted cloud SIGKILLed whatever process had taken its dead server's pid."""
    innocent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        now = process_identity(innocent.pid)
        assert now is not None
        recorded = ProcessIdentity(innocent.pid, now.started - 100)  # the dead server that had this pid
        assert ServerSupervisor.kill_orphan(recorded) is False
        assert psutil.Process(innocent.pid).is_running() and innocent.poll() is None
        assert ServerSupervisor.kill_orphan(now) is True
        innocent.wait(5)
    finally:
        if innocent.poll() is None:
            innocent.kill()


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met")


def test_events_published_while_the_cloud_is_down_arrive_when_it_returns(tmp_path: Path) -> None:
    """The cloud subscribed QoS 0, so what edges said while it was away was lost."""
    with MosquittoProcess(workdir=tmp_path / "m") as mosq:
        config = CloudConfig(broker=mosq.url, home=tmp_path / "cloud", client_id="cloud-qos", allow_unsigned=True)
        cloud = CloudApp(config).start()
        op_conn = MqttConnection(new_client_id("op"), mosq.url).start()
        operator = RpcClient(op_conn, "operator").start()
        digest = push_folder(operator, TASK).manifest.digest
        operator.call("tasks", "create", {"name": "down", "task": "down", "bundle": digest})
        cloud.stop()
        edge = MqttConnection(new_client_id("edge"), mosq.url).start()
        for n in range(5):
            edge.publish(TOPICS.device_events("down", "dev-q"), codec.encode(
                {"kind": "client_info", "data": {"n": n}}, "json"), qos=1).wait_for_publish(5)
        edge.stop()
        cloud = CloudApp(config).start()
        try:
            got = wait_for(lambda: [e for e in operator.all_items("events", "list", {"task": "down"})
                                     if e["kind"] == "client_info"] or None)
            wait_for(lambda: len([e for e in operator.all_items("events", "list", {"task": "down"})
                                   if e["kind"] == "client_info"]) == 5)
            assert got and {e["device"] for e in got} == {"dev-q"}
        finally:
            op_conn.stop()
            cloud.stop()


def test_a_stop_lost_in_a_broker_crash_still_reaches_the_device(tmp_path: Path) -> None:
    """Mosquitto SIGKILLed right after queuing a stop for an offline device lost the command and
    the retained announcement.  When the cloud reconnects it puts back every announcement and
    sends unconfirmed stops again; a device that returns sees its task stopped (the agent stops a
    client whose task's announcement is no longer running) -- and, where its session survived,
    the command too."""
    with MosquittoProcess(workdir=tmp_path / "m") as mosq:
        cloud = CloudApp(CloudConfig(broker=mosq.url, home=tmp_path / "cloud", client_id="cloud-crash",
                                     allow_unsigned=True)).start()
        op_conn = MqttConnection(new_client_id("op"), mosq.url).start()
        try:
            operator = RpcClient(op_conn, "operator").start()
            device_conn = MqttConnection("fedmq-edge-dev-c", mosq.url, persistent=True).start()
            device = RpcClient(device_conn, "dev-c").start()
            device.call("devices", "update_info", {"info": DEVICE_INFO})
            digest = push_folder(operator, TASK).manifest.digest
            operator.call("tasks", "create", {"name": "crash", "task": "crash", "bundle": digest,
                                              "args": {"rounds": 50}})
            operator.call("tasks", "start", {"task": "crash"})
            assert [o["id"] for o in device.call("tasks", "request")] == ["crash"]
            device_conn.stop()                                 # the device goes away...
            operator.call("tasks", "stop", {"task": "crash"})  # ...its stop is queued...
            mosq.kill()                                        # ...and the broker crashes
            mosq.start()
            wait_for(cloud.connection.connected.is_set, 30)
            seen: queue.Queue[tuple[str, Any]] = queue.Queue()
            device_conn = MqttConnection("fedmq-edge-dev-c", mosq.url, persistent=True)
            for topic in (TOPICS.device_cmd("dev-c"), TOPICS.task("crash")):
                device_conn.subscribe(topic, lambda m: seen.put((m.topic, codec.decode(m.payload)[0]
                                                                 if m.payload else None)), qos=1, wait=False)
            device_conn.start()
            announced = None
            deadline = time.monotonic() + 20
            while announced is None and time.monotonic() < deadline:
                try:
                    topic, body = seen.get(timeout=1)
                except queue.Empty:
                    continue
                if topic == TOPICS.task("crash") and body and body["state"] == "stopped":
                    announced = body
            assert announced is not None and announced["run"] == 1
            device_conn.stop()
        finally:
            op_conn.stop()
            cloud.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_tls_and_credentials_end_to_end(tmp_path: Path) -> None:
    """The shipped configuration's TLS listener with scripts/secure_mosquitto.sh's CA: an edge and
    the cloud connect verified; a wrong password, a client that does not trust the broker, and
    (with require_certificate) a certificate from another CA are refused."""
    from fedmq.broker.mosquitto import Tls
    from fedmq.edge.agent import EdgeAgent
    from fedmq.edge.config import EdgeConfig

    made = tmp_path / "made"
    subprocess.run(["bash", str(REPO / "scripts" / "secure_mosquitto.sh"), str(made), "localhost",
                    "--client", "dev-tls"], check=True, capture_output=True)
    other = tmp_path / "other"
    subprocess.run(["bash", str(REPO / "scripts" / "secure_mosquitto.sh"), str(other), "localhost",
                    "--client", "stranger"], check=True, capture_output=True)
    password = (made / "cloud.password").read_text().strip()
    ca = made / "ca.crt"
    tls = Tls(ca, made / "server.crt", made / "server.key")
    with MosquittoProcess(workdir=tmp_path / "m", tls=tls, dynsec_file=made / "dynamic-security.json",
                          host="127.0.0.1") as mosq:
        url = f"mqtts://cloud:{password}@localhost:{mosq.port}?ca={ca}"
        cloud = CloudApp(CloudConfig(broker=url, home=tmp_path / "cloud", client_id="fedmq-cloud", dynsec=True,
                                     allow_unsigned=True)).start()
        try:
            creds = cloud.identities.add("dev-tls", Role.DEVICE)
            agent = EdgeAgent(EdgeConfig(device_id="dev-tls", work_dir=tmp_path / "edge", allow_unsigned=True,
                                         broker=f"mqtts://dev-tls:{creds.password}@localhost:{mosq.port}?ca={ca}"))
            import threading

            runner = threading.Thread(target=agent.run, daemon=True)
            runner.start()
            op = cloud.identities.add("op-tls", Role.OPERATOR)
            op_conn = MqttConnection(new_client_id("op"), f"mqtts://op-tls:{op.password}@localhost:{mosq.port}"
                                                          f"?ca={ca}").start(timeout=10)
            operator = RpcClient(op_conn, "op-tls").start()
            wait_for(lambda: any(d["id"] == "dev-tls" and d["online"] for d in operator.all_items("devices", "list")),
                      20)
            op_conn.stop()
            agent.stop()
            runner.join(15)
            refused = [f"mqtts://dev-tls:wrong@localhost:{mosq.port}?ca={ca}",            # bad password
                       f"mqtts://dev-tls:{creds.password}@localhost:{mosq.port}?ca={other / 'ca.crt'}"]  # not trusted
            for bad in refused:
                conn = MqttConnection("fedmq-edge-dev-tls", bad)
                with pytest.raises(BrokerUnavailable):
                    conn.start(timeout=3, fail_fast=True)
                conn.stop()
        finally:
            cloud.stop()
    strict = Tls(ca, made / "server.crt", made / "server.key", require_certificate=True)
    with MosquittoProcess(workdir=tmp_path / "m2", tls=strict, dynsec_file=made / "dynamic-security.json") as mosq:
        good = f"mqtts://cloud:{password}@localhost:{mosq.port}?ca={ca}&cert={made / 'dev-tls.crt'}" \
               f"&key={made / 'dev-tls.key'}"
        MqttConnection(new_client_id("good"), good).start(timeout=5).stop()
        foreign = f"mqtts://cloud:{password}@localhost:{mosq.port}?ca={ca}&cert={other / 'stranger.crt'}" \
                  f"&key={other / 'stranger.key'}"
        conn = MqttConnection(new_client_id("foreign"), foreign)
        with pytest.raises(BrokerUnavailable):
            conn.start(timeout=3, fail_fast=True)
        conn.stop()
