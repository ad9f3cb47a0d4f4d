"""Attestation: TPM enrollment checks, challenges, appraisal of evidence, trust states.

The cryptographic verdicts come from `security.tpm` (pure functions with named checks);
this module decides what they mean for a device and records it:

- results are EAR-shaped (`affirming | warning | contraindicated`, failed checks by
  name, policy id and version, verifier version, PCR values, hash of the raw evidence);
- trust state: trusted (affirming) → suspect (warning, or attestation overdue) →
  quarantined (contraindicated). A device that does not answer is not failed.
- quarantine and release go through fleet.services (audited); a policy may release a
  device after N affirming results in a row.
- `software-claims` evidence (no TPM) is never better than `warning` and is labelled
  self-reported; a policy may refuse it (contraindicated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from agent_stub import protocol as p
from fleet import audit, push
from fleet import services as fleet_services
from fleet.errors import Conflict, InvalidInput
from fleet.models import Device, DeviceStatus
from security.models import (
    AttestationChallenge,
    AttestationPolicy,
    AttestationResult,
    DeviceKey,
    DeviceTrust,
    TpmIdentity,
    TrustAnchor,
)
from security.tpm import credential as tpm_credential
from security.tpm import structures as tpm_structures
from security.tpm import verify as tpm_verify

log = logging.getLogger(__name__)

VERIFIER_VERSION = "console-verifier/1.0"
DEFAULT_PCRS = [0, 1, 2, 3, 4, 5, 6, 7]
AFFIRMING, WARNING, CONTRAINDICATED = "affirming", "warning", "contraindicated"


def _challenge_ttl() -> timedelta:
    return timedelta(seconds=getattr(settings, "SECURITY_CHALLENGE_TTL_S", 60))


# --- trust store and TPM enrollment -----------------------------------------------------

def trust_store() -> tpm_verify.TrustStore:
    """Anchors from the database (admins manage them) plus an optional directory."""
    tiers: dict[str, list[bytes]] = {"manufacturer": [], "test": []}
    intermediates: list[bytes] = []
    for anchor in TrustAnchor.objects.all():
        pem = anchor.certificate_pem.encode()
        (intermediates if anchor.tier == TrustAnchor.Tier.INTERMEDIATE else tiers[anchor.tier]).append(pem)
    store = tpm_verify.TrustStore.from_certs(tiers, intermediates)
    directory = getattr(settings, "SECURITY_TPM_TRUST_DIR", "")
    if directory and os.path.isdir(directory):
        extra = tpm_verify.TrustStore.from_directory(directory)
        merged = {tier: (*store.tiers.get(tier, ()), *certs) for tier, certs in extra.tiers.items()}
        merged = {**store.tiers, **merged}
        store = tpm_verify.TrustStore(merged, (*store.intermediates, *extra.intermediates))
    return store


@dataclasses.dataclass
class TpmEnrollment:
    """The server's half of a TPM enrollment, kept by the connection between frames."""

    ek_public: bytes
    ek_certificate: bytes | None
    ak_public: bytes
    ek_tier: str
    ek_cert_failed: list[str]
    secret: bytes
    credential_blob: bytes
    encrypted_secret: bytes

    @property
    def ek_approved(self) -> bool:
        return bool(self.ek_tier)


def tpm_enrollment_begin(*, ek_public: bytes, ek_certificate: bytes | None, ak_public: bytes) -> TpmEnrollment:
    """Check the EK certificate and the AK, then MakeCredential for the AK's name.

    Raises InvalidInput naming the failed checks when the AK is unusable (the device cannot
    enroll with it). An EK without a valid certificate is allowed, but the device then
    waits for an operator to approve the EK hash.
    """
    try:
        ak = tpm_structures.parse_tpm2b_public(ak_public)
        tpm_structures.parse_tpm2b_public(ek_public)
    except tpm_structures.TpmFormatError as exc:
        raise InvalidInput(f"malformed TPM public area: {exc}") from None
    ak_failed = tpm_verify.check_ak_attributes(ak)
    if ak_failed:
        raise InvalidInput(f"attestation key refused: {', '.join(ak_failed)}")
    tier, failed = "", ["ek_cert.missing"]
    if ek_certificate:
        verdict = tpm_verify.verify_ek_certificate(ek_certificate, ek_public, trust_store())
        tier, failed = (verdict.tier or ""), list(verdict.failed)
    secret = os.urandom(32)
    made = tpm_credential.make_credential(ek_public, tpm_structures.object_name(ak), secret)
    return TpmEnrollment(
        ek_public=ek_public, ek_certificate=ek_certificate, ak_public=ak_public, ek_tier=tier,
        ek_cert_failed=[] if tier else failed, secret=secret, credential_blob=made.credential_blob,
        encrypted_secret=made.encrypted_secret,
    )


