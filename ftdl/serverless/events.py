"""The steps a serverless participant reports on its own event topic
(``tasks/<task>/events/<device>``), from which the cloud builds the run's timeline: who was
elected, who aggregated each round, failovers, refused updates, the end."""

from __future__ import annotations

from enum import StrEnum


class FlEvent(StrEnum):
    JOINED = "fl_joined"                      # {session, eligible, run}
    ELECTED = "fl_elected"                    # {round, aggregator, electorate}
    FAILOVER = "fl_failover"                  # {round, lost, aggregator}: the elected one left
    UPDATE_PUBLISHED = "fl_update_published"  # {round, blob, num_examples, base}
    UPDATE_REJECTED = "fl_update_rejected"    # {round, device, blob, reason, message}
    ROUND_TIMEOUT = "fl_round_timeout"        # {round, missing}: aggregated without them
    GLOBAL_PUBLISHED = "fl_global_published"  # {round, digest, contributors, metrics, final}
    GLOBAL_ACCEPTED = "fl_global_accepted"    # {round, digest, aggregator}
    FINISHED = "fl_finished"                  # {rounds, digest, reason}
