"""OTA models: the signing keyring, artifacts (with per-tier variants), campaigns and
per-device executions. State changes go through rollouts.services and the orchestrator,
never through `.save()` elsewhere."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from fleet.models import Device, DeviceGroup, Site


class SigningKey(models.Model):
    """One Ed25519 key of the artifact keyring.

    The active key signs new manifests; retired keys still verify (agents get every
    non-revoked public key in `welcome.artifact_keys`); revoked keys neither sign nor
    verify. The private key is stored encrypted (AES-GCM, key derived from SECRET_KEY).
    """

    key_id = models.CharField(max_length=64, unique=True)
    public_key = models.BinaryField()
    private_key_encrypted = models.BinaryField(editable=False)
    active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["active"], condition=Q(active=True), name="rollouts_one_active_key"),
        ]

    def __str__(self) -> str:
        return self.key_id + (" (active)" if self.active else "")


class Kind(models.TextChoices):
    MODEL = "model", "ML model"
    AGENT = "agent", "Agent"
    FIRMWARE = "firmware", "Firmware"


class Artifact(models.Model):
    """A versioned thing to install. Its files are its variants (one per capability tier set)."""

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    version = models.CharField(max_length=64)
    description = models.TextField(blank=True)
    # Compatibility. Empty lists mean "any".
    hardware_models = models.JSONField(default=list, blank=True)
    accelerators = models.JSONField(default=list, blank=True)
    # Least capable tier that can run it (1 = most capable, 3 = anything).
    min_tier = models.PositiveSmallIntegerField(default=3)
    created_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["name", "kind", "version"], name="rollouts_artifact_unique_version"),
        ]

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}@{self.version}"


def variant_upload_to(instance: ArtifactVariant, filename: str) -> str:
    artifact = instance.artifact
    return f"artifacts/{artifact.kind}/{artifact.name}/{artifact.version}/{instance.name}/{filename}"


class ArtifactVariant(models.Model):
    """One file of an artifact for some capability tiers (e.g. full for tier 1, int8 for tier 2),
    with its own signed manifest."""

    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="variants")
    name = models.CharField(max_length=32, default="default")
    tiers = models.JSONField(default=list)  # e.g. [1] or [2, 3]
    file = models.FileField(upload_to=variant_upload_to, max_length=400)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    manifest = models.BinaryField()  # canonical JSON bytes, exactly as signed
    signature = models.BinaryField()
    key = models.ForeignKey(SigningKey, on_delete=models.PROTECT, related_name="+")

    class Meta:
        ordering = ["artifact", "name"]
        constraints = [
            models.UniqueConstraint(fields=["artifact", "name"], name="rollouts_variant_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.artifact} [{self.name}]"


class Campaign(models.Model):
    class State(models.TextChoices):
        DRAFT = "draft", "Draft"
        SCHEDULED = "scheduled", "Scheduled"
        RUNNING = "running", "Running"
        PAUSED = "paused", "Paused"
        COMPLETED = "completed", "Completed"
        ABORTED = "aborted", "Aborted"

    class Action(models.TextChoices):
        PAUSE = "pause", "Pause"
        ABORT = "abort", "Abort"
        ABORT_AND_REVERT = "abort_and_revert", "Abort and revert"

    name = models.CharField(max_length=200)
    # Null only for revert campaigns, whose executions each carry their own variant.
    artifact = models.ForeignKey(Artifact, null=True, blank=True, on_delete=models.PROTECT, related_name="campaigns")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    artifact_name = models.CharField(max_length=100)
    state = models.CharField(max_length=10, choices=State.choices, default=State.DRAFT)
    state_reason = models.TextField(blank=True)

    # Target: every given part must hold (an empty part selects everything).
    target_selector = models.CharField(max_length=4096, blank=True)
    target_group = models.ForeignKey(DeviceGroup, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    target_site = models.ForeignKey(Site, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    target_tiers = models.JSONField(default=list, blank=True)
    target_uids = models.JSONField(default=list, blank=True)

    # [{"size": "5%"|int (cumulative), "soak_s": int, "gates": [{"type": ..., ..., "action": ...}]}]
    waves = models.JSONField(default=list)
    # Gates checked per device before an offer: [{"type": "attestation", "max_age_s": 3600}]
    offer_gates = models.JSONField(default=list, blank=True)
    on_gate_failure = models.CharField(max_length=16, choices=Action.choices, default=Action.PAUSE)

    rate_per_min = models.PositiveIntegerField(default=600)
    ramp_initial_per_min = models.PositiveIntegerField(null=True, blank=True)  # doubles each wave up to rate_per_min
    max_concurrent = models.PositiveIntegerField(default=1000)  # offered-and-delivered + downloading at once

    window_cron = models.CharField(max_length=100, blank=True)  # 5-field cron: when an install window opens
    window_tz = models.CharField(max_length=64, default="UTC")
    window_duration_min = models.PositiveIntegerField(default=0)

    ack_timeout_s = models.PositiveIntegerField(default=300)
    download_timeout_s = models.PositiveIntegerField(default=3600)
    install_timeout_s = models.PositiveIntegerField(default=1800)
    online_timeout_s = models.PositiveIntegerField(default=900)  # back online after an install/reboot
    max_retries = models.PositiveSmallIntegerField(default=3)
    retry_backoff_s = models.PositiveIntegerField(default=60)

    # Orchestrator state.
    current_wave = models.PositiveSmallIntegerField(default=0)
    wave_started_at = models.DateTimeField(null=True, blank=True)
    wave_drained_at = models.DateTimeField(null=True, blank=True)
    eligible_count = models.PositiveIntegerField(default=0)
    rate_tokens = models.FloatField(default=0)
    rate_updated_at = models.DateTimeField(null=True, blank=True)
    gate_results = models.JSONField(default=dict, blank=True)  # {"<wave>": {"<gate>": {...}}}
    gate_overrides = models.JSONField(default=dict, blank=True)  # {"<wave>": ["failure", ...]}

    revert_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reverts")
    created_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "scheduled_at"], name="rollouts_campaign_state")]
        permissions = [("control_campaign", "Can start, pause, resume and abort campaigns")]

    def __str__(self) -> str:
        return self.name


class Execution(models.Model):
    """One device's part in a campaign."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        OFFERED = "offered", "Offered"
        ACKED = "acked", "Acknowledged"
        DOWNLOADING = "downloading", "Downloading"
        DOWNLOADED = "downloaded", "Downloaded"
        INSTALLING = "installing", "Installing"
        VERIFYING = "verifying", "Verifying"
        COMMITTED = "committed", "Committed"
        FAILED = "failed", "Failed"
        ROLLED_BACK = "rolled_back", "Rolled back"
        TIMED_OUT = "timed_out", "Timed out"
        REJECTED = "rejected", "Rejected"
        CANCELED = "canceled", "Canceled"
        INCOMPATIBLE = "incompatible", "Incompatible"
        PINNED = "pinned", "Pinned"
        SUPERSEDED = "superseded", "Superseded"

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="executions")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="rollout_executions")
    variant = models.ForeignKey(ArtifactVariant, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    component = models.CharField(max_length=10, choices=Kind.choices)
    wave = models.PositiveSmallIntegerField(default=0)
    rank = models.PositiveIntegerField(default=0)  # order by the deterministic hash among eligible devices
    bucket = models.FloatField(default=0)  # hash(campaign, device uid) in [0, 1)
    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING)
    hold = models.CharField(max_length=16, blank=True)  # why a pending execution waits (e.g. "attestation")
    progress = models.PositiveSmallIntegerField(default=0)
    attempt = models.PositiveSmallIntegerField(default=0)
    error = models.JSONField(null=True, blank=True)  # {"code", "retryable", "detail"}
    previous_version = models.CharField(max_length=64, blank=True)
    target_version = models.CharField(max_length=64, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    offered_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["campaign", "wave", "rank"]
        constraints = [
            models.UniqueConstraint(fields=["campaign", "device"], name="rollouts_execution_one_per_device"),
        ]
        indexes = [
            models.Index(fields=["campaign", "state", "wave", "rank"], name="rollouts_exec_claim"),
            models.Index(fields=["campaign", "wave", "state"], name="rollouts_exec_wave_state"),
            models.Index(fields=["device", "state"], name="rollouts_exec_device_state"),
            models.Index(
                fields=["deadline_at"], name="rollouts_exec_deadline",
                condition=Q(state__in=["offered", "acked", "downloading", "downloaded", "installing", "verifying"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.campaign_id}/{self.device_id}: {self.state}"

