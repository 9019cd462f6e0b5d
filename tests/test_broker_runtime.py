"""The brokers themselves: embedded auth, the shipped Mosquitto config and ACL, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.broker.connection import BrokerUnavailable, MqttConnection, new_client_id
from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.mosquitto import REPO_CONFIG, MosquittoProcess
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.rpc_server import RpcServer

from conftest import EchoState, Stack, make_echo_service

REPO = Path(__file__).resolve().parent.parent
FEDMQ = [sys.executable, "-m", "fedmq.cli"]


def test_embedded_broker_password_auth() -> None:
    with EmbeddedBroker(users={"cloud": "s3cret"}) as embedded:
        good = MqttConnection(new_client_id("ok"), f"mqtt://cloud:s3cret@127.0.0.1:{embedded.port}")
        good.start(timeout=5)
        good.stop()
        bad = MqttConnection(new_client_id("bad"), f"mqtt://cloud:wrong@127.0.0.1:{embedded.port}")
        with pytest.raises(BrokerUnavailable):
            bad.start(timeout=2)
        bad.stop()


def test_tests_run_mosquitto_with_the_shipped_settings(mosquitto_broker: MosquittoProcess) -> None:
    derived = mosquitto_broker.config_path.read_text()
    for setting in ("set_tcp_nodelay true", "max_packet_size 1048576", "persistence true"):
        assert setting in REPO_CONFIG.read_text() and setting in derived
    assert f"listener {mosquitto_broker.port} 127.0.0.1" in derived
    assert "listener 1883" not in derived


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_shipped_acl_binds_the_caller_to_its_credentials(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user in ("cloud", "dev-1"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"pw-{user}"], check=True)
    with MosquittoProcess(password_file=passwd, acl_file=REPO / "mosquitto.acl") as mosq:
        server_conn = MqttConnection("svc-acl", f"mqtt://cloud:pw-cloud@127.0.0.1:{mosq.port}").start()
        state = EchoState()
        server = RpcServer(server_conn)
        server.add(make_echo_service(state))
        server.start()
        device = MqttConnection(new_client_id("dev"), f"mqtt://dev-1:pw-dev-1@127.0.0.1:{mosq.port}").start()
        try:
            assert RpcClient(device, "dev-1").start().call("echo", "count", {"key": "own"}) == 1
            with pytest.raises(RpcError) as err:  # speaking as another device is not delivered
                RpcClient(device, "dev-2").start().call("echo", "count", {"key": "spoof"}, timeout=1)
            assert err.value.code is ErrorCode.TIMEOUT and "spoof" not in state.runs
        finally:
            device.stop()
            server_conn.stop()
            server.stop()


def test_cli_broker_runs_in_the_foreground_and_stops_on_ctrl_c() -> None:
    # Ctrl-C is SIGINT with its default disposition (a background CI shell may have ignored it).
    proc = subprocess.Popen([*FEDMQ, "broker", "--port", "0"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        conn = MqttConnection(new_client_id("cli"), f"mqtt://127.0.0.1:{port}").start(timeout=5)
        conn.stop()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_call(rpc_stack: Stack) -> None:
    env = {**os.environ, "FEDMQ_BROKER": rpc_stack.url}
    done = subprocess.run([*FEDMQ, "call", "echo", "add", "--args", '{"a": 1, "b": 2}'],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 3
    bad = subprocess.run([*FEDMQ, "call", "echo", "add", "--args", '{"a": "x"}'],
                         capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 1 and "invalid_args" in bad.stderr
    garbage = subprocess.run([*FEDMQ, "call", "echo", "add", "--args", "{nope"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert garbage.returncode == 2 and "not JSON" in garbage.stderr


def test_cli_reports_an_unreachable_broker() -> None:
    from fedmq.broker.net import free_port

    done = subprocess.run([*FEDMQ, "--broker", f"mqtt://127.0.0.1:{free_port()}", "call", "echo", "ping"],
                          capture_output=True, text=True, timeout=30)
    # 3: the broker is unreachable (2 is a usage error; docs/cli.md has the table)
    assert done.returncode == 3 and "no connection to the MQTT broker" in done.stderr