def tpm_identity_store(*, device: Device, enrollment: TpmEnrollment) -> TpmIdentity:
    """Record the TPM of a device whose credential activation succeeded (inside enrollment)."""
    ak = tpm_structures.parse_tpm2b_public(enrollment.ak_public)
    return TpmIdentity.objects.create(
        device=device, ek_public=enrollment.ek_public, ek_certificate=enrollment.ek_certificate,
        ek_sha256=hashlib.sha256(enrollment.ek_public).hexdigest(), ek_tier=enrollment.ek_tier,
        ek_cert_failed=enrollment.ek_cert_failed, ek_approved=enrollment.ek_approved,
        ak_public=enrollment.ak_public, ak_name=tpm_structures.object_name(ak).hex(),
    )


@transaction.atomic
def tpm_ek_approve(*, actor: Any, device: Device) -> TpmIdentity:
    identity = TpmIdentity.objects.select_for_update().filter(device=device).first()
    if identity is None:
        raise Conflict(f"{device.uid} has no TPM identity")
    if identity.ek_approved:
        raise Conflict(f"the endorsement key of {device.uid} is already trusted")
    identity.ek_approved = True
    identity.ek_approved_by = str(actor)[:200]
    identity.save(update_fields=["ek_approved", "ek_approved_by"])
    audit.record(actor=actor, action="tpm.ek_approve", target=device, data={"ek_sha256": identity.ek_sha256})
    return identity


# --- challenges -------------------------------------------------------------------------

# The most specific active policy of a device: one of its groups', then one for its hardware
# model, then a default; the highest version within a rank. The one place that ranking lives:
# `policy_for` reads it, and challenges (issued on every connect) embed it.
_POLICY_SQL = """
SELECT p.id, p.pcr_selection FROM security_attestationpolicy p
WHERE p.state = %(active)s AND (
    p.group_id IN (SELECT m.devicegroup_id FROM fleet_devicegroup_devices m WHERE m.device_id = %(device)s)
    OR (p.group_id IS NULL AND (p.hardware_model = ''
        OR p.hardware_model = (SELECT d.hardware_model FROM fleet_device d WHERE d.id = %(device)s))))
ORDER BY CASE WHEN p.group_id IS NOT NULL THEN 0 WHEN p.hardware_model <> '' THEN 1 ELSE 2 END, p.version DESC
LIMIT 1
"""

# A challenge in one statement (raw SQL: every connect issues one): the policy's PCR
# selection (the default when it has none), the challenge row, and the trust row's
# last_challenge_at. A device without a trust row yet gets it from the ORM afterwards.
_CHALLENGE_SQL = """
WITH policy AS (POLICY),
trust AS (UPDATE security_devicetrust SET last_challenge_at = %(now)s WHERE device_id = %(device)s RETURNING 1)
INSERT INTO security_attestationchallenge (id, device_id, nonce, pcrs, reason, created_at, expires_at, answered_at)
SELECT %(id)s, %(device)s, %(nonce)s,
       COALESCE((SELECT NULLIF(pcr_selection, '[]'::jsonb) FROM policy), %(default_pcrs)s::jsonb),
       %(reason)s, %(now)s, %(expires)s, NULL
RETURNING pcrs, EXISTS (SELECT 1 FROM trust)
""".replace("POLICY", _POLICY_SQL)


def policy_for(device: Device) -> AttestationPolicy | None:
    """The most specific active policy: the device's group, then its hardware model, then a default."""
    with connection.cursor() as cursor:
        cursor.execute(_POLICY_SQL, {"active": AttestationPolicy.State.ACTIVE, "device": device.pk})
        row = cursor.fetchone()
    return None if row is None else AttestationPolicy.objects.filter(pk=row[0]).first()


