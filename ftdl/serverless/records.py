"""The retained records a serverless participant publishes under its own level of the task's
``fl`` subtree, one topic each (the latest replaces the previous):

- ``state``: its presence in the task -- ``online`` on connect, ``offline`` as its last will --
  with its session counter and whether it may be elected (``eligible``, ``reason``);
- ``update``: its contribution to a round -- the round, the global model it trained from
  (``base``), its weights blob, example count, fit metrics, and its evaluation of that base;
- ``global``: a global model it aggregated -- the round, the blob, the updates it used, the
  participants it saw (the next round's electorate), the evaluation of the previous global,
  and ``final`` when the run ends.

Every record carries the run, so the records a previous run left retained are ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from msgspec import Meta, field

from fedmq.broker.presence import Presence
from fedmq.broker.schema import WireRecord as Record

# One record layer for every wire record (the deployments' are there too); RecordError is re-exported.
from fedmq.broker.wire import RecordError  # noqa: F401

# \Z, not $: Python's $ also matches before a trailing newline.
Hex64 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
DeviceId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")]
Metrics = dict[str, Any]


class ParticipantState(Presence, kw_only=True):
    """``{state, session, ts, run, eligible, reason}``: presence plus electability."""

    run: str = ""
    eligible: bool = True
    reason: str = ""


class Evaluation(Record, frozen=True, kw_only=True):
    round: Annotated[int, Meta(ge=0)]
    loss: float | None = None
    num_examples: Annotated[int, Meta(ge=0)] = 0
    metrics: Metrics = field(default_factory=dict)


class UpdateRecord(Record, frozen=True, kw_only=True):
    run: str
    round: Annotated[int, Meta(ge=1)]
    base: Hex64                           # the global model trained from
    device: DeviceId
    session: Annotated[int, Meta(ge=0)]
    blob: Hex64 | None = None             # None: nothing trained (not sampled, or past the last round)
    num_examples: Annotated[int, Meta(ge=0)] = 0
    metrics: Metrics = field(default_factory=dict)
    evaluation: Evaluation | None = None  # of ``base``
    ts: float = field(default_factory=time.time)


class Contribution(Record, frozen=True, kw_only=True):
    device: DeviceId
    blob: Hex64
    num_examples: Annotated[int, Meta(ge=0)]


class Member(Record, frozen=True, kw_only=True):
    device: DeviceId
    session: Annotated[int, Meta(ge=0)]


class Point(Record, frozen=True, kw_only=True):
    round: Annotated[int, Meta(ge=0)]
    value: float


class GlobalRecord(Record, frozen=True, kw_only=True):
    run: str
    round: Annotated[int, Meta(ge=0)]
    digest: Hex64                         # the global model's blob
    owner: DeviceId                       # whose level holds the blob
    base: Hex64 | None = None             # the previous global (None for round 0)
    aggregator: DeviceId
    session: Annotated[int, Meta(ge=0)]
    roster: list[Member]                  # who it saw: the next round's electorate
    contributors: list[Contribution] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=dict)                # fit metrics of this round
    evaluation: Evaluation | None = None  # of ``base``, averaged over the participants' reports
    history: list[Point] = field(default_factory=list)   # the target metric per round
    final: bool = False
    reason: str = ""
    ts: float = field(default_factory=time.time)

    @property
    def completed(self) -> int:
        """Rounds trained into this record's model (a final record points at the previous global)."""
        return self.round - 1 if self.final else self.round
