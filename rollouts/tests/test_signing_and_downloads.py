"""The keyring (sign, verify, rotate, revoke, encryption at rest) and execution-bound download URLs."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from agent_stub import protocol as p
from rollouts import selectors, services, signing
from rollouts.models import Execution, SigningKey
from rollouts.tests.helpers import make_artifact, make_campaign, make_fleet, offered, report, succeed, tick

pytestmark = pytest.mark.django_db


def test_the_first_artifact_creates_a_key_and_its_manifest_verifies_with_the_keyring():
    artifact = make_artifact(content=b"x" * 100_000)
    variant = artifact.variants.get()
    manifest = json.loads(bytes(variant.manifest))
    assert manifest | {"created": 0} == {"name": "anomaly", "kind": "model", "version": "1.1.0", "size": 100_000,
                                         "sha256": __import__("hashlib").sha256(b"x" * 100_000).hexdigest(),
                                         "variant": "default", "created": 0}
    assert bytes(variant.manifest) == p.canonical_json(manifest)
    assert selectors.verify_manifest(manifest=bytes(variant.manifest), signature=bytes(variant.signature),
                                     key_id=variant.key.key_id)
    ((key_id, public),) = selectors.artifact_public_keys()
    assert key_id == variant.key.key_id and len(public) == 32


def test_a_tampered_manifest_fails_verification_with_the_keyring():
    variant = make_artifact().variants.get()
    manifest = json.loads(bytes(variant.manifest))
    manifest["sha256"] = "0" * 64
    tampered = p.canonical_json(manifest)
    assert not selectors.verify_manifest(manifest=tampered, signature=bytes(variant.signature),
                                         key_id=variant.key.key_id)
    assert not selectors.verify_manifest(manifest=bytes(variant.manifest), signature=bytes(variant.signature),
                                         key_id="ed25519-unknown")


def test_rotation_signs_with_the_new_key_while_old_keys_still_verify_until_revoked():
    old = make_artifact(version="1.0.0").variants.get()
    new_key = services.signing_key_create(actor="test")
    new = make_artifact(version="1.1.0").variants.get()
    assert new.key == new_key and old.key != new_key
    assert SigningKey.objects.get(pk=old.key.pk).retired_at is not None
    assert {k for k, _ in selectors.artifact_public_keys()} == {old.key.key_id, new_key.key_id}
    assert selectors.verify_manifest(manifest=bytes(old.manifest), signature=bytes(old.signature),
                                     key_id=old.key.key_id)
    services.signing_key_revoke(actor="test", key=old.key, reason="compromised laptop")
    assert not selectors.verify_manifest(manifest=bytes(old.manifest), signature=bytes(old.signature),
                                         key_id=old.key.key_id)
    assert [k for k, _ in selectors.artifact_public_keys()] == [new_key.key_id]


def test_private_keys_are_encrypted_at_rest_and_bound_to_their_key_id(settings):
    key = services.signing_key_create(actor="test")
    blob = bytes(key.private_key_encrypted)
    raw = signing.decrypt_private_key(blob, key_id=key.key_id)
    assert len(raw) == 32 and raw not in blob
    with pytest.raises(ValueError, match="cannot be decrypted"):
        signing.decrypt_private_key(blob, key_id="another-key")
    old_secret = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-secret-key-" * 4, [old_secret]
    assert signing.decrypt_private_key(blob, key_id=key.key_id) == raw


def _path(url: str) -> str:
    return url.replace("http://testserver", "")


def test_the_download_url_serves_its_execution_file_to_an_anonymous_agent(pushed,
                                                                          django_capture_on_commit_callbacks):
    make_fleet(2)
    campaign = make_campaign(make_artifact(content=b"the model bytes"))
    with django_capture_on_commit_callbacks(execute=True):
        tick()
    (_, frame), _ = pushed
    response = Client().get(_path(frame["artifact"]["url"]))
    assert response.status_code == 200
    assert response.getvalue() == b"the model bytes"
    assert response["X-Content-SHA256"] == frame["artifact"]["sha256"]
    assert response["Content-Disposition"].startswith("attachment; filename=")
    # Bound to its execution: once that execution is past downloading, the link is gone.
    execution = Execution.objects.get(pk=frame["execution_id"])
    succeed(execution)
    gone = Client().get(_path(frame["artifact"]["url"]))
    assert gone.status_code == 410 and gone.json()["code"] == "gone"
    assert campaign.pk


def test_a_small_artifact_is_sent_in_one_body_and_a_large_one_streams_the_same_bytes(
        pushed, django_capture_on_commit_callbacks, monkeypatch):
    from rollouts.api import views

    make_fleet(2)
    make_campaign(make_artifact(content=b"0123456789" * 10))
    with django_capture_on_commit_callbacks(execute=True):
        tick()
    (_, frame), _ = pushed
    url = _path(frame["artifact"]["url"])
    whole = Client().get(url)
    assert not whole.streaming and whole.content == b"0123456789" * 10
    monkeypatch.setattr(views, "WHOLE_BODY_MAX_BYTES", 99)  # one byte under the artifact's size
    streamed = Client().get(url)
    assert streamed.streaming and b"".join(streamed.streaming_content) == b"0123456789" * 10
    assert streamed["Content-Disposition"] == whole["Content-Disposition"]
    assert streamed["X-Content-SHA256"] == whole["X-Content-SHA256"] == frame["artifact"]["sha256"]


def test_a_tampered_or_expired_download_link_is_refused(settings):
    make_fleet(1)
    campaign = make_campaign(make_artifact())
    tick()
    (execution,) = offered(campaign)
    url = _path(services.download_url(execution))
    bad = Client().get(url[:-6] + "AAAAA/")
    assert bad.status_code == 403 and bad.json()["code"] == "bad_token"
    settings.ROLLOUTS_DOWNLOAD_TTL_S = -1
    expired = Client().get(url)
    assert expired.status_code == 410 and expired.json()["code"] == "expired"


def test_a_retried_execution_invalidates_its_old_download_link():
    make_fleet(1)
    campaign = make_campaign(make_artifact())
    tick()
    (execution,) = offered(campaign)
    url = _path(services.download_url(execution))
    report(execution, "acked")
    report(execution, "failed", error=("download_failed", True))
    assert Client().get(url).status_code == 410
