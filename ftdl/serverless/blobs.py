"""Model weights as content-addressed blobs on the broker, under their publisher's own level.

A blob is a list of numpy arrays encoded with fedmq's codec (msgpack: dtype, shape and raw bytes
per array), named by the SHA-256 of those bytes and published as retained chunks
``tasks/<task>/fl/<device>/blobs/<sha256>/<index>`` followed by a retained manifest
``…/blobs/<sha256>/manifest`` (size, chunk size, per-chunk digests, and each array's dtype and
shape).  A receiver checks the manifest's shapes against what it expects before downloading a
byte, every chunk against its digest as it arrives, the whole against the blob's name, and the
decoded arrays against the manifest.  Only plain numeric dtypes travel: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from msgspec import Meta

from fedmq.broker import codec
from fedmq.broker.topics import Topics
from fedmq.broker.wire import FrozenWire
from fedmq.ftdl.chunks import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_WINDOW,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    ChunkError,
    ChunkFetch,
    clear_chunks,
    publish_chunks,
    split,
    wait_retained,
)
from fedmq.ftdl.serverless.records import Hex64, Record, RecordError

MAX_BLOB_BYTES = 1024 * 1024 * 1024
MAX_ARRAYS = 10_000
MAX_DIMS = 32
_KINDS = "fiub"  # float, signed and unsigned integers, bool: nothing that needs pickle


class ArraySpec(FrozenWire, forbid_unknown_fields=True, frozen=True, kw_only=True):
    dtype: Annotated[str, Meta(min_length=2, max_length=8)]   # numpy's dtype.str, e.g. "<f4"
    shape: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=MAX_DIMS)]

    @classmethod
    def of(cls, array: np.ndarray) -> ArraySpec:
        return cls(dtype=array.dtype.str, shape=list(array.shape))

    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _check_dtype(dtype: str) -> np.dtype[Any]:
    try:
        parsed = np.dtype(dtype)
    except TypeError:
        raise ChunkError("bad_shape", f"unknown dtype {dtype!r}") from None
    if parsed.kind not in _KINDS or parsed.str != dtype:
        raise ChunkError("bad_shape", f"dtype {dtype!r} is not a plain numeric type")
    return parsed


def specs(arrays: Sequence[np.ndarray]) -> list[ArraySpec]:
    return [ArraySpec.of(np.asarray(a)) for a in arrays]


def encode_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    body = []
    for array in arrays:
        value = np.asarray(array)  # tobytes() is C order whatever the layout (ascontiguousarray would make 0-d 1-d)
        _check_dtype(value.dtype.str)
        body.append({"dtype": value.dtype.str, "shape": list(value.shape), "data": value.tobytes()})
    return codec.encode({"format": 1, "arrays": body})


def decode_arrays(data: bytes, expect: Sequence[ArraySpec] | None = None) -> list[np.ndarray]:
    """Arrays from ``encode_arrays`` bytes, each checked against ``expect`` when given."""
    try:
        body, _ = codec.decode(data, codec.Codec.MSGPACK)
    except codec.CodecError as exc:
        raise ChunkError("bad_shape", f"weights are not decodable: {exc}") from None
    items = body.get("arrays") if isinstance(body, dict) and body.get("format") == 1 else None
    if not isinstance(items, list) or len(items) > MAX_ARRAYS:
        raise ChunkError("bad_shape", "weights must be {format: 1, arrays: [...]}")
    arrays = []
    for index, item in enumerate(items):
        try:
            spec = msgspec.convert({"dtype": item.get("dtype"), "shape": item.get("shape")}, ArraySpec)
        except (AttributeError, msgspec.ValidationError):
            raise ChunkError("bad_shape", f"array {index} has no valid dtype and shape") from None
        raw = item.get("data")
        if not isinstance(raw, bytes) or len(raw) != spec.nbytes():
            raise ChunkError("bad_shape", f"array {index} holds the wrong number of bytes for {spec.shape}")
        arrays.append(np.frombuffer(raw, dtype=_check_dtype(spec.dtype)).reshape(spec.shape).copy())
    if expect is not None:
        check_specs(specs(arrays), expect)
    return arrays


def check_specs(got: Sequence[ArraySpec], expect: Sequence[ArraySpec]) -> None:
    if len(got) != len(expect):
        raise ChunkError("bad_shape", f"{len(got)} arrays where {len(expect)} were expected")
    for index, (a, b) in enumerate(zip(got, expect, strict=True)):
        if a != b:
            raise ChunkError("bad_shape", f"array {index} is {a.dtype}{a.shape}, expected {b.dtype}{b.shape}")


class BlobManifest(Record, frozen=True, kw_only=True):
    """Published retained on ``…/blobs/<digest>/manifest``."""

    format: Literal[1] = 1
    digest: Hex64
    size: int
    chunk_size: int
    chunks: list[Hex64]
    arrays: Annotated[list[ArraySpec], Meta(max_length=MAX_ARRAYS)]

    def __post_init__(self) -> None:
        if not 0 < self.size <= MAX_BLOB_BYTES:
            raise ValueError(f"size must be 1..{MAX_BLOB_BYTES} bytes")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if len(self.chunks) != math.ceil(self.size / self.chunk_size):
            raise ValueError("chunks must list one SHA-256 per chunk")
        if sum(spec.nbytes() for spec in self.arrays) > self.size:
            raise ValueError("the arrays need more bytes than the blob has")

    @classmethod
    def from_wire(cls, payload: bytes) -> BlobManifest:
        try:
            return cls.decode(payload)
        except RecordError as exc:
            raise ChunkError("bad_manifest", str(exc)) from None


class Blobs:
    """Publish and fetch weight blobs of one task over one connection."""

    def __init__(self, connection: Any, topics: Topics, task: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 window: int = DEFAULT_WINDOW) -> None:
        self.connection, self.topics, self.task = connection, topics, task
        self.chunk_size, self.window = chunk_size, window

    def publish(self, device: str, arrays: Sequence[np.ndarray], *, timeout: float = 120.0) -> BlobManifest:
        """Chunks first (acknowledged), then the manifest: whoever sees a manifest finds every chunk."""
        data = encode_arrays(arrays)
        digest = hashlib.sha256(data).hexdigest()
        chunks = split(data, self.chunk_size)
        manifest = BlobManifest(digest=digest, size=len(data), chunk_size=self.chunk_size,
                                chunks=[hashlib.sha256(c).hexdigest() for c in chunks], arrays=specs(arrays))
        publish_chunks(self.connection, lambda i: self.topics.fl_blob(self.task, device, digest, i), chunks,
                       timeout=timeout)
        info = self.connection.publish(self.topics.fl_blob(self.task, device, digest), manifest.encode(),
                                       qos=1, retain=True)
        info.wait_for_publish(timeout)
        return manifest

    def manifest(self, owner: str, digest: str, timeout: float = 30.0) -> BlobManifest:
        payload = wait_retained(self.connection, self.topics.fl_blob(self.task, owner, digest), timeout)
        if payload is None:
            raise ChunkError("not_found", f"no blob {digest[:12]} of {owner} on the broker within {timeout:g} s")
        manifest = BlobManifest.from_wire(payload)
        if manifest.digest != digest:
            raise ChunkError("bad_manifest", f"the manifest of blob {digest[:12]} describes another blob")
        return manifest

    def fetch(self, owner: str, digest: str, *, expect: Sequence[ArraySpec] | None = None,
              manifest_timeout: float = 30.0, stall_timeout: float = 30.0) -> list[np.ndarray]:
        """The arrays of blob ``digest`` published by ``owner``, verified; shapes are checked
        against ``expect`` from the manifest before any chunk is downloaded."""
        manifest = self.manifest(owner, digest, manifest_timeout)
        if expect is not None:
            check_specs(manifest.arrays, expect)
        download = ChunkFetch(self.connection, lambda i: self.topics.fl_blob(self.task, owner, digest, i),
                              manifest.chunks, window=self.window)
        data = download.wait(stall_timeout)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ChunkError("digest_mismatch", f"blob {digest[:12]} does not match its digest")
        return decode_arrays(data, manifest.arrays)

    def clear(self, device: str, manifest: BlobManifest) -> None:
        """Remove one's own blob: the manifest first, then the chunks."""
        gone = self.connection.publish(self.topics.fl_blob(self.task, device, manifest.digest), b"", qos=1,
                                       retain=True)
        clear_chunks(self.connection, lambda i: self.topics.fl_blob(self.task, device, manifest.digest, i),
                     len(manifest.chunks))
        gone.wait_for_publish(10)
