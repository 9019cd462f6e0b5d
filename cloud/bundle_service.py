"""The ``bundles`` RPC service: operators upload bundles in acknowledged chunks; the cloud
verifies, stores and publishes them.  Operators never need write access to device-facing topics.
"""

from __future__ import annotations

from typing import Any

from broker.envelope import ErrorCode, RpcError
from broker.rpc_server import Service
from broker.topics import TopicError, check_digest
from cloud.bundle_store import BundlePublisher, BundleStore
from ftdl.bundle import BundleError, BundleManifest

# BundleError codes that mean "you sent something wrong" rather than "not here".
_NOT_FOUND = {"not_found"}
_FORBIDDEN = {"unsigned", "unknown_signer", "bad_signature"}


def _rpc_error(exc: BundleError) -> RpcError:
    code = ErrorCode.NOT_FOUND if exc.code in _NOT_FOUND else \
        ErrorCode.FORBIDDEN if exc.code in _FORBIDDEN else ErrorCode.INVALID_ARGS
    return RpcError(code, exc.message, {"reason": exc.code})


def digest_arg(value: str) -> str:
    """A bundle digest from a caller: 64 hex digits, or ``invalid_args``."""
    try:
        return check_digest(value)
    except TopicError as exc:
        raise RpcError(ErrorCode.INVALID_ARGS, str(exc)) from None


def summary(manifest: BundleManifest) -> dict[str, Any]:
    return {"digest": manifest.digest, "name": manifest.task.get("name"), "size": manifest.size,
            "files": len(manifest.files), "signer": manifest.signer}


def make_bundle_service(store: BundleStore, publisher: BundlePublisher) -> Service:
    service = Service("bundles")

    @service.method
    def upload_begin(manifest: dict[str, Any]) -> dict[str, Any]:
        """Start (or resume) an upload; answers the chunk indices still missing."""
        try:
            parsed = BundleManifest.from_wire(manifest, store.limits)
            missing = store.begin(parsed)
        except BundleError as exc:
            raise _rpc_error(exc) from None
        return {"digest": parsed.digest, "missing": missing, "stored": not missing and store.has(parsed.digest)}

    @service.method
    def upload_chunk(digest: str, index: int, data: bytes) -> dict[str, Any]:
        """Store one chunk after checking it against the manifest's digest for it."""
        try:
            store.put_chunk(digest_arg(digest), index, data)
        except BundleError as exc:
            raise _rpc_error(exc) from None
        return {"index": index}

    @service.method
    def upload_commit(digest: str, publish: bool = True) -> dict[str, Any]:
        """Verify the whole archive, keep it, and publish it as retained chunks."""
        digest = digest_arg(digest)
        try:
            manifest = store.manifest(digest) if store.has(digest) else store.commit(digest)
        except BundleError as exc:
            raise _rpc_error(exc) from None
        if publish:
            publisher.publish(digest)
        return {**summary(manifest), "published": publish}

    @service.method
    def publish(digest: str) -> dict[str, Any]:
        """(Re)publish a stored bundle, e.g. after a broker lost its retained messages."""
        digest = digest_arg(digest)
        try:
            manifest = publisher.publish(digest)
        except BundleError as exc:
            raise _rpc_error(exc) from None
        return {**summary(manifest), "chunks": manifest.chunk_count, "chunk_size": manifest.chunk_size}

    @service.method(name="list")
    def list_() -> list[dict[str, Any]]:
        """Every stored bundle."""
        return [summary(m) for m in store.list()]

    @service.method
    def get(digest: str) -> dict[str, Any]:
        """A stored bundle's full manifest."""
        try:
            return store.manifest(digest_arg(digest)).to_wire()
        except BundleError as exc:
            raise _rpc_error(exc) from None

    @service.method
    def remove(digest: str) -> dict[str, Any]:
        """Delete a bundle from the store and clear its retained messages from the broker."""
        digest = digest_arg(digest)
        try:
            publisher.clear(digest)
        except BundleError as exc:
            raise _rpc_error(exc) from None
        store.remove(digest)
        return {"digest": digest, "removed": True}

    return service
