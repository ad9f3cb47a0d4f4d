"""Telemetry models.

The time-series tables themselves (`telemetry_point`, the rollups, the late-data markers) are
not Django models: their shape depends on the backend chosen at migrate time (TimescaleDB
hypertable or native daily partitions) and they are only read and written with SQL by
`telemetry.ingest`, `telemetry.rollups` and `telemetry.selectors`. See telemetry/storage.py.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from fleet.models import Device, DeviceGroup


class Metric(models.Model):
    """Catalog of metric names; points refer to them by a 2-byte id."""

    id = models.SmallAutoField(primary_key=True)
    name = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DeviceMetric(models.Model):
    """Which metrics a device has ever reported (enforces the per-device cardinality cap), and
    the newest stored point of each such series (serves `telemetry.selectors.latest`).

    `last_time`/`last_value` are derived data written by the ingest flusher after its commits, at
    most every TELEMETRY_LATEST_FLUSH_MS, and never moved backwards (a late point does not replace
    a newer one; equal times keep the larger value, as the rollups' `last`)."""

    pk = models.CompositePrimaryKey("device", "metric")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="+")
    metric = models.ForeignKey(Metric, on_delete=models.CASCADE, related_name="+")
    first_seen = models.DateTimeField(auto_now_add=True)
    last_time = models.DateTimeField(null=True, blank=True)
    last_value = models.FloatField(null=True, blank=True)

    class Meta:
        # "Latest value of metric M for these devices" reads one metric's rows; the updated
        # columns are not indexed, so the flusher's updates stay HOT (fillfactor 70, migration 0003).
        indexes = [models.Index(fields=["metric", "device"], name="telemetry_dm_metric_device")]

    def __str__(self) -> str:
        return f"{self.device_id}:{self.metric_id}"


class Severity(models.TextChoices):
    INFO = "info", "Info"
    WARNING = "warning", "Warning"
    CRITICAL = "critical", "Critical"


class DeviceEvent(models.Model):
    """An agent `event` frame entry (inference result, alert raised on the device, log, boot)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="events")
    time = models.DateTimeField()
    kind = models.CharField(max_length=16)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.INFO)
    message = models.TextField(blank=True)
    attrs = models.JSONField(default=dict, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-time"]
        indexes = [
            models.Index(fields=["device", "-time"], name="telemetry_event_device_time"),
            models.Index(fields=["time"], name="telemetry_event_time"),
        ]

    def __str__(self) -> str:
        return f"{self.device_id} {self.kind} {self.time:%Y-%m-%d %H:%M:%S}"


class RollupState(models.Model):
    """Watermarks of the incremental jobs: everything before `watermark` has been processed."""

    name = models.CharField(max_length=32, primary_key=True)
    watermark = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name}@{self.watermark.isoformat()}"


class Comparison(models.TextChoices):
    GT = ">", "greater than"
    GE = ">=", "greater than or equal"
    LT = "<", "less than"
    LE = "<=", "less than or equal"


class RuleKind(models.TextChoices):
    THRESHOLD = "threshold", "Threshold on a metric"
    ABSENCE = "absence", "Device silent"


class RuleScope(models.TextChoices):
    ALL = "all", "All devices"
    DEVICE = "device", "One device"
    GROUP = "group", "A device group"
    SELECTOR = "selector", "A label selector"


class RuleAgg(models.TextChoices):
    AVG = "avg", "Average"
    MIN = "min", "Minimum"
    MAX = "max", "Maximum"
    LAST = "last", "Last value"


class AlertRule(models.Model):
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=RuleKind.choices, default=RuleKind.THRESHOLD)
    metric = models.CharField(max_length=64, blank=True, help_text="metric name (threshold rules)")
    agg = models.CharField(max_length=8, choices=RuleAgg.choices, default=RuleAgg.AVG,
                           help_text="per-minute aggregate compared with the threshold")
    comparison = models.CharField(max_length=2, choices=Comparison.choices, default=Comparison.GT)
    threshold = models.FloatField(default=0)
    clear_threshold = models.FloatField(
        null=True, blank=True,
        help_text="hysteresis: an open alert resolves only once the value is back past this (default: threshold)",
    )
    for_duration_s = models.PositiveIntegerField(
        default=300, help_text="threshold: how long the condition must hold; absence: how long a device is silent"
    )
    scope = models.CharField(max_length=16, choices=RuleScope.choices, default=RuleScope.ALL)
    device = models.ForeignKey(Device, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    group = models.ForeignKey(DeviceGroup, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    selector = models.CharField(max_length=4096, blank=True)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING)
    webhook_url = models.URLField(max_length=500, blank=True)
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_evaluated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name


class AlertState(models.TextChoices):
    OPEN = "open", "Open"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"


ACTIVE_STATES = (AlertState.OPEN, AlertState.ACKNOWLEDGED)


class Alert(models.Model):
    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="alerts")
    state = models.CharField(max_length=16, choices=AlertState.choices, default=AlertState.OPEN)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING)
    opened_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="+")
    last_value = models.FloatField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    # [{"at": iso, "state": "open", "value": 81.2, "by": "system", "note": ""}, ...]
    history = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-opened_at", "-id"]
        constraints = [
            # At most one active alert per rule and device: an alert opens once and stays open.
            models.UniqueConstraint(fields=["rule", "device"], condition=Q(state__in=["open", "acknowledged"]),
                                    name="telemetry_alert_one_active"),
        ]
        indexes = [models.Index(fields=["state", "-opened_at"], name="telemetry_alert_state")]

    def __str__(self) -> str:
        return f"{self.rule} on {self.device_id}: {self.state}"
