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
    """One action. `hash` = SHA-256 over the previous entry's hash and this entry's content
    (security.audit.entry_digest), so an edit anywhere breaks the chain from there on."""

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
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

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
