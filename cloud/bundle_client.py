"""Operator side of the ``bundles`` service: pack, sign and upload a task folder.

Chunks go up as acknowledged RPC calls, a window at a time; an interrupted push resumes, because
``upload_begin`` answers only the chunks the cloud does not have yet.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.broker.rpc_client import RpcClient
from fedmq.ftdl.bundle import DEFAULT_CHUNK_SIZE, BundleManifest, build_bundle
from fedmq.ftdl.signing import SigningKey


@dataclass
class PushResult:
    manifest: BundleManifest
    uploaded_chunks: int
    reply: dict[str, Any]


def upload(client: RpcClient, manifest: BundleManifest, archive: Path, *, window: int = 8,
           on_progress: Callable[[int, int], None] | None = None, publish: bool = True) -> PushResult:
    """Upload a built bundle; ``on_progress(bytes_done, bytes_total)``."""
    begun = client.call("bundles", "upload_begin", {"manifest": manifest.to_wire()})
    missing: list[int] = begun["missing"]
    size_of = {i: min(manifest.chunk_size, manifest.size - i * manifest.chunk_size) for i in missing}
    done = manifest.size - sum(size_of.values())
    if on_progress:
        on_progress(done, manifest.size)
    in_flight: list[tuple[int, Any]] = []
    with archive.open("rb") as data:
        for position, index in enumerate(missing):
            data.seek(index * manifest.chunk_size)
            in_flight.append((index, client.call_future("bundles", "upload_chunk", {
                "digest": manifest.digest, "index": index, "data": data.read(manifest.chunk_size)},
                timeout=60)))
            last = position == len(missing) - 1
            while in_flight and (len(in_flight) >= window or last):
                finished, pending = in_flight.pop(0)
                pending.result_or_raise()
                done += size_of[finished]
                if on_progress:
                    on_progress(done, manifest.size)
    reply = client.call("bundles", "upload_commit", {"digest": manifest.digest, "publish": publish},
                        timeout=120)
    return PushResult(manifest, len(missing), reply)


def push_folder(client: RpcClient, folder: Path, *, key: SigningKey | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, window: int = 8,
                on_progress: Callable[[int, int], None] | None = None) -> PushResult:
    with tempfile.TemporaryDirectory(prefix="fedmq-push-") as tmp:
        archive = Path(tmp) / "bundle.tar.gz"
        manifest = build_bundle(folder, archive, chunk_size=chunk_size, key=key)
        return upload(client, manifest, archive, window=window, on_progress=on_progress)
