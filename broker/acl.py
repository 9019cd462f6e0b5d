"""The one definition of which topics each role may use, with the identity filled in.

A device speaks only as itself and hears only what is addressed to it or to everyone; an
operator or viewer calls as itself and reads the fleet's state; a service (the cloud) owns the
tree.  From this one table come the Mosquitto dynamic-security roles the cloud creates for each
identity, the shipped ``mosquitto.acl`` (for a password-file set-up; a test checks the file is
this table rendered) and the embedded broker's checks -- so every broker fedmq runs enforces the
same rules.

Topic filters use ``{p}`` for the prefix and ``{id}`` for the identity (the MQTT username, which
is also the caller level of the RPC topics).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.broker.roles import Role, topic_identity
from fedmq.broker.topics import DEFAULT_PREFIX

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"


@dataclass(frozen=True)
class Grant:
    topic: str            # a filter template
    publish: bool = False
    read: bool = False    # subscribe to it and receive from it


def _call(read_extra: tuple[Grant, ...] = ()) -> tuple[Grant, ...]:
    return (Grant("{p}/rpc/+/+/{id}", publish=True), Grant("{p}/reply/{id}/#", read=True), *read_extra)


FLEET_READS = (Grant("{p}/tasks/#", read=True), Grant("{p}/devices/+/state", read=True),
               Grant("{p}/events/#", read=True))

GRANTS: dict[Role, tuple[Grant, ...]] = {
    Role.DEVICE: _call((
        Grant("{p}/devices/{id}/state", publish=True, read=True),   # its birth and its last will
        Grant("{p}/devices/{id}/cmd", read=True),
        Grant("{p}/devices/{id}/models", read=True),                # the models it should run
        Grant("{p}/models/#", read=True),                           # their files, in chunks
        Grant("{p}/tasks/+", read=True),                            # announcements
        Grant("{p}/tasks/+/events/{id}", publish=True),             # its own steps, under its own name
        Grant("{p}/tasks/+/fl/{id}/#", publish=True),               # serverless: its state, updates, globals, blobs
        Grant("{p}/tasks/+/fl/#", read=True),                       # serverless: the other participants'
        Grant("{p}/bundles/#", read=True),
    )),
    Role.OPERATOR: _call((*FLEET_READS, Grant("{p}/bundles/#", read=True))),
    Role.VIEWER: _call(FLEET_READS),
    Role.TASK: _call((Grant("{p}/tasks/#", read=True),)),
    # ``{id}`` is the device a participant identity (``fl.<device>``) stands for: no RPC, no presence
    Role.PARTICIPANT: (
        Grant("{p}/tasks/+/fl/{id}/#", publish=True),
        Grant("{p}/tasks/+/fl/#", read=True),
        Grant("{p}/tasks/+/events/{id}", publish=True),
    ),
    # Replicas share requests and devices' steps through $share subscriptions.
    Role.SERVICE: (Grant("{p}/#", publish=True, read=True), Grant("$share/+/{p}/#", read=True)),
}


def grants(role: Role, identity: str, prefix: str = DEFAULT_PREFIX) -> list[Grant]:
    levels = topic_identity(identity, role)
    return [Grant(g.topic.format(p=prefix, id=levels), g.publish, g.read) for g in GRANTS[role]]


def dynsec_acls(role: Role, identity: str, prefix: str = DEFAULT_PREFIX) -> list[dict[str, object]]:
    """The ACL entries of this identity's dynamic-security role."""
    acls: list[dict[str, object]] = []
    for grant in grants(role, identity, prefix):
        if grant.publish:
            acls.append({"acltype": "publishClientSend", "topic": grant.topic, "allow": True})
        if grant.read:
            acls.append({"acltype": "subscribePattern", "topic": grant.topic, "allow": True})
            acls.append({"acltype": "publishClientReceive", "topic": grant.topic, "allow": True})
    return acls


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a topic against a filter (``+`` one level, ``#`` the rest)."""
    if topic.startswith("$") != topic_filter.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels, parts = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(levels) == len(parts)


def covers(acl_filter: str, subscription: str) -> bool:
    """Whether a subscription filter asks for nothing beyond an ACL filter (dynamic security's
    rule: wildcards in the subscription need the same or wider wildcards in the ACL)."""
    acl, sub = acl_filter.split("/"), subscription.split("/")
    for i, level in enumerate(sub):
        if i >= len(acl):
            return False
        if acl[i] == "#":
            return True
        if level == "#" or (acl[i] != "+" and (level == "+" or acl[i] != level)):
            return False
    return len(acl) == len(sub) or acl[len(sub):] == ["#"]


@dataclass(frozen=True)
class Access:
    """What one connection may do, evaluated by the embedded broker."""

    grants: tuple[Grant, ...]

    @classmethod
    def of(cls, role: Role, identity: str, prefix: str = DEFAULT_PREFIX) -> Access:
        return cls(tuple(grants(role, identity, prefix)))

    def may_publish(self, topic: str) -> bool:
        return any(g.publish and topic_matches(g.topic, topic) for g in self.grants)

    def may_subscribe(self, subscription: str) -> bool:
        return any(g.read and covers(g.topic, subscription) for g in self.grants)

    def may_receive(self, topic: str) -> bool:
        return any(g.read and topic_matches(g.topic, topic) for g in self.grants)


def render_acl_file(prefix: str = DEFAULT_PREFIX) -> str:
    """``mosquitto.acl`` for a password-file set-up: the service user ``cloud``, the operator
    ``operator`` and the viewer ``dashboard`` by name, every other user as a device (patterns)."""
    lines = ["# fedmq ACL for Mosquitto (acl_file), for a password-file set-up. Generated from",
             "# fedmq/broker/acl.py (tests/test_security.py checks this file against it); with the",
             "# dynamic-security plugin (the shipped mosquitto.conf) the cloud creates the same rules per",
             "# identity instead. A user's MQTT username is its identity and the caller level of its RPC",
             "# topics, so each speaks only as itself.", ""]
    for role, user in ((Role.SERVICE, "cloud"), (Role.OPERATOR, "operator"), (Role.VIEWER, "dashboard")):
        lines.append(f"user {user}")
        lines += [_acl_line("topic", g) for g in grants(role, user, prefix)]
        lines.append("")
    lines.append("# every other user is a device (patterns apply to all users; %u is the username)")
    lines += [_acl_line("pattern", g) for g in grants(Role.DEVICE, "%u", prefix)]
    return "\n".join(lines) + "\n"


def _acl_line(kind: str, grant: Grant) -> str:
    access = "readwrite" if grant.publish and grant.read else "write" if grant.publish else "read"
    return f"{kind} {access} {grant.topic}"
