"""The model lifecycle end to end on a real Mosquitto: a real `fedmq cloud` and four real `fedmq edge`
processes train digits twice with different arguments; the operator compares the runs, registers
the better model, deploys it in stages, then deploys a deliberately broken version (the other
run's model, far below the health bar) and sees it stopped at the first stage and rolled back on
the device that took it -- every decision in the deployment's timeline with its reason.  Then a
device is offline while a deployment is rolled back and ends on the right version when it returns.

The operator's commands go through the CLI, typed as a stranger would (``python -m fedmq.cli
--broker URL …`` from a working folder, relative paths).  The Models page of the dashboards is
photographed once the deployments exist (artifacts/dashboards/models.png)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.broker.mosquitto import MosquittoProcess
from fedmq.demo import DemoCluster

from tests_support import Browser, node_red

pytestmark = pytest.mark.slow
DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")
GOOD = {"rounds": 3, "epochs": 2, "lr": 0.01, "min_clients": 4}
BROKEN = {"rounds": 1, "epochs": 1, "lr": 0.0001, "min_clients": 4}  # an untrained MLP: ~0.1-0.3 accuracy
HEALTH = "accuracy >= 0.8"  # each device judges on its 54 held-out examples: 0.89-0.96 seen
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCluster]:
    root = tmp_path_factory.mktemp("lifecycle")
    with MosquittoProcess(workdir=root / "mosquitto") as mosq, \
            DemoCluster(root / "demo", mosq.url, devices=DEVICES) as running:
        running.wait_for(running.devices_online, 60, "four edges online")
        yield running


def fedmq(cluster: DemoCluster, *argv: str, cwd: Path, expect: int = 0) -> str:
    """The CLI as an operator types it, from a working folder of their own."""
    done = subprocess.run([sys.executable, "-m", "fedmq.cli", "--broker", cluster.url, *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=_env())
    output = done.stdout + done.stderr
    assert done.returncode == expect, f"fedmq {' '.join(argv)} -> {done.returncode}\n{output[-3000:]}"
    return output


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")} | {"COLUMNS": "200"}


def train(cluster: DemoCluster, task: str, args: dict[str, Any]) -> dict[str, Any]:
    cluster.call("tasks", "update", {"task": task, "args": args})
    cluster.call("tasks", "start", {"task": task})
    final = cluster.wait_task(task, timeout=300)
    assert final["state"] == "finished", final
    return final


def accuracy_of(run: dict[str, Any]) -> float:
    metrics = run["metrics"] or {}
    return float(metrics.get("central_accuracy", metrics.get("accuracy")))


def running_versions(cluster: DemoCluster) -> dict[str, int | None]:
    """What each device says it runs (its info, as it reports it to the cloud)."""
    return {d["id"]: ((d.get("info") or {}).get("models") or {}).get("digits")
            for d in cluster.items("devices", "list") if d["id"] in DEVICES}


def wait_deployment(cluster: DemoCluster, deployment: str, states: set[str], timeout: float = 240) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        found = cluster.call("deployments", "get", {"deployment": deployment})
        return found if found["state"] in states else None

    return cluster.wait_for(ended, timeout, f"deployment {deployment} in {sorted(states)}")


def test_two_runs_compared_the_better_deployed_in_stages_a_broken_one_rolled_back(
        cluster: DemoCluster, tmp_path: Path) -> None:
    work = tmp_path / "operator"
    work.mkdir()
    shutil.copy(cluster.workdir / "keys" / "operator.key", work / "operator.key")
    digest = cluster.push("digits")
    cluster.call("tasks", "create", {"name": "digits", "task": "digits", "bundle": digest, "args": GOOD})
    train(cluster, "digits", GOOD)
    train(cluster, "digits", BROKEN)

    # compare: what differs (the arguments), the final metrics side by side, the curves overlaid
    out = fedmq(cluster, "run", "compare", "digits:1", "digits:2", "--plot", "compare.png", cwd=work)
    assert "lr" in out and "epochs" in out and "rounds" in out
    assert (work / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ARTIFACTS / "lifecycle").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "compare.png", ARTIFACTS / "lifecycle" / "run-compare.png")
    runs = {r["run"]: r for r in cluster.items("tasks", "runs", {"task": "digits"})}
    assert set(runs[1]["cohort"]) == set(DEVICES) and set(runs[1]["data"]) == set(DEVICES)
    assert runs[1]["data"] == runs[2]["data"]  # the same devices' same data; only the arguments differ
    better, worse = sorted((1, 2), key=lambda r: -accuracy_of(runs[r]))
    assert better == 1 and accuracy_of(runs[1]) >= 0.9 > accuracy_of(runs[2]), (runs[1]["metrics"], runs[2]["metrics"])

    # register the better run's model; deploy it 25% -> 50% -> 100% with a health bar
    fedmq(cluster, "model", "register", f"digits:{better}", "--name", "digits", cwd=work)
    shown = cluster.call("models", "show", {"name": "digits", "version": 1})
    assert shown["task"] == "digits" and shown["run"] == better
    fedmq(cluster, "deploy", "digits:1", "--to", "data_quantity >= 100", "--stages", "25%,50%,100%",  # the form
          "--max-failure-rate", "0.05", "--health", HEALTH, "--key", "operator.key", cwd=work)
    first = cluster.items("deployments", "list", {"name": "digits"})[0]
    done = wait_deployment(cluster, first["id"], {"completed", "rolled_back", "failed"})
    assert done["state"] == "completed", done
    cluster.wait_for(lambda: set(running_versions(cluster).values()) == {1}, 60, "every device on digits:1")

    # a broken version: the other run's model, registered as digits:2, stopped at stage 1 and rolled back
    fedmq(cluster, "model", "register", f"digits:{worse}", "--name", "digits", "--note", "deliberately broken",
          cwd=work)
    watched = fedmq(cluster, "deploy", "start", "digits:2", "--to", "data_quantity >= 100", "--stages",
                    "25%,50%,100%", "--max-failure-rate", "0.05", "--health", HEALTH, "--key", "operator.key",
                    "--watch", cwd=work, expect=1)  # followed live until it rolls back: exit 1
    assert "rolled_back" in watched
    second = next(d for d in cluster.items("deployments", "list", {"name": "digits"}) if d["version"] == 2)
    broken = wait_deployment(cluster, second["id"], {"completed", "rolled_back", "failed"})
    assert broken["state"] == "rolled_back", broken
    detail = broken["devices_detail"]
    took = [d for d in detail if d["stage"] == 1]
    assert len(took) == 1 and took[0]["state"] == "rolled_back", detail  # stage 1 of 3: one device of four
    assert {d["state"] for d in detail if d["stage"] > 1} == {"pending"}, detail  # the others never got it
    assert broken["devices"] == {"rolled_back": 1, "pending": 3}, broken["devices"]
    cluster.wait_for(lambda: set(running_versions(cluster).values()) == {1}, 60, "every device back on digits:1")

    steps = broken["timeline"]
    kinds = [s["kind"] for s in steps]
    assert kinds[0] == "deployment_created" and "deployment_stage_started" in kinds
    assert kinds.index("deployment_device_reported") < kinds.index("deployment_rolled_back")
    report = next(s for s in steps if s["kind"] == "deployment_device_reported")
    assert "accuracy" in report["reason"] and "< 0.8" in report["reason"], report
    rolled = next(s for s in steps if s["kind"] == "deployment_rolled_back")
    assert "stage 1" in rolled["reason"] and "0.05" in rolled["reason"], rolled
    status = fedmq(cluster, "deploy", "status", second["id"], cwd=work)
    assert "rolled_back" in status and "< 0.8" in status
    (ARTIFACTS / "lifecycle" / "broken-deployment.txt").write_text(status)


def test_a_device_offline_during_a_rollback_ends_on_the_right_version(cluster: DemoCluster, tmp_path: Path) -> None:
    """After the first test every device runs digits:1.  digits:3 (a third, good run) goes to all
    four; dev-4 goes offline; the operator rolls digits:3 back; dev-4 returns and ends on digits:1."""
    work = tmp_path / "operator"
    work.mkdir()
    shutil.copy(cluster.workdir / "keys" / "operator.key", work / "operator.key")
    train(cluster, "digits", {**GOOD, "seed": 1})
    fedmq(cluster, "model", "register", "digits", "--name", "digits", cwd=work)  # the latest run: digits:3
    assert cluster.call("models", "show", {"name": "digits"})["version"] == 3
    fedmq(cluster, "deploy", "start", "digits:3", "--to", "data_quantity >= 100", "--stages", "100%",
          "--health", HEALTH, "--key", "operator.key", cwd=work)
    third = next(d for d in cluster.items("deployments", "list", {"name": "digits"}) if d["version"] == 3)
    assert wait_deployment(cluster, third["id"], {"completed", "rolled_back", "failed"})["state"] == "completed"
    cluster.wait_for(lambda: set(running_versions(cluster).values()) == {3}, 60, "every device on digits:3")

    cluster.kill("dev-4")  # the device loses power
    cluster.wait_for(lambda: not next(d for d in cluster.items("devices", "list") if d["id"] == "dev-4")["online"],
                     60, "dev-4 offline")
    out = fedmq(cluster, "deploy", "rollback", third["id"], cwd=work)
    assert "rolled_back" in out
    cluster.wait_for(lambda: [running_versions(cluster)[d] for d in DEVICES[:3]] == [1, 1, 1], 60,
                     "the online devices back on digits:1")
    assert running_versions(cluster)["dev-4"] == 3  # what it last said, while it is away

    cluster.start_edge("dev-4")  # back: its retained record says digits:1
    cluster.wait_for(lambda: running_versions(cluster)["dev-4"] == 1, 120, "dev-4 on digits:1 again")
    back = cluster.call("deployments", "get", {"deployment": third["id"]})
    row = next(d for d in back["devices_detail"] if d["device"] == "dev-4")
    assert row["state"] == "rolled_back", row
    events = [e for e in cluster.items("events", "list", {"task": "digits"})
              if e["device"] == "dev-4" and e["kind"] == "model_installed"]
    assert events and (events[-1]["data"] or {}).get("version") == 1, events[-1:]
    (ARTIFACTS / "lifecycle").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "lifecycle" / "offline-rollback.json").write_text(json.dumps(back, indent=2, default=str))


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("npm") is None,
                    reason="the Models page's screenshot needs Chromium and npm: bash scripts/install.sh --test")
def test_the_models_page_shows_versions_metrics_where_deployed_stage_and_health(
        cluster: DemoCluster, tmp_path: Path) -> None:
    """After the two tests above: three versions, three deployments (completed, rolled back twice)."""
    with node_red(cluster.url, "operator", tmp_path / "node-red") as (_red, base):
        browser = Browser()
        try:
            browser.goto(f"{base}/models")
            browser.wait_for("document.body.innerText.includes('digits:1') && "
                             "document.body.innerText.includes('digits:3')", 60, "the model rows")
            browser.wait_for("document.body.innerText.includes('rolled_back') && "
                             "document.body.innerText.includes('completed')", 30, "the deployment rows")
            text = browser.js("document.body.innerText")
            assert "deliberately broken" not in text or "digits:2" in text
            assert "accuracy >= 0.8" in text and "stage 1" in text
            time.sleep(1.0)
            browser.screenshot(ARTIFACTS / "dashboards" / "models.png")
        finally:
            browser.close()