def challenge_issue(*, device_id: int, reason: str) -> dict:
    """Create a single-use challenge and return its `attest.challenge` frame."""
    challenge_id, nonce, now = uuid.uuid4(), os.urandom(32), timezone.now()
    expires = now + _challenge_ttl()
    with connection.cursor() as cursor:
        cursor.execute(_CHALLENGE_SQL, {
            "active": AttestationPolicy.State.ACTIVE, "device": device_id, "now": now, "id": challenge_id,
            "nonce": nonce, "default_pcrs": json.dumps(DEFAULT_PCRS), "reason": reason, "expires": expires})
        pcrs, trust_updated = cursor.fetchone()
    if not trust_updated:
        DeviceTrust.objects.bulk_create([DeviceTrust(device_id=device_id, last_challenge_at=now)], update_conflicts=True,
                                        unique_fields=["device"], update_fields=["last_challenge_at"])
    pcrs = json.loads(pcrs) if isinstance(pcrs, str) else pcrs
    return p.attest_challenge(str(challenge_id), nonce, int(expires.timestamp() * 1000), pcrs=pcrs)


@transaction.atomic
def attestation_request(*, actor: Any, device: Device) -> None:
    """An operator asks for an attestation now; the device gets a challenge if online."""
    if device.status in (DeviceStatus.PENDING, DeviceStatus.DECOMMISSIONED):
        raise Conflict(f"{device.uid} is {device.status}; it cannot be attested")
    audit.record(actor=actor, action="attestation.request", target=device)
    transaction.on_commit(lambda: challenge_push(device_id=device.id, reason="operator"))


def challenge_push(*, device_id: int, reason: str) -> None:
    frame = challenge_issue(device_id=device_id, reason=reason)
    push.send_to_device(device_id, {"type": "device.frame", "frame": frame})


# --- appraisal --------------------------------------------------------------------------

def _evidence_digest(evidence: p.AttestEvidence) -> str:
    raw = {k: (p.b64e(v) if isinstance(v, bytes) else v) for k, v in dataclasses.asdict(evidence).items()}
    return hashlib.sha256(p.canonical_json(raw)).hexdigest()


@dataclasses.dataclass
class Appraisal:
    status: str
    failed: list[str]
    warnings: list[str]
    pcrs: dict
    clock: dict
    reboot: bool
    self_reported: bool


def _appraise_tpm(device: Device, challenge: AttestationChallenge, evidence: p.AttestEvidence,
                  trust: DeviceTrust, policy: AttestationPolicy | None) -> Appraisal:
    identity = TpmIdentity.objects.filter(device=device).first()
    if identity is None:
        return Appraisal(CONTRAINDICATED, ["tpm.not_enrolled"], [], {}, {}, False, False)
    key = DeviceKey.objects.filter(device=device, state=DeviceKey.State.ACTIVE).values_list("public_key", flat=True).first()
    previous = None
    if trust.last_clock:
        previous = tpm_structures.ClockInfo(**trust.last_clock)
    reported = {bank: {str(i): v for i, v in values.items()} for bank, values in (evidence.pcrs or {}).items()}
    result = tpm_verify.verify_quote(
        ak_public=bytes(identity.ak_public), attest=evidence.attest or b"", signature=evidence.signature or b"",
        nonce=bytes(challenge.nonce), device_public_key=bytes(key or b""),
        requested_pcrs={"sha256": list(challenge.pcrs)}, reported_pcrs=reported, previous_clock=previous,
        ek_public=bytes(identity.ek_public),
    )
    failed, warnings = list(result.failed), list(result.warnings)
    if not identity.ek_approved:
        warnings.append("tpm.ek_unapproved")
    elif identity.ek_tier == "test":
        warnings.append("tpm.ek_test_tier")
    if result.ok and policy is not None and policy.golden_pcrs:
        failed += tpm_verify.evaluate_policy(result.pcrs, policy.golden_pcrs)
    elif policy is None:
        warnings.append("policy.none")
    clock = dataclasses.asdict(result.clock_info) if result.clock_info else {}
    status = CONTRAINDICATED if failed else (WARNING if warnings and _warnings_matter(warnings) else AFFIRMING)
    return Appraisal(status, failed, warnings, result.pcrs, clock, result.reboot_detected, False)


def _warnings_matter(warnings: list[str]) -> bool:
    # An unsafe clock after an unorderly shutdown is informational; the rest lower trust.
    return any(w not in ("quote.clock_unsafe", "tpm.ek_test_tier") for w in warnings)


