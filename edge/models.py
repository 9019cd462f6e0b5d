"""Deployed models on a device: the edge's half of a deployment (docs/lifecycle.md, "On the device").

The cloud publishes, retained, what this device should run on ``devices/<me>/models``
(``DesiredModels``).  For each model name whose desired version (or deployment) differs from what
the device runs, the ``ModelDeployer``:

1. checks the operator's signature over ``NAME:VERSION`` and the file's SHA-256 against the
   device's trusted keys (unless the record is unsigned and the agent allows unsigned content) --
   before a byte is downloaded;
2. takes the model file from ``<work>/models/<name>/<version>/model.npz`` if it is there and
   intact (a rollback downloads nothing), else fetches it from the retained chunks on
   ``models/<sha256>/...``, each chunk and the whole verified;
3. fetches the code bundle that trained it (the agent's bundle fetcher, signatures and all) and
   runs its ``[deploy]`` entry point with ftdl's one process runner, the model path in
   ``FEDMQ_MODEL_PATH`` and the device's data dir -- the entry point measures the model on local
   data and reports ``send_health(metrics)``;
4. records what it runs in ``<work>/models/installed.json`` only when all that succeeded: a failed
   install leaves the previous version in place;
5. reports to the cloud, ``deployments.report(...)``, from a queue kept on disk
   (``<work>/models/reports.json``) and retried with backoff until answered -- under the same
   request id each time, so a cloud that already took a report answers it again instead of
   counting it twice.

Everything runs on one worker thread of its own, started when the first record (or a pending
report) needs it: an idle agent with no deployments pays one subscription.  The numerical and
crypto machinery (chunk fetch, signatures, the process runner) is imported on first use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from msgspec import field

from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.events import EventKind
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.schema import DesiredModel, DesiredModels, ModelManifest
from fedmq.broker.topics import Topics
from fedmq.broker.wire import RecordError, Wire, read
from fedmq.edge.state import write_json

if TYPE_CHECKING:
    from fedmq.edge.bundle_fetch import BundleFetcher
    from fedmq.ftdl.process import TaskProcess
    from fedmq.ftdl.signing import TrustStore

log = logging.getLogger("fedmq.edge.models")

MODEL_FILE = "model.npz"               # as ftdl.reporter.MODEL_FILE (not imported: it is ftdl's task side)
INSTALLED_FILE = "installed.json"
SIGNATURE_FILE = "signature.json"     # beside a version's file: the signature this device checked
REPORTS_FILE = "reports.json"
KEEP_VERSIONS = 3                      # per name: the running one and the latest others (rollbacks)
MAX_MODEL_BYTES = 512 * 1024 * 1024    # a model is fetched into memory before it is written
MANIFEST_TIMEOUT_S = 30.0
STALL_TIMEOUT_S = 30.0
TRANSIENT_ATTEMPTS = 3                 # a download that stalls is tried this often before it is a failure
# An answer with one of these codes is no answer: the report is sent again later.
_RETRIED = (ErrorCode.TIMEOUT, ErrorCode.INTERNAL, ErrorCode.UNKNOWN_METHOD)


class _File(Wire, kw_only=True):
    """A file this agent writes and reads back (fields it does not know are ignored)."""


class InstalledModel(_File, kw_only=True):
    """A model this device runs: the version whose deploy entry point last succeeded."""

    version: int
    sha256: str
    size: int
    bundle: str
    deployment: str
    metrics: dict[str, Any] = field(default_factory=dict)
    installed: float = field(default_factory=time.time)


class FailedInstall(_File, kw_only=True):
    """A desired version that failed here: not tried again until the record asks for another."""

    version: int
    sha256: str
    deployment: str
    error: str
    at: float = field(default_factory=time.time)


class InstalledFile(_File, kw_only=True):
    models: dict[str, InstalledModel] = field(default_factory=dict)
    failed: dict[str, FailedInstall] = field(default_factory=dict)


class Report(_File, kw_only=True):
    """One ``deployments.report`` call waiting for an answer; ``id`` is its request id."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deployment: str
    name: str
    version: int
    ok: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def args(self) -> dict[str, Any]:
        args = self.to_wire()
        del args["id"]
        return args


