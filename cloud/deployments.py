"""Deployments: a registered model (NAME:VERSION) rolled out to the devices a criteria expression
selects, stage by stage, each stage judged by what its devices report about the model on their
own data, and rolled back -- automatically or by hand -- when too many of them fail.

The devices of a deployment are chosen once, when it is created: those the criteria select, online
ones first, then by id (deterministic), each given the stage that will take it (stage k takes the
first ``ceil(stages[k] * N)``).  They are ``DeploymentDevice`` rows from the start (``pending``),
so what a deployment will do is in the database, not in memory, and a restarted cloud carries on.

Entering a stage sets each of its devices' desired version (``DeviceModel``, remembering the one
it had as ``previous``) and publishes the device's whole desired record, retained, on
``devices/<d>/models`` -- a device that is away gets it when it returns.  The model file goes on
the broker as retained chunks (``models/<sha256>/...``) before any record names it, and is taken
off once no desired state or running deployment references it.

A stage is decided when each of its devices has reported or its timeout has passed (a silent
device counts as failed, and the reason says so): failure rate = failed / stage size; above
``max_failure_rate`` every device that took the version gets its previous one back (rolled_back),
else the next stage starts (completed after the last).  A paused deployment records reports but
does not advance.  Every decision is an event (component ``cloud.deployments``, ``data.deployment``)
with a ``reason`` a person can read, and is taken under a write transaction with an optimistic
claim on the deployment row (``updated``), so replicas sharing a database decide each stage once.
A small ticker thread decides the stages whose time is up.

States: a deployment is ``running``, ``paused``, ``completed`` or ``rolled_back``; a device of it
``pending`` (its stage has not come), ``sent``, ``healthy``, ``unhealthy`` (its report, or silence),
``rolled_back``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from peewee import OP, Database, Expression, Value

from fedmq.broker import codec
from fedmq.broker.criteria import CriteriaError, parse_criteria
from fedmq.broker.errors import Conflict, FedmqError, Forbidden, Invalid, NotFound
from fedmq.broker.events import EventKind, EventRecord
from fedmq.broker.schema import DesiredModel, DesiredModels
from fedmq.broker.topics import TopicError, check_id
from fedmq.cloud.bundle_store import BundleStore
from fedmq.cloud.db import (
    Deployment,
    DeploymentDevice,
    Device,
    DeviceModel,
    Event,
    ModelVersion,
    Task,
    write_transaction,
)
from fedmq.cloud.devices import flat_info
from fedmq.cloud.events import EventLog
from fedmq.cloud.model_registry import ModelRegistry
from fedmq.ftdl.bundle import BundleError
from fedmq.ftdl.manifest import ManifestError, TaskManifest
from fedmq.ftdl.signing import SigningError, TrustStore

log = logging.getLogger("fedmq.cloud.deployments")
COMPONENT = "cloud.deployments"

RUNNING, PAUSED, COMPLETED, ROLLED_BACK = "running", "paused", "completed", "rolled_back"
ACTIVE = (RUNNING, PAUSED)
PENDING, SENT, HEALTHY, UNHEALTHY = "pending", "sent", "healthy", "unhealthy"
TOOK_IT = (SENT, HEALTHY, UNHEALTHY)  # the devices whose desired version this deployment set
MAX_STAGES = 20
MAX_METRICS_BYTES = 16 * 1024
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 7 * 24 * 3600.0
TICK_S = 1.0


class DeploymentNotFound(NotFound):
    pass


class DeploymentConflict(Conflict):
    """Not in a state that allows this (one already running for that model, already rolled back)."""


class InvalidDeployment(Invalid):
    """A deployment that cannot be made: unknown model, bad stages, criteria or health."""


class ModelPublisher(Protocol):
    """What the deployments say on the broker (``cloud.mqtt_publisher.MqttPublisher``)."""

    def desired_models(self, device: str, record: DesiredModels) -> None:
        """Retain the device's desired models on ``devices/<device>/models``."""

    def publish_model(self, sha256: str, data: bytes) -> None:
        """Put a model file on the broker as retained chunks, then its manifest."""

    def clear_model(self, sha256: str, size: int) -> None:
        """Take a model file's retained chunks and manifest off the broker."""


class _Lost(Exception):
    """Another replica (or thread) changed the deployment first: the transaction is retried."""


