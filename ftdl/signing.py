"""Ed25519 signatures for task bundles (``cryptography``).

Operators sign bundles with a private key (``fedmq keys new``); devices are configured with the
public keys they trust and refuse anything else.  A key id is the first 16 hex digits of the
SHA-256 of the raw public key, so a manifest names its signer without carrying the key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningError(ValueError):
    pass


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.private.sign(message)).decode("ascii")

    @classmethod
    def load(cls, path: Path | str) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise SigningError(f"cannot read signing key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"{path} is not an Ed25519 private key")
        return cls(key)


def generate_keypair(directory: Path | str, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, mode 600) and ``NAME.pub`` into ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} exists; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


class TrustStore:
    """The public keys a device (or the cloud) accepts bundles from."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {key_id(k): k for k in keys or []}

    @classmethod
    def from_paths(cls, paths: Sequence[Path | str]) -> TrustStore:
        """Each path is a ``.pub`` file or a folder of them."""
        keys: list[Ed25519PublicKey] = []
        for entry in map(Path, paths):
            files = sorted(entry.glob("*.pub")) if entry.is_dir() else [entry]
            for file in files:
                try:
                    key = serialization.load_pem_public_key(file.read_bytes())
                except (OSError, ValueError) as exc:
                    raise SigningError(f"cannot read trusted key {file}: {exc}") from None
                if not isinstance(key, Ed25519PublicKey):
                    raise SigningError(f"{file} is not an Ed25519 public key")
                keys.append(key)
        return cls(keys)

    def verify(self, signer: str | None, signature: str | None, message: bytes, what: str = "the bundle") -> None:
        if not signer or not signature:
            raise SigningError(f"{what} is not signed")
        key = self.keys.get(signer)
        if key is None:
            raise SigningError(f"{what} is signed by unknown key {signer}")
        try:
            key.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError):
            raise SigningError(f"the signature by key {signer} does not match {what}") from None

    def verify_model(self, name: str, version: int, sha256: str, signer: str | None, signature: str | None) -> None:
        """Raise ``SigningError`` unless a trusted key signed NAME:VERSION with this file digest."""
        self.verify(signer, signature, model_signing_message(name, version, sha256), f"model {name}:{version}")


def model_signing_message(name: str, version: int, sha256: str) -> bytes:
    """What an operator signs to deploy a registered model: its name, version and file digest,
    so a signature for one version (or one file) cannot be replayed for another."""
    return f"fedmq-model\n{name}\n{int(version)}\n{sha256}".encode()
