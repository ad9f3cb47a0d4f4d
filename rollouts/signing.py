"""The artifact keyring: Ed25519 keys that sign manifests, private halves encrypted at rest.

Private keys are encrypted with AES-256-GCM under a key derived (HKDF-SHA256) from
settings.SECRET_KEY; SECRET_KEY_FALLBACKS are tried when decrypting, so rotating
SECRET_KEY the Django way keeps the keyring readable until keys are re-wrapped.
The key id is bound to the ciphertext (associated data), so rows cannot be swapped.

A manifest is canonical JSON (agent_stub.protocol.canonical_json) of
{name, kind, version, sha256, size, variant, created}; agents verify the signature over
those exact bytes with the public key named by `key_id`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from django.conf import settings

from agent_stub.protocol import canonical_json

_INFO = b"rollouts.signing-key.v1"


def _wrapping_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"edge-fleet-console", info=_INFO).derive(secret.encode())


def encrypt_private_key(raw: bytes, *, key_id: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(_wrapping_key(settings.SECRET_KEY)).encrypt(nonce, raw, key_id.encode())


def decrypt_private_key(blob: bytes, *, key_id: str) -> bytes:
    blob = bytes(blob)
    nonce, body = blob[:12], blob[12:]
    for secret in [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]:
        try:
            return AESGCM(_wrapping_key(secret)).decrypt(nonce, body, key_id.encode())
        except InvalidTag:
            continue
    raise ValueError(f"signing key {key_id} cannot be decrypted with SECRET_KEY (or its fallbacks)")


def generate() -> tuple[str, bytes, bytes]:
    """A new key: (key_id, raw public key, encrypted private key). The id names the public key."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = "ed25519-" + base64.b32encode(hashlib.sha256(public).digest()[:10]).decode().lower()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return key_id, public, encrypt_private_key(raw, key_id=key_id)


def sign(data: bytes, *, key_id: str, private_key_encrypted: bytes) -> bytes:
    raw = decrypt_private_key(private_key_encrypted, key_id=key_id)
    return Ed25519PrivateKey.from_private_bytes(raw).sign(data)


def verify(data: bytes, signature: bytes, public_key: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def manifest_bytes(*, name: str, kind: str, version: str, sha256: str, size: int, variant: str,
                   created: int) -> bytes:
    """Canonical JSON of a manifest (`created` in epoch milliseconds)."""
    body: dict[str, Any] = {"name": name, "kind": kind, "version": version, "sha256": sha256, "size": size,
                            "variant": variant, "created": created}
    return canonical_json(body)
