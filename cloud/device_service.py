"""The ``devices`` RPC service, over the device registry."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.rpc_server import CallContext, rpc
from fedmq.broker.schema import DeviceInfo
from fedmq.cloud.devices import DeviceRegistry, device_row


class DeviceService:
    name = "devices"

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    @rpc
    def update_info(self, info: DeviceInfo, ctx: CallContext) -> dict[str, Any]:
        """A device reports its facts (it can only speak for itself: the caller is the device)."""
        return self.registry.update_info(ctx.caller, info)

    @rpc
    def get_info(self, device: str) -> dict[str, Any]:
        """One device: its info and presence."""
        return device_row(self.registry.get(device))

    @rpc(name="list")
    def list_(self, online: bool | None = None,
              limit: Annotated[int, Field(ge=1, le=10000)] = 1000) -> list[dict[str, Any]]:
        """Devices, optionally only online or offline ones."""
        return [device_row(d) for d in self.registry.query(online, limit)]
