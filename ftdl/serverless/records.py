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

from pydantic import Field

from fedmq.broker.presence import Presence

# One record layer for every wire record (the deployments' are there too); RecordError is re-exported.
from fedmq.broker.schema import RecordError  # noqa: F401
from fedmq.broker.schema import WireRecord as Record

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
Metrics = dict[str, Any]


class ParticipantState(Presence):
    """``{state, session, ts, run, eligible, reason}``: presence plus electability."""

    run: str = ""
    eligible: bool = True
    reason: str = ""


class Evaluation(Record):
    round: Annotated[int, Field(ge=0)]
    loss: float | None = None
    num_examples: Annotated[int, Field(ge=0)] = 0
    metrics: Metrics = Field(default_factory=dict)


class UpdateRecord(Record):
    run: str
    round: Annotated[int, Field(ge=1)]
    base: Hex64                           # the global model trained from
    device: DeviceId
    session: Annotated[int, Field(ge=0)]
    blob: Hex64 | None = None             # None: nothing trained (not sampled, or past the last round)
    num_examples: Annotated[int, Field(ge=0)] = 0
    metrics: Metrics = Field(default_factory=dict)
    evaluation: Evaluation | None = None  # of ``base``
    ts: float = Field(default_factory=time.time)


class Contribution(Record):
    device: DeviceId
    blob: Hex64
    num_examples: Annotated[int, Field(ge=0)]


class Member(Record):
    device: DeviceId
    session: Annotated[int, Field(ge=0)]


class Point(Record):
    round: Annotated[int, Field(ge=0)]
    value: float


class GlobalRecord(Record):
    run: str
    round: Annotated[int, Field(ge=0)]
    digest: Hex64                         # the global model's blob
    owner: DeviceId                       # whose level holds the blob
    base: Hex64 | None = None             # the previous global (None for round 0)
    aggregator: DeviceId
    session: Annotated[int, Field(ge=0)]
    roster: list[Member]                  # who it saw: the next round's electorate
    contributors: list[Contribution] = Field(default_factory=list)
    rejected: list[dict[str, str]] = Field(default_factory=list)
    metrics: Metrics = Field(default_factory=dict)                # fit metrics of this round
    evaluation: Evaluation | None = None  # of ``base``, averaged over the participants' reports
    history: list[Point] = Field(default_factory=list)   # the target metric per round
    final: bool = False
    reason: str = ""
    ts: float = Field(default_factory=time.time)

    @property
    def completed(self) -> int:
        """Rounds trained into this record's model (a final record points at the previous global)."""
        return self.round - 1 if self.final else self.round
