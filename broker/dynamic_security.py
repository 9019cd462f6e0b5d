"""Mosquitto's dynamic-security model, for the embedded broker.

The cloud provisions identities with Mosquitto's dynamic-security plugin, over its control topic
``$CONTROL/dynamic-security/v1``.  The embedded broker answers the same commands (the subset
fedmq uses) with the same meaning -- clients with hashed passwords, an optional bound client
id, roles with ordered ACLs, default access as dynamic security's, disconnection of a client
whose credentials change -- so provisioning, roles and revocation behave the same on both
brokers, and the tests can run them on both.

Command subset: createClient, deleteClient, disableClient, enableClient, setClientPassword,
setClientId, addClientRole, removeClientRole, getClient, listClients, createRole, deleteRole,
addRoleACL, removeRoleACL, getRole, listRoles.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmq.broker.acl import covers, topic_matches

_ITERATIONS = 10_000
# dynamic security's default access when no ACL of a client's roles matches
_DEFAULT_ALLOW = {"publishClientSend": False, "publishClientReceive": True, "subscribe": False}
ACL_TYPES = ("publishClientSend", "publishClientReceive", "subscribePattern", "subscribeLiteral",
             "unsubscribePattern", "unsubscribeLiteral")


class CommandError(ValueError):
    pass


@dataclass
class _Client:
    username: str
    salt: bytes
    password_hash: bytes
    clientid: str | None = None
    roles: list[tuple[str, int]] = field(default_factory=list)  # (role, priority)
    disabled: bool = False


@dataclass
class _Acl:
    acltype: str
    topic: str
    allow: bool
    priority: int


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)


def _text(command: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = command.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise CommandError(f"{key} must be a non-empty string")
    return value


class DynamicSecurity:
    """Clients and roles, checked on connect, publish, subscribe and delivery."""

    def __init__(self, admin_username: str, admin_password: str) -> None:
        self._clients: dict[str, _Client] = {}
        self._roles: dict[str, list[_Acl]] = {}
        self._lock = threading.RLock()
        self.on_kick: Callable[[str], None] = lambda username: None  # set by the broker
        # What ``mosquitto_ctrl dynsec init`` creates: an admin with the control topics.
        self._roles["admin"] = [_Acl(t, "$CONTROL/dynamic-security/#", True, 0) for t in
                                ("publishClientSend", "publishClientReceive", "subscribePattern")]
        self._add_client(admin_username, admin_password, None, [("admin", 0)])

    # --- the broker's checks -----------------------------------------------------------------
    def authenticate(self, username: str | None, password: str | None, clientid: str | None) -> bool:
        with self._lock:
            client = self._clients.get(username or "")
            if client is None or client.disabled or password is None:
                return False
            if not hmac.compare_digest(client.password_hash, _hash(str(password), client.salt)):
                return False
            return client.clientid is None or client.clientid == clientid

    def allowed(self, username: str | None, kind: str, topic: str) -> bool:
        """``kind``: publishClientSend, publishClientReceive or subscribe."""
        with self._lock:
            client = self._clients.get(username or "")
            if client is None:
                return False
            for acl in self._acls_of(client):
                if kind == "subscribe":
                    hit = (acl.acltype == "subscribePattern" and covers(acl.topic, topic)) or \
                          (acl.acltype == "subscribeLiteral" and acl.topic == topic)
                else:
                    hit = acl.acltype == kind and topic_matches(acl.topic, topic)
                if hit:
                    return acl.allow
            return _DEFAULT_ALLOW[kind]

    def _acls_of(self, client: _Client) -> list[_Acl]:
        acls = [acl for role, _ in sorted(client.roles, key=lambda r: -r[1]) for acl in self._roles.get(role, [])]
        return sorted(acls, key=lambda acl: -acl.priority)

    # --- the control topic ---------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control message ``{"commands": [...]}``; the answer ``{"responses": [...]}``."""
        commands = request.get("commands")
        if not isinstance(commands, list):
            return {"responses": [{"command": "unknown", "error": "Invalid/missing commands"}]}
        responses = []
        for command in commands:
            name = command.get("command") if isinstance(command, dict) else None
            response: dict[str, Any] = {"command": name if isinstance(name, str) else "unknown"}
            if isinstance(command, dict) and "correlationData" in command:
                response["correlationData"] = command["correlationData"]
            try:
                handler = getattr(self, f"_cmd_{name}", None) if isinstance(name, str) else None
                if handler is None:
                    raise CommandError("Unknown command")
                data = handler(command)
                if data is not None:
                    response["data"] = data
            except CommandError as exc:
                response["error"] = str(exc)
            responses.append(response)
        return {"responses": responses}

    def _add_client(self, username: str, password: str, clientid: str | None, roles: list[tuple[str, int]]) -> None:
        salt = os.urandom(12)
        self._clients[username] = _Client(username, salt, _hash(password, salt), clientid, roles)

    def _client(self, command: dict[str, Any]) -> _Client:
        username = _text(command, "username")
        client = self._clients.get(username or "")
        if client is None:
            raise CommandError("Client not found")
        return client

    def _kick(self, username: str) -> None:
        self.on_kick(username)

    def _cmd_createClient(self, command: dict[str, Any]) -> None:
        username, password = _text(command, "username"), _text(command, "password")
        assert username is not None and password is not None
        with self._lock:
            if username in self._clients:
                raise CommandError("Client already exists")
            roles = []
            for role in command.get("roles") or []:
                if not isinstance(role, dict) or role.get("rolename") not in self._roles:
                    raise CommandError("Role not found")
                roles.append((role["rolename"], int(role.get("priority", -1))))
            self._add_client(username, password, _text(command, "clientid", required=False), roles)

    def _cmd_deleteClient(self, command: dict[str, Any]) -> None:
        with self._lock:
            client = self._client(command)
            del self._clients[client.username]
        self._kick(client.username)

    def _cmd_disableClient(self, command: dict[str, Any]) -> None:
        with self._lock:
            client = self._client(command)
            client.disabled = True
        self._kick(client.username)

    def _cmd_enableClient(self, command: dict[str, Any]) -> None:
        with self._lock:
            self._client(command).disabled = False

    def _cmd_setClientPassword(self, command: dict[str, Any]) -> None:
        password = _text(command, "password")
        assert password is not None
        with self._lock:
            client = self._client(command)
            client.salt = os.urandom(12)
            client.password_hash = _hash(password, client.salt)
        self._kick(client.username)

    def _cmd_setClientId(self, command: dict[str, Any]) -> None:
        with self._lock:
            client = self._client(command)
            client.clientid = _text(command, "clientid", required=False)
        self._kick(client.username)

    def _cmd_addClientRole(self, command: dict[str, Any]) -> None:
        rolename = _text(command, "rolename")
        with self._lock:
            client = self._client(command)
            if rolename not in self._roles:
                raise CommandError("Role not found")
            priority = int(command.get("priority", -1))
            client.roles = [r for r in client.roles if r[0] != rolename] + [(str(rolename), priority)]
        self._kick(client.username)

    def _cmd_removeClientRole(self, command: dict[str, Any]) -> None:
        rolename = _text(command, "rolename")
        with self._lock:
            client = self._client(command)
            client.roles = [r for r in client.roles if r[0] != rolename]
        self._kick(client.username)

    def _cmd_getClient(self, command: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            client = self._client(command)
            return {"client": {"username": client.username, "clientid": client.clientid, "disabled": client.disabled,
                               "roles": [{"rolename": r, "priority": p} for r, p in client.roles]}}

    def _cmd_listClients(self, _command: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {"totalCount": len(self._clients), "clients": sorted(self._clients)}

    def _cmd_createRole(self, command: dict[str, Any]) -> None:
        rolename = _text(command, "rolename")
        assert rolename is not None
        with self._lock:
            if rolename in self._roles:
                raise CommandError("Role already exists")
            self._roles[rolename] = []
            for acl in command.get("acls") or []:
                self._roles[rolename].append(self._acl(acl))

    def _cmd_deleteRole(self, command: dict[str, Any]) -> None:
        rolename = _text(command, "rolename")
        with self._lock:
            if self._roles.pop(rolename or "", None) is None:
                raise CommandError("Role not found")
            holders = [c.username for c in self._clients.values() if any(r == rolename for r, _ in c.roles)]
            for client in self._clients.values():
                client.roles = [r for r in client.roles if r[0] != rolename]
        for username in holders:
            self._kick(username)

    def _cmd_addRoleACL(self, command: dict[str, Any]) -> None:
        rolename = _text(command, "rolename")
        with self._lock:
            if rolename not in self._roles:
                raise CommandError("Role not found")
            self._roles[str(rolename)].append(self._acl(command))

    def _cmd_removeRoleACL(self, command: dict[str, Any]) -> None:
        rolename, acltype, topic = _text(command, "rolename"), _text(command, "acltype"), _text(command, "topic")
        with self._lock:
            if rolename not in self._roles:
                raise CommandError("Role not found")
            self._roles[str(rolename)] = [a for a in self._roles[str(rolename)]
                                          if (a.acltype, a.topic) != (acltype, topic)]

    def _cmd_getRole(self, command: dict[str, Any]) -> dict[str, Any]:
        rolename = _text(command, "rolename")
        with self._lock:
            if rolename not in self._roles:
                raise CommandError("Role not found")
            return {"role": {"rolename": rolename, "acls": [vars(a) for a in self._roles[str(rolename)]]}}

    def _cmd_listRoles(self, _command: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {"totalCount": len(self._roles), "roles": sorted(self._roles)}

    @staticmethod
    def _acl(spec: Any) -> _Acl:
        if not isinstance(spec, dict) or spec.get("acltype") not in ACL_TYPES:
            raise CommandError(f"acltype must be one of {', '.join(ACL_TYPES)}")
        topic = spec.get("topic")
        if not isinstance(topic, str) or not topic:
            raise CommandError("topic must be a non-empty string")
        return _Acl(spec["acltype"], topic, bool(spec.get("allow", False)), int(spec.get("priority", -1)))
