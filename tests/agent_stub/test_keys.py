"""The device key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent_stub import keys


def test_key_file_is_created_with_mode_0600_and_reloads_to_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "state" / keys.KEY_FILE
    key, created = keys.load_or_create(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created = keys.load_or_create(path)
    assert not created
    assert keys.public_bytes(again) == keys.public_bytes(key)
    assert len(keys.public_bytes(key)) == 32
    assert not list(tmp_path.glob("state/*.tmp"))


def test_signatures_verify_with_the_raw_public_key() -> None:
    key = keys.generate()
    sig = keys.sign(key, b"message")
    assert len(sig) == 64
    assert keys.verify(keys.public_bytes(key), sig, b"message")
    assert not keys.verify(keys.public_bytes(key), sig, b"other")
    assert not keys.verify(b"short", sig, b"message")


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / keys.KEY_FILE
    keys.save(keys.generate(), path)
    os.chmod(path, 0o644)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.load(path)


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / keys.KEY_FILE
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(keys.KeyFileError, match="not a readable private key"):
        keys.load(path)
