"""Lineage end to end: a real broker (the demo's embedded amqtt), a real `fedmq cloud` and two real
`fedmq edge` agents as processes, the numpy test task in both modes.  Each device reports a
fingerprint of the data it trained on; a run's record (tasks.run / tasks.runs) holds its revision,
cohort, those fingerprints, final metrics and model digest; `fedmq run show|compare` and
`fedmq task runs` show them to a stranger at a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.cloud.bundle_client import push_folder
from fedmq.demo import DemoCluster
from fedmq.ftdl.channel import FrameError, ReporterMessage, parse_frame
from fedmq.ftdl.reporter import data_fingerprint

TASK = Path(__file__).parent / "tasks" / "numpy_fl"
DEVICES = ("lin-1", "lin-2")


def test_a_fingerprint_is_stable_and_says_what_the_data_is() -> None:
    x, y = np.arange(12, dtype=np.float64).reshape(4, 3), np.arange(4)
    digest, examples = data_fingerprint(x, y)
    assert (digest, examples) == data_fingerprint(x.copy(), y.copy()) and examples == 4 and len(digest) == 64
    assert data_fingerprint(x.astype(np.float32), y)[0] != digest  # the dtype counts
    assert data_fingerprint(x.reshape(3, 4), y)[0] != digest        # so does the shape
    assert data_fingerprint(x[:, ::-1], y)[0] != data_fingerprint(x, y)[0]
    assert data_fingerprint(np.asfortranarray(x), y)[0] == digest  # the memory layout does not
    parse_frame(ReporterMessage("data", {"digest": digest, "examples": examples}).to_line())
    for bad in ({"digest": "x" * 64, "examples": 4}, {"digest": digest, "examples": -1}, {"digest": digest}):
        with pytest.raises(FrameError):
            parse_frame(ReporterMessage("data", bad).to_line())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    with DemoCluster(tmp_path_factory.mktemp("lineage") / "demo", devices=DEVICES) as running:
        running.wait_for(running.devices_online, 60, "two edges online")
        yield running


def run_once(cluster: DemoCluster, task: str) -> dict[str, Any]:
    cluster.call("tasks", "start", {"task": task})
    final = cluster.wait_task(task, timeout=180)
    assert final["state"] == "finished", final
    return cluster.call("tasks", "run", {"task": task})


@pytest.fixture(scope="module")
def runs(cluster: DemoCluster) -> dict[str, list[dict[str, Any]]]:
    """ln-f: three Flower runs, the third on other data (seed 1); ln-s: one serverless run."""
    assert cluster.operator is not None
    digest = push_folder(cluster.operator, TASK, key=cluster.key).manifest.digest
    cluster.call("tasks", "create", {"name": "linreg", "bundle": digest, "task": "ln-f",
                                     "args": {"rounds": 2, "seed": 0}})
    flower = [run_once(cluster, "ln-f"), run_once(cluster, "ln-f")]
    cluster.call("tasks", "update", {"task": "ln-f", "args": {"rounds": 2, "seed": 1}})
    flower.append(run_once(cluster, "ln-f"))
    cluster.call("tasks", "create", {"name": "linreg", "bundle": digest, "task": "ln-s",
                                     "args": {"mode": "serverless", "min_participants": 2, "quiet_s": 0.5,
                                              "rounds": 2, "seed": 0}})
    return {"flower": flower, "serverless": [run_once(cluster, "ln-s")]}


def test_a_runs_record_holds_its_revision_cohort_data_metrics_and_model(
        cluster: DemoCluster, runs: dict[str, list[dict[str, Any]]]) -> None:
    first, second, third = runs["flower"]
    assert [r["run"] for r in runs["flower"]] == [1, 2, 3]
    for record in runs["flower"]:
        assert record["task"] == "ln-f" and record["state"] == "finished" and record["finished"] > record["started"]
        assert record["cohort"] == list(DEVICES) and sorted(record["data"]) == list(DEVICES)
        assert all(fp["examples"] == 200 for fp in record["data"].values())
        assert record["rounds"] == 2 and record["metrics"]["r2"] > 0.9
        revision = record["revision"]
        assert revision["mode"] == "flower" and revision["criteria"] == ""
        assert revision["requirements"]["packages"] == ["flwr>=1.41", "numpy>=1.26"]
        model = cluster.call("tasks", "model", {"task": "ln-f", "run": record["run"], "offset": 0})
        assert record["model"] == {"sha256": model["sha256"], "size": model["size"]}
    assert first["revision"] == second["revision"] and first["revision"]["args"] == {"rounds": 2, "seed": 0}
    assert third["revision"]["args"] == {"rounds": 2, "seed": 1}
    assert third["revision"]["revision"] == first["revision"]["revision"] + 1
    # the same data gives the same fingerprints, run after run; other data others
    assert first["data"] == second["data"]
    assert all(third["data"][d]["digest"] != first["data"][d]["digest"] for d in DEVICES)

    (serverless,) = runs["serverless"]
    assert serverless["revision"]["mode"] == "serverless" and serverless["cohort"] == list(DEVICES)
    assert serverless["data"] == first["data"]  # same seed, same data, whichever mode trained on it
    assert serverless["rounds"] == 2 and serverless["model"]["sha256"]

    assert cluster.items("tasks", "runs", {"task": "ln-f"}) == runs["flower"]
    assert cluster.call("tasks", "run", {"task": "ln-f", "run": 1}) == first
    for args in ({"task": "ln-f", "run": 9}, {"task": "nosuch"}):
        with pytest.raises(RpcError) as err:
            cluster.call("tasks", "run", args)
        assert err.value.code is ErrorCode.NOT_FOUND, err.value


def fedmq(cluster: DemoCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a stranger runs it: its own process, the broker on the command line."""
    return subprocess.run([sys.executable, "-m", "fedmq.cli", "--broker", cluster.url, *argv],
                          capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}, "COLUMNS": "250"})


