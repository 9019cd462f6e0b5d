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


class ModelNotFound(NotFound):
    """No such registered model or version (or its file is not on this cloud host)."""


class ModelConflict(Conflict):
    """The model cannot be registered in this state (its run has not finished)."""


class InvalidModel(Invalid):
    """A model name or version that cannot be used."""
