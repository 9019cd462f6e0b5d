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
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from edge.agent import EdgeConfig

_PATHS = {"work_dir", "data_dir"}


def load_edge_config(file: Path | None, overrides: dict[str, Any]) -> EdgeConfig:
    values: dict[str, Any] = {}
    if file is not None:
        try:
            values.update(tomllib.loads(file.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read edge config {file}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    known = {f.name for f in fields(EdgeConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown edge settings {sorted(unknown)}; known: {', '.join(sorted(known))}")
    if "device_id" not in values:
        raise ValueError("a device id is required (--device-id, FEDMQ_DEVICE_ID or device_id in the config file)")
    for key in _PATHS:
        if values.get(key) is not None:
            values[key] = Path(values[key])
    values["trusted_keys"] = [Path(p) for p in values.get("trusted_keys", [])]
    return EdgeConfig(**values)
