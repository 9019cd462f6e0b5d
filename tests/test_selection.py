"""Selection's in-memory state stays what the database says, through every change it makes."""

from __future__ import annotations

import time
from pathlib import Path

from fedmq.broker.arguments import DeviceInfo
from fedmq.broker.schema import DeviceTaskState
from fedmq.cloud.db import Task, TaskDevice, open_database
from fedmq.cloud.devices import DeviceRegistry
from fedmq.cloud.events import EventLog
from fedmq.cloud.selection import Selection
from fedmq.cloud.write_batch import WriteBatcher


def _rows(device: str) -> dict[str, DeviceTaskState]:
    return {r.task: DeviceTaskState(r.state) for r in TaskDevice.select().where(TaskDevice.device == device)}


def test_the_caches_agree_with_the_database_through_offers_steps_stops_and_new_runs(tmp_path: Path) -> None:
    db = open_database(None, tmp_path)
    batcher = WriteBatcher(db)
    events = EventLog(db, None)
    selection = Selection(db, events, batcher)
    registry = DeviceRegistry(db, events, batcher)
    registry.listeners.append(selection.device_changed)
    for k, criteria in enumerate(["data_quantity > 10", "region == 'eu'", "data_quantity > 1000"]):
        Task.create(id=f"t{k}", name=f"t{k}", bundle="0" * 64, state="running", criteria=criteria,
                    flower_host="127.0.0.1", flower_port=1, created=time.time() + k)
    registry.update_info("d1", DeviceInfo.model_validate({"data_quantity": 50, "labels": {"region": "eu"}}))
    registry.update_info("d2", DeviceInfo.model_validate({"data_quantity": 5}))

    def agree() -> None:
        for device in ("d1", "d2"):
            assert selection._known_of(device) == _rows(device), device

    assert [o.id for o in selection.request("d1")] == ["t0", "t1"] and selection.request("d2") == []
    agree()
    selection.mark("t0", "d1", DeviceTaskState.RUNNING)
    agree()
    assert sorted(selection.take_active("t0")) == ["d1"]
    assert selection._known_of("d1")["t0"] is DeviceTaskState.STOPPING
    agree()
    registry.update_info("d2", DeviceInfo.model_validate({"data_quantity": 500}))  # facts change: offered now
    selection.invalidate()
    assert [o.id for o in selection.request("d2")] == ["t0"]
    agree()
    selection.forget("t0")  # a new run: offered again
    agree()
    assert "t0" in [o.id for o in selection.request("d1")]
    agree()
    # A fresh Selection (a restarted cloud) reads the same state in one go.
    assert Selection(db, events, batcher)._known_of("d1") == selection._known_of("d1")
    batcher.close()
    db.close()