@dataclass
class _After:
    """What a decision does once committed: events to publish, devices whose record to publish,
    model files that may no longer be referenced."""

    events: list[EventRecord] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)
    release: set[str] = field(default_factory=set)


def stage_sizes(stages: list[float], selected: int) -> list[int]:
    """How many of ``selected`` devices run the version once each stage has started (cumulative)."""
    return [min(selected, math.ceil(round(fraction * selected, 9))) for fraction in stages]


def check_stages(stages: list[float]) -> list[float]:
    if not stages or len(stages) > MAX_STAGES:
        raise InvalidDeployment(f"stages: give 1 to {MAX_STAGES} fractions, like 0.05,0.25,1.0")
    values = []
    for value in stages:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise InvalidDeployment(f"stages: {value!r} is not a fraction in (0, 1]")
        values.append(float(value))
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise InvalidDeployment(f"stages must increase: {values}")
    if values[-1] != 1.0:
        raise InvalidDeployment(f"stages must end at 1.0 (every selected device), not {values[-1]:g}")
    return values


def _parsed(what: str, text: str) -> str:
    try:
        parse_criteria(text)
    except CriteriaError as exc:
        raise InvalidDeployment(f"{what}: {exc}", {"position": exc.position}) from None
    return text.strip()


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def _summarise(reasons: list[str], limit: int = 3) -> str:
    unique = list(dict.fromkeys(reasons))
    shown = "; ".join(unique[:limit])
    return shown + (f"; and {len(unique) - limit} more" if len(unique) > limit else "")


def deployment_view(row: Deployment) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for device in DeploymentDevice.select(DeploymentDevice.state).where(DeploymentDevice.deployment == row.id):
        counts[device.state] = counts.get(device.state, 0) + 1
    return {"id": row.id, "model": f"{row.name}:{row.version}", "name": row.name, "version": row.version,
            "criteria": row.criteria, "stages": row.stages, "max_failure_rate": row.max_failure_rate,
            "health": row.health, "stage_timeout_s": row.stage_timeout_s, "state": row.state,
            "stage": row.stage + 1, "stage_count": len(row.stages), "stage_started": row.stage_started,
            "reason": row.reason, "signed": bool(row.signature), "key_id": row.key_id, "created": row.created,
            "updated": row.updated, "created_by": row.created_by, "devices": counts}


def _device_view(row: DeploymentDevice) -> dict[str, Any]:
    return {"device": row.device, "stage": row.stage + 1, "state": row.state, "previous": row.previous,
            "metrics": row.metrics or {}, "reason": row.error, "updated": row.updated}


