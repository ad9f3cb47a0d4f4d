"""Security models: the append-only, hash-chained audit log (more to come: keys, attestation)."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class AppendOnlyError(Exception):
    """Raised on any attempt to change or delete an audit entry through the ORM."""


class AuditQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AppendOnlyError("audit entries cannot be updated")

    def delete(self):
        raise AppendOnlyError("audit entries cannot be deleted")


class AuditEntry(models.Model):
    """One action. `content_hash` = SHA-256 over this entry's content (security.audit.content_digest),
    computed when it is written. At COMMIT a deferred trigger seals it into the chain: `chain_seq` =
    the last sealed entry's + 1, `prev_hash` = that entry's `hash`, `hash` = SHA-256(prev_hash +
    content_hash) (security.audit.link_digest). So the chain is in commit order, and an edit, removal
    or reordering anywhere breaks it from there on. Until its transaction commits an entry is unsealed
    (chain_seq, prev_hash and hash are NULL), and nobody else can see it."""

    at = models.DateTimeField(db_index=True)
    actor_type = models.CharField(max_length=16)  # user | device | system
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=100, db_index=True)
    target_type = models.CharField(max_length=100, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_repr = models.CharField(max_length=200, blank=True)
    data = models.JSONField(default=dict, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    content_hash = models.CharField(max_length=64, editable=False)
    chain_seq = models.PositiveBigIntegerField(null=True, blank=True, unique=True, editable=False)
    prev_hash = models.CharField(max_length=64, null=True, blank=True, editable=False)
    hash = models.CharField(max_length=64, null=True, blank=True, unique=True, editable=False)

    objects = AuditQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "audit entries"
        indexes = [models.Index(fields=["target_type", "target_id"], name="security_audit_target")]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} by {self.actor}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise AppendOnlyError("audit entries cannot be changed once written")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("audit entries cannot be deleted")


class EnrollmentToken(models.Model):
    """A secret an operator hands to new devices so they can enroll.

    Only a SHA-256 of the secret is stored; the secret is shown once, at creation.
    """

    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=12, help_text="first characters of the secret, to recognise it")
    secret_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    max_uses = models.PositiveIntegerField(default=1)
    uses = models.PositiveIntegerField(default=0)
    site = models.ForeignKey("fleet.Site", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    labels = models.JSONField(default=dict, blank=True)
    auto_approve = models.BooleanField(default=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name or f"{self.prefix}…"

    def state(self, now) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.uses >= self.max_uses:
            return "spent"
        return "valid"


class DeviceKey(models.Model):
    """A device's Ed25519 public key. A device has one active key; rotation revokes the old one."""

    class State(models.TextChoices):
        ACTIVE = "active", "Active"
        REVOKED = "revoked", "Revoked"

    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="keys")
    public_key = models.BinaryField(max_length=32)
    fingerprint = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the raw public key")
    state = models.CharField(max_length=8, choices=State.choices, default=State.ACTIVE)
    source = models.CharField(max_length=16, default="enroll")  # enroll | preauthorized | rotated
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["device"], condition=models.Q(state="active"), name="one_active_key_per_device")
        ]
        permissions = [("manage_device_keys", "Can rotate and revoke device keys")]

    def __str__(self) -> str:
        return f"{self.fingerprint[:16]} ({self.state})"


class TrustAnchor(models.Model):
    """A root CA certificate that EK certificates may chain to, with its trust tier.

    "manufacturer" anchors are TPM vendors' roots; "test" anchors are software TPMs' local
    CAs (swtpm) — devices chaining only to a test anchor are labelled as such everywhere.
    """

    class Tier(models.TextChoices):
        MANUFACTURER = "manufacturer", "Manufacturer"
        TEST = "test", "Test (software TPM)"
        INTERMEDIATE = "intermediate", "Intermediate (untrusted helper)"

    name = models.CharField(max_length=200)
    tier = models.CharField(max_length=16, choices=Tier.choices)
    certificate_pem = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tier", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.tier})"


class TpmIdentity(models.Model):
    """A device's TPM: EK and AK bound by credential activation at enrollment."""

    device = models.OneToOneField("fleet.Device", primary_key=True, on_delete=models.CASCADE, related_name="tpm")
    ek_public = models.BinaryField()
    ek_certificate = models.BinaryField(null=True, blank=True)
    ek_sha256 = models.CharField(max_length=64, db_index=True)
    ek_tier = models.CharField(max_length=16, blank=True, help_text="trust tier of the EK certificate chain, if any")
    ek_cert_failed = models.JSONField(default=list, blank=True)
    ek_approved = models.BooleanField(default=False, help_text="EK trusted by certificate or by an operator")
    ek_approved_by = models.CharField(max_length=200, blank=True)
    ak_public = models.BinaryField()
    ak_name = models.CharField(max_length=140)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "TPM identity"
        verbose_name_plural = "TPM identities"
        permissions = [("approve_ek", "Can approve a TPM endorsement key without a certificate")]

    def __str__(self) -> str:
        return f"TPM of {self.device_id} (EK {self.ek_sha256[:12]})"


