"""Starting Node-RED with the fedmq flows (package data of ``fedmq.dashboards``) against a broker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from fedmq.broker.connection import BrokerSettings
from fedmq.broker.roles import Role, bound_client_id
from fedmq.broker.topics import DEFAULT_PREFIX
from fedmq.broker.urls import without_credentials

DASHBOARDS = Path(str(resources.files("fedmq.dashboards")))  # package data: flows and npm manifest


class DashboardError(RuntimeError):
    pass


def ensure_installed(user_dir: Path, folder: Path = DASHBOARDS) -> Path:
    """Node-RED and the dashboard nodes, from the npm registry (``npm ci`` on the lock file).

    A source checkout where ``bash scripts/install.sh --test`` ran has them in ``dashboards/``;
    otherwise (a wheel, whose package folder may not be writable) they go to ``user_dir/node``."""
    for candidate in (folder, user_dir / "node"):
        red = candidate / "node_modules" / "node-red" / "red.js"
        if red.is_file():
            return red
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise DashboardError("Node.js and npm are needed for the dashboards (Node-RED 4.1 runs on Node >= 18): "
                             "apt-get install -y nodejs npm")
    target = user_dir / "node"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(folder / name, target / name)
    red = target / "node_modules" / "node-red" / "red.js"
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target,
                          capture_output=True, text=True)
    if done.returncode != 0 or not red.is_file():
        raise DashboardError(f"npm could not install Node-RED in {target}:\n{done.stderr[-2000:]}")
    return red


# Node-RED reads the broker node's credentials from flows_cred.json; fedmq writes only references
# to environment variables there, unencrypted (there is nothing secret in it to encrypt).
_CREDENTIALS = {"fedmq-broker": {"user": "${FEDMQ_MQTT_USER}", "password": "${FEDMQ_MQTT_PASSWORD}"}}
_SETTINGS = "module.exports = { flowFile: 'flows.json', credentialSecret: false };\n"


def node_red_command(broker_url: str, port: int, user_dir: Path, caller: str, client_id: str | None = None,
                     folder: Path = DASHBOARDS) -> tuple[list[str], dict[str, str]]:
    """``caller`` is the identity the dashboards speak as -- with credentials, the URL's user: a
    viewer watches, an operator also steers.  ``client_id`` defaults to the one a viewer is bound
    to (operators may use any)."""
    settings = BrokerSettings.from_url(broker_url)
    if settings.tls:
        raise DashboardError("the dashboards connect over plain MQTT: give them the broker's loopback listener "
                             "(mosquitto.conf's port 1883 on 127.0.0.1) and run Node-RED on that host")
    user_dir.mkdir(parents=True, exist_ok=True)
    red = ensure_installed(user_dir, folder)
    shutil.copyfile(folder / "flows.json", user_dir / "flows.json")
    (user_dir / "flows_cred.json").write_text(json.dumps(_CREDENTIALS, indent=2) + "\n")
    (user_dir / "fedmq-settings.js").write_text(_SETTINGS)
    env = {**os.environ, "FEDMQ_MQTT_HOST": settings.host, "FEDMQ_MQTT_PORT": str(settings.port),
           "FEDMQ_MQTT_USER": settings.username or "", "FEDMQ_MQTT_PASSWORD": settings.password or "",
           "FEDMQ_MQTT_CLIENT_ID": client_id or bound_client_id(caller, Role.VIEWER) or caller,
           "FEDMQ_CALLER": caller, "FEDMQ_REPLY_FILTER": f"{DEFAULT_PREFIX}/reply/{caller}/#",
           "NODE_RED_ENABLE_PROJECTS": "false"}
    return [shutil.which("node") or "node", str(red), "--userDir", str(user_dir), "--settings",
            str(user_dir / "fedmq-settings.js"), "--port", str(port)], env


def run_node_red(broker_url: str, port: int, user_dir: Path, caller: str, console: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # Node-RED itself exits 0 on a taken port
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise DashboardError(f"port {port} is not free for Node-RED ({exc.strerror}): "
                                 "choose another with --port") from None
    command, env = node_red_command(broker_url, port, user_dir, caller)
    console.print(f"Node-RED on http://127.0.0.1:{port}/ — dashboards at http://127.0.0.1:{port}/dashboard "
                  f"(broker {without_credentials(broker_url)}); Ctrl-C stops it")
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
    if proc.returncode not in (0, None, -signal.SIGTERM):
        raise DashboardError(f"Node-RED exited with {proc.returncode}")
