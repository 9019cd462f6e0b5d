"""Edge configuration: a TOML file, then environment variables, then flags (each overriding the
one before).  Only the device id is required.

    # fedmq-edge.toml
    device_id = "pi-kitchen"
    broker = "mqtts://dev-pi-kitchen:secret@fleet.example.org:8883"
    alternates = ["mqtts://backup.example.org:8883"]
    work_dir = "/var/lib/fedmq-edge"
    data_dir = "/srv/data"
    trusted_keys = ["/etc/fedmq/operator.pub"]
    policy = "at_most_one"
    recheck_interval_s = 60
    [labels]
    region = "eu"
    [private_labels]       # seen only by tasks that select on the device; never reported
    site = "clinic-7"

Paths become absolute here and nowhere else: a relative path in the file is taken relative to
the file's folder, one from a flag or the environment relative to the working directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedmq.broker.connection import BrokerSettings
from fedmq.broker.topics import DEFAULT_PREFIX
from fedmq.broker.urls import with_absolute_files
from fedmq.ftdl.paths import absolute

_PATHS = ("work_dir", "data_dir")


@dataclass
class EdgeConfig:
    device_id: str
    broker: str = "mqtt://127.0.0.1:1883"
    alternates: list[str] = field(default_factory=list)
    prefix: str = DEFAULT_PREFIX
    work_dir: Path = Path("fedmq-edge")
    data_dir: Path | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    allow_unsigned: bool = False
    policy: str = "at_most_one"
    recheck_interval_s: float = 60.0
    report_interval_s: float = 300.0
    rpc_timeout_s: float = 10.0
    labels: dict[str, Any] = field(default_factory=dict)
    private_labels: dict[str, Any] = field(default_factory=dict)  # criteria of device-selected tasks only
    client_time_limit_s: float | None = None
    deploy_time_limit_s: float | None = 300.0  # a [deploy] entry point measures a model; it does not train

    def __post_init__(self) -> None:
        # Relative paths still here came from code or flags: the working directory is their base.
        self.work_dir = absolute(self.work_dir)
        self.data_dir = absolute(self.data_dir) if self.data_dir is not None else None
        self.trusted_keys = [absolute(p) for p in self.trusted_keys]
        self.broker = with_absolute_files(self.broker) if isinstance(self.broker, str) else self.broker


def load_edge_config(file: Path | None, overrides: dict[str, Any]) -> EdgeConfig:
    values: dict[str, Any] = {}
    if file is not None:
        try:
            from_file = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read edge config {file}: {exc}") from None
        base = absolute(file).parent
        for key in _PATHS:
            if isinstance(from_file.get(key), str):
                from_file[key] = absolute(from_file[key], base)
        if isinstance(from_file.get("broker"), str):  # ?ca=certs/ca.crt beside the file
            from_file["broker"] = with_absolute_files(from_file["broker"], base)
        if isinstance(from_file.get("trusted_keys"), list):
            from_file["trusted_keys"] = [absolute(p, base) if isinstance(p, str) else p
                                         for p in from_file["trusted_keys"]]
        values.update(from_file)
    values.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    known = {f.name for f in fields(EdgeConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown edge settings {sorted(unknown)}; known: {', '.join(sorted(known))}")
    if "device_id" not in values:
        raise ValueError("a device id is required (--device-id, FEDMQ_DEVICE_ID or device_id in the config file)")
    for key in _PATHS:
        if values.get(key) is not None:
            if not isinstance(values[key], (str, Path)):
                raise ValueError(f"{key} must be a path")
            values[key] = absolute(values[key])
    trusted = values.get("trusted_keys", [])
    if not isinstance(trusted, list) or not all(isinstance(p, (str, Path)) for p in trusted):
        raise ValueError("trusted_keys must be a list of paths")
    values["trusted_keys"] = [absolute(p) for p in trusted]
    config = EdgeConfig(**values)
    user = BrokerSettings.from_url(config.broker).username
    if user is not None and user != config.device_id:
        # The broker binds a device's topics to its username: as anyone else it would connect
        # and then be refused every subscription and publish.
        raise ValueError(f"the broker URL's user {user!r} is not this device {config.device_id!r}; "
                         "use the URL from this device's config (fedmq device add prints it)")
    return config
