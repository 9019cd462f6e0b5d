"""The cloud's bundle store: content-addressed, verified archives on disk.  (Their retained
copies on the broker are ``cloud.mqtt_publisher``'s job.)

Layout under the store folder::

    archives/<digest>.tar.gz     verified archives, named by their SHA-256
    manifests/<digest>.json      their manifests (as uploaded: signature included)
    uploads/<digest>/<index>     chunks of uploads in progress (resumable)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import threading
import tomllib
from pathlib import Path

from fedmq.broker.topics import TopicError, check_digest
from fedmq.ftdl.bundle import BundleError, BundleManifest, Limits, file_digest, inspect_archive
from fedmq.ftdl.manifest import MANIFEST_NAME, TaskManifest, parse_manifest
from fedmq.ftdl.signing import TrustStore


def bundle_digest(value: str) -> str:
    """A bundle digest from a caller: 64 lowercase hex digits (a ``bad_manifest`` refusal if not)."""
    try:
        return check_digest(value)
    except TopicError as exc:
        raise BundleError("bad_manifest", str(exc)) from None


class BundleStore:
    def __init__(self, root: Path | str, *, trust: TrustStore | None = None,
                 require_signed: bool = False, limits: Limits = Limits()) -> None:
        self.root = Path(root)
        self.trust = trust
        self.require_signed = require_signed
        self.limits = limits
        for sub in ("archives", "manifests", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    # --- lookups ---------------------------------------------------------------------------
    def archive_path(self, digest: str) -> Path:
        return self.root / "archives" / f"{digest}.tar.gz"

    def _manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / f"{digest}.json"

    def has(self, digest: str) -> bool:
        return self.archive_path(digest).is_file() and self._manifest_path(digest).is_file()

    def manifest(self, digest: str) -> BundleManifest:
        path = self._manifest_path(digest)
        try:
            return BundleManifest.from_wire(json.loads(path.read_text()), self.limits)
        except FileNotFoundError:
            raise BundleError("not_found", f"no bundle {digest} in the store") from None

    def manifests(self) -> list[BundleManifest]:
        return [self.manifest(p.stem) for p in sorted((self.root / "manifests").glob("*.json"))]

    # --- upload ----------------------------------------------------------------------------
    def begin(self, manifest: BundleManifest) -> list[int]:
        """Start or resume an upload; returns the chunk indices still missing."""
        if self.trust is not None or self.require_signed:
            manifest.verify(self.trust, allow_unsigned=not self.require_signed)
        if self.has(manifest.digest):
            self._keep_manifest(manifest)  # a signature for a stored unsigned bundle is kept
            return []
        folder = self.root / "uploads" / manifest.digest
        folder.mkdir(exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps(manifest.to_wire()))
        return [i for i, want in enumerate(manifest.chunks) if not self._chunk_ok(folder / str(i), want)]

    @staticmethod
    def _chunk_ok(path: Path, want: str) -> bool:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() == want
        except FileNotFoundError:
            return False

    def _upload_manifest(self, digest: str) -> BundleManifest:
        path = self.root / "uploads" / digest / "manifest.json"
        try:
            return BundleManifest.from_wire(json.loads(path.read_text()), self.limits)
        except FileNotFoundError:
            raise BundleError("not_found", f"no upload in progress for {digest}; call upload_begin") from None

    def put_chunk(self, digest: str, index: int, data: bytes) -> None:
        manifest = self._upload_manifest(digest)
        if not 0 <= index < manifest.chunk_count:
            raise BundleError("bad_chunk", f"chunk index {index} outside 0..{manifest.chunk_count - 1}")
        if hashlib.sha256(data).hexdigest() != manifest.chunks[index]:
            raise BundleError("tampered_chunk", f"chunk {index} does not match its digest")
        target = self.root / "uploads" / digest / str(index)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def commit(self, digest: str) -> BundleManifest:
        """Assemble, verify the whole digest and the archive's contents, then store."""
        manifest = self._upload_manifest(digest)
        folder = self.root / "uploads" / digest
        missing = [i for i in range(manifest.chunk_count) if not (folder / str(i)).is_file()]
        if missing:
            raise BundleError("incomplete", f"{len(missing)} chunk(s) still missing, first {missing[0]}")
        assembled = folder / "archive.part"
        with assembled.open("wb") as out:
            for i in range(manifest.chunk_count):
                out.write((folder / str(i)).read_bytes())
        if file_digest(assembled) != digest or assembled.stat().st_size != manifest.size:
            shutil.rmtree(folder, ignore_errors=True)
            raise BundleError("digest_mismatch", "the assembled archive does not match its digest")
        inspect_archive(assembled, self.limits)
        self._check_task_manifest(assembled, manifest)
        kept = self._keep(manifest, assembled, move=True)
        shutil.rmtree(folder, ignore_errors=True)
        return kept

    def _keep(self, manifest: BundleManifest, archive: Path, *, move: bool) -> BundleManifest:
        """Put a verified archive and its manifest in the store (manifest last: ``has`` needs both)."""
        with self._lock:
            if not self.archive_path(manifest.digest).is_file():
                if move:
                    os.replace(archive, self.archive_path(manifest.digest))
                else:
                    shutil.copyfile(archive, self.archive_path(manifest.digest))
            return self._keep_manifest(manifest)

    def _keep_manifest(self, manifest: BundleManifest) -> BundleManifest:
        """Signed stays signed: once a stored bundle's manifest is signed it is never replaced --
        an unsigned manifest of the same content (a folder on the cloud host) reuses it, another
        signature is refused.  An unsigned one may be replaced by a signed one.  Returns the
        manifest the store holds."""
        with self._lock:
            path = self._manifest_path(manifest.digest)
            current = BundleManifest.from_wire(json.loads(path.read_text()), self.limits) if path.is_file() else None
            if current is not None and current.signature is not None:
                if manifest.signature is None or (manifest.signer, manifest.signature) == (current.signer,
                                                                                            current.signature):
                    return current
                raise BundleError("signed", f"bundle {manifest.digest[:12]} is stored signed by {current.signer}; "
                                            "a signed manifest is never replaced")
            if current is not None and manifest.signature is None:
                return current
            path.write_text(json.dumps(manifest.to_wire()))
            return manifest

    @staticmethod
    def _check_task_manifest(archive: Path, manifest: BundleManifest) -> None:
        with tarfile.open(archive, "r:gz") as tar:
            try:
                member = tar.getmember(MANIFEST_NAME)
            except KeyError:
                raise BundleError("bad_manifest", f"the archive has no {MANIFEST_NAME}") from None
            handle = tar.extractfile(member)
            inner = parse_manifest(tomllib.loads(handle.read().decode()))  # type: ignore[union-attr]
        if inner != TaskManifest.from_dict(manifest.task):
            raise BundleError("bad_manifest", f"the archive's {MANIFEST_NAME} differs from the bundle manifest")

    def adopt(self, manifest: BundleManifest, archive: Path) -> BundleManifest:
        """Keep a bundle built on the cloud host itself (``tasks.create`` with a folder): unsigned,
        so refused by a cloud that requires signatures -- unless the same content is already
        stored signed, whose manifest is then reused."""
        inspect_archive(archive, self.limits)
        if self.require_signed and manifest.signature is None:
            stored = self.manifest(manifest.digest) if self.has(manifest.digest) else None
            if stored is None or stored.signature is None:
                raise BundleError("unsigned", "this cloud requires signed bundles and a folder on the cloud host is "
                                              "not signed: push it with fedmq bundle push --key instead")
        return self._keep(manifest, archive, move=False)

    def remove(self, digest: str) -> bool:
        with self._lock:
            found = self.has(digest)
            self.archive_path(digest).unlink(missing_ok=True)
            self._manifest_path(digest).unlink(missing_ok=True)
        return found
