"""Which offered tasks to run.  A policy is a small function, so others fit beside AGATA's.

``offers`` come from ``tasks.request`` already in priority order; ``running`` are the task ids
this device runs now; ``blocked`` those it must not start (quarantined after failing here)."""

from __future__ import annotations

from collections.abc import Callable

from fedmq.broker.schema import Offer

Policy = Callable[[list[Offer], set[str], set[str]], list[Offer]]


def at_most_one(offers: list[Offer], running: set[str], blocked: set[str]) -> list[Offer]:
    """AGATA's policy: when nothing runs, run the first eligible task."""
    if running:
        return []
    for offer in offers:
        if offer.id not in blocked:
            return [offer]
    return []


POLICIES: dict[str, Policy] = {"at_most_one": at_most_one}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
