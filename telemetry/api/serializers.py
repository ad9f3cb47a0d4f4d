"""Telemetry API serializers: alert rules, alerts, events."""

from __future__ import annotations

from rest_framework import serializers

from fleet.models import Device, DeviceGroup
from telemetry.models import Alert, AlertRule, DeviceEvent


class AlertRuleSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", queryset=Device.objects.all(), required=False,
                                          allow_null=True)
    group = serializers.SlugRelatedField(slug_field="slug", queryset=DeviceGroup.objects.all(), required=False,
                                         allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = AlertRule
        fields = [
            "id", "name", "kind", "metric", "agg", "comparison", "threshold", "clear_threshold", "for_duration_s",
            "scope", "device", "group", "selector", "severity", "webhook_url", "enabled", "created_by",
            "created_at", "updated_at", "last_evaluated_at",
        ]
        read_only_fields = ["id", "created_by", "created_at", "updated_at", "last_evaluated_at"]


class AlertSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", read_only=True)
    rule_name = serializers.CharField(source="rule.name", read_only=True)
    acknowledged_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Alert
        fields = ["id", "rule", "rule_name", "device", "state", "severity", "opened_at", "resolved_at",
                  "acknowledged_at", "acknowledged_by", "last_value", "history", "updated_at"]
        read_only_fields = fields


class AcknowledgeSerializer(serializers.Serializer):
    note = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class DeviceEventSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", read_only=True)

    class Meta:
        model = DeviceEvent
        fields = ["id", "device", "time", "kind", "severity", "message", "attrs", "received_at"]
        read_only_fields = fields
