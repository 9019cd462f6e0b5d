"""The ``devices`` RPC service, over the device registry."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.arguments import DeviceInfo
from fedmq.broker.errors import Forbidden
from fedmq.broker.roles import DEVICES, READERS, Role
from fedmq.broker.rpc_server import CallContext, rpc
from fedmq.cloud.devices import DeviceRegistry, device_row
from fedmq.cloud.pages import DEFAULT_LIMIT, MAX_LIMIT, Page, page_query


class DeviceService:
    name = "devices"

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry

    @rpc(roles=DEVICES)
    def update_info(self, info: DeviceInfo, ctx: CallContext) -> dict[str, Any]:
        """A device reports its facts (it can only speak for itself: the caller is the device)."""
        return self.registry.update_info(ctx.caller, info)

    @rpc(roles=READERS | DEVICES)
    def get_info(self, device: str, ctx: CallContext) -> dict[str, Any]:
        """One device: its info and presence (a device may read only its own)."""
        if ctx.role is Role.DEVICE and device != ctx.caller:
            raise Forbidden(f"{ctx.caller} may read only its own info, not {device}'s")
        return device_row(self.registry.get(device))

    @rpc(name="list", roles=READERS)
    def list_(self, online: bool | None = None, limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
              cursor: str | None = None) -> Page:
        """Devices by id, optionally only online or offline ones: a page of them."""
        return page_query(self.registry.query(online), limit, cursor, device_row)
