"""The ``models`` RPC service: register a finished run's model as NAME:VERSION, list, show and
compare versions, and read a version's file in pieces -- thin over the model registry."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.roles import OPERATOR, READERS
from fedmq.broker.rpc_server import CallContext, rpc
from fedmq.cloud.model_registry import ModelRegistry, deployed_counts, model_view
from fedmq.cloud.pages import DEFAULT_LIMIT, MAX_LIMIT, Page, page_query

ModelName = Annotated[str, Field(min_length=1, max_length=128)]
Version = Annotated[int, Field(ge=1)]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT)]
PIECE = 128 * 1024  # as tasks.model: well inside the broker's packet limit


class ModelService:
    name = "models"

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @rpc(roles=OPERATOR)
    def register(self, ctx: CallContext, task: str, run: Annotated[int, Field(ge=1)] | None = None,
                 name: ModelName | None = None, note: Annotated[str, Field(max_length=4000)] = "") -> dict[str, Any]:
        """Register a finished run's model (default: the latest run) as the next version of
        ``name`` (default: the task's model_name, else its name).  The same task:run under the
        same name answers the version it already is (``created`` false)."""
        row, created = self.registry.register(task, run, name, note=note, by=ctx.caller)
        return {**model_view(row).to_wire(), "created": created}

    @rpc(name="list", roles=READERS)
    def list_(self, name: ModelName | None = None, limit: Limit = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
        """Registered versions by name then version (optionally of one name): a page of them."""
        deployed = deployed_counts(name)
        return page_query(self.registry.query(name), limit, cursor,
                          lambda row: model_view(row, deployed=deployed).to_wire())

    @rpc(roles=READERS)
    def show(self, name: ModelName, version: Version | None = None) -> dict[str, Any]:
        """One version (default: the latest) with its lineage: the run's record as registered."""
        return model_view(self.registry.get(name, version), lineage=True).to_wire()

    @rpc(roles=READERS)
    def diff(self, name: ModelName, a: Version, b: Version, other: ModelName | None = None) -> dict[str, Any]:
        """What differs between ``name:a`` and ``name:b`` (or ``other:b``): lineage key by key,
        metrics side by side."""
        return self.registry.diff(self.registry.get(name, a), self.registry.get(other or name, b))

    @rpc(roles=READERS)
    def artifact(self, name: ModelName, version: Version | None = None, offset: Annotated[int, Field(ge=0)] = 0,
                 size: Annotated[int, Field(ge=1, le=PIECE)] = PIECE) -> dict[str, Any]:
        """A piece of the version's model.npz (default: the latest version); offset 0 also gives its sha256."""
        return self.registry.artifact(name, version, offset, size)
