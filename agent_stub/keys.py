"""The device identity key: Ed25519, generated once, kept in the state directory.

Owns the key file format (PKCS#8 PEM, unencrypted: the device has nobody to type a
passphrase; the file is protected by mode 0600 and, where there is one, by the TPM
attestation of the software that reads it), creation without a window where the file is
world-readable, and the two operations the protocol needs: raw public key bytes and
signing.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "device_key.pem"


class KeyFileError(Exception):
    """The key file exists but cannot be used (unreadable, wrong type, too open)."""


def generate() -> Ed25519PrivateKey:
    """A new random Ed25519 key."""
    return Ed25519PrivateKey.generate()


def save(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write ``key`` as PKCS#8 PEM with mode 0600, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(path.name + ".tmp")
    # O_EXCL|0600 at creation: the secret is never readable by others, not even briefly
    # (a chmod after writing would leave that window open).
    tmp.unlink(missing_ok=True)  # a leftover of a crash mid-save
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a key written by ``save``; refuses files readable by group or others."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{path} is accessible by other users (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """The key at ``path``, creating it on first use; returns ``(key, created)``."""
    path = Path(path)
    if path.exists():
        return load(path), False
    key = generate()
    save(key, path)
    return key, True


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (the protocol's ``public_key``)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """A 64-byte Ed25519 signature over ``message``."""
    return key.sign(message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` over ``message`` verifies with the raw ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
