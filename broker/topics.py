"""The one place that knows fedmq's topic tree.

Ids (services, methods, callers, devices, tasks) become single topic levels, so they are checked
here: a ``/``, ``+`` or ``#`` inside an id would let one party speak on another's topics, and the
broker ACL (``%u``/``%c`` patterns) relies on the caller being exactly one level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "fedmq/v1"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
FL_LEAVES = ("state", "update", "global")  # a serverless participant's retained records


class TopicError(ValueError):
    """A topic or an id that cannot be part of the fedmq topic tree."""


def check_id(value: object, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit")
    return value


def check_digest(value: object) -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise TopicError(f"invalid bundle digest {value!r}: expected 64 lowercase hex digits")
    return value


@dataclass(frozen=True)
class RpcTopic:
    service: str
    method: str
    caller: str


@dataclass(frozen=True)
class Topics:
    """Builds and parses topics under one configurable prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or self.prefix.startswith("/") or self.prefix.endswith("/") \
                or any(c in self.prefix for c in "+#\0"):
            raise TopicError(f"invalid topic prefix {self.prefix!r}")

    def _join(self, *levels: str) -> str:
        return "/".join((self.prefix, *levels))

    # --- RPC -------------------------------------------------------------------------------
    def rpc(self, service: str, method: str, caller: str) -> str:
        return self._join("rpc", check_id(service, "service"), check_id(method, "method"),
                          check_id(caller, "caller"))

    def rpc_filter(self, service: str) -> str:
        return self._join("rpc", check_id(service, "service"), "+", "+")

    def reply_base(self, caller: str) -> str:
        return self._join("reply", check_id(caller, "caller"))

    def reply(self, caller: str, inbox: str) -> str:
        return self._join("reply", check_id(caller, "caller"), check_id(inbox, "inbox"))

    def parse_rpc(self, topic: str, check_method: bool = True) -> RpcTopic:
        """``check_method=False`` lets a server answer "no such method" to a misspelt one
        instead of dropping it unanswered; service and caller are always checked."""
        head = self.prefix + "/rpc/"
        if not topic.startswith(head):
            raise TopicError(f"not an RPC topic: {topic!r}")
        parts = topic[len(head):].split("/")
        if len(parts) != 3:
            raise TopicError(f"RPC topic needs <service>/<method>/<caller>: {topic!r}")
        service, method, caller = parts
        return RpcTopic(check_id(service, "service"), check_id(method, "method") if check_method else method,
                        check_id(caller, "caller"))

    def reply_allowed(self, reply_to: str, caller: str) -> bool:
        """A service only answers inside the caller's own reply tree (so the ACL holds)."""
        base = self.reply_base(caller)
        if reply_to != base and not reply_to.startswith(base + "/"):
            return False
        return not any(c in reply_to for c in "+#\0")

    # --- devices, tasks, bundles, events ---------------------------------------------------
    def device_state(self, device: str) -> str:
        return self._join("devices", check_id(device, "device"), "state")

    def device_cmd(self, device: str) -> str:
        return self._join("devices", check_id(device, "device"), "cmd")

    def device_models(self, device: str) -> str:
        """The models a device should run (retained, the cloud's desired state for it)."""
        return self._join("devices", check_id(device, "device"), "models")

    def model_blob(self, digest: str, index: int | None = None) -> str:
        """``models/<sha256>/manifest`` (``index`` None) or ``models/<sha256>/<index>``: a registered
        model's file in retained chunks, as bundles travel."""
        leaf = "manifest" if index is None else str(index)
        if index is not None and (not isinstance(index, int) or index < 0):
            raise TopicError(f"invalid chunk index {index!r}")
        return self._join("models", check_digest(digest), leaf)

    def task(self, task: str) -> str:
        return self._join("tasks", check_id(task, "task"))

    def task_events(self, task: str) -> str:
        """The cloud's events about a task."""
        return self._join("tasks", check_id(task, "task"), "events")

    def device_events(self, task: str, device: str) -> str:
        """A device's own steps on a task: under its name, which the broker binds to its
        credentials, so no device can report in another's name."""
        return self._join("tasks", check_id(task, "task"), "events", check_id(device, "device"))

    def bundle_manifest(self, digest: str) -> str:
        return self._join("bundles", check_digest(digest), "manifest")

    def bundle_chunk(self, digest: str, index: int) -> str:
        if not isinstance(index, int) or index < 0:
            raise TopicError(f"invalid chunk index {index!r}")
        return self._join("bundles", check_digest(digest), str(index))

    # --- serverless training: each participant's own level under its task -----------------
    def fl(self, task: str, device: str, leaf: str) -> str:
        """``tasks/<task>/fl/<device>/<leaf>``: what one participant of a serverless task publishes
        (``state``, ``update``, ``global``); only that device may publish under its level."""
        if leaf not in FL_LEAVES:
            raise TopicError(f"invalid serverless leaf {leaf!r} (one of {', '.join(FL_LEAVES)})")
        return self._join("tasks", check_id(task, "task"), "fl", check_id(device, "device"), leaf)

    def fl_blob(self, task: str, device: str, digest: str, index: int | None = None) -> str:
        """``tasks/<task>/fl/<device>/blobs/<sha256>/manifest`` (``index`` None) or ``/<index>``."""
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
            raise TopicError(f"invalid chunk index {index!r}")
        return self._join("tasks", check_id(task, "task"), "fl", check_id(device, "device"), "blobs",
                          check_digest(digest), "manifest" if index is None else str(index))

    def fl_all(self, task: str, leaf: str) -> str:
        """Every participant's ``leaf`` of a task: ``tasks/<task>/fl/+/<leaf>``."""
        if leaf not in FL_LEAVES:
            raise TopicError(f"invalid serverless leaf {leaf!r} (one of {', '.join(FL_LEAVES)})")
        return self._join("tasks", check_id(task, "task"), "fl", "+", leaf)

    def all_fl_globals(self) -> str:
        """Every participant's ``global`` of every serverless task (what the cloud observes)."""
        return self._join("tasks", "+", "fl", "+", "global")

    def fl_tree(self, task: str) -> str:
        """Everything a serverless task's participants published: ``tasks/<task>/fl/#``."""
        return self._join("tasks", check_id(task, "task"), "fl", "#")

    def parse_fl(self, topic: str) -> tuple[str, str, str]:
        """(task, device, leaf) of a ``tasks/<task>/fl/<device>/<leaf>`` topic."""
        head = self.prefix + "/tasks/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        if len(parts) != 4 or parts[1] != "fl" or parts[3] not in FL_LEAVES:
            raise TopicError(f"not a serverless topic: {topic!r}")
        return check_id(parts[0], "task"), check_id(parts[2], "device"), parts[3]

    def events(self, component: str) -> str:
        return self._join("events", check_id(component, "component"))

    def event_task(self, topic: str) -> str:
        """The task of an event topic (``tasks/<task>/events`` or ``.../events/<device>``)."""
        head = self.prefix + "/tasks/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        if len(parts) not in (2, 3) or parts[1] != "events":
            raise TopicError(f"not an event topic: {topic!r}")
        return check_id(parts[0], "task")

    # --- filters ---------------------------------------------------------------------------
    def all_device_states(self) -> str:
        return self._join("devices", "+", "state")

    def replica_state(self, replica: str) -> str:
        """A cloud replica's presence (retained; its last will says offline): who runs which
        task's Flower server is known by replica, and a dead one's tasks are handled by the rest."""
        return self._join("replicas", check_id(replica, "replica"), "state")

    def all_replica_states(self) -> str:
        return self._join("replicas", "+", "state")

    def all_tasks(self) -> str:
        return self._join("tasks", "+")

    def all_task_events(self) -> str:
        """Every event about every task: the cloud's and the devices'."""
        return self._join("tasks", "+", "events", "#")

    def all_device_events(self) -> str:
        return self._join("tasks", "+", "events", "+")
