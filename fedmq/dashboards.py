"""Starting Node-RED with the fedmq flows (``dashboards/``) against a broker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from broker.connection import BrokerSettings

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"


class DashboardError(RuntimeError):
    pass


def ensure_installed(folder: Path = DASHBOARDS) -> Path:
    """Node-RED and the dashboard nodes, from the npm registry (``npm ci`` on the lock file)."""
    red = folder / "node_modules" / "node-red" / "red.js"
    if red.is_file():
        return red
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise DashboardError("Node.js and npm are needed for the dashboards (Node-RED 4.1 runs on Node >= 18)")
    command = [npm, "ci" if (folder / "package-lock.json").is_file() else "install", "--no-audit", "--no-fund",
               "--loglevel=error"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0 or not red.is_file():
        raise DashboardError(f"npm could not install Node-RED in {folder}:\n{done.stderr[-2000:]}")
    return red


def node_red_command(broker_url: str, port: int, user_dir: Path, folder: Path = DASHBOARDS) -> tuple[list[str], dict[str, str]]:
    red = ensure_installed(folder)
    settings = BrokerSettings.from_url(broker_url)
    user_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "flows.json", user_dir / "flows.json")
    env = {**os.environ, "FEDMQ_MQTT_HOST": settings.host, "FEDMQ_MQTT_PORT": str(settings.port),
           "NODE_RED_ENABLE_PROJECTS": "false"}
    return [shutil.which("node") or "node", str(red), "--userDir", str(user_dir), "--port", str(port),
            "flows.json"], env


def run_node_red(broker_url: str, port: int, user_dir: Path, console: Any) -> None:
    command, env = node_red_command(broker_url, port, user_dir)
    console.print(f"Node-RED on http://127.0.0.1:{port}/ — dashboards at http://127.0.0.1:{port}/dashboard "
                  f"(broker {broker_url}); Ctrl-C stops it")
    proc = subprocess.Popen(command, env=env)

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    finally:
        signal.signal(signal.SIGTERM, previous)
