"""Events: the wire shape of a step on ``tasks/<task>/events`` and ``events/<component>``, the
vocabulary of kinds, and the one function that publishes them -- for the cloud, which records
and publishes its steps, and the edges, which publish theirs."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any

import msgspec
from msgspec import Meta, field

from fedmq.broker import codec
from fedmq.broker.topics import TopicError, Topics, check_id
from fedmq.broker.wire import Wire

MAX_KIND_LENGTH = 64


class EventKind(StrEnum):
    """Every kind fedmq itself emits (others may publish kinds of their own)."""

    # the cloud, about tasks
    TASK_CREATED = "task_created"
    TASK_UPDATED = "task_updated"
    TASK_DELETED = "task_deleted"
    TASK_STARTED = "task_started"
    TASK_FINISHED = "task_finished"
    TASK_FAILED = "task_failed"
    TASK_STOPPED = "task_stopped"
    ROUND_DONE = "round_done"
    ROUND_METRICS = "round_metrics"
    SERVER_ERROR = "server_error"
    SERVER_INFO = "server_info"
    SERVER_FINISHED = "server_finished"
    SERVER_TRIGGER_STARTED = "server_trigger_started"
    SERVER_TRIGGER_RESULT = "server_trigger_result"
    SERVER_TRIGGER_REFUSED = "server_trigger_refused"
    # the cloud, about devices
    DEVICE_REGISTERED = "device_registered"
    DEVICE_ONLINE = "device_online"
    DEVICE_OFFLINE = "device_offline"
    DEVICE_REQUESTED = "device_requested"
    DEVICE_JOINED = "device_joined"    # a task that selects on the device: it found itself eligible
    DEVICE_EVENTS_DROPPED = "device_events_dropped"
    # the edges
    BUNDLE_FETCH_STARTED = "bundle_fetch_started"
    BUNDLE_FETCHED = "bundle_fetched"
    BUNDLE_REFUSED = "bundle_refused"
    CLIENT_STARTED = "client_started"
    CLIENT_ROUND = "client_round"
    CLIENT_PROGRESS = "client_progress"
    CLIENT_INFO = "client_info"
    CLIENT_ERROR_REPORT = "client_error_report"
    CLIENT_TRIGGER_RESULT = "client_trigger_result"
    CLIENT_TRIGGER_REFUSED = "client_trigger_refused"
    CLIENT_FINISHED = "client_finished"
    CLIENT_STOPPED = "client_stopped"
    CLIENT_ERROR = "client_error"
    # the participants of a serverless task (fedmq.ftdl.serverless), on their own event topics
    FL_JOINED = "fl_joined"
    FL_ELECTED = "fl_elected"
    FL_FAILOVER = "fl_failover"
    FL_UPDATE_PUBLISHED = "fl_update_published"
    FL_UPDATE_REJECTED = "fl_update_rejected"
    FL_ROUND_TIMEOUT = "fl_round_timeout"
    FL_GLOBAL_PUBLISHED = "fl_global_published"
    FL_GLOBAL_ACCEPTED = "fl_global_accepted"
    FL_FINISHED = "fl_finished"
    # the model lifecycle: lineage, the registry, deployments, the desired state from a file
    CLIENT_DATA = "client_data"                  # a device's fingerprint of the data it trained on
    MODEL_REGISTERED = "model_registered"
    MODEL_NOT_REGISTERED = "model_not_registered"  # a task's register_if said no (and why)
    DEPLOYMENT_CREATED = "deployment_created"
    DEPLOYMENT_STAGE_STARTED = "deployment_stage_started"
    DEPLOYMENT_DEVICE_REPORTED = "deployment_device_reported"
    DEPLOYMENT_STAGE_PASSED = "deployment_stage_passed"
    DEPLOYMENT_PAUSED = "deployment_paused"
    DEPLOYMENT_RESUMED = "deployment_resumed"
    DEPLOYMENT_ROLLED_BACK = "deployment_rolled_back"
    DEPLOYMENT_COMPLETED = "deployment_completed"
    MODEL_INSTALLED = "model_installed"          # a device, about a model it now runs (or failed to)
    MODEL_INSTALL_FAILED = "model_install_failed"
    FLEET_APPLIED = "fleet_applied"              # fedmq apply: what changed, with the file's digest


# One event per device per task: at fleet scale (10,000 devices x 200 tasks) these would flood
# the component stream, so they go on their task's topic only (the timeline keeps all of them).
PER_DEVICE_TASK_KINDS = frozenset({EventKind.DEVICE_REQUESTED, EventKind.DEVICE_JOINED})


def _number_or_now(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else time.time()


class EventRecord(Wire, kw_only=True):
    """``{ts, component, kind, task, device, run, data}``.  Parsing another party's event is
    lenient where being strict would lose a step for nothing (an odd timestamp becomes now, an
    odd run or data is dropped) and strict where it matters (kind, device id)."""

    ts: float = field(default_factory=time.time)
    component: str = ""
    kind: Annotated[str, Meta(min_length=1, max_length=MAX_KIND_LENGTH)]
    task: str | None = None
    device: str | None = None
    run: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, body: Any, task: str) -> EventRecord | None:
        """An event as another party published it on ``tasks/<task>/events`` (the topic names the
        task), or None if it is not one."""
        if not isinstance(body, dict):
            return None
        run, data, component, device = body.get("run"), body.get("data"), body.get("component"), body.get("device")
        try:
            return msgspec.convert({
                "ts": _number_or_now(body.get("ts")),
                "component": component if isinstance(component, str) else "",
                "kind": body.get("kind"),
                "task": task,
                "device": None if device is None else check_id(device, "device"),
                "run": run if isinstance(run, int) and not isinstance(run, bool) else None,
                "data": codec.finite(data) if isinstance(data, dict) else {},  # a NaN loss is kept as null
            }, cls)
        except (msgspec.ValidationError, TopicError):
            return None


def publish_event(connection: Any, topics: Topics, record: EventRecord, *, qos: int = 1,
                  component_topic: bool = False, as_device: bool = False) -> None:
    """Publish an event as JSON on its task's topic (when it has a task) -- a device's own
    (``as_device``) under ``tasks/<task>/events/<device>`` -- and, with ``component_topic``, on
    ``events/<component>`` too (but for the per-device-per-task kinds).  ``connection`` is an ``MqttConnection``."""
    payload = codec.encode(record.to_wire(), codec.Codec.JSON)
    if record.task:
        topic = topics.device_events(record.task, str(record.device)) if as_device else topics.task_events(record.task)
        connection.publish(topic, payload, qos=qos)
    if component_topic and not (record.task and record.kind in PER_DEVICE_TASK_KINDS):
        connection.publish(topics.events(record.component), payload, qos=qos)
