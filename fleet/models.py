"""Inventory models. State changes go through fleet.services, never through .save() elsewhere."""

from __future__ import annotations

import zoneinfo

from django.contrib.postgres.indexes import GinIndex
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from fleet.tiers import TIER_CHOICES

uid_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
    "A device uid is 1–64 characters: letters, digits, '.', '_', ':' or '-', starting with a letter or digit.",
)


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)")


class Site(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    region = models.CharField(max_length=100, blank=True)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    latitude = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(-90), MaxValueValidator(90)]
    )
    longitude = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(-180), MaxValueValidator(180)]
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Accelerator(models.TextChoices):
    NONE = "none", "None"
    GPU = "gpu", "GPU"
    NPU = "npu", "NPU"
    TPU = "tpu", "TPU"


class DeviceStatus(models.TextChoices):
    PENDING = "pending", "Pending approval"
    ACTIVE = "active", "Active"
    QUARANTINED = "quarantined", "Quarantined"
    DECOMMISSIONED = "decommissioned", "Decommissioned"


class Device(models.Model):
    uid = models.CharField(max_length=64, unique=True, validators=[uid_validator])
    name = models.CharField(max_length=200, blank=True)
    serial = models.CharField(max_length=100, blank=True)
    hardware_model = models.CharField(max_length=100, blank=True, db_index=True)

    # Capabilities, as reported by the agent's `state` frame or entered by an operator.
    cpu_cores = models.PositiveSmallIntegerField(null=True, blank=True)
    ram_mb = models.PositiveIntegerField(null=True, blank=True)
    accelerator = models.CharField(max_length=8, choices=Accelerator.choices, default=Accelerator.NONE)
    storage_mb = models.PositiveIntegerField(null=True, blank=True)
    arch = models.CharField(max_length=32, blank=True)
    os = models.CharField(max_length=100, blank=True)
    # Derived from capabilities by fleet.tiers.compute_tier; stored so it can be filtered.
    tier = models.PositiveSmallIntegerField(choices=TIER_CHOICES, default=3, db_index=True)

    site = models.ForeignKey(Site, null=True, blank=True, on_delete=models.SET_NULL, related_name="devices")
    labels = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=DeviceStatus.choices, default=DeviceStatus.PENDING)

    online = models.BooleanField(default=False)
    last_seen = models.DateTimeField(null=True, blank=True)
    # Identifies the connection that set `online`, so a replaced connection closing late
    # cannot mark the device offline under its successor.
    session = models.CharField(max_length=32, blank=True, editable=False)

    # {"agent": "1.2.0", "model": "anomaly-1.0.0", "firmware": "2024.1"}
    installed_versions = models.JSONField(default=dict, blank=True)
    # Components whose version must not change: {"model": "1.0.0"}
    pinned_versions = models.JSONField(default=dict, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["uid"]
        indexes = [
            GinIndex(fields=["labels"], name="fleet_device_labels_gin"),
            models.Index(fields=["status", "online"], name="fleet_device_status_online"),
            models.Index(fields=["site", "status"], name="fleet_device_site_status"),
        ]
        permissions = [
            ("approve_device", "Can approve pending devices"),
            ("quarantine_device", "Can quarantine and release devices"),
            ("decommission_device", "Can decommission devices"),
            ("pin_device", "Can pin and unpin device versions"),
        ]

    def __str__(self) -> str:
        return self.name or self.uid


class DeviceGroup(models.Model):
    """A static set of devices. Dynamic sets are label selectors (fleet.selector)."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    devices = models.ManyToManyField(Device, blank=True, related_name="groups")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class UplinkCursor(models.Model):
    """The highest durable-uplink `seq` committed for a device (agent protocol v1).

    Kept apart from Device so the ingest path's frequent updates touch a narrow row.
    Writers advance it with a conditional UPDATE (`WHERE last_acked_seq = <expected>`)
    in the same transaction as the frame's effects: a frame stored by another connection
    of the same device in the meantime fails the condition and is stored nothing, which
    is what makes storage exactly-once across processes.
    """

    device = models.OneToOneField(Device, primary_key=True, on_delete=models.CASCADE, related_name="uplink")
    last_acked_seq = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.device_id}@{self.last_acked_seq}"


class DeviceCommand(models.Model):
    """An operator's command to a device (agent protocol `command`), kept until it is answered.

    Queued commands reach a device when it connects; the channel-layer push is only a
    doorbell for devices online now.
    """

    class Name(models.TextChoices):
        REBOOT = "reboot", "Reboot"
        ATTEST = "attest", "Attest now"
        SYNC_STATE = "sync_state", "Sync state"
        SET_CONFIG = "set_config", "Set configuration"

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        SENT = "sent", "Sent"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        EXPIRED = "expired", "Expired"

    id = models.UUIDField(primary_key=True, editable=False)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="commands")
    name = models.CharField(max_length=16, choices=Name.choices)
    args = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    output = models.TextField(blank=True)
    created_by = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["device", "state"], name="fleet_cmd_device_state")]
        permissions = [("send_command", "Can send commands to devices")]

    def __str__(self) -> str:
        return f"{self.name} → {self.device_id} ({self.state})"


class PresenceEvent(models.Model):
    """One change of a device's connection state, for its presence history (not heartbeats:
    those only move `Device.last_seen`). Older rows are pruned by `fleet.tasks.prune_presence`."""

    class Kind(models.TextChoices):
        CONNECTED = "connected", "Connected"
        DISCONNECTED = "disconnected", "Disconnected"
        TIMED_OUT = "timed_out", "Timed out (no goodbye)"

    id = models.BigAutoField(primary_key=True)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="presence_events")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    at = models.DateTimeField()
    session = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["device", "-at"], name="fleet_presence_device_at")]

    def __str__(self) -> str:
        return f"{self.device_id} {self.kind} @ {self.at:%Y-%m-%d %H:%M:%S}"
