"""Who aggregates a round: rendezvous (highest-random-weight) hashing, pure and deterministic.

Every candidate -- a participant's device id and the session counter of its current connection
-- gets a score per round, the SHA-256 of ``task, round, device, session``; the highest score
aggregates.  The score depends on nothing but those four values, so every participant that sees
the same candidates elects the same one with no message exchanged, and:

- removing the winner elects the runner-up (the next in the same ranking);
- removing or adding anyone else leaves the winner unchanged, unless the newcomer outscores it;
- a participant that reconnects (a new session) is a new candidate with a new score;
- the winner changes from round to round, spreading the aggregation work.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Candidate:
    device: str
    session: int


def score(task: str, round_: int, candidate: Candidate) -> bytes:
    """The candidate's weight for this round (compared as bytes: big-endian digests)."""
    key = "\x1f".join((task, str(round_), candidate.device, str(candidate.session)))
    return hashlib.sha256(key.encode("utf-8")).digest()


def rank(task: str, round_: int, candidates: Iterable[Candidate]) -> list[Candidate]:
    """Candidates best first; ties (never seen with SHA-256) broken by device and session."""
    unique = set(candidates)
    return sorted(unique, key=lambda c: (score(task, round_, c), c.device, c.session), reverse=True)


def elect(task: str, round_: int, candidates: Iterable[Candidate]) -> Candidate | None:
    """The aggregator of ``round_`` among ``candidates`` (None when there is none)."""
    ranked = rank(task, round_, candidates)
    return ranked[0] if ranked else None


def sample(task: str, round_: int, candidates: Iterable[Candidate], fraction: float) -> set[str]:
    """The devices that train in ``round_`` when only ``fraction`` of them should: the best
    ``ceil(fraction * n)`` by a second ranking (salted, so it is not the aggregator's order)."""
    unique = sorted(set(candidates))
    if fraction >= 1.0:
        return {c.device for c in unique}
    count = max(1, math.ceil(round(fraction * len(unique), 9)))
    return {c.device for c in rank(f"{task}\x1fsample", round_, unique)[:count]}
