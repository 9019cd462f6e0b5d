"""Identities: who may connect and call, with which role, and their broker credentials.

The cloud keeps each identity's role (the RPC server asks it for every call) and, through a
``BrokerAccounts`` port, creates, rotates and revokes its credentials on the broker: with
Mosquitto's dynamic-security plugin (``cloud.broker_accounts.DynsecAccounts``) a revoked
identity is disconnected at once and cannot reconnect.  Each identity but an operator is bound
to one client id derived from its name, so no credential can take another connection's id.

A caller the registry does not know is a device: on a broker with credentials only identities
the operator created can connect at all; on an open development broker (the demo) devices
register by themselves.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from peewee import Database

from fedmq.broker.errors import Conflict, Invalid, NotFound
from fedmq.broker.roles import PARTICIPANT_PREFIX, Role, bound_client_id, participant_identity
from fedmq.broker.topics import TopicError, check_id
from fedmq.cloud.db import Principal, write_transaction

# Names with a role before anyone provisions them; an authenticated broker still decides who
# may use them (on an open broker anyone can: development only).
DEFAULT_ROLES = {"operator": Role.OPERATOR, "dashboard": Role.VIEWER}
TASK_PREFIX = "task."


@dataclass(frozen=True)
class Credentials:
    name: str
    role: Role
    password: str | None     # shown once, never stored by the cloud
    clientid: str | None


class BrokerAccounts(Protocol):
    """The broker's side of identities."""

    managed: bool  # False: an open broker, credentials are not enforced

    def create(self, name: str, password: str, role: Role, clientid: str | None) -> None: ...
    def delete(self, name: str) -> None: ...
    def set_password(self, name: str, password: str) -> None: ...


class OpenBroker:
    """A broker without credentials (the demo's, a laptop's): roles are kept, nothing enforced."""

    managed = False

    def create(self, name: str, password: str, role: Role, clientid: str | None) -> None:
        pass

    def delete(self, name: str) -> None:
        pass

    def set_password(self, name: str, password: str) -> None:
        pass


def new_password() -> str:
    return secrets.token_urlsafe(24)


class IdentityRegistry:
    def __init__(self, db: Database, accounts: BrokerAccounts, own: dict[str, Role] | None = None) -> None:
        """``own``: identities of the cloud itself (its service username), known without a row."""
        self.db, self.accounts = db, accounts
        self._fixed = {**DEFAULT_ROLES, **(own or {})}
        self._roles: dict[str, Role] = {}
        self._lock = threading.Lock()
        self.revoked_listeners: list[Callable[[str, Role], None]] = []
        self._load()

    def _load(self) -> None:
        with self._lock:
            self._roles = {row.name: Role(row.role) for row in Principal.select()}

    def role_of(self, caller: str) -> Role:
        """The role of a caller (the RPC server asks this on every call: a dictionary lookup)."""
        role = self._roles.get(caller) or self._fixed.get(caller)
        return role if role is not None else Role.DEVICE

    @staticmethod
    def _name(name: str) -> str:
        try:
            return check_id(name, "identity")
        except TopicError as exc:
            raise Invalid(str(exc)) from None

    def add(self, name: str, role: Role) -> Credentials:
        name = self._name(name)
        if name in self._fixed and self._fixed[name] != role:
            raise Conflict(f"{name!r} is reserved for the role {self._fixed[name]}")
        if name.startswith(TASK_PREFIX) and role is not Role.TASK:
            raise Invalid(f"names starting with {TASK_PREFIX!r} are for tasks' own credentials")
        if name.startswith(PARTICIPANT_PREFIX) != (role is Role.PARTICIPANT):
            raise Invalid(f"names starting with {PARTICIPANT_PREFIX!r} are for devices' serverless participants, "
                          "and only those")
        with self._lock:
            if Principal.get_or_none(Principal.name == name) is not None:
                raise Conflict(f"{name} exists; rotate its password or revoke it first")
        password, clientid = new_password(), bound_client_id(name, role)
        self.accounts.create(name, password, role, clientid)
        with write_transaction(self.db):
            Principal.create(name=name, role=role, clientid=clientid, created=time.time())
        with self._lock:
            self._roles[name] = role
        return Credentials(name, role, password, clientid)

    def rotate(self, name: str) -> Credentials:
        row = self._get(name)
        password = new_password()
        self.accounts.set_password(row.name, password)  # disconnects the old one's connections
        row.rotated = time.time()
        row.save()
        return Credentials(row.name, Role(row.role), password, row.clientid)

    def revoke(self, name: str) -> None:
        row = self._get(name)
        self.accounts.delete(row.name)  # disconnected at once; cannot reconnect
        row.delete_instance()
        with self._lock:
            self._roles.pop(row.name, None)
        for listener in self.revoked_listeners:
            listener(row.name, Role(row.role))
        if Role(row.role) is Role.DEVICE:  # its serverless participant goes with it
            try:
                self.revoke(participant_identity(row.name))
            except NotFound:
                pass

    def _get(self, name: str) -> Principal:
        row = Principal.get_or_none(Principal.name == self._name(name))
        if row is None:
            raise NotFound(f"no identity {name!r}")
        return row

    @staticmethod
    def all() -> list[Principal]:
        return list(Principal.select().order_by(Principal.role, Principal.name))

    # --- a task's own credentials ----------------------------------------------------------------
    def for_task(self, task_id: str) -> Credentials:
        """Fresh credentials for a task run's server-side code (role task), replacing the last
        run's: the task never sees the cloud's own."""
        name = TASK_PREFIX + task_id
        if len(name) > 128:
            raise Invalid(f"task id {task_id!r} is too long for a credential name")
        if Principal.get_or_none(Principal.name == name) is not None:
            self.revoke(name)
        return self.add(name, Role.TASK)

    # --- a device's serverless participant --------------------------------------------------------
    def for_participant(self, device: str) -> Credentials:
        """Credentials for a device's serverless participant (role participant, named
        ``fl.<device>``): a fresh password on every call, which disconnects a previous child still
        holding the old one.  It may do less than the device itself (its fl level and its steps,
        no RPC), so it lives as long as the device."""
        name = participant_identity(self._name(device))
        if len(name) > 128:
            raise Invalid(f"device id {device!r} is too long for a participant's credential name")
        if Principal.get_or_none(Principal.name == name) is not None:
            return self.rotate(name)
        return self.add(name, Role.PARTICIPANT)

    def end_task(self, task_id: str) -> None:
        try:
            self.revoke(TASK_PREFIX + task_id)
        except NotFound:
            pass
