"""The cloud's group commit: many writers, one transaction; nothing acknowledged is lost, on
SIGTERM nothing queued is lost, and a crash loses at most what waited for the next batch."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_cloud import spawn_cloud

from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.presence import Presence
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import Topics
from fedmq.cloud.db import Device, open_database
from fedmq.cloud.write_batch import WriteBatcher

TOPICS = Topics()


def test_concurrent_writes_share_transactions_and_each_caller_waits_for_its_commit(tmp_path: Path) -> None:
    db = open_database(None, tmp_path)
    batcher = WriteBatcher(db, max_delay_s=0.01)
    seen_after: list[str] = []

    def write(i: int) -> None:
        def insert() -> Any:
            Device.create(id=f"dev-{i}")
            return lambda: seen_after.append(f"dev-{i}")
        batcher.write(insert)
        # Once write() returns the row is committed: another connection sees it.
        other = sqlite3.connect(tmp_path / "fedmq.db")
        assert other.execute("SELECT 1 FROM device WHERE id = ?", (f"dev-{i}",)).fetchone() == (1,)
        other.close()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    batcher.close()
    assert Device.select().count() == 64 and len(seen_after) == 64
    assert batcher.stats["writes"] == 64 and batcher.stats["batches"] < 64  # grouped
    db.close()


def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    db = open_database(None, tmp_path)
    batcher = WriteBatcher(db, max_delay_s=0.05)
    errors: list[BaseException] = []

    def good() -> None:
        batcher.write(lambda: Device.create(id="good") and None)

    def bad() -> None:
        def insert_then_fail() -> None:
            Device.create(id="half")
            raise ValueError("no")
        try:
            batcher.write(insert_then_fail)
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    batcher.close()
    assert [str(e) for e in errors] == ["no"]
    assert sorted(d.id for d in Device.select()) == ["good"]  # the failed one was undone, alone
    db.close()


def test_queued_writes_are_committed_by_close(tmp_path: Path) -> None:
    db = open_database(None, tmp_path)
    batcher = WriteBatcher(db, max_delay_s=10)  # nothing would be committed for 10 s
    for i in range(200):
        batcher.write_later(lambda i=i: Device.create(id=f"d{i}") and None)
    batcher.close()
    assert Device.select().count() == 200
    db.close()


def _presence_storm(url: str, devices: int) -> MqttConnection:
    conn = MqttConnection(new_client_id("storm"), url).start()
    infos = [conn.publish(TOPICS.device_state(f"dev-{i}"), Presence(state="online", session=1).encode(), qos=1,
                          retain=False) for i in range(devices)]
    for info in infos:
        info.wait_for_publish(10)
    return conn


def _rows(home: Path, query: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(home / "fedmq.db")
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_what_the_cloud_acknowledged_survives_sigterm_and_sigkill(mqtt_broker: Any, tmp_path: Path, how: str) -> None:
    """Device info the cloud answered survives even SIGKILL; queued presence survives SIGTERM."""
    home = tmp_path / "cloud"
    # Presence waits 3 s for company here, so it is still queued when the signal comes.
    proc = spawn_cloud(mqtt_broker.url, home, new_client_id("cloud"), tmp_path / "cloud.log",
                       "--write-delay-ms", "3000")
    try:
        conn = MqttConnection(new_client_id("dev"), mqtt_broker.url).start()
        acknowledged = []
        for i in range(30):
            client = RpcClient(conn, f"dev-a{i}").start()
            client.call("devices", "update_info", {"info": {"data_quantity": i}})
            acknowledged.append(f"dev-a{i}")
        storm = _presence_storm(mqtt_broker.url, 300)
        time.sleep(1.0)  # received by the cloud, not committed yet
        assert _rows(home, "SELECT count(*) FROM device WHERE online = 1")[0][0] < 300
        os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        proc.wait(30)
        storm.stop()
        conn.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    registered = {row[0] for row in _rows(home, "SELECT id FROM device WHERE info_updated IS NOT NULL")}
    assert set(acknowledged) <= registered  # every answered write, whatever the ending
    online = _rows(home, "SELECT count(*) FROM device WHERE online = 1 AND id LIKE 'dev-%' "
                         "AND id NOT LIKE 'dev-a%'")[0][0]
    if how == "sigkill":
        assert online < 300  # lost: at most what waited for the next batch (the broker retains it)
    else:
        assert online == 300  # everything the cloud had taken in was committed before it exited


def test_the_cloud_commits_in_batches_under_load(mqtt_broker: Any, tmp_path: Path) -> None:
    from fedmq.cloud.app import CloudApp, CloudConfig

    cloud = CloudApp(CloudConfig(broker=mqtt_broker.url, home=tmp_path / "c", client_id=new_client_id("cloud"))).start()
    try:
        storm = _presence_storm(mqtt_broker.url, 500)
        deadline = time.monotonic() + 20
        while Device.select().where(Device.online == True).count() < 500:  # noqa: E712 (peewee)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        storm.stop()
        assert cloud.batcher.stats["batches"] < cloud.batcher.stats["writes"]
    finally:
        cloud.stop()


