"""The ``fedmq`` command (entry point ``fedmq.cli:app``); the root is ``fedmq.cli.app``."""

from fedmq.cli.app import app

__all__ = ["app"]
