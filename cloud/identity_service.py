"""The ``identities`` RPC service: provisioning, rotation and revocation (operators only)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from fedmq.broker.roles import ADMINS, Role
from fedmq.broker.rpc_server import rpc
from fedmq.cloud.identities import Credentials, IdentityRegistry
from fedmq.cloud.pages import Page, page

Provisioned = Literal["device", "operator", "viewer", "service"]


def _wire(credentials: Credentials, managed: bool) -> dict[str, Any]:
    return {"name": credentials.name, "role": credentials.role, "password": credentials.password,
            "clientid": credentials.clientid, "enforced": managed}


class IdentityService:
    name = "identities"

    def __init__(self, registry: IdentityRegistry) -> None:
        self.registry = registry

    @rpc(roles=ADMINS)
    def add(self, name: str, role: Provisioned) -> dict[str, Any]:
        """Create an identity and its broker credentials; the password is answered once."""
        return _wire(self.registry.add(name, Role(role)), self.registry.accounts.managed)

    @rpc(roles=ADMINS)
    def rotate(self, name: str) -> dict[str, Any]:
        """A new password; the old one stops working and its connections are closed."""
        return _wire(self.registry.rotate(name), self.registry.accounts.managed)

    @rpc(roles=ADMINS)
    def revoke(self, name: str) -> dict[str, Any]:
        """Delete the identity: it is disconnected at once and cannot reconnect."""
        self.registry.revoke(name)
        return {"name": name, "revoked": True, "enforced": self.registry.accounts.managed}

    @rpc(name="list", roles=ADMINS)
    def list_(self, limit: Annotated[int, Field(ge=1, le=1000)] = 200, cursor: str | None = None) -> Page:
        """Identities and their roles (never passwords)."""
        rows = [{"name": p.name, "role": p.role, "clientid": p.clientid, "created": p.created,
                 "rotated": p.rotated} for p in self.registry.all()]
        return page(rows, limit, cursor)
