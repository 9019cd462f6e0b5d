"""Serverless training: no aggregation server.  The participants of a task elect one of
themselves per round to aggregate (``election``), and weights travel over MQTT as verified,
content-addressed blobs (``blobs``); ``runner`` drives a Flower ``NumPyClient`` through the
rounds.  See docs/serverless.md."""

from __future__ import annotations

from fedmq.ftdl.serverless.aggregate import AGGREGATORS, fedavg
from fedmq.ftdl.serverless.config import FLOWER, SERVERLESS, ServerlessConfig, Target, training_mode
from fedmq.ftdl.serverless.election import Candidate, elect, rank
from fedmq.ftdl.serverless.runner import RunResult, ServerlessError, ServerlessRunner, participant_connection

__all__ = ["AGGREGATORS", "FLOWER", "SERVERLESS", "Candidate", "RunResult", "ServerlessConfig", "ServerlessError",
           "ServerlessRunner", "Target", "elect", "fedavg", "participant_connection", "rank", "training_mode"]
