"""The steps a serverless participant reports on its own event topic
(``tasks/<task>/events/<device>``), from which the cloud builds the run's timeline: who was
elected, who aggregated each round, failovers, refused updates, the end.  The values are the
wire's own event kinds (``fedmq.broker.events.EventKind``), so the cloud knows them by name."""

from __future__ import annotations

from enum import StrEnum

from fedmq.broker.events import EventKind


class FlEvent(StrEnum):
    JOINED = EventKind.FL_JOINED.value                      # {session, eligible, run}
    ELECTED = EventKind.FL_ELECTED.value                    # {round, aggregator, electorate}
    FAILOVER = EventKind.FL_FAILOVER.value                  # {round, lost, aggregator}: the elected one left
    UPDATE_PUBLISHED = EventKind.FL_UPDATE_PUBLISHED.value  # {round, blob, num_examples, base}
    UPDATE_REJECTED = EventKind.FL_UPDATE_REJECTED.value    # {round, device, blob, reason, message}
    ROUND_TIMEOUT = EventKind.FL_ROUND_TIMEOUT.value        # {round, missing}: aggregated without them
    GLOBAL_PUBLISHED = EventKind.FL_GLOBAL_PUBLISHED.value  # {round, digest, contributors, metrics, final}
    GLOBAL_ACCEPTED = EventKind.FL_GLOBAL_ACCEPTED.value    # {round, digest, aggregator}
    FINISHED = EventKind.FL_FINISHED.value                  # {rounds, digest, reason}
