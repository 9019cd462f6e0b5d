"""Who may do what: the roles a caller can have.

The caller of an RPC is the caller level of its topic, which the broker binds to the
connection's username (``mosquitto.acl``, the dynamic-security roles, the embedded broker's
rules), so a role is a property of a credential.  Every RPC method declares the roles it admits
(``@rpc(roles=...)``); the server answers ``forbidden`` to everyone else.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    OPERATOR = "operator"   # everything, including who may connect
    VIEWER = "viewer"       # read-only: dashboards, monitoring
    DEVICE = "device"       # its own presence, info, requests and events; reads bundles
    SERVICE = "service"     # cloud replicas and helper services: reads, and republishing bundles
    TASK = "task"           # a task's own server-side code and triggers: steer tasks, read results
    PARTICIPANT = "participant"  # a device's serverless participant (its task's client child): that
    #                              device's fl topics and steps, the other participants' fl topics; no RPC


OPERATOR = frozenset({Role.OPERATOR})
DEVICES = frozenset({Role.DEVICE})
READERS = frozenset({Role.OPERATOR, Role.VIEWER, Role.SERVICE, Role.TASK})  # may read the fleet's state
STEERING = frozenset({Role.OPERATOR, Role.TASK})  # may change a task's parameters, start or stop it
# may manage identities (the cloud's own identity bootstraps the first operator)
ADMINS = frozenset({Role.OPERATOR, Role.SERVICE})


# The one client id an identity of each role may connect with; operators are not bound (their
# tools open many connections; an operator may stop anything anyway).
CLIENT_IDS = {Role.DEVICE: "fedmq-edge-{}", Role.VIEWER: "fedmq-viewer-{}", Role.TASK: "fedmq-{}",
              Role.SERVICE: "fedmq-service-{}", Role.PARTICIPANT: "fedmq-{}"}
# A device's serverless participant is the identity ``fl.<device>``: its own connection, beside the
# agent's (which holds the device's one client id), that may speak on the device's fl level only.
PARTICIPANT_PREFIX = "fl."


def bound_client_id(name: str, role: Role) -> str | None:
    pattern = CLIENT_IDS.get(role)
    return pattern.format(name) if pattern else None


def participant_identity(device: str) -> str:
    return PARTICIPANT_PREFIX + device


def topic_identity(name: str, role: Role) -> str:
    """Whose topic levels an identity speaks on: its own name, but a participant's is its device's."""
    return name.removeprefix(PARTICIPANT_PREFIX) if role is Role.PARTICIPANT else name
