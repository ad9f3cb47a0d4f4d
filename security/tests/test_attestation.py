"""Appraisal consequences: quarantine, automatic release, self-reported devices under policy."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent_stub import protocol as p
from fleet import services as fleet_services
from fleet.models import Device
from security import attestation
from security.models import AttestationResult, DeviceTrust
from security.services import device_preauthorize

pytestmark = pytest.mark.django_db
CLAIMS = {"agent_sha256": "a" * 64, "model_sha256": "b" * 64, "boot_id": "boot"}


def _device(uid: str) -> tuple[Device, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return device_preauthorize(actor="test", uid=uid, public_key=raw, approve=True), key


def _answer_with_claims(device: Device, key: Ed25519PrivateKey) -> AttestationResult:
    challenge = attestation.challenge_issue(device_id=device.id, reason="operator")
    sig = key.sign(p.claims_message(p.b64d(challenge["nonce"]), CLAIMS))
    evidence = p.validate_attest_evidence(p.attest_evidence_software(challenge["challenge_id"], CLAIMS, sig))
    return attestation.evidence_appraise(device_id=device.id, evidence=evidence)


def test_a_policy_that_refuses_self_reported_devices_quarantines_them():
    device, key = _device("soft-q")
    attestation.policy_save(actor="test", name="strict", golden_pcrs={"sha256": {"0": "00" * 32}},
                            allow_self_reported=False)
    result = _answer_with_claims(device, key)
    assert result.status == "contraindicated"
    assert result.failed_checks == ["policy.self_reported_not_allowed"]
    assert Device.objects.get(pk=device.pk).status == "quarantined"


def test_a_forged_claims_signature_is_contraindicated():
    device, _ = _device("soft-f")
    result = _answer_with_claims(device, Ed25519PrivateKey.generate())
    assert (result.status, result.failed_checks) == ("contraindicated", ["claims.signature"])


def test_a_quarantined_device_is_released_after_the_policys_affirming_streak():
    device, _ = _device("streak")
    policy = attestation.policy_save(actor="test", name="p", golden_pcrs={"sha256": {"0": "00" * 32}},
                                     release_after_affirming=2)
    fleet_services.device_quarantine(actor="test", device=device, reason="test")
    trust = DeviceTrust.objects.create(device=device, state="quarantined")
    for expected in ("quarantined", "active"):
        result = AttestationResult.objects.create(device=device, format="tpm2-quote", status="affirming",
                                                  verifier_version="t", evidence_sha256="0" * 64)
        appraisal = attestation.Appraisal("affirming", [], [], {}, {}, False, False)
        attestation._apply_trust(Device.objects.get(pk=device.pk), trust, result, appraisal, policy)
        assert Device.objects.get(pk=device.pk).status == expected
    assert DeviceTrust.objects.get(device=device).state == "trusted"


def test_an_unanswered_challenge_changes_nothing_and_a_late_answer_is_ignored():
    from datetime import timedelta

    from django.utils import timezone

    from security.models import AttestationChallenge

    device, key = _device("late")
    challenge = attestation.challenge_issue(device_id=device.id, reason="schedule")
    AttestationChallenge.objects.filter(id=challenge["challenge_id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1))
    sig = key.sign(p.claims_message(p.b64d(challenge["nonce"]), CLAIMS))
    evidence = p.validate_attest_evidence(p.attest_evidence_software(challenge["challenge_id"], CLAIMS, sig))
    assert attestation.evidence_appraise(device_id=device.id, evidence=evidence) is None
    assert not AttestationResult.objects.filter(device=device).exists()
    assert Device.objects.get(pk=device.pk).status == "active"
