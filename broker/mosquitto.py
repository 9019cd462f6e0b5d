"""Run a real Mosquitto from the repository's ``mosquitto.conf`` on a port of our choosing.

Tests and benchmarks never rely on a Mosquitto that happens to be running: they start their own,
keeping every setting of the shipped config (TCP_NODELAY, limits, persistence) and replacing only
what must differ per instance -- the listener, the persistence folder and the auth files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedmq.broker.net import free_port, wait_for_port

# The repository's top-level mosquitto.conf, shipped as package data (broker/mosquitto.conf links to it).
REPO_CONFIG = Path(str(resources.files("fedmq.broker") / "mosquitto.conf"))
# Settings replaced per instance; everything else is kept verbatim.
_REPLACED = ("listener", "persistence_location", "pid_file", "user", "password_file", "acl_file",
             "allow_anonymous", "cafile", "certfile", "keyfile", "require_certificate", "tls_version",
             "log_dest", "plugin", "plugin_opt_config_file")
_FALLBACK = "per_listener_settings false\nset_tcp_nodelay true\nmax_packet_size 1048576\npersistence true\n"
_PLUGIN = "mosquitto_dynamic_security.so"


class MosquittoNotInstalled(RuntimeError):
    pass


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise MosquittoNotInstalled(
        "mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")


def dynsec_plugin() -> Path:
    """The dynamic-security plugin Debian's mosquitto package installs (path by architecture)."""
    for folder in (*sorted(Path("/usr/lib").glob("*-linux-gnu")), Path("/usr/lib"), Path("/usr/local/lib")):
        if (folder / _PLUGIN).is_file():
            return folder / _PLUGIN
    raise MosquittoNotInstalled(f"{_PLUGIN} is not installed (it comes with Debian's mosquitto package)")


@dataclass(frozen=True)
class Tls:
    """Server certificate files of a TLS listener (scripts/secure_mosquitto.sh makes them)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


def derive_config(source: str, port: int, data_dir: Path, *, password_file: Path | None = None,
                  acl_file: Path | None = None, host: str = "127.0.0.1", dynsec_file: Path | None = None,
                  tls: Tls | None = None) -> str:
    kept = [line for line in source.splitlines()
            if line.strip().split(" ", 1)[0] not in _REPLACED]
    extra = [f"listener {port} {host}", f"persistence_location {data_dir}/", "log_dest stderr"]
    if tls is not None:
        extra += [f"cafile {tls.cafile}", f"certfile {tls.certfile}", f"keyfile {tls.keyfile}",
                  "tls_version tlsv1.2", f"require_certificate {str(tls.require_certificate).lower()}"]
    if os.geteuid() == 0:
        # Started as root, Mosquitto drops to user 'mosquitto', which cannot read our private
        # temporary folder; an instance of our own stays the user that started it.
        extra.append("user root")
    if dynsec_file is not None:
        extra += ["allow_anonymous false", f"plugin {dynsec_plugin()}", f"plugin_opt_config_file {dynsec_file}"]
    elif password_file:
        extra += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        extra.append("allow_anonymous true")
    if acl_file:
        extra.append(f"acl_file {acl_file}")
    return "\n".join([*kept, "", "# --- per-instance settings (fedmq) ---", *extra]) + "\n"


def init_dynsec(path: Path, admin: str, password: str) -> Path:
    """A dynamic-security file with one admin client, as ``mosquitto_ctrl dynsec init`` writes it."""
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl is None:
        raise MosquittoNotInstalled("mosquitto_ctrl is not installed: apt-get install -y mosquitto-clients")
    path.unlink(missing_ok=True)
    subprocess.run([ctrl, "dynsec", "init", str(path), admin, password], check=True, capture_output=True)
    return path


class MosquittoProcess:
    """A Mosquitto child process; ``restart()`` keeps its port and persistence folder."""

    def __init__(self, port: int = 0, *, config: Path | None = None, workdir: Path | None = None,
                 password_file: Path | None = None, acl_file: Path | None = None,
                 host: str = "127.0.0.1", admin: tuple[str, str] | None = None, tls: Tls | None = None,
                 dynsec_file: Path | None = None) -> None:
        """``admin``: load the dynamic-security plugin with a new file whose admin is this
        (username, password); ``dynsec_file``: with a copy of this file instead (one
        scripts/secure_mosquitto.sh made); ``tls``: a TLS listener instead of plain MQTT."""
        self.host = host
        self.port = port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-mosquitto-"))
        source = (config or REPO_CONFIG)
        text = source.read_text() if source.exists() else _FALLBACK
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.tls = tls
        if dynsec_file is not None:
            dynsec_file = Path(shutil.copyfile(dynsec_file, self.workdir / "dynamic-security.json"))
        elif admin is not None:
            dynsec_file = init_dynsec(self.workdir / "dynamic-security.json", *admin)
        self.config_path.write_text(derive_config(text, self.port, self.workdir / "data",
                                                  password_file=password_file, acl_file=acl_file,
                                                  host=host, dynsec_file=dynsec_file, tls=tls))
        self.log_path = self.workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        binary = mosquitto_binary()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([binary, "-c", str(self.config_path)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if not wait_for_port(self.host, self.port, timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{self.log_tail()}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Die without a clean shutdown, as a crashed broker would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
