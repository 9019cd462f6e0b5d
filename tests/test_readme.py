"""The README's commands, run as a reader runs them: from a working directory, with the
README's own relative paths, the text taken from README.md itself (scripts/readme.py, which
.ci/run uses too)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import readme  # noqa: E402  (scripts/readme.py)

pytestmark = pytest.mark.slow


def test_the_readme_starts_with_two_commands_and_ci_runs_them() -> None:
    assert readme.command("demo") == "bash scripts/install.sh && .venv/bin/fedmq demo"
    assert readme.command("tests") == "bash scripts/install.sh --test && .venv/bin/python -m pytest"
    assert readme.command("failover") == ".venv/bin/fedmq demo --scenario failover"
    assert readme.command("serverless") == ".venv/bin/fedmq demo --scenario serverless"
    ci = (REPO / ".ci" / "run").read_text()
    assert 'python3 scripts/readme.py "$name"' in ci
    assert [line for line in ci.splitlines() if line.startswith("step ")] == [
        "step demo", "step failover", "step serverless", "step tests"]


def test_readme_parsing_refuses_a_readme_without_its_commands() -> None:
    with pytest.raises(SystemExit, match="exactly two commands"):
        readme.command("demo", "# x\n\n```bash\nonly one\n```\n")
    with pytest.raises(SystemExit, match="no '## A quick tour'"):
        readme.command("tour", "```bash\na\nb\n```\n")


def processes_under(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.cwd().startswith(str(folder)) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.splitlines()
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
            and not {".git", ".venv", "node_modules", "__pycache__"} & set(p.relative_to(REPO).parts)]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Iterator[Path]:
    """A copy of the repository root as a reader has it after the first command: every tracked
    file (so a command that writes where the sources are is caught), and the virtualenv the
    tests run in as ``.venv``."""
    root = tmp_path / "fedmq"
    for name in tracked_files():
        source = REPO / name
        if source.is_file() or source.is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name, follow_symlinks=False)
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    try:
        yield root
    finally:
        for proc in processes_under(root):  # whatever a failing run left behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()


@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "activate").is_file(), reason="needs a virtualenv")
def test_the_quick_tour_runs_as_written(repo_copy: Path) -> None:
    script = repo_copy.parent / "tour.sh"
    script.write_text("set -euo pipefail\n" + readme.command("tour"))
    sources = {p for p in repo_copy.rglob("*") if p.is_file() and ".venv" not in p.parts}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_") and k != "VIRTUAL_ENV"}
    started = time.monotonic()
    done = subprocess.run(["bash", str(script)], cwd=repo_copy, env=env, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "digits-1 finished run 1 (5/5 rounds)" in output
    with np.load(repo_copy / "model.npz") as model:  # the final global model, loadable
        arrays = [model[name] for name in model.files]
    assert len(arrays) >= 2 and all(a.size for a in arrays)
    assert (repo_copy / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (repo_copy / "events.json").stat().st_size > 0
    # Run folders live under the cloud home, never inside the unpacked bundle.
    assert (repo_copy / "fedmq-cloud" / "runs" / "digits-1" / "1" / "model.npz").is_file()
    assert not list((repo_copy / "fedmq-cloud" / "tasks").rglob("model.npz"))
    # Nothing it wrote landed among the sources (a --home ./cloud once filled the cloud package).
    written = {p for p in repo_copy.rglob("*") if p.is_file() and ".venv" not in p.parts} - sources
    packages = ("broker", "cloud", "edge", "ftdl", "fedmq", "dashboards", "examples", "tests", "scripts", "docs")
    among_sources = sorted(str(p.relative_to(repo_copy)) for p in written
                           if p.relative_to(repo_copy).parts[0] in packages and "__pycache__" not in p.parts)
    assert among_sources == []
    deadline = time.monotonic() + 15
    while processes_under(repo_copy) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(repo_copy) == []  # the tour's last line stopped everything
    assert time.monotonic() - started < 240


def test_the_demo_runs_from_a_working_directory_with_its_defaults(repo_copy: Path) -> None:
    done = subprocess.run([str(repo_copy / ".venv" / "bin" / "fedmq"), "demo", "--rounds", "2"], cwd=repo_copy,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "training C round" in output and "final accuracy" in output
    assert "Traceback" not in output  # nothing from the embedded broker reaches the terminal
    result = (repo_copy / "fedmq-demo" / "result.json").read_text()
    assert '"state": "finished"' in result
    assert (repo_copy / "fedmq-demo" / "logs" / "broker.log").is_file()


def test_the_serverless_demo_loses_its_aggregator_and_finishes(repo_copy: Path) -> None:
    command = readme.command("serverless").split()
    done = subprocess.run([str(repo_copy / command[0]), *command[1:], "--rounds", "3"], cwd=repo_copy,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    result = json.loads((repo_copy / "fedmq-demo" / "result.json").read_text())
    killed = result["killed"]
    assert result["task"]["state"] == "finished" and killed["round"] == 2, result
    assert killed["took_over_by"] in {"dev-1", "dev-2", "dev-3"} - {killed["device"]}
    assert killed["next_global_s"] is not None and result["accuracy"] > 0.8
    assert f"killed {killed['device']}, the aggregator of round 2" in output
    assert [row["round"] for row in result["metrics"]] == [1, 2, 3]  # each round once
    steps = [row["step"] for row in result["timeline"]]
    aggregated = [s for s in steps if s.endswith(" aggregated")]  # who aggregated each round, once each
    assert aggregated == ["global 0 aggregated", "global 1 aggregated", "global 2 aggregated",
                          "global 3 aggregated", "final 4 aggregated"], steps
    assert any(s.startswith("failover 2:") and killed["device"] in s for s in steps), steps


def test_the_flower_cli_in_the_environment_runs() -> None:
    """amqtt pins typer==0.15.4, on which `flwr --help` crashes; the install pins what it needs."""
    flwr = Path(sys.prefix) / "bin" / "flwr"
    for args in (["--help"], ["new", "--help"], ["run", "--help"]):
        done = subprocess.run([str(flwr), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Usage" in done.stdout


def test_device_list_help_says_what_the_default_is() -> None:
    done = subprocess.run([sys.executable, "-m", "fedmq.cli", "device", "list", "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert "all by default" in done.stdout and "default: offline" not in done.stdout.replace("  ", " ")