def _appraise_claims(device: Device, challenge: AttestationChallenge, evidence: p.AttestEvidence,
                     policy: AttestationPolicy | None) -> Appraisal:
    from security.services import signature_valid

    key = DeviceKey.objects.filter(device=device, state=DeviceKey.State.ACTIVE).values_list("public_key", flat=True).first()
    failed: list[str] = []
    if not key or not signature_valid(bytes(key), p.claims_message(bytes(challenge.nonce), evidence.claims or {}),
                                      evidence.sig or b""):
        failed.append("claims.signature")
    if policy is not None and not policy.allow_self_reported:
        failed.append("policy.self_reported_not_allowed")
    # Never better than `warning`: nothing but the device vouches for these claims.
    return Appraisal(CONTRAINDICATED if failed else WARNING, failed, ["claims.self_reported"], {},
                     {}, False, True)


def evidence_appraise(*, device_id: int, evidence: p.AttestEvidence) -> AttestationResult | None:
    """Appraise evidence for a challenge; record the result and apply its consequences.

    Returns None (and records nothing) when the challenge is unknown or expired: a late or
    stray answer says nothing about the device, and unreachable is not failed.
    """
    with transaction.atomic():
        challenge = (AttestationChallenge.objects.select_for_update()
                     .filter(id=_uuid(evidence.challenge_id), device_id=device_id).first())
        if challenge is None or (challenge.answered_at is None and challenge.expires_at <= timezone.now()):
            return None
        device = Device.objects.select_for_update(no_key=True).get(pk=device_id)
        trust, _ = DeviceTrust.objects.select_for_update().get_or_create(device=device)
        policy = policy_for(device)
        if challenge.answered_at is not None:
            appraisal = Appraisal(CONTRAINDICATED, ["challenge.reused"], [], {}, {}, False,
                                  evidence.format == "software-claims")
        else:
            challenge.answered_at = timezone.now()
            challenge.save(update_fields=["answered_at"])
            if evidence.format == "tpm2-quote":
                appraisal = _appraise_tpm(device, challenge, evidence, trust, policy)
            else:
                appraisal = _appraise_claims(device, challenge, evidence, policy)
        result = AttestationResult.objects.create(
            device=device, challenge=challenge, format=evidence.format, status=appraisal.status,
            self_reported=appraisal.self_reported, failed_checks=appraisal.failed, warnings=appraisal.warnings,
            policy=policy, policy_version=policy.version if policy else None, verifier_version=VERIFIER_VERSION,
            pcrs=appraisal.pcrs, evidence_sha256=_evidence_digest(evidence), clock=appraisal.clock,
            reboot_detected=appraisal.reboot,
        )
        _learn_baseline(device, appraisal)
        _apply_trust(device, trust, result, appraisal, policy)
    return result


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _apply_trust(device: Device, trust: DeviceTrust, result: AttestationResult, appraisal: Appraisal,
                 policy: AttestationPolicy | None) -> None:
    actor = "attestation"
    trust.last_result = result
    trust.last_status = result.status
    trust.last_attested_at = result.created_at
    if appraisal.clock and not appraisal.failed:
        trust.last_clock = appraisal.clock
    if result.status == AFFIRMING:
        trust.affirming_streak += 1
    else:
        trust.affirming_streak = 0
    if result.status == CONTRAINDICATED:
        trust.state = DeviceTrust.State.QUARANTINED
        if device.status == DeviceStatus.ACTIVE:
            fleet_services.device_quarantine(actor=actor, device=device,
                                             reason=f"attestation contraindicated: {', '.join(appraisal.failed)}")
    elif device.status == DeviceStatus.QUARANTINED:
        trust.state = DeviceTrust.State.QUARANTINED
        if (result.status == AFFIRMING and policy is not None and policy.release_after_affirming
                and trust.affirming_streak >= policy.release_after_affirming):
            fleet_services.device_release(actor=actor, device=device,
                                          reason=f"{trust.affirming_streak} affirming attestations in a row")
            trust.state = DeviceTrust.State.TRUSTED
    else:
        trust.state = DeviceTrust.State.TRUSTED if result.status == AFFIRMING else DeviceTrust.State.SUSPECT
    trust.save()
    audit.record(actor=actor, action="attestation.result", target=device,
                 data={"status": result.status, "failed": appraisal.failed, "warnings": appraisal.warnings,
                       "result_id": result.id, "policy": policy.pk if policy else None})


def _learn_baseline(device: Device, appraisal: Appraisal) -> None:
    if appraisal.failed or not appraisal.pcrs:
        return
    for policy in AttestationPolicy.objects.select_for_update().filter(
        state=AttestationPolicy.State.LEARNING, learn_from=device
    ):
        policy.golden_pcrs = appraisal.pcrs
        policy.state = AttestationPolicy.State.PENDING_APPROVAL
        policy.save(update_fields=["golden_pcrs", "state"])
        audit.record(actor="attestation", action="policy.baseline_learned", target=policy,
                     data={"device": device.uid, "pcrs": sorted(next(iter(appraisal.pcrs.values()), {}))})