class Deployments:
    """The domain; ``publisher`` says it on the broker, ``registry`` knows the model versions and
    their files, ``store`` (optional) tells whether a bundle has a ``[deploy]`` entry, ``trust``
    (optional) checks the operator's signature, ``require_signed`` refuses unsigned deployments."""

    def __init__(self, db: Database, events: EventLog, publisher: ModelPublisher, registry: ModelRegistry,
                 store: BundleStore | None = None, trust: TrustStore | None = None, require_signed: bool = False,
                 tick_s: float = TICK_S, clock: Callable[[], float] = time.time) -> None:
        self.db, self.events, self.publisher, self.registry = db, events, publisher, registry
        self.store, self.trust, self.require_signed = store, trust, require_signed
        self.tick_s, self.clock = tick_s, clock
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- the model a deployment rolls out ---------------------------------------------------------
    def _model(self, name: str, version: int) -> ModelVersion:
        try:
            return self.registry.get(name, version)
        except NotFound as exc:
            raise InvalidDeployment(exc.message) from None

    @staticmethod
    def bundle_of(model: ModelVersion) -> str | None:
        """The code bundle of the task that trained the model: its ``[deploy]`` entry serves it."""
        revision = (model.lineage or {}).get("revision") or {}
        if isinstance(revision.get("bundle"), str):
            return str(revision["bundle"])
        task = Task.get_or_none(Task.id == model.task)
        return task.bundle if task is not None else None

    def _check_bundle(self, model: ModelVersion) -> str:
        bundle = self.bundle_of(model)
        if bundle is None:
            raise InvalidDeployment(f"cannot tell which code bundle serves {model.name}:{model.version} "
                                    f"(its lineage names none and task {model.task} is gone)")
        if self.store is not None:
            try:
                manifest = TaskManifest.from_dict(self.store.manifest(bundle).task)
            except (BundleError, ManifestError, FedmqError):
                return bundle  # not on this cloud, or unreadable: the device will tell
            if manifest.deploy is None:
                raise InvalidDeployment(f"bundle {bundle[:12]} of {model.name}:{model.version} has no [deploy] "
                                        "entry point, so no device could load the model")
        return bundle

    def _check_signature(self, model: ModelVersion, signature: str | None, key_id: str | None) -> None:
        if not signature:
            if self.require_signed:
                raise Forbidden(f"deployments of this cloud must be signed: fedmq deploy start "
                                f"{model.name}:{model.version} --key KEY")
            return
        if self.trust is not None and self.trust.keys:
            try:
                self.trust.verify_model(model.name, model.version, model.sha256, key_id, signature)
            except SigningError as exc:
                raise Forbidden(str(exc)) from None

    def _file(self, model: ModelVersion) -> bytes:
        path = self.registry.path(model.name, model.version)
        try:
            data = path.read_bytes()
        except OSError:
            raise InvalidDeployment(f"the file of {model.name}:{model.version} is not on this cloud host ({path})") \
                from None
        if hashlib.sha256(data).hexdigest() != model.sha256:
            raise InvalidDeployment(f"the file of {model.name}:{model.version} does not match its registered "
                                    "sha256 (changed on disk?)")
        return data

    # --- creating -------------------------------------------------------------------------------
    def create(self, *, name: str, version: int, to: str = "", stages: list[float] | None = None,
               max_failure_rate: float = 0.0, health: str = "", stage_timeout_s: float = 600.0,
               signature: str | None = None, key_id: str | None = None, by: str = "",
               deployment_id: str | None = None) -> Deployment:
        """Validate everything, choose the devices, put the model file on the broker, then record
        the deployment and start its first stage in one transaction."""
        fractions = check_stages(list(stages or [1.0]))
        if not 0 <= max_failure_rate <= 1:
            raise InvalidDeployment(f"max_failure_rate must be in [0, 1], not {max_failure_rate:g}")
        if not MIN_TIMEOUT_S <= stage_timeout_s <= MAX_TIMEOUT_S:
            raise InvalidDeployment(f"stage_timeout_s must be {MIN_TIMEOUT_S:g}..{MAX_TIMEOUT_S:g} s")
        criteria = parse_criteria(_parsed("to", to))
        health = _parsed("health", health)
        try:
            deployment_id = check_id(deployment_id or f"{name}-v{version}-{uuid.uuid4().hex[:6]}", "deployment id")
        except TopicError as exc:
            raise InvalidDeployment(str(exc)) from None
        model = self._model(name, version)
        self._check_bundle(model)
        self._check_signature(model, signature, key_id)
        self._refuse_active(name)
        devices = sorted(Device.select(), key=lambda d: (not d.online, d.id))
        chosen = [d.id for d in devices if criteria.matches(flat_info(d))]
        if not chosen:
            raise InvalidDeployment(f"the criteria {to!r} select none of the {len(devices)} known devices"
                                    if to.strip() else "there are no devices to deploy to")
        self.publisher.publish_model(model.sha256, self._file(model))  # before any record names it
        sizes = stage_sizes(fractions, len(chosen))
        after = _After()
        now = self.clock()

        def write() -> Deployment:
            self._refuse_active(name)  # again, under the write lock
            if Deployment.get_or_none(Deployment.id == deployment_id) is not None:
                raise DeploymentConflict(f"deployment {deployment_id} exists")
            row = Deployment.create(id=deployment_id, name=name, version=version, criteria=to.strip(),
                                    stages=fractions, max_failure_rate=float(max_failure_rate), health=health,
                                    stage_timeout_s=float(stage_timeout_s), signature=signature or None,
                                    key_id=key_id or None, state=RUNNING, stage=0, stage_started=now,
                                    reason="created", created=now, updated=now, created_by=by)
            DeploymentDevice.insert_many(
                [{"deployment": deployment_id, "device": device, "stage": next(k for k, n in enumerate(sizes) if i < n),
                  "state": PENDING, "updated": now} for i, device in enumerate(chosen)]).execute()
            self._record(after, EventKind.DEPLOYMENT_CREATED, row, model=f"{name}:{version}", sha256=model.sha256,
                         selected=len(chosen), stages=fractions, signed=bool(signature),
                         reason=f"{name}:{version} to {len(chosen)} device(s) "
                                f"({'criteria ' + repr(to.strip()) if to.strip() else 'every device'}) in "
                                f"{len(fractions)} stage(s) {', '.join(map(_percent, fractions))}; health "
                                f"{health or '(none: loading is enough)'}, at most "
                                f"{_percent(max_failure_rate)} failing per stage, by {by or 'an operator'}")
            self._enter_stage(row, 0, after, now)
            self._settle(row, after, now)
            return row

        try:
            row = self._transaction(write, after)
        except FedmqError:
            self._release({model.sha256})
            raise
        return row

    @staticmethod
    def _refuse_active(name: str) -> None:
        active = Deployment.get_or_none((Deployment.name == name) & Deployment.state.in_(ACTIVE))
        if active is not None:
            raise DeploymentConflict(f"deployment {active.id} of {name}:{active.version} is {active.state}; "
                                     f"roll it back or let it finish before deploying {name} again")

    # --- transactions and what follows them ----------------------------------------------------------
    def _transaction(self, write: Callable[[], Any], after: _After, attempts: int = 3) -> Any:
        for attempt in range(attempts):
            try:
                with write_transaction(self.db):
                    result = write()
                break
            except _Lost:
                after.events.clear()
                after.devices.clear()
                after.release.clear()
                if attempt == attempts - 1:
                    raise DeploymentConflict("the deployment changed meanwhile; try again") from None
        self._follow(after)
        return result

    def _follow(self, after: _After) -> None:
        """Once committed: publish the devices' records, the events, and take unreferenced model
        files off the broker."""
        for device in sorted(after.devices):
            try:
                self.publisher.desired_models(device, self.desired(device))
            except Exception:
                log.exception("publishing the desired models of %s failed (republished on reconnect)", device)
        for record in after.events:
            self.events.publish(record)
        if after.release:
            self._release(after.release)

    def _record(self, after: _After, kind: str, row: Deployment, device: str | None = None,
                **data: Any) -> None:
        after.events.append(self.events.record(kind, device=device, component=COMPONENT, ts=self.clock(),
                                               data={"deployment": row.id, **data}, publish=False))

    def _claim(self, row: Deployment, now: float, **changes: Any) -> None:
        """Change the row only if nobody else has since it was read (its ``updated`` is the stamp)."""
        now = max(now, row.updated + 1e-6)
        claimed = Deployment.update(**changes, updated=now).where(
            (Deployment.id == row.id) & (Deployment.updated == row.updated)).execute()
        if not claimed:
            raise _Lost()
        for key, value in changes.items():
            setattr(row, key, value)
        row.updated = now

    # --- stages ---------------------------------------------------------------------------------------
    def _enter_stage(self, row: Deployment, stage: int, after: _After, now: float) -> None:
        devices = list(DeploymentDevice.select().where((DeploymentDevice.deployment == row.id) &
                                                       (DeploymentDevice.stage == stage) &
                                                       (DeploymentDevice.state == PENDING)))
        already = []
        for entry in devices:
            current = DeviceModel.get_or_none((DeviceModel.device == entry.device) & (DeviceModel.name == row.name))
            entry.previous = current.version if current is not None else None
            installed = current.installed if current is not None else None
            if current is None:
                DeviceModel.create(device=entry.device, name=row.name, version=row.version, deployment=row.id,
                                   installed=None, updated=now)
            else:
                current.version, current.deployment, current.updated = row.version, row.id, now
                current.save()
            if installed == row.version:  # nothing to install, so nothing will be reported
                entry.state, entry.error = HEALTHY, f"already runs {row.name}:{row.version}"
                already.append(entry.device)
            else:
                entry.state, entry.error = SENT, None
            entry.metrics, entry.updated = {}, now
            entry.save()
            after.devices.add(entry.device)
        self._claim(row, now, stage=stage, stage_started=now, reason=f"stage {stage + 1} under way")
        total = DeploymentDevice.select().where(DeploymentDevice.deployment == row.id).count()
        running = DeploymentDevice.select().where((DeploymentDevice.deployment == row.id) &
                                                  (DeploymentDevice.stage <= stage)).count()
        self._record(after, EventKind.DEPLOYMENT_STAGE_STARTED, row, stage=stage + 1,
                     devices=[d.device for d in devices],
                     reason=f"stage {stage + 1} of {len(row.stages)}: {_percent(row.stages[stage])} of {total} "
                            f"selected device(s) = {running}, {len(devices)} of them new"
                            + (f" ({len(already)} already run it)" if already else "")
                            + f"; decided when all have reported or after {row.stage_timeout_s:g} s")

    def _settle(self, row: Deployment, after: _After, now: float) -> None:
        """Decide stages as long as one is due (an empty stage passes at once)."""
        while row.state == RUNNING and self._decide(row, after, now):
            pass

    def _decide(self, row: Deployment, after: _After, now: float) -> bool:
        """Decide the stage under way if it is due; True when the deployment moved on to another stage."""
        stage = row.stage
        entries = list(DeploymentDevice.select().where((DeploymentDevice.deployment == row.id) &
                                                       (DeploymentDevice.stage == stage)))
        waiting = [e for e in entries if e.state == SENT]
        if waiting and now < (row.stage_started or now) + row.stage_timeout_s:
            return False
        for entry in waiting:
            entry.state = UNHEALTHY
            entry.error = f"silent: no report within the stage timeout of {row.stage_timeout_s:g} s"
            entry.updated = now
            entry.save()
            self._record(after, EventKind.DEPLOYMENT_DEVICE_REPORTED, row, device=entry.device, stage=stage + 1,
                         ok=False, healthy=False, metrics={}, reason=entry.error)
        failed = [e for e in entries if e.state != HEALTHY]
        rate = len(failed) / len(entries) if entries else 0.0
        summary = f"stage {stage + 1} of {len(row.stages)}: {len(failed)} of {len(entries)} unhealthy"
        if failed:
            summary += f" ({_summarise([e.error or 'unhealthy' for e in failed])})"
        if rate > row.max_failure_rate:
            self._rollback(row, after, now, f"{summary}; failure rate {rate:.2f} > {row.max_failure_rate:.2f}",
                           stage=stage + 1, failure_rate=round(rate, 4), automatic=True)
            return False
        passed = f"{summary}; failure rate {rate:.2f} <= {row.max_failure_rate:.2f}"
        self._record(after, EventKind.DEPLOYMENT_STAGE_PASSED, row, stage=stage + 1, failure_rate=round(rate, 4),
                     reason=passed)
        if stage + 1 >= len(row.stages):
            self._claim(row, now, state=COMPLETED, reason=passed)
            self._record(after, EventKind.DEPLOYMENT_COMPLETED, row, stage=stage + 1,
                         reason=f"every stage passed; {row.name}:{row.version} is the desired version of "
                                f"{len(self._took_it(row))} device(s)")
            after.release.update(self._shas(row.name, {e.previous for e in self._took_it(row)}))
            return False
        self._enter_stage(row, stage + 1, after, now)
        return True

    @staticmethod
    def _took_it(row: Deployment) -> list[DeploymentDevice]:
        return list(DeploymentDevice.select().where((DeploymentDevice.deployment == row.id) &
                                                    DeploymentDevice.state.in_(TOOK_IT)))

    @staticmethod
    def _shas(name: str, versions: Iterable[int | None]) -> set[str]:
        wanted = {v for v in versions if v is not None}
        if not wanted:
            return set()
        return {m.sha256 for m in ModelVersion.select(ModelVersion.sha256).where(
            (ModelVersion.name == name) & ModelVersion.version.in_(wanted))}

    def _rollback(self, row: Deployment, after: _After, now: float, reason: str, **data: Any) -> None:
        """Every device that took this version (and still has it as its desired one) gets back the
        version it had before, or none."""
        reverted = []
        for entry in self._took_it(row):
            current = DeviceModel.get_or_none((DeviceModel.device == entry.device) & (DeviceModel.name == row.name))
            if current is not None and current.deployment == row.id and current.version == row.version:
                if entry.previous is None:
                    current.delete_instance()
                else:
                    origin = (Deployment.select(Deployment.id).where(
                        (Deployment.name == row.name) & (Deployment.version == entry.previous))
                        .order_by(Deployment.created.desc()).first())
                    current.version, current.updated = entry.previous, now
                    current.deployment = origin.id if origin is not None else row.id
                    current.save()
                after.devices.add(entry.device)
                reverted.append(entry.device)
            entry.state, entry.updated = ROLLED_BACK, now
            entry.save()
        self._claim(row, now, state=ROLLED_BACK, reason=reason)
        self._record(after, EventKind.DEPLOYMENT_ROLLED_BACK, row, devices=reverted, reason=reason, **data)
        after.release.update(self._shas(row.name, [row.version]))

    # --- the operator's verbs ---------------------------------------------------------------------------
    @staticmethod
    def get_row(deployment_id: str) -> Deployment:
        row = Deployment.get_or_none(Deployment.id == deployment_id)
        if row is None:
            raise DeploymentNotFound(f"no deployment {deployment_id!r}")
        return row

    def _verb(self, deployment_id: str, allowed: tuple[str, ...], change: Callable[[Deployment, _After, float], None],
              what: str) -> Deployment:
        after = _After()

        def write() -> Deployment:
            row = self.get_row(deployment_id)
            if row.state not in allowed:
                raise DeploymentConflict(f"deployment {deployment_id} is {row.state}: cannot {what} it")
            change(row, after, self.clock())
            return row

        return self._transaction(write, after)

    def pause(self, deployment_id: str, by: str = "") -> Deployment:
        def change(row: Deployment, after: _After, now: float) -> None:
            reason = (f"paused by {by or 'an operator'} in stage {row.stage + 1}: reports are recorded, "
                      "no stage advances")
            self._claim(row, now, state=PAUSED, reason=reason)
            self._record(after, EventKind.DEPLOYMENT_PAUSED, row, stage=row.stage + 1, reason=reason)
        return self._verb(deployment_id, (RUNNING,), change, "pause")

    def resume(self, deployment_id: str, by: str = "") -> Deployment:
        def change(row: Deployment, after: _After, now: float) -> None:
            reason = (f"resumed by {by or 'an operator'} in stage {row.stage + 1}: its timeout of "
                      f"{row.stage_timeout_s:g} s counts from now")
            self._claim(row, now, state=RUNNING, stage_started=now, reason=reason)
            self._record(after, EventKind.DEPLOYMENT_RESUMED, row, stage=row.stage + 1, reason=reason)
            self._settle(row, after, now)  # every device may have reported meanwhile
        return self._verb(deployment_id, (PAUSED,), change, "resume")

    def rollback(self, deployment_id: str, by: str = "", reason: str = "") -> Deployment:
        def change(row: Deployment, after: _After, now: float) -> None:
            why = f"rolled back by {by or 'an operator'} in stage {row.stage + 1}" + (f": {reason}" if reason else "")
            self._rollback(row, after, now, why, stage=row.stage + 1, automatic=False)
        return self._verb(deployment_id, (RUNNING, PAUSED, COMPLETED), change, "roll back")

    # --- a device's report ---------------------------------------------------------------------------------
    def report(self, device: str, deployment_id: str, name: str, version: int, ok: bool,
               metrics: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
        """What a device says about the version it installed (or failed to); the first report of a
        device counts, a repeat (a retry whose answer was lost) is answered the same."""
        metrics = dict(metrics or {})
        try:
            codec.check_tree(metrics, "metrics", max_depth=4)
        except codec.CodecError as exc:
            raise Invalid(str(exc)) from None
        if len(codec.encode(metrics)) > MAX_METRICS_BYTES:
            raise Invalid(f"metrics larger than {MAX_METRICS_BYTES} bytes")
        after = _After()
        answer: dict[str, Any] = {}

        def write() -> None:
            row = self.get_row(deployment_id)
            entry = DeploymentDevice.get_or_none((DeploymentDevice.deployment == row.id) &
                                                 (DeploymentDevice.device == device))
            if entry is None or entry.state == PENDING:
                raise Forbidden(f"device {device} is not {'yet ' if entry else ''}in deployment {row.id}")
            if name != row.name:
                raise Invalid(f"deployment {row.id} deploys {row.name}, not {name}")
            if version != row.version and not (entry.state == ROLLED_BACK and version == entry.previous):
                raise Invalid(f"deployment {row.id} deploys {row.name}:{row.version}, not version {version}")
            now = self.clock()
            current = DeviceModel.get_or_none((DeviceModel.device == device) & (DeviceModel.name == name))
            if ok and current is not None and current.version == version:
                current.installed, current.updated = version, now
                current.save()
            answer.update(deployment=row.id, device=device, state=row.state)
            if version != row.version:  # the device is back on its previous version
                reason = f"back on {name}:{version} after the rollback" if ok else f"rollback to {version}: {error}"
                answer.update(healthy=None, reason=reason)
                self._record(after, EventKind.DEPLOYMENT_DEVICE_REPORTED, row, device=device, stage=entry.stage + 1,
                             version=version, ok=ok, healthy=None, metrics=metrics, reason=reason)
                return
            healthy, reason = self._judge(row, ok, metrics, error)
            if entry.state != SENT:  # decided already (a retry, or a report after silence or rollback)
                late = entry.state in (ROLLED_BACK,) or (entry.error or "").startswith("silent")
                answer.update(healthy=entry.state == HEALTHY, reason=entry.error or reason, recorded=False)
                if late:
                    self._record(after, EventKind.DEPLOYMENT_DEVICE_REPORTED, row, device=device,
                                 stage=entry.stage + 1, ok=ok, healthy=healthy, metrics=metrics,
                                 reason=f"{reason} (after the stage's decision: it stands)")
                return
            entry.state, entry.metrics, entry.updated = HEALTHY if healthy else UNHEALTHY, metrics, now
            entry.error = None if healthy else reason
            entry.save()
            self._record(after, EventKind.DEPLOYMENT_DEVICE_REPORTED, row, device=device, stage=entry.stage + 1,
                         ok=ok, healthy=healthy, metrics=metrics, reason=reason)
            answer.update(healthy=healthy, reason=reason, recorded=True)
            if row.state == RUNNING and entry.stage == row.stage:
                self._settle(row, after, now)
                answer["state"] = row.state

        self._transaction(write, after)
        return answer

    @staticmethod
    def _judge(row: Deployment, ok: bool, metrics: dict[str, Any], error: str | None) -> tuple[bool, str]:
        if not ok:
            return False, error or "the install failed (no cause given)"
        held, why = parse_criteria(row.health).explain(metrics)
        if not row.health:
            return True, "loaded (no health condition)"
        return held, f"loaded, {why}" if held else why

    # --- reading ----------------------------------------------------------------------------------------
    @staticmethod
    def query(state: str | None = None, name: str | None = None) -> list[Deployment]:
        query = Deployment.select().order_by(Deployment.created.desc())
        if state is not None:
            query = query.where(Deployment.state == state)
        if name is not None:
            query = query.where(Deployment.name == name)
        return list(query)

    def get(self, deployment_id: str) -> dict[str, Any]:
        """The deployment, its devices and its decisions in order, each with its reason."""
        row = self.get_row(deployment_id)
        devices = DeploymentDevice.select().where(DeploymentDevice.deployment == row.id).order_by(
            DeploymentDevice.stage, DeploymentDevice.device)
        return {**deployment_view(row), "devices_detail": [_device_view(d) for d in devices],
                "timeline": self.timeline(row.id)}

    @staticmethod
    def timeline(deployment_id: str) -> list[dict[str, Any]]:
        marker = codec.encode({"deployment": deployment_id}, codec.Codec.JSON)[1:-1].decode()
        # A text match on the JSON column narrows the rows (the pattern as is: not JSON-encoded
        # again by the field); the exact test is below.
        mentions = Expression(Event.data, OP.ILIKE, Value(f"%{marker}%", converter=False))
        rows = Event.select().where((Event.component == COMPONENT) & mentions).order_by(Event.ts, Event.id)
        return [{"ts": e.ts, "kind": e.kind, "device": e.device, "stage": (e.data or {}).get("stage"),
                 "reason": (e.data or {}).get("reason", ""),
                 "data": {k: v for k, v in (e.data or {}).items() if k not in ("deployment", "reason")}}
                for e in rows if (e.data or {}).get("deployment") == deployment_id]

    def desired(self, device: str) -> DesiredModels:
        """The device's whole desired record, from the database."""
        models: dict[str, DesiredModel] = {}
        for entry in DeviceModel.select().where(DeviceModel.device == device).order_by(DeviceModel.name):
            model = ModelVersion.get_or_none((ModelVersion.name == entry.name) &
                                             (ModelVersion.version == entry.version))
            if model is None:
                log.error("device %s should run %s:%s, which is not registered", device, entry.name, entry.version)
                continue
            origin = Deployment.get_or_none(Deployment.id == entry.deployment) if entry.deployment else None
            if origin is None or origin.version != entry.version:
                origin = (Deployment.select().where((Deployment.name == entry.name) &
                                                    (Deployment.version == entry.version))
                          .order_by(Deployment.created.desc()).first())
            models[entry.name] = DesiredModel(
                version=entry.version, sha256=model.sha256, size=model.size, bundle=self.bundle_of(model) or "",
                deployment=origin.id if origin is not None else (entry.deployment or ""),
                signature=origin.signature if origin is not None else None,
                key_id=origin.key_id if origin is not None else None)
        return DesiredModels(seq=time.time_ns() // 1000, models=models)

    # --- the broker's copy ---------------------------------------------------------------------------
    @staticmethod
    def _referenced() -> dict[str, ModelVersion]:
        """The model files some desired state or active deployment needs, by sha256."""
        wanted: set[tuple[str, int]] = {(d.name, d.version) for d in DeviceModel.select(DeviceModel.name,
                                                                                           DeviceModel.version)}
        wanted |= {(d.name, d.version) for d in Deployment.select(Deployment.name, Deployment.version).where(
            Deployment.state.in_(ACTIVE))}
        found: dict[str, ModelVersion] = {}
        for name, version in wanted:
            model = ModelVersion.get_or_none((ModelVersion.name == name) & (ModelVersion.version == version))
            if model is not None:
                found[model.sha256] = model
        return found

    def _release(self, candidates: set[str]) -> None:
        referenced = self._referenced()
        for sha in sorted(candidates - set(referenced)):
            model = ModelVersion.get_or_none(ModelVersion.sha256 == sha)
            if model is None:
                continue
            try:
                self.publisher.clear_model(sha, model.size)
            except Exception:
                log.exception("clearing model file %s from the broker failed", sha[:12])

    def republish(self) -> None:
        """Every referenced model file and every device's record back on the broker (after the cloud
        or a broker without persistence restarted): files first, so any record finds its file."""
        for sha, model in self._referenced().items():
            try:
                self.publisher.publish_model(sha, self._file(model))
            except FedmqError as exc:
                log.error("cannot republish %s:%s: %s", model.name, model.version, exc)
        devices = {d.device for d in DeviceModel.select(DeviceModel.device)}
        devices |= {d.device for d in DeploymentDevice.select(DeploymentDevice.device).where(
            DeploymentDevice.state != PENDING)}
        for device in sorted(devices):
            self.publisher.desired_models(device, self.desired(device))

    # --- the ticker -------------------------------------------------------------------------------------
    def tick(self) -> list[str]:
        """Decide the running deployments whose stage is due (timeout passed, or every device
        reported before a restart); returns the ids that changed."""
        changed = []
        now = self.clock()
        for row in Deployment.select().where(Deployment.state == RUNNING):
            if not self._due(row, now):
                continue
            after = _After()

            def write(deployment_id: str = row.id, after: _After = after) -> bool:
                current = self.get_row(deployment_id)
                if current.state != RUNNING:
                    return False
                before = (current.state, current.stage)
                self._settle(current, after, self.clock())
                return (current.state, current.stage) != before

            try:
                if self._transaction(write, after):
                    changed.append(row.id)
            except FedmqError as exc:
                log.warning("deciding deployment %s: %s", row.id, exc)
        return changed

    @staticmethod
    def _due(row: Deployment, now: float) -> bool:
        if now >= (row.stage_started or 0) + row.stage_timeout_s:
            return True
        return not DeploymentDevice.select().where((DeploymentDevice.deployment == row.id) &
                                                   (DeploymentDevice.stage == row.stage) &
                                                   (DeploymentDevice.state.in_((SENT, PENDING)))).exists()

    def start(self) -> None:
        if self._ticker is None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._run_ticker, name="deployments-ticker", daemon=True)
            self._ticker.start()

    def _run_ticker(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("the deployments ticker failed (retried in %g s)", self.tick_s)

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
            self._ticker = None
