"""The idle edge agent stays light: what ``fedmq edge`` imports, and its lean command line.

The figures (RSS, CPU) are bench/edge_idle.py's; these tests catch the imports that cost them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.cloud.app import CloudApp, CloudConfig
from fedmq.edge import agent

# The idle agent runs as ``fedmq edge`` does (the console script calls fedmq.cli.run); after its
# first decision cycle (info reported, tasks requested, nothing offered) it lists what is loaded.
IDLE_AGENT = """
import json, sys
import fedmq.edge.lean_paho as lean
lean_import = lean.import_paho_lean
def lean_then_patch():  # the entry imports paho its lean way before the agent: patch the agent after it
    assert lean_import(), "paho or hashlib was imported before the edge's entry asked for it"
    import fedmq.edge.agent as agent
    cycle = agent.EdgeAgent._cycle
    def once(self):
        cycle(self)
        print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), flush=True)
        self.stop()
    agent.EdgeAgent._cycle = once
    return True
lean.import_paho_lean = lean_then_patch
sys.argv = ["fedmq", "--broker", sys.argv[1], "edge", "--device-id", "light-1", "--work-dir", sys.argv[2],
            "--allow-unsigned", "--label", "region=eu"]
import fedmq.cli
fedmq.cli.run()
"""
# _hashlib: OpenSSL's digests, ~2.2 MB, loaded at the first bundle or model verification (edge.lean_paho)
NEVER = ("torch", "flwr", "numpy", "typer", "rich", "click", "cryptography", "asyncio", "pydantic", "_hashlib")


@pytest.fixture
def idle_imports(embedded_broker, tmp_path: Path) -> set[str]:
    cloud = CloudApp(CloudConfig(broker=embedded_broker.url, home=tmp_path / "cloud", client_id="cloud-light-test",
                                 allow_unsigned=True)).start()
    try:
        out = subprocess.run([sys.executable, "-c", IDLE_AGENT, embedded_broker.url, str(tmp_path / "edge")],
                             capture_output=True, text=True, timeout=60)
    finally:
        cloud.stop()
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert lines, out.stdout + out.stderr
    return set(json.loads(lines[-1]))


def test_the_idle_agent_imports_no_training_cli_or_crypto_packages(idle_imports: set[str]) -> None:
    assert "paho" in idle_imports  # it did run
    assert sorted(idle_imports & set(NEVER)) == []


def _typer_edge_params() -> dict[str, tuple[str, str | None, bool]]:
    from typer.main import get_command

    from fedmq.cli.app import app
    command = get_command(app).commands["edge"]  # type: ignore[attr-defined]
    return {opt: (p.name, p.envvar, p.multiple) for p in command.params for opt in p.opts}


def test_the_lean_command_line_has_the_typer_commands_options() -> None:
    from fedmq.cli.edge_run import EDGE_FLAGS, EDGE_VALUES

    lean = {opt: (name, env, many) for opt, (name, env, many, _kind) in EDGE_VALUES.items()}
    lean.update({opt: (name, None, False) for opt, name in EDGE_FLAGS.items()})
    assert lean == _typer_edge_params()


def test_lean_arguments() -> None:
    from fedmq.cli.edge_run import lean_args

    args = lean_args(["-v", "--broker=mqtt://light-1:pw@h:1", "edge", "--device-id", "light-1", "--label", "a=b",
                      "--label=c=d", "--trust", "k.pub", "--recheck-interval", "5", "--allow-unsigned"],
                     {"FEDMQ_WORK_DIR": "/w", "FEDMQ_DATA_DIR": ""})
    assert args == {"alternate": [], "trust": [Path("k.pub")], "device_id": "light-1", "recheck_interval": 5.0,
                    "allow_unsigned": True, "work_dir": Path("/w"), "labels": {"a": "b", "c": "d"},
                    "broker": "mqtt://light-1:pw@h:1", "broker_on_command_line": True, "prefix": None,
                    "verbose": True}
    from_env = lean_args(["edge"], {"FEDMQ_BROKER": "mqtt://x@h", "FEDMQ_PREFIX": "p/v1"})
    assert from_env is not None and from_env["broker"] == "mqtt://x@h" and not from_env["broker_on_command_line"]
    assert from_env["prefix"] == "p/v1"
    # What only typer can answer (help, version, errors, other verbs) goes to typer.
    for argv in (["edge", "--help"], ["--version", "edge"], ["edge", "--nope"], ["edge", "--label", "x"],
                 ["edge", "--recheck-interval", "soon"], ["edge", "--device-id"], ["--prefix", "edge", "task", "list"],
                 ["device", "add", "edge"], ["--broker"]):
        assert lean_args(argv, {}) is None, argv


def test_forwarded_kinds_are_the_reporters() -> None:
    from fedmq.ftdl.channel import ReporterKind

    assert {"error", "progress", "info", "stats"} <= {k.value for k in ReporterKind}
    assert all(key in {k.value for k in ReporterKind} | {"trigger_result", "trigger_refused"}
               for key in agent._FORWARDED)


def test_fedmq_edge_help_and_errors_are_typers(tmp_path: Path) -> None:
    fedmq = Path(sys.executable).with_name("fedmq")
    shown = subprocess.run([str(fedmq), "edge", "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--device-id" in shown.stdout and "--label" in shown.stdout
    bad = subprocess.run([str(fedmq), "edge", "--label", "nokey"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    missing = subprocess.run([str(fedmq), "edge", "--work-dir", str(tmp_path)], capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 4 and "device id is required" in missing.stderr