class AttestationPolicy(models.Model):
    """Golden PCR values for a hardware model or a device group, versioned.

    `learning` records the values of `learn_from` at its next good quote and waits for an
    admin's approval before it is enforced.
    """

    class State(models.TextChoices):
        LEARNING = "learning", "Learning baseline"
        PENDING_APPROVAL = "pending_approval", "Baseline awaiting approval"
        ACTIVE = "active", "Active"
        RETIRED = "retired", "Retired"

    name = models.CharField(max_length=200)
    version = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    hardware_model = models.CharField(max_length=100, blank=True)
    group = models.ForeignKey("fleet.DeviceGroup", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    golden_pcrs = models.JSONField(default=dict, blank=True, help_text='{"sha256": {"0": "<hex>", …}}')
    pcr_selection = models.JSONField(default=list, blank=True, help_text="PCR indexes to quote; default 0–7")
    learn_from = models.ForeignKey("fleet.Device", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    allow_self_reported = models.BooleanField(default=True, help_text="devices without a TPM get `warning`, not quarantine")
    release_after_affirming = models.PositiveIntegerField(
        default=0, help_text="release a quarantined device after this many affirming results in a row (0: operators only)"
    )
    max_age_s = models.PositiveIntegerField(default=24 * 3600, help_text="a result older than this is stale")
    created_by = models.CharField(max_length=200, blank=True)
    approved_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    approved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "-version"]
        verbose_name_plural = "attestation policies"
        constraints = [models.UniqueConstraint(fields=["name", "version"], name="attestation_policy_version")]

    def __str__(self) -> str:
        return f"{self.name} v{self.version} ({self.state})"


class AttestationChallenge(models.Model):
    id = models.UUIDField(primary_key=True, editable=False)
    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="+")
    nonce = models.BinaryField()
    pcrs = models.JSONField(default=list)
    reason = models.CharField(max_length=16)  # connect | schedule | operator
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    answered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["device", "created_at"], name="security_challenge_device")]
        permissions = [("request_attestation", "Can request an attestation on demand")]

    def __str__(self) -> str:
        return f"challenge {self.id} for {self.device_id}"


class AttestationResult(models.Model):
    """One appraisal, shaped like an IETF RATS attestation result (EAR)."""

    class Status(models.TextChoices):
        AFFIRMING = "affirming", "Affirming"
        WARNING = "warning", "Warning"
        CONTRAINDICATED = "contraindicated", "Contraindicated"

    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="attestations")
    challenge = models.ForeignKey(AttestationChallenge, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    format = models.CharField(max_length=20)
    status = models.CharField(max_length=16, choices=Status.choices)
    self_reported = models.BooleanField(default=False)
    failed_checks = models.JSONField(default=list, blank=True)
    warnings = models.JSONField(default=list, blank=True)
    policy = models.ForeignKey(AttestationPolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    policy_version = models.PositiveIntegerField(null=True, blank=True)
    verifier_version = models.CharField(max_length=32)
    pcrs = models.JSONField(default=dict, blank=True)
    evidence_sha256 = models.CharField(max_length=64)
    clock = models.JSONField(default=dict, blank=True)
    reboot_detected = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["device", "-created_at"], name="security_result_device_latest")]

    def __str__(self) -> str:
        return f"{self.status} for {self.device_id} at {self.created_at:%Y-%m-%d %H:%M}"


class DeviceTrust(models.Model):
    """A device's current trust state, derived from its attestation results."""

    class State(models.TextChoices):
        UNKNOWN = "unknown", "Not yet attested"
        TRUSTED = "trusted", "Trusted"
        SUSPECT = "suspect", "Suspect"
        QUARANTINED = "quarantined", "Quarantined"

    device = models.OneToOneField("fleet.Device", primary_key=True, on_delete=models.CASCADE, related_name="trust")
    state = models.CharField(max_length=12, choices=State.choices, default=State.UNKNOWN)
    last_result = models.ForeignKey(AttestationResult, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    last_status = models.CharField(max_length=16, blank=True)
    last_attested_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_challenge_at = models.DateTimeField(null=True, blank=True)
    affirming_streak = models.PositiveIntegerField(default=0)
    last_clock = models.JSONField(default=dict, blank=True)

    def __str__(self) -> str:
        return f"{self.device_id}: {self.state}"
