"""A device's deployed models (edge/models.py): a real EdgeAgent against the embedded broker, with
the test playing the cloud over real MQTT -- the retained desired record, the model file in
retained chunks, the bundle, and an RPC service answering ``deployments.report``.

The task is tests/tasks/numpy_fl, whose [deploy] entry point measures a linear model in about a
second: r2 near 1 for the true weights."""

from __future__ import annotations

import hashlib
import io
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_security import wait_for as wait

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.events import EventKind
from fedmq.broker.roles import DEVICES
from fedmq.broker.rpc_server import CallContext, RpcServer, rpc
from fedmq.broker.schema import DesiredModel, DesiredModels, ModelManifest
from fedmq.broker.topics import Topics
from fedmq.edge.agent import EdgeAgent, EdgeConfig
from fedmq.ftdl.bundle import build_bundle
from fedmq.ftdl.chunks import publish_chunks, split
from fedmq.ftdl.manifest import parse_manifest
from fedmq.ftdl.signing import SigningKey, generate_keypair, model_signing_message

TASK = Path(__file__).parent / "tasks" / "numpy_fl"
TOPICS = Topics()
DEVICE = "dev-m"
NAME = "linreg"
GOOD = [np.array([2.0, -1.0, 0.5])]
WORSE = [np.array([1.5, -1.0, 0.5])]
CHUNK = 1024