class ReportsFile(_File, kw_only=True):
    pending: list[Report] = field(default_factory=list)


class InstallError(Exception):
    """An install that did not happen, and why (``code`` in one word, ``cause`` for people)."""

    def __init__(self, code: str, cause: str, *, transient: bool = False) -> None:
        super().__init__(cause)
        self.code, self.cause, self.transient = code, cause, transient


def _load(path: Path, model: type[_File]) -> Any:
    try:
        return read(model, json.loads(path.read_text()))
    except FileNotFoundError:
        return model()
    except ValueError as exc:  # not JSON, or a RecordError
        # A damaged file must not keep the device from serving: start clean (the cloud's
        # retained record says again what to run), but keep the damaged file for a person.
        log.error("%s is damaged (%s); starting without it", path, exc)
        path.replace(path.with_suffix(".damaged"))
        return model()


def _sha256(path: Path) -> str | None:
    import hashlib  # here, not at the top: an idle agent does without OpenSSL's digests (edge.lean_paho)

    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


@dataclass
class DeployerSettings:
    device: str
    root: Path                                   # <work>/models
    data_dir: Path | None
    allow_unsigned: bool
    time_limit_s: float | None
    rpc_timeout_s: float


class ModelDeployer:
    """Keeps this device's models as the cloud's record for it says (see the module docstring).

    ``fetcher`` and ``trust`` are callables so the agent makes its bundle fetcher (and loads its
    signing machinery) only when a deployment first needs them; ``publish_event(task, kind,
    data)`` is the agent's; ``on_change`` is called when what the device runs changed (its info);
    ``backoff(failures)`` is the agent's retry delay."""

    def __init__(self, connection: Any, topics: Topics, rpc: RpcClient, settings: DeployerSettings, *,
                 fetcher: Callable[[], BundleFetcher], trust: Callable[[], TrustStore | None],
                 publish_event: Callable[[str, str, dict[str, Any]], None],
                 on_change: Callable[[], None], backoff: Callable[[int], float]) -> None:
        self.connection, self.topics, self.rpc, self.settings = connection, topics, rpc, settings
        self._fetcher, self._trust, self._publish, self._on_change = fetcher, trust, publish_event, on_change
        self._backoff = backoff
        self.root = settings.root
        self.state: InstalledFile = _load(self.root / INSTALLED_FILE, InstalledFile)
        self.reports: ReportsFile = _load(self.root / REPORTS_FILE, ReportsFile)
        self.desired: DesiredModels | None = None  # None: no record heard yet (keep what runs)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._process: TaskProcess | None = None
        self._report_failures = 0
        self._retry_at = 0.0
        self._transient: dict[tuple[str, int, str], int] = {}  # (name, version, deployment) -> attempts

    # --- what the agent sees ------------------------------------------------------------------
    def running(self) -> dict[str, int]:
        """``{name: version}`` of the models this device runs (for its device info)."""
        return {name: entry.version for name, entry in sorted(self.state.models.items())}

    def start(self) -> None:
        self.connection.subscribe(self.topics.device_models(self.settings.device), self._on_record, qos=1, wait=False)
        if self.reports.pending:  # what a previous process could not deliver
            self._kick()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        process = self._process
        if process is not None:
            process.stop(grace_s=5.0)
        if self._thread is not None:
            self._thread.join(10.0)

    def _kick(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._serve, name=f"models-{self.settings.device}",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def _on_record(self, message: mqtt.MQTTMessage) -> None:
        """The cloud's record for this device (paho's thread: decode, keep, wake the worker)."""
        try:
            record = DesiredModels.decode(bytes(message.payload)) if message.payload else DesiredModels()
        except RecordError as exc:
            log.warning("%s: ignored the models record: %s", self.settings.device, exc)
            return
        with self._lock:
            if self.desired is not None and record.seq < self.desired.seq:
                return  # an older record replayed after a newer one
            self.desired = record
        self._kick()

    # --- the worker ---------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            timeout = max(0.05, self._retry_at - time.time()) if self._retry_at else None
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._retry_at = 0.0
            try:
                self._reconcile()
                self._send_reports()
            except Exception:  # the worker must outlive one bad install
                log.exception("%s: deployed models: reconcile failed", self.settings.device)
                self._retry_later(1)

    def _retry_later(self, failures: int) -> float:
        """Wake again after the agent's backoff for ``failures``; returns the delay."""
        delay = self._backoff(failures)
        at = time.time() + delay
        self._retry_at = min(self._retry_at, at) if self._retry_at else at
        return delay

    def _reconcile(self) -> None:
        with self._lock:
            desired = self.desired
        if desired is None:
            return
        changed = False
        for name in sorted(set(self.state.models) - set(desired.models)):
            log.info("%s: no longer runs model %s (version %d)", self.settings.device, name,
                     self.state.models[name].version)
            del self.state.models[name]
            changed = True
        for name in set(self.state.failed) - set(desired.models):
            del self.state.failed[name]
        for name, want in sorted(desired.models.items()):
            if self._stop.is_set():
                return
            if self._settled(name, want):
                continue
            self._install(name, want)
            changed = True
        self._save_state()
        if changed:
            self._on_change()

    def _settled(self, name: str, want: DesiredModel) -> bool:
        """Nothing to do: it runs this, or this very request failed here already."""
        for entry in (self.state.models.get(name), self.state.failed.get(name)):
            if entry is not None and (entry.version, entry.sha256, entry.deployment) == \
                    (want.version, want.sha256, want.deployment):
                return True
        return False

    def _install(self, name: str, want: DesiredModel) -> None:
        previous = self.state.models.get(name)
        metrics: dict[str, Any] = {}
        downloaded = False
        try:
            self._verify(name, want)
            model_path, downloaded = self._model_file(name, want)
            bundle_path, manifest = self._bundle(want.bundle)
            metrics = self._run(name, want, bundle_path, manifest, model_path)
        except InstallError as exc:
            key = (name, want.version, want.deployment)
            attempts = self._transient.get(key, 0) + 1
            if exc.transient and attempts < TRANSIENT_ATTEMPTS and not self._stop.is_set():
                self._transient[key] = attempts
                log.warning("%s: model %s:%d not installed yet (%s); trying again", self.settings.device, name,
                            want.version, exc.cause)
                self._retry_later(attempts)
                return
            if self._stop.is_set():
                return  # stopped mid-install: not this version's failure
            self._transient.pop(key, None)
            self._failed(name, want, previous, exc, metrics)
            return
        self._transient.pop((name, want.version, want.deployment), None)
        self.state.models[name] = InstalledModel(version=want.version, sha256=want.sha256, size=want.size,
                                                 bundle=want.bundle, deployment=want.deployment, metrics=metrics)
        self.state.failed.pop(name, None)
        self._save_state()
        self._prune(name)
        reason = (f"installed {name}:{want.version}" + (f" (was {previous.version})" if previous else "")
                  + ("" if downloaded else ", its file already here") + "; the deploy entry point reported "
                  + (", ".join(f"{k} {_short(v)}" for k, v in metrics.items()) or "no metrics"))
        log.info("%s: %s", self.settings.device, reason)
        self._event(name, EventKind.MODEL_INSTALLED, {
            "name": name, "version": want.version, "deployment": want.deployment, "metrics": metrics,
            "previous": previous.version if previous else None, "downloaded": downloaded, "reason": reason})
        self._queue_report(Report(deployment=want.deployment, name=name, version=want.version, ok=True,
                                  metrics=metrics))

    def _failed(self, name: str, want: DesiredModel, previous: InstalledModel | None, exc: InstallError,
                metrics: dict[str, Any]) -> None:
        self.state.failed[name] = FailedInstall(version=want.version, sha256=want.sha256,
                                                deployment=want.deployment, error=exc.cause[:2000])
        self._save_state()
        kept = f"; keeps running version {previous.version}" if previous else "; runs no version of it"
        reason = f"{name}:{want.version} not installed: {exc.cause}{kept}"
        log.warning("%s: %s", self.settings.device, reason)
        self._event(name, EventKind.MODEL_INSTALL_FAILED, {
            "name": name, "version": want.version, "deployment": want.deployment, "code": exc.code,
            "error": exc.cause, "kept": previous.version if previous else None, "reason": reason})
        self._queue_report(Report(deployment=want.deployment, name=name, version=want.version, ok=False,
                                  metrics=metrics, error=exc.cause[:2000]))

    # --- the steps of an install ----------------------------------------------------------------
    def _verify(self, name: str, want: DesiredModel) -> None:
        """The operator's signature over NAME:VERSION and the digest, checked against the trusted
        keys.  A record without one (a rollback to a version no deployment of the cloud's signs any
        more) may rely on the signature this device checked when it first installed that version,
        kept beside the file -- checked again now, against today's trusted keys."""
        signer, signature = want.key_id, want.signature
        kept = self.version_dir(name, want.version) / SIGNATURE_FILE
        if signature is None:
            try:
                stored = json.loads(kept.read_text())
                if stored.get("sha256") == want.sha256:
                    signer, signature = stored.get("key_id"), stored.get("signature")
            except (OSError, ValueError, AttributeError):
                pass
        if signature is None and self.settings.allow_unsigned:
            return
        from fedmq.ftdl.signing import SigningError, TrustStore

        try:
            (self._trust() or TrustStore()).verify_model(name, want.version, want.sha256, signer, signature)
        except SigningError as exc:
            raise InstallError("bad_signature" if signature else "unsigned", f"signature refused: {exc}") from None
        write_json(kept, {"sha256": want.sha256, "key_id": signer, "signature": signature})

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def _model_file(self, name: str, want: DesiredModel) -> tuple[Path, bool]:
        """The verified model file, and whether it had to be downloaded."""
        path = self.version_dir(name, want.version) / MODEL_FILE
        if _sha256(path) == want.sha256:
            return path, False
        if want.size > MAX_MODEL_BYTES:
            raise InstallError("too_large", f"the model file is {want.size} bytes, over {MAX_MODEL_BYTES}")
        from fedmq.ftdl.chunks import ChunkError, ChunkFetch, ChunkTimeout, wait_retained

        raw = wait_retained(self.connection, self.topics.model_blob(want.sha256), MANIFEST_TIMEOUT_S)
        if raw is None:
            raise InstallError("not_found", f"no manifest for model file {want.sha256[:12]} on the broker "
                                            f"within {MANIFEST_TIMEOUT_S:g} s", transient=True)
        try:
            manifest = ModelManifest.decode(raw)
        except RecordError as exc:
            raise InstallError("bad_manifest", str(exc)) from None
        if (manifest.sha256, manifest.size) != (want.sha256, want.size):
            raise InstallError("bad_manifest", "the model file's manifest describes another file")
        fetch = ChunkFetch(self.connection, lambda i: self.topics.model_blob(want.sha256, i), manifest.chunks)
        try:
            data = fetch.wait(STALL_TIMEOUT_S)
        except ChunkTimeout as exc:
            raise InstallError(exc.code, f"model file not fetched ({exc.code}): {exc.message}",
                               transient=True) from None
        except ChunkError as exc:
            raise InstallError(exc.code, f"model file refused ({exc.code}): {exc.message}") from None
        import hashlib

        if hashlib.sha256(data).hexdigest() != want.sha256:
            raise InstallError("digest_mismatch", "the assembled model file does not match its digest")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return path, True

    def _bundle(self, digest: str) -> tuple[Path, Any]:
        from fedmq.ftdl.bundle import BundleError
        from fedmq.ftdl.manifest import ManifestError, load_manifest

        try:
            result = self._fetcher().fetch(digest)
        except BundleError as exc:
            raise InstallError(exc.code, f"bundle refused ({exc.code}): {exc.message}",
                               transient=exc.code == "timeout") from None
        try:
            manifest = load_manifest(result.path)
        except ManifestError as exc:
            raise InstallError("bad_manifest", str(exc)) from None
        if manifest.deploy is None:
            raise InstallError("no_deploy_entry", f"the bundle {digest[:12]} has no [deploy] entry point")
        return result.path, manifest

    def _run(self, name: str, want: DesiredModel, bundle: Path, manifest: Any, model: Path) -> dict[str, Any]:
        from fedmq.ftdl import start_task
        from fedmq.ftdl.reporter import ENV_MODEL_NAME, ENV_MODEL_PATH, ENV_MODEL_VERSION

        health: dict[str, Any] = {}

        def on_event(event: Any) -> None:
            if event.kind == "health":  # ReporterKind.HEALTH
                health.clear()
                health.update(event.data.get("metrics") or {})

        process = start_task(
            bundle, "deploy", task_id=name, log_dir=self.version_dir(name, want.version), on_event=on_event,
            data_dir=self.settings.data_dir, time_limit_s=self.settings.time_limit_s, manifest=manifest,
            env={ENV_MODEL_PATH: str(model), ENV_MODEL_NAME: name, ENV_MODEL_VERSION: str(want.version)})
        self._process = process
        try:
            outcome = process.wait()
        finally:
            self._process = None
        assert outcome is not None
        if not outcome.ok:
            raise InstallError("deploy_failed", f"the deploy entry point failed: {outcome.cause}")
        return dict(health)

    def _prune(self, name: str) -> None:
        """Keep the running version and the newest others, up to ``KEEP_VERSIONS`` in all."""
        running = self.state.models[name].version
        folder = self.root / name
        versions = sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
        keep = {running, *[v for v in versions if v != running][:KEEP_VERSIONS - 1]}
        for version in versions:
            if version not in keep:
                shutil.rmtree(folder / str(version), ignore_errors=True)

    # --- events, state, reports ------------------------------------------------------------------
    def _event(self, name: str, kind: str, data: dict[str, Any]) -> None:
        """On the device's event topic of the model's name (a device publishes events only under a
        task; a model's name is its training task's unless the operator chose another)."""
        from fedmq.broker.topics import TopicError

        try:
            self._publish(name, kind, data)
        except TopicError as exc:
            log.warning("%s: no event for model %s: %s", self.settings.device, name, exc)

    def _save_state(self) -> None:
        write_json(self.root / INSTALLED_FILE, self.state.to_wire())

    def _queue_report(self, report: Report) -> None:
        if not report.deployment:  # desired by no deployment (the cloud has none to tell)
            return
        self.reports.pending.append(report)
        write_json(self.root / REPORTS_FILE, self.reports.to_wire())

    def _send_reports(self) -> None:
        while self.reports.pending and not self._stop.is_set():
            report = self.reports.pending[0]
            try:
                self.rpc.call_future("deployments", "report", report.args(), timeout=self.settings.rpc_timeout_s,
                                     request_id=report.id).result_or_raise()
            except RpcError as exc:
                if exc.code in _RETRIED:
                    self._report_failures += 1
                    delay = self._retry_later(self._report_failures)
                    log.warning("%s: deployments.report not answered (%s); retrying in %.1f s",
                                self.settings.device, exc, delay)
                    return
                log.warning("%s: deployments.report refused (%s); dropping the report of %s:%d",
                            self.settings.device, exc, report.name, report.version)
            self._report_failures = 0
            self.reports.pending.pop(0)
            write_json(self.root / REPORTS_FILE, self.reports.to_wire())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