def cells(table: str) -> list[list[str]]:
    """A rich table's rows as their cells' text."""
    return [[c.strip() for c in line.strip("│┃ ").split("│")] for line in table.splitlines() if line.startswith("│")]


def test_run_compare_show_and_task_runs_from_the_command_line(
        cluster: DemoCluster, runs: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    first, _, third = runs["flower"]
    plot = tmp_path / "out.png"
    done = fedmq(cluster, "run", "compare", "ln-f:1", "ln-f:3", "ln-s", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    lines = {row[1]: " ".join(row) for row in cells(done.stdout) if row[0] == "≠"}
    assert {"args.seed", "mode", "revision", "data.lin-1", "data.lin-2", "model.sha256"} <= set(lines)
    assert "bundle" not in lines and "cohort" not in lines and "requirements.packages" not in lines
    assert first["data"]["lin-1"]["digest"][:12] in lines["data.lin-1"]
    assert third["data"]["lin-1"]["digest"][:12] in lines["data.lin-1"]
    assert "ln-f:1" in done.stdout and "ln-s:1" in done.stdout and "metrics.r2" in done.stdout

    same = fedmq(cluster, "run", "compare", "ln-f:1", "ln-f:2", "--output", "json")
    assert same.returncode == 0, same.stderr
    result = json.loads(same.stdout)
    assert [f for f in result["differs"] if not f.startswith(("metrics.", "model.", "reason"))] == []
    assert [row["round"] for row in result["rounds"]["ln-f:1"]] == [1, 2]

    shown = fedmq(cluster, "run", "show", "ln-f")  # the latest run
    assert shown.returncode == 0, shown.stderr
    assert "ln-f:3" in shown.stdout and "data.lin-2" in shown.stdout and third["data"]["lin-2"]["digest"][:12] \
        in shown.stdout
    listed = fedmq(cluster, "task", "runs", "ln-f")
    assert listed.returncode == 0, listed.stderr
    header = next(line for line in listed.stdout.splitlines() if line.startswith("┃"))
    columns = [c.strip() for c in header.strip("┃ ").split("┃")]
    row = dict(zip(columns, next(r for r in cells(listed.stdout) if r[0] == "3"), strict=True))
    assert row["cohort"] == "2" and row["data"] == f"{third['data']['lin-1']['digest'][:8]}×2", row

    for argv, code, said in ((("run", "show", "x:abc"), 2, "RUN must be a run number"),
                             (("run", "compare", "ln-f:1"), 2, "two runs or more"),
                             (("run", "show", "nosuch:1"), 1, "not_found"),
                             (("run", "compare", "ln-f:1", "ln-f:9"), 1, "no run 9")):
        bad = fedmq(cluster, *argv)
        assert bad.returncode == code and said in bad.stderr, (argv, bad.returncode, bad.stderr)
