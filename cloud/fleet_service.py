"""The ``fleet`` RPC service: the desired state from a file (``fedmq diff`` / ``fedmq apply``).

``desired`` is the file's content as parsed (bundle folders already pushed and replaced by
their digests); it is validated here again with the file's own schema, since a caller need not
be our CLI.  ``source`` = ``{file, digest}``: the file's name and the sha256 of its bytes,
recorded with every change.  Both return the changes, ``[]`` when the tasks match the file."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.roles import OPERATOR, READERS
from fedmq.broker.rpc_server import rpc
from fedmq.cloud.fleet_file import FleetSource, ModelSignature, validate_desired
from fedmq.cloud.fleet_state import FleetState


class FleetService:
    name = "fleet"

    def __init__(self, fleet: FleetState) -> None:
        self.fleet = fleet

    @rpc(roles=READERS)
    def diff(self, desired: dict[str, Any], source: FleetSource, prune: bool = False) -> list[dict[str, Any]]:
        """What apply would change (with ``prune``: also the managed tasks it would delete)."""
        return [c.to_wire() for c in self.fleet.diff(validate_desired(desired), source, prune)]

    @rpc(roles=OPERATOR)
    def apply(self, desired: dict[str, Any], source: FleetSource, prune: bool = False,
              signatures: Annotated[dict[str, ModelSignature], Field(max_length=1000)] | None = None,
              ) -> list[dict[str, Any]]:
        """Make the tasks and deployments what ``desired`` says; with ``prune``, delete the tasks
        this fleet manages that it no longer names.  ``signatures``: by deployment id, the
        operator's signature of the model it deploys.  The changes made, in order."""
        return [c.to_wire() for c in self.fleet.apply(validate_desired(desired), source, prune, signatures)]
