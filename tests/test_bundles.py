"""Bundles over a real broker: push, publish, fetch, resume, and every kind of refusal."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.cloud.bundle_client import push_folder
from fedmq.edge.bundle_fetch import BundleFetcher
from fedmq.ftdl.bundle import BundleError, BundleManifest, FileEntry, build_bundle, chunk_digests, safe_unpack
from fedmq.ftdl.signing import SigningKey, TrustStore, generate_keypair

TASK = Path(__file__).parent / "tasks" / "numpy_fl"
TOPICS = Topics()
FEDMQ = [sys.executable, "-m", "fedmq.cli"]
TOML = b'[task]\nname = "evil"\n[client]\nentry = "client.py"\n'


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    op_key, op_pub = generate_keypair(tmp_path / "keys", "operator")
    bad_key, _ = generate_keypair(tmp_path / "other", "intruder")
    return {"key": op_key, "pub": op_pub, "signing": SigningKey.load(op_key),
            "intruder": SigningKey.load(bad_key), "trust": TrustStore.from_paths([op_pub])}


@pytest.fixture
def cloud(mqtt_broker: Any, tmp_path: Path) -> Iterator[CloudApp]:
    app = CloudApp(CloudConfig(broker=mqtt_broker.url, home=tmp_path / "cloud", chunk_size=16 * 1024,
                               client_id=new_client_id("cloud")))
    app.start()
    yield app
    app.stop()


@pytest.fixture
def conns(mqtt_broker: Any) -> Iterator[list[MqttConnection]]:
    opened: list[MqttConnection] = []

    class Factory(list):
        def new(self) -> MqttConnection:
            conn = MqttConnection(new_client_id("edge"), mqtt_broker.url).start()
            opened.append(conn)
            return conn

    yield Factory()  # type: ignore[misc]
    for conn in opened:
        conn.stop()


def operator(conns: Any) -> RpcClient:
    return RpcClient(conns.new(), "operator").start()


def fetcher(conns: Any, cache: Path, trust: TrustStore | None, events: list | None = None, **kw: Any) -> BundleFetcher:
    return BundleFetcher(conns.new(), TOPICS, cache, trust=trust,
                         on_event=(lambda kind, data: events.append((kind, data))) if events is not None else None, **kw)


def source_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")}


def test_packing_is_deterministic_and_unpacks_byte_identical(tmp_path: Path) -> None:
    first = build_bundle(TASK, tmp_path / "a.tar.gz")
    os.utime(TASK / "client.py")  # a new mtime must not change the bundle
    second = build_bundle(TASK, tmp_path / "b.tar.gz")
    assert first.digest == second.digest
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    out = safe_unpack(tmp_path / "a.tar.gz", tmp_path / "out")
    assert source_files(out) == source_files(TASK)
    assert {f.path for f in first.files} == set(source_files(TASK))


def test_round_trip_cli_push_two_edges(cloud: CloudApp, conns: Any, keys: dict, tmp_path: Path, mqtt_broker: Any) -> None:
    task = make_big_task(tmp_path / "task", 100_000)
    done = subprocess.run([*FEDMQ, "--broker", mqtt_broker.url, "bundle", "push", str(task), "--key", str(keys["key"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    digest = done.stdout.strip()
    assert len(digest) == 64 and "signed by" in done.stderr
    events: list = []
    edges = [fetcher(conns, tmp_path / f"edge{i}", keys["trust"], events) for i in range(2)]
    results: list[Any] = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, edges[i].fetch(digest))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for result in results:
        assert result is not None and result.downloaded_chunks == result.total_chunks > 1
        assert source_files(result.path) == source_files(task)  # bytes identical
    assert [k for k, _ in events].count("bundle_fetched") == 2
    assert fetcher(conns, tmp_path / "edge0", keys["trust"]).fetch(digest).cached  # second time: cache
    listed = RpcClient(conns.new(), "operator").start().all_items("bundles", "list")
    assert [b["digest"] for b in listed] == [digest] and listed[0]["signer"] == keys["signing"].key_id


@pytest.mark.parametrize("window", [None, 3])
def test_a_connection_lost_mid_download_resumes_on_reconnect(window: int | None, cloud: CloudApp, conns: Any,
                                                             keys: dict, tmp_path: Path) -> None:
    """Streamed (one wildcard, the default for a fresh bundle) or windowed (exact topics): after a
    reconnect the chunks still in flight are asked for again and the download completes."""
    task = make_big_task(tmp_path / "task", 300_000)
    digest = push_folder(operator(conns), task, key=keys["signing"]).manifest.digest
    conn = conns.new()
    dropped: list[int] = []

    def on_progress(done: int, total: int, _manifest: BundleManifest) -> None:
        if done == 3 and not dropped:  # cut the TCP connection under paho: it reconnects by itself
            dropped.append(done)
            conn.client.socket().shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

    result = BundleFetcher(conn, TOPICS, tmp_path / "edge", trust=keys["trust"], window=window,
                           on_progress=on_progress).fetch(digest, stall_timeout=20)
    assert dropped and conn.connect_count >= 2
    assert result.downloaded_chunks == result.total_chunks > 3
    assert source_files(result.path) == source_files(task)


def test_unsigned_bundles_are_refused_unless_allowed(cloud: CloudApp, conns: Any, keys: dict, tmp_path: Path) -> None:
    digest = push_folder(operator(conns), TASK).manifest.digest
    events: list = []
    with pytest.raises(BundleError) as err:
        fetcher(conns, tmp_path / "strict", keys["trust"], events).fetch(digest)
    assert err.value.code == "unsigned" and events[-1][0] == "bundle_refused"
    assert not (tmp_path / "strict" / "bundles" / digest).exists()
    assert fetcher(conns, tmp_path / "dev", None, allow_unsigned=True).fetch(digest).path.is_dir()


def make_big_task(folder: Path, size: int) -> Path:
    shutil.copytree(TASK, folder)
    (folder / "weights.bin").write_bytes(os.urandom(size))  # incompressible
    return folder


def test_killed_edge_resumes_and_fetches_only_missing_chunks(cloud: CloudApp, conns: Any, keys: dict,
                                                              tmp_path: Path, mqtt_broker: Any) -> None:
    task = make_big_task(tmp_path / "big", 2_000_000)
    digest = push_folder(operator(conns), task, key=keys["signing"]).manifest.digest
    cache = tmp_path / "edge"
    proc = subprocess.Popen([*FEDMQ, "--broker", mqtt_broker.url, "bundle", "fetch", digest, "--cache", str(cache),
                             "--trust", str(keys["pub"]), "--window", "1"], stderr=subprocess.PIPE, text=True)
    lines = 0
    for line in proc.stderr:  # type: ignore[union-attr]  (progress goes to stderr)
        lines += line.startswith("chunk ")
        if lines >= 25:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(10)
    manifest = BundleManifest.from_wire(RpcClient(conns.new(), "operator").start().call("bundles", "get", {"digest": digest}))
    partial = cache / "partial" / f"{digest}.tar.gz"
    published = chunk_digests  # the cloud publishes 16 KiB chunks: count intact ones independently
    total = -(-manifest.size // (16 * 1024))
    data = partial.read_bytes()
    wanted = published(Path(cloud.store.archive_path(digest)), 16 * 1024)
    intact = sum(hashlib.sha256(data[i * 16384:(i + 1) * 16384]).hexdigest() == wanted[i] for i in range(total))
    assert 25 <= intact < total
    result = fetcher(conns, cache, keys["trust"]).fetch(digest)
    assert result.reused_chunks == intact and result.downloaded_chunks == total - intact
    assert (result.path / "weights.bin").read_bytes() == (task / "weights.bin").read_bytes()
    assert not partial.exists()


# --- refusals: an attacker with write access to the broker publishes bundles directly ----------
def craft_archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return raw.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def base_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [file_member("fedmq.toml", TOML), file_member("client.py", b"print('hi')\n")]


def publish_raw(conn: MqttConnection, archive: bytes, key: SigningKey | None, chunk_size: int = 4096,
                mutate: Any = None) -> str:
    digest = hashlib.sha256(archive).hexdigest()
    chunks = [archive[i:i + chunk_size] for i in range(0, len(archive), chunk_size)]
    manifest = BundleManifest(digest=digest, size=len(archive), chunk_size=chunk_size,
                              chunks=[hashlib.sha256(c).hexdigest() for c in chunks],
                              files=[FileEntry(path="client.py", size=12, sha256="0" * 64)],
                              task={"name": "evil", "description": "", "server": None,
                                    "client": {"entry": "client.py", "args": {}}, "triggers": {}, "requirements": {}})
    if key is not None:
        manifest.sign(key)
    if mutate:
        mutate(manifest, chunks)
    for i, chunk in enumerate(chunks):
        conn.publish(TOPICS.bundle_chunk(digest, i), chunk, retain=True).wait_for_publish(10)
    conn.publish(TOPICS.bundle_manifest(digest), codec.encode(manifest.to_wire(), "json"),
                 retain=True).wait_for_publish(10)
    return digest


def link_member() -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("data")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info, b""


def bomb_member() -> tuple[tarfile.TarInfo, bytes]:
    return file_member("zeros.bin", bytes(60 * 1024 * 1024))


def tamper_chunk(manifest: BundleManifest, chunks: list[bytes]) -> None:
    chunks[0] = b"X" + chunks[0][1:]


def forge_signature(manifest: BundleManifest, chunks: list[bytes]) -> None:
    manifest.task = {**manifest.task, "description": "changed after signing"}


CASES = {
    "tampered_chunk": (base_members, "operator", tamper_chunk),
    "bad_signature": (base_members, "operator", forge_signature),
    "unknown_signer": (base_members, "intruder", None),
    "path_traversal_dotdot": (lambda: [*base_members(), file_member("../x", b"owned")], "operator", None),
    "path_traversal_absolute": (lambda: [*base_members(), file_member("/etc/x-fedmq-test", b"owned")], "operator", None),
    "link": (lambda: [*base_members(), link_member()], "operator", None),
    "bomb": (lambda: [*base_members(), bomb_member()], "operator", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundles_are_refused_and_nothing_is_written_outside(case: str, conns: Any, keys: dict,
                                                                     tmp_path: Path) -> None:
    members, signer, mutate = CASES[case]
    key = keys["signing"] if signer == "operator" else keys["intruder"]
    digest = publish_raw(conns.new(), craft_archive(members()), key, mutate=mutate)
    events: list = []
    sandbox = tmp_path / "sandbox"
    cache = sandbox / "edge" / "cache"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(BundleError) as err:
        fetcher(conns, cache, keys["trust"], events).fetch(digest)
    expected = case.split("_dotdot", maxsplit=1)[0].split("_absolute", maxsplit=1)[0]
    assert err.value.code == expected, err.value
    assert events[-1] == ("bundle_refused", {"digest": digest, "reason": expected, "message": err.value.message})
    assert not (cache / "bundles" / digest).exists()
    after = {p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()}
    assert all(cache in p.parents for p in after), after  # nothing outside the cache
    assert not (cache / "bundles" / "x").exists() and not (sandbox / "edge" / "x").exists()
    assert not Path("/etc/x-fedmq-test").exists()
    assert not any((cache / "bundles").iterdir())


def test_cloud_refuses_hostile_uploads(cloud: CloudApp, conns: Any, keys: dict, tmp_path: Path) -> None:
    archive = craft_archive([*base_members(), file_member("../escape.py", b"x")])
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(archive)
    manifest = BundleManifest(digest=hashlib.sha256(archive).hexdigest(), size=len(archive), chunk_size=4096,
                              chunks=chunk_digests(path, 4096), files=[],
                              task={"name": "evil", "client": {"entry": "client.py"}})
    client = operator(conns)
    client.call("bundles", "upload_begin", {"manifest": manifest.to_wire()})
    for i in range(manifest.chunk_count):
        client.call("bundles", "upload_chunk", {"digest": manifest.digest, "index": i,
                                                "data": archive[i * 4096:(i + 1) * 4096]})
    with pytest.raises(RpcError) as err:
        client.call("bundles", "upload_commit", {"digest": manifest.digest})
    assert err.value.code is ErrorCode.INVALID_ARGS and err.value.details["reason"] == "path_traversal"
    with pytest.raises(RpcError) as err:
        client.call("bundles", "upload_chunk", {"digest": manifest.digest, "index": 0, "data": b"tampered"})
    assert err.value.code in (ErrorCode.INVALID_ARGS, ErrorCode.NOT_FOUND)
    with pytest.raises(RpcError) as err:
        client.call("bundles", "upload_begin", {"manifest": {**manifest.to_wire(), "size": -5}})
    assert err.value.code is ErrorCode.INVALID_ARGS and "size" in err.value.message
    with pytest.raises(RpcError) as err:
        client.call("bundles", "get", {"digest": "../../etc"})
    assert err.value.code is ErrorCode.INVALID_ARGS
    assert client.all_items("bundles", "list") == []


def test_remove_clears_the_retained_bundle(cloud: CloudApp, conns: Any, keys: dict, mqtt_broker: Any) -> None:
    client = operator(conns)
    digest = push_folder(client, TASK, key=keys["signing"]).manifest.digest
    client.call("bundles", "remove", {"digest": digest})
    seen: list[str] = []
    watcher = conns.new()
    watcher.subscribe(f"fedmq/v1/bundles/{digest}/#", lambda m: seen.append(m.topic) if m.payload else None)
    time.sleep(1.0)
    assert seen == [] and client.all_items("bundles", "list") == []
    with pytest.raises(RpcError) as err:
        client.call("bundles", "get", {"digest": digest})
    assert err.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("bad", [
    {"format": 2}, {"digest": "zz"}, {"size": 0}, {"chunk_size": 10}, {"chunks": ["a" * 64, "b" * 64]}, {"chunks": ["A" * 64]},
    {"files": "x"}, {"task": {"name": "x"}}, {"signature": 5},
])
def test_hostile_manifests_are_refused(bad: dict, tmp_path: Path) -> None:
    good = build_bundle(TASK, tmp_path / "a.tar.gz").to_wire()
    with pytest.raises(BundleError) as err:
        BundleManifest.from_wire({**good, **bad})
    assert err.value.code == "bad_manifest"


def test_the_signed_bytes_are_the_documented_canonical_json(tmp_path: Path, keys: dict[str, Any]) -> None:
    """docs/bundles.md defines what is signed; a verifier written from that page alone (sorted
    keys, no white space, non-ASCII escaped) must verify a non-ASCII description."""
    import base64

    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    folder = tmp_path / "task"
    shutil.copytree(TASK, folder)
    toml = (folder / "fedmq.toml").read_text()
    description = toml.split("description = ", 1)[1].split("\n", 1)[0]
    (folder / "fedmq.toml").write_text(toml.replace(description, '"Réseau — 日本"', 1), encoding="utf-8")
    manifest = build_bundle(folder, tmp_path / "b.tar.gz", key=keys["signing"])
    wire = json.loads(json.dumps(manifest.to_wire()))  # as a device receives it
    body = {k: wire[k] for k in ("format", "digest", "size", "files", "task")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert b"\\u00e9" in canonical and "Réseau".encode() not in canonical
    public = load_pem_public_key(keys["pub"].read_bytes())
    public.verify(base64.b64decode(wire["signature"]), canonical)  # raises if not
    raw_utf8 = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    with pytest.raises(Exception):
        public.verify(base64.b64decode(wire["signature"]), raw_utf8)
