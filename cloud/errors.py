"""The cloud domain's refusals; the RPC server's table turns each kind into an error code."""

from __future__ import annotations

from fedmq.broker.errors import Conflict, Invalid, NotFound


class TaskNotFound(NotFound):
    pass


class TaskConflict(Conflict):
    """The task is not in a state that allows this (already running, not running, exists)."""


class InvalidTask(Invalid):
    """A task definition that cannot be used: bad criteria, arguments, requirements, folder."""


class DeviceNotFound(NotFound):
    pass


class RunNotFound(NotFound):
    """No such run, or the run kept no such thing (a model, a log)."""
