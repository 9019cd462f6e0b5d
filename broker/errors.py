"""The errors a domain raises, by what went wrong -- not by who will report it.

Domain code (the task lifecycle, the bundle store, the device registry) raises subclasses of
these and never builds RPC errors; the RPC server's one table (``fedmq.broker.rpc_server``)
turns each kind into its stable error code.  They live at the bottom floor so that every
layer can raise them without importing the RPC machinery.
"""

from __future__ import annotations

from typing import Any


class FedmqError(Exception):
    """A refusal with a message a person can act on, and optional machine-readable details."""

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(FedmqError):
    """The thing asked for does not exist (here)."""


class Conflict(FedmqError):
    """The request contradicts the current state (already exists, not running, ...)."""


class Invalid(FedmqError):
    """The request itself is wrong: bad arguments, a malformed file, an impossible change."""


class Forbidden(FedmqError):
    """The caller may not do this, or the thing offered is not trusted."""
