"""Comparing runs by their records (``RunHistory.run``): what each was made from and how it ended,
as named fields, and which of those differ between runs.

Pure functions over the records, so the CLI (``fedmq run compare``) and the cloud can share them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The order sections are shown in: what the run was started with, who trained on what, the outcome.
SECTIONS = ("revision", "bundle", "mode", "criteria", "args", "requirements", "cohort", "data",
            "state", "reason", "rounds", "metrics", "model")
LINEAGE = frozenset(SECTIONS[:SECTIONS.index("data") + 1])  # the rest is the outcome


def fields(record: dict[str, Any]) -> dict[str, Any]:
    """A run's record as flat named fields: ``args.lr``, ``requirements.memory_mb``,
    ``data.<device>`` (its fingerprint ``{digest, examples}``), ``metrics.loss``, ``model.sha256``...
    Times and the run's own number are left out: they differ between any two runs."""
    revision = record.get("revision") or {}
    out: dict[str, Any] = {key: revision.get(key) for key in ("revision", "bundle", "mode", "criteria")}
    for section in ("args", "requirements"):
        for key, value in sorted((revision.get(section) or {}).items()):
            out[f"{section}.{key}"] = value
    out["cohort"] = list(record.get("cohort") or [])
    for device, fingerprint in sorted((record.get("data") or {}).items()):
        out[f"data.{device}"] = fingerprint
    out.update(state=record.get("state"), reason=record.get("reason"), rounds=record.get("rounds"))
    for key, value in sorted((record.get("metrics") or {}).items()):
        out[f"metrics.{key}"] = value
    model = record.get("model") or {}
    out["model.sha256"] = model.get("sha256")
    return out


@dataclass(frozen=True)
class Row:
    field: str
    values: list[Any]  # one per run, None where a run has no such field

    @property
    def differs(self) -> bool:
        return len({json.dumps(v, sort_keys=True, default=str) for v in self.values}) > 1

    @property
    def lineage(self) -> bool:
        return self.field.partition(".")[0] in LINEAGE


def _rank(name: str) -> tuple[int, str]:
    section = name.partition(".")[0]
    return (SECTIONS.index(section) if section in SECTIONS else len(SECTIONS), name)


def compare(records: list[dict[str, Any]]) -> list[Row]:
    """Every field any of the runs has, in section order, with each run's value."""
    flat = [fields(r) for r in records]
    names = sorted({name for f in flat for name in f}, key=_rank)
    return [Row(name, [f.get(name) for f in flat]) for name in names]
