import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fleet.models import Device
from security.models import AuditEntry, EnrollmentToken
from security.services import token_digest
from tests.factories import make_device

pytestmark = pytest.mark.django_db


def _public_key_b64() -> str:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def test_operator_creates_a_token_and_sees_the_secret_once(operator_api):
    response = operator_api.post("/api/v1/security/enrollment-tokens/", {
        "name": "line 3", "max_uses": 5, "expires_in_hours": 2, "labels": {"line": "l3"}, "auto_approve": True,
    }, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["secret"].startswith("fet_") and body["state"] == "valid"
    token = EnrollmentToken.objects.get(pk=body["id"])
    assert token.secret_hash == token_digest(body["secret"])  # only the hash is stored
    listed = operator_api.get(f"/api/v1/security/enrollment-tokens/{token.pk}/").json()
    assert "secret" not in listed


def test_a_revoked_token_reports_its_state(operator_api):
    created = operator_api.post("/api/v1/security/enrollment-tokens/", {}, format="json").json()
    response = operator_api.post(f"/api/v1/security/enrollment-tokens/{created['id']}/revoke/")
    assert response.json()["state"] == "revoked"
    again = operator_api.post(f"/api/v1/security/enrollment-tokens/{created['id']}/revoke/")
    assert again.status_code == 409


def test_viewers_cannot_create_tokens_or_preauthorize(viewer_api):
    assert viewer_api.post("/api/v1/security/enrollment-tokens/", {}, format="json").status_code == 403
    response = viewer_api.post("/api/v1/security/device-keys/preauthorize/",
                               {"uid": "x", "public_key": _public_key_b64()}, format="json")
    assert response.status_code == 403


def test_operator_preauthorizes_a_device_with_its_key(operator_api):
    response = operator_api.post("/api/v1/security/device-keys/preauthorize/",
                                 {"uid": "pre-9", "public_key": _public_key_b64(), "approve": True}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "active"
    assert Device.objects.get(uid="pre-9").keys.filter(state="active", source="preauthorized").exists()


def test_a_malformed_public_key_is_a_400_that_says_why(operator_api):
    response = operator_api.post("/api/v1/security/device-keys/preauthorize/",
                                 {"uid": "pre-10", "public_key": "AAAA"}, format="json")
    assert response.status_code == 400
    assert "32 bytes" in response.json()["detail"]


def test_only_admins_rotate_keys_and_revoke_devices(operator_api, admin_api):
    operator_api.post("/api/v1/security/device-keys/preauthorize/",
                      {"uid": "pre-11", "public_key": _public_key_b64()}, format="json")
    url = "/api/v1/security/device-keys/devices/pre-11/"
    assert operator_api.post(url + "revoke/", {"reason": "lost"}, format="json").status_code == 403
    assert admin_api.post(url + "rotate/", {"public_key": _public_key_b64()}, format="json").status_code == 200
    response = admin_api.post(url + "revoke/", {"reason": "lost"}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "decommissioned"
    assert not Device.objects.get(uid="pre-11").keys.filter(state="active").exists()


def test_audit_log_is_filterable_and_exports_csv(viewer_api):
    device = make_device(status="pending")
    from fleet import services

    services.device_approve(actor="test", device=device, reason="ok")
    entries = viewer_api.get("/api/v1/security/audit/?action=device.").json()["results"]
    assert {e["action"] for e in entries} == {"device.register", "device.approve"}
    response = viewer_api.get("/api/v1/security/audit/export/?action=device.approve")
    assert response.status_code == 200
    lines = b"".join(response.streaming_content).decode().strip().splitlines()
    assert lines[0].startswith("id,at,actor_type") and len(lines) == 2
    assert AuditEntry.objects.count() >= 2


def test_operator_sends_a_command_and_viewer_cannot(operator_api, viewer_api):
    device = make_device()
    url = f"/api/v1/devices/{device.uid}/commands/"
    assert viewer_api.post(url, {"name": "reboot"}, format="json").status_code == 403
    response = operator_api.post(url, {"name": "reboot"}, format="json")
    assert response.status_code == 201 and response.json()["state"] == "queued"
    assert [c["name"] for c in viewer_api.get(url).json()] == ["reboot"]


def test_attestation_api_enforces_roles(viewer_api, operator_api, admin_api):
    make_device(uid="att-1")
    golden = {"sha256": {"7": "ab" * 32}}
    assert viewer_api.get("/api/v1/security/attestation/results/").status_code == 200
    assert viewer_api.post("/api/v1/security/attestation/trust/att-1/attest/").status_code == 403
    assert operator_api.post("/api/v1/security/attestation/trust/att-1/attest/").status_code == 202
    policy = {"name": "gw", "golden_pcrs": golden}
    assert operator_api.post("/api/v1/security/attestation/policies/", policy, format="json").status_code == 403
    created = admin_api.post("/api/v1/security/attestation/policies/", policy, format="json")
    assert created.status_code == 201 and created.json()["state"] == "active" and created.json()["version"] == 1
    again = admin_api.post("/api/v1/security/attestation/policies/", policy, format="json").json()
    assert again["version"] == 2
    bad = admin_api.post("/api/v1/security/attestation/policies/", {"name": "x", "golden_pcrs": {"sha256": {"7": "zz"}}},
                         format="json")
    assert bad.status_code == 400 and "64 hex characters" in bad.json()["detail"]
    anchor = {"name": "vendor", "tier": "manufacturer", "certificate_pem": "not a cert"}
    assert operator_api.post("/api/v1/security/attestation/trust-anchors/", anchor, format="json").status_code == 403
    response = admin_api.post("/api/v1/security/attestation/trust-anchors/", anchor, format="json")
    assert response.status_code == 400 and "PEM" in response.json()["detail"]


def test_a_learned_baseline_is_enforced_only_after_approval(admin_api):
    from security import attestation
    from security.models import AttestationPolicy

    device = make_device(uid="golden-box")
    policy = attestation.policy_save(actor="test", name="learned", learn_from=device)
    assert policy.state == "learning"
    attestation._learn_baseline(device, attestation.Appraisal("affirming", [], [], {"sha256": {"0": "00" * 32}}, {},
                                                               False, False))
    policy.refresh_from_db()
    assert policy.state == "pending_approval" and policy.golden_pcrs == {"sha256": {"0": "00" * 32}}
    response = admin_api.post(f"/api/v1/security/attestation/policies/{policy.pk}/approve/")
    assert response.status_code == 200 and response.json()["state"] == "active"
    assert AttestationPolicy.objects.get(pk=policy.pk).approved_by == "alice-admin"


def test_attestation_fresh_keeps_only_recent_affirming_devices():
    from datetime import timedelta

    from django.utils import timezone

    from security.models import AttestationResult, DeviceTrust
    from security.selectors import attestation_fresh

    fresh, stale, warned = make_device(), make_device(), make_device()
    for device, status, age in ((fresh, "affirming", 10), (stale, "affirming", 7200), (warned, "warning", 10)):
        result = AttestationResult.objects.create(device=device, format="tpm2-quote", status=status,
                                                  verifier_version="t", evidence_sha256="0" * 64)
        DeviceTrust.objects.create(device=device, state="trusted", last_result=result,
                                   last_attested_at=timezone.now() - timedelta(seconds=age))
    assert attestation_fresh(device_ids=[fresh.id, stale.id, warned.id], max_age_s=3600) == {fresh.id}


def test_trusted_devices_become_suspect_when_attestation_is_overdue_and_due_ones_are_challenged(settings):
    from datetime import timedelta

    from django.utils import timezone

    from security import attestation
    from security.models import AttestationChallenge, DeviceTrust

    late, recent = make_device(), make_device()
    DeviceTrust.objects.create(device=late, state="trusted", last_attested_at=timezone.now() - timedelta(hours=3))
    DeviceTrust.objects.create(device=recent, state="trusted", last_attested_at=timezone.now(),
                               last_challenge_at=timezone.now())
    assert attestation.mark_overdue(grace_s=7200) == 1
    assert DeviceTrust.objects.get(device=late).state == "suspect"
    assert DeviceTrust.objects.get(device=recent).state == "trusted"
    from fleet.models import Device

    Device.objects.filter(pk__in=[late.pk, recent.pk]).update(online=True)
    assert attestation.challenges_due(interval_s=3600) == 1  # only the one not challenged lately
    assert AttestationChallenge.objects.filter(device=late, reason="schedule").count() == 1


def test_create_enrollment_token_prints_a_usable_secret_on_its_last_line(capsys):
    from django.core.management import call_command

    from security.models import EnrollmentToken
    from security.services import token_digest
    from tests.factories import make_site

    make_site(slug="plant-7")
    call_command("create_enrollment_token", "--auto-approve", "--site", "plant-7", "--uses", "3",
                 "--expires-in", "2h", "--label", "line=l2")
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    token = EnrollmentToken.objects.get(secret_hash=token_digest(secret))
    assert (token.auto_approve, token.max_uses, token.site.slug, token.labels) == (True, 3, "plant-7", {"line": "l2"})
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="bad duration"):
        call_command("create_enrollment_token", "--expires-in", "soon")
