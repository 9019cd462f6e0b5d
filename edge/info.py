"""What a device reports about itself (``devices.update_info``), gathered without importing any
machine-learning package: versions come from package metadata, resources from the OS."""

from __future__ import annotations

import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

RELEVANT_PACKAGES = ("fedmq", "torch", "torchvision", "flwr", "numpy", "scikit-learn", "scipy", "pandas", "tensorflow")


def installed_packages(names: tuple[str, ...] = RELEVANT_PACKAGES) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def memory_mb() -> float | None:
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (ValueError, OSError, AttributeError):
        return None


def data_quantity(data_dir: Path | None) -> int:
    """Samples in the data folder: ``meta.json``'s ``samples`` if the data set says so, otherwise
    the number of files in it."""
    if data_dir is None or not data_dir.is_dir():
        return 0
    meta = data_dir / "meta.json"
    if meta.is_file():
        try:
            samples = json.loads(meta.read_text()).get("samples")
            if isinstance(samples, int) and samples >= 0:
                return samples
        except (OSError, ValueError, AttributeError):
            pass
    return sum(1 for p in data_dir.rglob("*") if p.is_file())


def gather(data_dir: Path | None, work_dir: Path, labels: dict[str, Any], task_stats: dict[str, dict[str, Any]],
           current_task: str | None, models: dict[str, int] | None = None) -> dict[str, Any]:
    """``models``: the version of each deployed model the device runs (``{name: version}``)."""
    info: dict[str, Any] = {
        "data_quantity": data_quantity(data_dir), "cpu_count": os.cpu_count() or 1,
        "disk_free_mb": round(shutil.disk_usage(work_dir).free / 2**20, 1),
        "python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}",
        "packages": installed_packages(), "labels": labels, "tasks": task_stats, "models": models or {},
    }
    memory = memory_mb()
    if memory is not None:
        info["memory_mb"] = memory
    if current_task:
        info["current_task"] = current_task
        stats = task_stats.get(current_task, {})
        for key in ("accuracy", "contribution"):
            if isinstance(stats.get(key), (int, float)):
                info[key] = float(stats[key])
    return info
