"""Weights over MQTT: content-addressed blobs in verified chunks under their publisher's level --
round trip, resume, and every refusal (tampered chunk, wrong digest, wrong shape or dtype, a
record on another device's level), on real brokers."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from fedmq.broker.acl import render_acl_file
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.broker.topics import Topics
from fedmq.ftdl.chunks import ChunkError, ChunkFetch, publish_chunks, split
from fedmq.ftdl.serverless.aggregate import fedavg, resolve
from fedmq.ftdl.serverless.blobs import ArraySpec, BlobManifest, Blobs, decode_arrays, encode_arrays, specs
from fedmq.ftdl.serverless.config import ServerlessConfig, Target
from fedmq.ftdl.serverless.records import UpdateRecord
from fedmq.ftdl.serverless.view import View

TASK = "blobs"
TOPICS = Topics()


def weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 300)).astype(np.float32), rng.normal(size=300).astype(np.float64),
            np.arange(7, dtype=np.int64), np.array([True, False]), np.float32(3.5).reshape(())]


@pytest.fixture
def pair(mqtt_broker: Any) -> Any:
    """Two connections on the broker: one publishes, the other fetches."""
    a = MqttConnection(new_client_id("pub"), mqtt_broker.url).start()
    b = MqttConnection(new_client_id("sub"), mqtt_broker.url).start()
    yield Blobs(a, TOPICS, TASK, chunk_size=16 * 1024), Blobs(b, TOPICS, TASK, chunk_size=16 * 1024)
    a.stop()
    b.stop()


def test_a_blob_round_trips_in_verified_chunks(pair: Any) -> None:
    sender, receiver = pair
    arrays = weights()
    manifest = sender.publish("dev-1", arrays)
    assert len(manifest.chunks) > 4 and manifest.digest == hashlib.sha256(encode_arrays(arrays)).hexdigest()
    got = receiver.fetch("dev-1", manifest.digest, expect=specs(arrays))
    assert [a.dtype for a in got] == [a.dtype for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(got, arrays, strict=True))
    got[0][0, 0] = 1.0  # writable copies, not views of a message buffer
    sender.clear("dev-1", manifest)
    with pytest.raises(ChunkError) as err:
        receiver.manifest("dev-1", manifest.digest, timeout=0.5)
    assert err.value.code == "not_found"


def test_a_tampered_chunk_is_refused(pair: Any) -> None:
    sender, receiver = pair
    manifest = sender.publish("dev-1", weights())
    topic = TOPICS.fl_blob(TASK, "dev-1", manifest.digest, 2)
    sender.connection.publish(topic, b"\0" * manifest.chunk_size, retain=True).wait_for_publish(5)
    with pytest.raises(ChunkError) as err:
        receiver.fetch("dev-1", manifest.digest)
    assert err.value.code == "tampered_chunk"


def test_chunks_that_match_a_lying_manifest_still_fail_the_whole_digest(pair: Any) -> None:
    sender, receiver = pair
    data = encode_arrays(weights(1))
    fake = "ab" * 32       # a name the content does not hash to
    chunks = split(data, sender.chunk_size)
    publish_chunks(sender.connection, lambda i: TOPICS.fl_blob(TASK, "dev-1", fake, i), chunks)
    manifest = BlobManifest(digest=fake, size=len(data), chunk_size=sender.chunk_size,
                            chunks=[hashlib.sha256(c).hexdigest() for c in chunks], arrays=specs(weights(1)))
    sender.connection.publish(TOPICS.fl_blob(TASK, "dev-1", fake), manifest.encode(), retain=True).wait_for_publish(5)
    with pytest.raises(ChunkError) as err:
        receiver.fetch("dev-1", fake)
    assert err.value.code == "digest_mismatch"


def test_the_wrong_shape_is_refused_before_a_chunk_is_downloaded(pair: Any) -> None:
    sender, receiver = pair
    arrays = weights()
    manifest = sender.publish("dev-1", arrays)
    expected = specs(arrays)
    other = [ArraySpec(dtype="<f4", shape=[64, 299]), *expected[1:]]
    with pytest.raises(ChunkError) as err:
        receiver.fetch("dev-1", manifest.digest, expect=other)
    assert err.value.code == "bad_shape" and "64, 299" in err.value.message
    with pytest.raises(ChunkError) as err:
        receiver.fetch("dev-1", manifest.digest, expect=expected[:-1])
    assert err.value.code == "bad_shape"
    retyped = [ArraySpec(dtype="<f8", shape=[64, 300]), *expected[1:]]
    with pytest.raises(ChunkError):
        receiver.fetch("dev-1", manifest.digest, expect=retyped)


def test_content_that_contradicts_its_manifest_or_is_not_plain_numbers_is_refused() -> None:
    data = encode_arrays([np.zeros(4, np.float32)])
    with pytest.raises(ChunkError, match="array 0 is <f4\\[4\\]"):
        decode_arrays(data, [ArraySpec(dtype="<f4", shape=[2, 2])])
    with pytest.raises(ChunkError, match="plain numeric"):
        encode_arrays([np.array(["a"], dtype=object)])
    from fedmq.broker import codec
    forged = codec.encode({"format": 1, "arrays": [{"dtype": "|O", "shape": [1], "data": b"\0" * 8}]})
    with pytest.raises(ChunkError, match="plain numeric"):
        decode_arrays(forged)
    short = codec.encode({"format": 1, "arrays": [{"dtype": "<f4", "shape": [3], "data": b"\0" * 8}]})
    with pytest.raises(ChunkError, match="wrong number of bytes"):
        decode_arrays(short)
    with pytest.raises(ChunkError) as err:
        BlobManifest.from_wire(codec.encode({"format": 1, "digest": "0" * 64, "size": 10, "chunk_size": 1024,
                                             "chunks": [], "arrays": []}))
    assert err.value.code == "bad_manifest"


def test_a_download_cut_short_resumes_with_what_it_has(embedded_broker: Any) -> None:
    a = MqttConnection(new_client_id("pub"), embedded_broker.url).start()
    b = MqttConnection(new_client_id("sub"), embedded_broker.url).start()
    try:
        data = encode_arrays(weights(2))
        chunks = split(data, 8 * 1024)
        digests = [hashlib.sha256(c).hexdigest() for c in chunks]
        digest = hashlib.sha256(data).hexdigest()
        topic_of = lambda i: TOPICS.fl_blob(TASK, "dev-1", digest, i)  # noqa: E731
        publish_chunks(a, topic_of, chunks[:-3])     # the last three are not there yet
        fetch = ChunkFetch(b, topic_of, digests, window=4)
        with pytest.raises(ChunkError) as err:
            fetch.wait(stall_timeout=0.6)
        assert err.value.code == "timeout" and len(fetch.parts) == len(chunks) - 3
        publish_chunks(a, topic_of, chunks)
        assert fetch.wait(stall_timeout=5) == data
    finally:
        a.stop()
        b.stop()


def test_fedavg_weighs_by_examples_and_aggregation_is_pluggable() -> None:
    one = [np.array([0.0, 2.0], np.float32), np.array([10], np.int64)]
    two = [np.array([3.0, 5.0], np.float32), np.array([20], np.int64)]
    mean = fedavg([(one, 100), (two, 200)])
    assert np.allclose(mean[0], [2.0, 4.0]) and mean[0].dtype == np.float32
    assert mean[1].tolist() == [17] and mean[1].dtype == np.int64
    assert np.allclose(fedavg([(one, 0), (two, 0)])[0], [1.5, 3.5])    # no counts: a plain mean
    assert resolve(None) is fedavg and resolve("fedavg") is fedavg

    def first(updates: Any) -> Any:
        return updates[0][0]
    assert resolve(first) is first
    with pytest.raises(ValueError, match="unknown aggregation"):
        resolve("median-of-nothing")


def test_task_arguments_configure_the_run_and_the_target_stops_it() -> None:
    cfg = ServerlessConfig.from_args({"mode": "serverless", "rounds": 5, "min_clients": 3, "epochs": 2,
                                      "target": {"metric": "accuracy", "value": 0.9}})
    assert (cfg.rounds, cfg.min_participants, cfg.target) == (5, 3, Target(value=0.9))
    with pytest.raises(ValueError, match="fraction"):
        ServerlessConfig.from_args({"fraction": 0})
    target = Target(value=0.9)
    assert target.stop_reason([0.5, 0.8]) is None and "reached" in (target.stop_reason([0.5, 0.91]) or "")
    plateau = Target(tolerance=0.01, window=2)
    assert plateau.stop_reason([0.5, 0.7, 0.705, 0.708]) and plateau.stop_reason([0.5, 0.6, 0.7]) is None
    assert Target(metric="loss", goal="min", value=0.1).stop_reason([0.3, 0.09])


def test_a_record_naming_another_device_than_its_level_is_ignored(embedded_broker: Any) -> None:
    listener = MqttConnection(new_client_id("view"), embedded_broker.url).start()
    forger = MqttConnection(new_client_id("forger"), embedded_broker.url).start()
    try:
        view = View(TOPICS, TASK, "1")
        view.subscribe(listener)
        forged = UpdateRecord(run="1", round=1, base="0" * 64, device="dev-1", session=1, blob="1" * 64,
                              num_examples=10**9)
        forger.publish(TOPICS.fl(TASK, "dev-2", "update"), forged.encode(), retain=True).wait_for_publish(5)
        honest = msgspec.structs.replace(forged, device="dev-2", num_examples=5)
        time.sleep(0.3)
        assert view.updates == {}
        forger.publish(TOPICS.fl(TASK, "dev-2", "update"), honest.encode(), retain=True).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while "dev-2" not in view.updates and time.monotonic() < deadline:
            time.sleep(0.05)
        assert view.updates["dev-2"].num_examples == 5 and "dev-1" not in view.updates
    finally:
        listener.stop()
        forger.stop()


def test_the_mosquitto_acl_refuses_an_update_on_another_devices_level(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    for i, user in enumerate(("dev-1", "dev-2")):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwords), user, "pw-" + user],
                       check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(render_acl_file())
    try:
        broker = MosquittoProcess(password_file=passwords, acl_file=acl, workdir=tmp_path / "broker").start()
    except FileNotFoundError as exc:
        pytest.skip(f"mosquitto is not installed: {exc}")
    url = f"mqtt://{{}}:pw-{{}}@127.0.0.1:{broker.port}"
    one = MqttConnection(new_client_id("one"), url.format("dev-1", "dev-1")).start()
    two = MqttConnection(new_client_id("two"), url.format("dev-2", "dev-2")).start()
    try:
        view = View(TOPICS, TASK, "1")
        view.subscribe(one)
        received: list[str] = []
        arrived = threading.Event()
        one.subscribe(TOPICS.fl_blob(TASK, "dev-1", "2" * 64, 0)[:-2] + "/#",
                      lambda m: (received.append(m.topic), arrived.set()))
        # dev-2 speaks on dev-1's level: a forged update record and blob chunk
        as_one = UpdateRecord(run="1", round=1, base="0" * 64, device="dev-1", session=1, blob="2" * 64)
        two.publish(TOPICS.fl(TASK, "dev-1", "update"), as_one.encode(), retain=True).wait_for_publish(5)
        two.publish(TOPICS.fl_blob(TASK, "dev-1", "2" * 64, 0), b"evil", retain=True).wait_for_publish(5)
        # ... and on its own level, which goes through
        own = msgspec.structs.replace(as_one, device="dev-2")
        two.publish(TOPICS.fl(TASK, "dev-2", "update"), own.encode(), retain=True).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while "dev-2" not in view.updates and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "dev-2" in view.updates
        assert "dev-1" not in view.updates and not arrived.wait(0.5) and received == []
    finally:
        one.stop()
        two.stop()
        broker.cleanup()
