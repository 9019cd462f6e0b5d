"""Paths a user gives are made absolute once, where configuration is loaded; nothing below that
receives a relative path (a task runs with its bundle folder as working directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq import ftdl
from fedmq.broker.net import free_port
from fedmq.cloud.app import CloudConfig
from fedmq.cloud.task_servers import TaskSettings
from fedmq.edge.config import EdgeConfig, load_edge_config
from fedmq.ftdl.paths import absolute


def test_edge_flags_are_taken_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_edge_config(None, {"device_id": "dev-1", "work_dir": Path("./edge1"),
                                     "data_dir": Path("data/dev-1"), "trusted_keys": [Path("keys/op.pub")]})
    assert config.work_dir == tmp_path / "edge1"
    assert config.data_dir == tmp_path / "data" / "dev-1"
    assert config.trusted_keys == [tmp_path / "keys" / "op.pub"]


def test_edge_config_file_paths_are_taken_from_the_files_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "edge.toml").write_text('device_id = "pi"\nwork_dir = "state"\ndata_dir = "../srv/data"\n'
                                   'broker = "mqtts://pi:pw@fleet:8883?ca=certs/ca.crt&cert=certs/pi.crt&key=certs/pi.key"\n'
                                   'trusted_keys = ["keys/op.pub", "/abs/other.pub"]\n')
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    config = load_edge_config(Path("../../etc/edge.toml"), {})
    assert config.work_dir == etc / "state"
    assert config.data_dir == tmp_path / "srv" / "data"
    assert config.trusted_keys == [etc / "keys" / "op.pub", Path("/abs/other.pub")]
    assert config.broker == f"mqtts://pi:pw@fleet:8883?ca={etc}/certs/ca.crt&cert={etc}/certs/pi.crt&key={etc}/certs/pi.key"
    # a flag still wins over the file, relative to the working directory
    config = load_edge_config(Path("../../etc/edge.toml"), {"work_dir": Path("mine")})
    assert config.work_dir == elsewhere / "mine"


def test_edge_config_with_a_wrong_path_type_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "edge.toml").write_text('device_id = "pi"\nwork_dir = 3\n')
    with pytest.raises(ValueError, match="work_dir must be a path"):
        load_edge_config(tmp_path / "edge.toml", {})
    (tmp_path / "edge.toml").write_text('device_id = "pi"\ntrusted_keys = "one.pub"\n')
    with pytest.raises(ValueError, match="trusted_keys must be a list of paths"):
        load_edge_config(tmp_path / "edge.toml", {})


def test_configs_built_in_code_are_absolute_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert EdgeConfig(device_id="d", work_dir=Path("w")).work_dir == tmp_path / "w"
    cloud = CloudConfig(home=Path("./cloud"), trusted_keys=[Path("k.pub")])
    assert cloud.home == tmp_path / "cloud" and cloud.trusted_keys == [tmp_path / "k.pub"]
    with pytest.raises(ValueError, match="absolute"):
        TaskSettings(home=Path("cloud"), broker_url="mqtt://x", prefix="fedmq/v1")
    assert CloudConfig(broker="mqtts://c:p@h:8883?ca=certs/ca.crt").broker == \
        f"mqtts://c:p@h:8883?ca={tmp_path}/certs/ca.crt"
    assert absolute("~/x").is_absolute() and absolute("a/../b", "/base") == Path("/base/b")


def test_a_task_process_never_gets_a_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "fedmq.toml").write_text('[task]\nname = "t"\n[client]\nentry = "client.py"\n')
    (folder / "client.py").write_text("")
    monkeypatch.chdir(tmp_path)
    cases = [dict(task_dir=Path("t"), log_dir=tmp_path / "logs"),
             dict(task_dir=folder, log_dir=Path("logs")),
             dict(task_dir=folder, log_dir=tmp_path / "logs", data_dir=Path("data")),
             dict(task_dir=folder, log_dir=tmp_path / "logs", env={"FEDMQ_OUTPUT_DIR": "runs/1"})]
    for case in cases:
        task_dir = case.pop("task_dir")
        with pytest.raises(ValueError, match="must be an absolute path"):
            ftdl.start_task(task_dir, "client", task_id="t", on_event=lambda e: None, **case)


def test_an_edge_config_file_beats_the_shells_broker_and_must_name_this_device(tmp_path: Path) -> None:
    """An operator's FEDMQ_BROKER in the shell once replaced the device's own credentials: the
    edge connected as the operator and every subscription was refused."""
    fedmq = str(Path(sys.executable).with_name("fedmq"))
    port = free_port()
    (tmp_path / "dev-1.toml").write_text(f'device_id = "dev-1"\nbroker = "mqtt://dev-1:pw@127.0.0.1:{port}"\n'
                                         'work_dir = "edge1"\n')
    env = {**os.environ, "FEDMQ_BROKER": "mqtt://alice:secret@127.0.0.1:1"}
    with subprocess.Popen([fedmq, "edge", "--config", "dev-1.toml"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as edge:
        try:
            assert edge.stdout is not None
            assert f"fedmq edge dev-1 -> mqtt://127.0.0.1:{port}" in edge.stdout.readline()
        finally:
            edge.terminate()
    (tmp_path / "dev-2.toml").write_text('device_id = "dev-2"\nbroker = "mqtt://alice:secret@127.0.0.1:1"\n')
    done = subprocess.run([fedmq, "edge", "--config", "dev-2.toml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 4 and "the broker URL's user 'alice' is not this device 'dev-2'" in done.stderr