@transaction.atomic
def policy_approve(*, actor: Any, policy: AttestationPolicy) -> AttestationPolicy:
    """Enforce a learned baseline: it becomes the active version and older ones retire."""
    policy = AttestationPolicy.objects.select_for_update().get(pk=policy.pk)
    if policy.state != AttestationPolicy.State.PENDING_APPROVAL:
        raise Conflict(f"policy {policy} is {policy.state}; only a learned baseline awaiting approval can be approved")
    AttestationPolicy.objects.filter(name=policy.name, state=AttestationPolicy.State.ACTIVE).update(
        state=AttestationPolicy.State.RETIRED
    )
    policy.state = AttestationPolicy.State.ACTIVE
    policy.approved_by = str(actor)[:200]
    policy.approved_at = timezone.now()
    policy.save(update_fields=["state", "approved_by", "approved_at"])
    audit.record(actor=actor, action="policy.approve", target=policy, data={"version": policy.version})
    return policy


@transaction.atomic
def policy_save(*, actor: Any, name: str, golden_pcrs: dict | None = None, hardware_model: str = "",
                group: Any = None, learn_from: Device | None = None, **options: Any) -> AttestationPolicy:
    """Create the next version of a policy (versions are immutable once written)."""
    if learn_from is None and not golden_pcrs:
        raise InvalidInput("give golden_pcrs, or learn_from a device to record a baseline")
    if golden_pcrs:
        _check_golden(golden_pcrs)
    latest = AttestationPolicy.objects.filter(name=name).order_by("-version").first()
    policy = AttestationPolicy.objects.create(
        name=name, version=(latest.version + 1) if latest else 1, hardware_model=hardware_model, group=group,
        golden_pcrs=golden_pcrs or {}, learn_from=learn_from, created_by=str(actor)[:200],
        state=AttestationPolicy.State.LEARNING if learn_from else AttestationPolicy.State.ACTIVE, **options,
    )
    if policy.state == AttestationPolicy.State.ACTIVE:
        AttestationPolicy.objects.filter(name=name, state=AttestationPolicy.State.ACTIVE).exclude(pk=policy.pk).update(
            state=AttestationPolicy.State.RETIRED
        )
    audit.record(actor=actor, action="policy.save", target=policy, data={"version": policy.version,
                                                                         "state": policy.state})
    return policy


def _check_golden(golden: Any) -> None:
    sizes = {"sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}
    if not isinstance(golden, dict):
        raise InvalidInput('golden_pcrs must look like {"sha256": {"0": "<hex>"}}')
    for bank, values in golden.items():
        if bank not in sizes or not isinstance(values, dict):
            raise InvalidInput(f"unknown PCR bank {bank!r}; use one of {', '.join(sizes)}")
        for index, value in values.items():
            if not str(index).isdigit() or not 0 <= int(index) <= 23:
                raise InvalidInput(f"PCR index {index!r} must be 0–23")
            if not isinstance(value, str) or len(value) != sizes[bank] or any(c not in "0123456789abcdefABCDEF"
                                                                               for c in value):
                raise InvalidInput(f"PCR {bank}:{index} must be {sizes[bank]} hex characters")


# --- scheduled work ---------------------------------------------------------------------

def challenges_due(*, interval_s: float, batch: int = 500) -> int:
    """Challenge online devices not challenged for `interval_s`; bounded per call."""
    cutoff = timezone.now() - timedelta(seconds=interval_s)
    due = list(
        Device.objects.filter(online=True, status__in=[DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED])
        .filter(Q(trust__isnull=True) | Q(trust__last_challenge_at__isnull=True) | Q(trust__last_challenge_at__lt=cutoff))
        .values_list("id", flat=True)[:batch]
    )
    for device_id in due:
        challenge_push(device_id=device_id, reason="schedule")
    return len(due)


def mark_overdue(*, grace_s: float) -> int:
    """Trusted devices whose last result is older than their policy allows become suspect."""
    cutoff = timezone.now() - timedelta(seconds=grace_s)
    return DeviceTrust.objects.filter(state=DeviceTrust.State.TRUSTED, last_attested_at__lt=cutoff).update(
        state=DeviceTrust.State.SUSPECT
    )
