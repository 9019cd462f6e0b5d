"""Broker credentials through Mosquitto's dynamic-security plugin (or the embedded broker,
which answers the same commands).

Each identity gets a role of its own on the broker, ``fedmq-<name>``, holding the topics of its
fedmq role with its name filled in (``fedmq.broker.acl``; dynamic security has no ``%u``), and a
client bound to its client id.  Deleting the client disconnects it at once.
"""

from __future__ import annotations

from fedmq.broker.acl import dynsec_acls
from fedmq.broker.dynsec import DynsecClient, DynsecError
from fedmq.broker.errors import Conflict
from fedmq.broker.roles import Role
from fedmq.broker.topics import DEFAULT_PREFIX


class DynsecAccounts:
    managed = True

    def __init__(self, client: DynsecClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client, self.prefix = client, prefix

    @staticmethod
    def role_name(name: str) -> str:
        return f"fedmq-{name}"

    def create(self, name: str, password: str, role: Role, clientid: str | None) -> None:
        rolename = self.role_name(name)
        try:
            self.client.delete_role(rolename)  # a leftover of an identity deleted half-way
        except DynsecError:
            pass
        self.client.create_role(rolename, dynsec_acls(role, name, self.prefix))
        try:
            self.client.create_client(name, password, [rolename], clientid)
        except DynsecError as exc:
            self.client.delete_role(rolename)
            if "exists" in exc.error:
                raise Conflict(f"the broker already has a client {name!r} (made outside fedmq?)") from None
            raise

    def ensure_own(self, name: str, role: Role) -> None:
        """The cloud's own identity (created with the broker's admin role by the set-up) also
        gets the topics of its fedmq role, once."""
        rolename = self.role_name(name)
        client = self.client.get_client(name)
        if any(r.get("rolename") == rolename for r in client.get("roles") or []):
            return
        try:
            self.client.create_role(rolename, dynsec_acls(role, name, self.prefix))
        except DynsecError as exc:
            if "exists" not in exc.error:
                raise
        try:
            self.client.run("addClientRole", username=name, rolename=rolename, priority=0, timeout=3.0)
        except (DynsecError, TimeoutError):
            # The broker disconnects a client whose roles change -- here, us -- so the answer may
            # be lost, or the command resent (QoS 1) and refused the second time: ask again.
            self.client.connection.wait_connected(30)
            held = self.client.get_client(name).get("roles") or []
            if not any(r.get("rolename") == rolename for r in held):
                raise

    def delete(self, name: str) -> None:
        try:
            self.client.delete_client(name)
        finally:
            try:
                self.client.delete_role(self.role_name(name))
            except DynsecError:
                pass

    def set_password(self, name: str, password: str) -> None:
        self.client.set_password(name, password)