def npz(arrays: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


@dataclass
class FakeCloud:
    """The cloud's side of the protocol, as the test speaks it."""

    reports: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    infos: list[dict[str, Any]] = field(default_factory=list)


class DeploymentsStub:
    name = "deployments"

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud

    @rpc(roles=DEVICES)
    def report(self, deployment: str, name: str, version: int, ok: bool, metrics: dict[str, Any],
               error: str | None, ctx: CallContext) -> dict[str, Any]:
        self.cloud.reports.put({"device": ctx.caller, "deployment": deployment, "name": name, "version": version,
                                "ok": ok, "metrics": metrics, "error": error})
        return {"recorded": True}


class DevicesStub:
    name = "devices"

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud

    @rpc(roles=DEVICES)
    def update_info(self, info: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self.cloud.infos.append(info)
        return {"device": ctx.caller}


class TasksStub:
    name = "tasks"

    @rpc(roles=DEVICES)
    def request(self, ctx: CallContext) -> list[dict[str, Any]]:
        return []


class Harness:
    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.conn = MqttConnection(new_client_id("cloud-test"), url).start()
        self.cloud = FakeCloud()
        self.servers: list[tuple[RpcServer, MqttConnection]] = []
        self.serve(DevicesStub(self.cloud), TasksStub())
        private, public = generate_keypair(tmp / "keys", "operator")
        self.key, self.public = SigningKey.load(private), public
        manifest = build_bundle(TASK, tmp / "bundle.tar.gz", chunk_size=CHUNK * 16, key=self.key)
        archive = (tmp / "bundle.tar.gz").read_bytes()
        publish_chunks(self.conn, lambda i: TOPICS.bundle_chunk(manifest.digest, i), split(archive, CHUNK * 16))
        self.conn.publish(TOPICS.bundle_manifest(manifest.digest), codec.encode(manifest.to_wire()), qos=1,
                          retain=True).wait_for_publish(10)
        self.bundle = manifest.digest
        self.seq = 0
        self.desired: dict[str, DesiredModel] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.conn.subscribe(TOPICS.all_device_events(), lambda m: self.events.put(codec.decode(m.payload)[0]))
        self.agent: EdgeAgent | None = None
        self.thread: threading.Thread | None = None

    def serve(self, *services: Any) -> None:
        conn = MqttConnection(new_client_id("svc"), self.url, persistent=True).start()
        server = RpcServer(conn)
        for service in services:
            server.add(service)
        server.start()
        self.servers.append((server, conn))

    def publish_file(self, arrays: list[np.ndarray], tamper: bool = False) -> tuple[str, int]:
        data = npz(arrays)
        sha = hashlib.sha256(data).hexdigest()
        chunks = split(data, CHUNK)
        manifest = ModelManifest(sha256=sha, size=len(data), chunk_size=CHUNK,
                                 chunks=[hashlib.sha256(c).hexdigest() for c in chunks])
        if tamper:
            chunks[-1] = chunks[-1][:-1] + bytes([chunks[-1][-1] ^ 1])
        publish_chunks(self.conn, lambda i: TOPICS.model_blob(sha, i), chunks)
        self.conn.publish(TOPICS.model_blob(sha), manifest.encode(), qos=1, retain=True).wait_for_publish(10)
        return sha, len(data)

    def clear_file(self, sha: str, size: int) -> None:
        for index in range(-(-size // CHUNK)):
            self.conn.publish(TOPICS.model_blob(sha, index), b"", qos=1, retain=True).wait_for_publish(10)
        self.conn.publish(TOPICS.model_blob(sha), b"", qos=1, retain=True).wait_for_publish(10)

    def deploy(self, version: int, arrays: list[np.ndarray], deployment: str, *, tamper: bool = False,
               forge: bool = False, publish_file: bool = True, unsigned: bool = False) -> DesiredModel:
        if publish_file:
            sha, size = self.publish_file(arrays, tamper)
        else:
            data = npz(arrays)
            sha, size = hashlib.sha256(data).hexdigest(), len(data)
        signed = model_signing_message(NAME, version + 1 if forge else version, sha)
        want = DesiredModel(version=version, sha256=sha, size=size, bundle=self.bundle, deployment=deployment,
                            signature=None if unsigned else self.key.sign(signed),
                            key_id=None if unsigned else self.key.key_id)
        self.desired[NAME] = want
        self.seq += 1
        self.conn.publish(TOPICS.device_models(DEVICE), DesiredModels(seq=self.seq, models=self.desired).encode(),
                          qos=1, retain=True).wait_for_publish(10)
        return want

    def start_agent(self) -> EdgeAgent:
        config = EdgeConfig(device_id=DEVICE, broker=self.url, work_dir=self.tmp / "edge", trusted_keys=[self.public],
                            recheck_interval_s=60.0, rpc_timeout_s=2.0)
        self.agent = EdgeAgent(config)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()
        return self.agent

    def stop_agent(self) -> None:
        if self.agent is not None and self.thread is not None:
            self.agent.stop()
            self.thread.join(20)
            self.agent = self.thread = None

    def report(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.cloud.reports.get(timeout=timeout)

    def event(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event.get("kind") == kind:
                return event

    def installed(self) -> dict[str, Any]:
        return json.loads((self.tmp / "edge" / "models" / "installed.json").read_text())

    def close(self) -> None:
        self.stop_agent()
        for server, conn in self.servers:
            conn.stop()
            server.stop()
        self.conn.stop()


@pytest.fixture
def harness(embedded_broker: Any, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(embedded_broker.url, tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_the_deploy_section_is_an_entry_point_and_absent_changes_nothing() -> None:
    with_deploy = parse_manifest({"task": {"name": "t"}, "client": {"entry": "c.py"}, "deploy": {"entry": "d.py"}})
    without = parse_manifest({"task": {"name": "t"}, "client": {"entry": "c.py"}})
    assert with_deploy.entry("deploy").entry == "d.py" and with_deploy.to_dict()["deploy"]["entry"] == "d.py"
    assert "deploy" not in without.to_dict()  # bundle manifests of tasks without one are as they were


def test_install_reports_health_then_a_rollback_needs_no_download(harness: Harness) -> None:
    harness.serve(DeploymentsStub(harness.cloud))
    harness.start_agent()
    first = harness.deploy(1, GOOD, "dep-1")
    report = harness.report()
    assert report["ok"] and report["error"] is None, report
    assert (report["device"], report["deployment"], report["name"], report["version"]) == (DEVICE, "dep-1", NAME, 1)
    assert report["metrics"]["r2"] > 0.99 and report["metrics"]["examples"] == 200 and "loss" in report["metrics"]
    installed = harness.event(EventKind.MODEL_INSTALLED)
    assert installed["device"] == DEVICE and installed["data"]["version"] == 1 and installed["data"]["downloaded"]
    assert harness.installed()["models"][NAME]["version"] == 1
    wait(lambda: any(info.get("models") == {NAME: 1} for info in harness.cloud.infos))

    harness.deploy(2, WORSE, "dep-2")
    report = harness.report()
    assert report["ok"] and report["version"] == 2 and report["metrics"]["r2"] < 0.99
    assert harness.event(EventKind.MODEL_INSTALLED)["data"]["previous"] == 1
    # Roll back: version 1's file is gone from the broker, yet it comes back from the device's own copy,
    # and a record without a signature is taken on the one the device checked for that version before.
    harness.clear_file(first.sha256, first.size)
    harness.deploy(1, GOOD, "dep-1", publish_file=False, unsigned=True)
    report = harness.report()
    assert report["ok"] and report["version"] == 1 and report["metrics"]["r2"] > 0.99
    back = harness.event(EventKind.MODEL_INSTALLED)
    assert back["data"]["version"] == 1 and back["data"]["downloaded"] is False and back["data"]["previous"] == 2
    assert harness.installed()["models"][NAME]["version"] == 1
    wait(lambda: harness.cloud.infos[-1].get("models") == {NAME: 1})


@pytest.mark.parametrize(("case", "cause"), [("forged", "signature refused"), ("unsigned", "is not signed"),
                                             ("tampered", "tampered_chunk"),
                                             ("crash", "the deploy entry point failed: exit code 1: ValueError")])
def test_a_failed_install_is_reported_and_keeps_the_previous_version(harness: Harness, case: str,
                                                                     cause: str) -> None:
    harness.serve(DeploymentsStub(harness.cloud))
    harness.start_agent()
    harness.deploy(1, GOOD, "dep-1")
    assert harness.report()["ok"]
    bad = [np.zeros(5), np.zeros(2)] if case == "crash" else WORSE  # deploy.py cannot serve two arrays
    harness.deploy(2, bad, "dep-2", forge=case == "forged", tamper=case == "tampered", unsigned=case == "unsigned")
    report = harness.report()
    assert not report["ok"] and cause in report["error"] and report["version"] == 2, report
    failed = harness.event(EventKind.MODEL_INSTALL_FAILED)
    assert failed["data"]["kept"] == 1 and cause in failed["data"]["reason"]
    assert harness.installed()["models"][NAME]["version"] == 1
    version_dir = harness.tmp / "edge" / "models" / NAME / "2"
    if case != "crash":  # refused before a file was written (the signature: before a byte was fetched)
        assert not (version_dir / "model.npz").exists()
    assert harness.cloud.reports.empty()  # reported once, not again at every wake-up


def test_an_agent_away_while_the_record_changed_installs_the_latest(harness: Harness) -> None:
    harness.serve(DeploymentsStub(harness.cloud))
    harness.deploy(1, GOOD, "dep-1")
    harness.deploy(2, WORSE, "dep-2")  # both while the agent is away: only the last is retained
    harness.start_agent()
    report = harness.report()
    assert (report["ok"], report["version"], report["deployment"]) == (True, 2, "dep-2")
    time.sleep(0.5)
    assert harness.cloud.reports.empty()


def test_a_report_the_cloud_did_not_answer_is_sent_after_a_restart(harness: Harness) -> None:
    agent = harness.start_agent()  # no deployments service: the report waits
    harness.deploy(1, GOOD, "dep-1")
    harness.event(EventKind.MODEL_INSTALLED, timeout=30)
    pending = harness.tmp / "edge" / "models" / "reports.json"
    wait(lambda: pending.exists() and json.loads(pending.read_text())["pending"])
    assert agent.models.running() == {NAME: 1}
    harness.stop_agent()
    harness.serve(DeploymentsStub(harness.cloud))
    harness.start_agent()
    report = harness.report()
    assert (report["ok"], report["version"], report["deployment"]) == (True, 1, "dep-1")
    wait(lambda: json.loads(pending.read_text())["pending"] == [])
    with pytest.raises(queue.Empty):  # the restarted agent runs version 1 already: no second install
        harness.event(EventKind.MODEL_INSTALLED, timeout=1.0)
