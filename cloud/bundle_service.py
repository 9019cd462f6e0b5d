"""The ``bundles`` RPC service: operators upload bundles in acknowledged chunks; the cloud
verifies, stores and publishes them.  Operators never need write access to device-facing topics.
The store raises ``BundleError`` kinds (not found, refused, invalid) that the RPC server maps.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fedmq.broker.roles import OPERATOR, READERS, Role
from fedmq.broker.rpc_server import rpc
from fedmq.cloud.bundle_store import BundleStore, bundle_digest
from fedmq.cloud.pages import DEFAULT_LIMIT, MAX_LIMIT, Page, page
from fedmq.cloud.ports import Publisher
from fedmq.ftdl.bundle import BundleManifest


def summary(manifest: BundleManifest) -> dict[str, Any]:
    return {"digest": manifest.digest, "name": manifest.task.get("name"), "size": manifest.size,
            "files": len(manifest.files), "signer": manifest.signer}


class BundleService:
    name = "bundles"

    def __init__(self, store: BundleStore, publisher: Publisher) -> None:
        self.store, self.publisher = store, publisher

    @rpc(roles=OPERATOR)
    def upload_begin(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Start (or resume) an upload; answers the chunk indices still missing."""
        parsed = BundleManifest.from_wire(manifest, self.store.limits)
        missing = self.store.begin(parsed)
        return {"digest": parsed.digest, "missing": missing, "stored": not missing and self.store.has(parsed.digest)}

    @rpc(roles=OPERATOR)
    def upload_chunk(self, digest: str, index: int, data: bytes) -> dict[str, Any]:
        """Store one chunk after checking it against the manifest's digest for it."""
        self.store.put_chunk(bundle_digest(digest), index, data)
        return {"index": index}

    @rpc(roles=OPERATOR)
    def upload_commit(self, digest: str, publish: bool = True) -> dict[str, Any]:
        """Verify the whole archive, keep it, and publish it as retained chunks."""
        digest = bundle_digest(digest)
        manifest = self.store.manifest(digest) if self.store.has(digest) else self.store.commit(digest)
        if publish:
            self.publisher.publish_bundle(digest)
        return {**summary(manifest), "published": publish}

    @rpc(roles={Role.OPERATOR, Role.SERVICE})
    def publish(self, digest: str) -> dict[str, Any]:
        """(Re)publish a stored bundle, e.g. after a broker lost its retained messages."""
        manifest = self.publisher.publish_bundle(bundle_digest(digest))
        return {**summary(manifest), "chunks": manifest.chunk_count, "chunk_size": manifest.chunk_size}

    @rpc(name="list", roles=READERS)
    def list_(self, limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
              cursor: str | None = None) -> Page:
        """The stored bundles: a page of them."""
        return page([summary(m) for m in self.store.manifests()], limit, cursor)

    @rpc(roles=READERS)
    def get(self, digest: str) -> dict[str, Any]:
        """A stored bundle's full manifest."""
        return self.store.manifest(bundle_digest(digest)).to_wire()

    @rpc(roles=OPERATOR)
    def remove(self, digest: str) -> dict[str, Any]:
        """Delete a bundle from the store and clear its retained messages from the broker."""
        digest = bundle_digest(digest)
        self.publisher.clear_bundle(digest)
        self.store.remove(digest)
        return {"digest": digest, "removed": True}
