"""Rollouts API serializers: shape and validate input; services make the changes."""

from __future__ import annotations

from rest_framework import serializers

from fleet.models import Device, DeviceGroup, Site
from rollouts.models import Artifact, ArtifactVariant, Campaign, Execution, Kind, SigningKey


class SigningKeySerializer(serializers.ModelSerializer):
    public_key = serializers.SerializerMethodField()

    class Meta:
        model = SigningKey
        fields = ["id", "key_id", "public_key", "active", "created_at", "retired_at", "revoked_at"]
        read_only_fields = fields

    def get_public_key(self, key: SigningKey) -> str:
        import base64

        return base64.b64encode(bytes(key.public_key)).decode()


class VariantSerializer(serializers.ModelSerializer):
    key_id = serializers.CharField(source="key.key_id", read_only=True)
    manifest = serializers.SerializerMethodField()

    class Meta:
        model = ArtifactVariant
        fields = ["id", "name", "tiers", "size", "sha256", "key_id", "manifest"]
        read_only_fields = fields

    def get_manifest(self, variant: ArtifactVariant) -> str:
        return bytes(variant.manifest).decode()


class ArtifactSerializer(serializers.ModelSerializer):
    variants = VariantSerializer(many=True, read_only=True)

    class Meta:
        model = Artifact
        fields = ["id", "name", "kind", "version", "description", "hardware_models", "accelerators", "min_tier",
                  "variants", "created_by", "created_at"]
        read_only_fields = fields


def _list_field(**kwargs):
    return serializers.ListField(child=serializers.CharField(max_length=100), required=False, default=list, **kwargs)


class ArtifactUploadSerializer(serializers.Serializer):
    """Multipart: `file` (one file for every tier up to min_tier) and/or `file_tier1`,
    `file_tier2`, `file_tier3` (a variant per tier; a tier without a file is not served)."""

    name = serializers.CharField(max_length=100)
    kind = serializers.ChoiceField(choices=Kind.choices)
    version = serializers.CharField(max_length=64)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    hardware_models = _list_field()
    accelerators = _list_field()
    min_tier = serializers.IntegerField(min_value=1, max_value=3, required=False, default=3)
    file = serializers.FileField(required=False)
    file_tier1 = serializers.FileField(required=False)
    file_tier2 = serializers.FileField(required=False)
    file_tier3 = serializers.FileField(required=False)
    variant_names = serializers.DictField(child=serializers.CharField(max_length=32), required=False, default=dict,
                                          help_text='optional names per tier file, e.g. {"2": "int8"}')

    def validate(self, attrs: dict) -> dict:
        if not any(attrs.get(f) for f in ("file", "file_tier1", "file_tier2", "file_tier3")):
            raise serializers.ValidationError("upload `file` or at least one of file_tier1, file_tier2, file_tier3")
        return attrs


class CampaignSerializer(serializers.ModelSerializer):
    artifact = serializers.PrimaryKeyRelatedField(queryset=Artifact.objects.all(), required=False, allow_null=True)
    target_group = serializers.SlugRelatedField(slug_field="slug", queryset=DeviceGroup.objects.all(),
                                                required=False, allow_null=True)
    target_site = serializers.SlugRelatedField(slug_field="slug", queryset=Site.objects.all(), required=False,
                                               allow_null=True)
    artifact_version = serializers.CharField(source="artifact.version", read_only=True, default=None)

    class Meta:
        model = Campaign
        fields = [
            "id", "name", "artifact", "artifact_version", "kind", "artifact_name", "state", "state_reason",
            "target_selector", "target_group", "target_site", "target_tiers", "target_uids", "waves", "offer_gates",
            "on_gate_failure", "rate_per_min", "ramp_initial_per_min", "max_concurrent", "window_cron", "window_tz",
            "window_duration_min", "ack_timeout_s", "download_timeout_s", "install_timeout_s", "online_timeout_s",
            "max_retries", "retry_backoff_s", "current_wave", "wave_started_at", "wave_drained_at", "eligible_count",
            "gate_results", "gate_overrides", "revert_of", "created_by", "created_at", "scheduled_at", "started_at",
            "finished_at",
        ]
        read_only_fields = [
            "id", "kind", "artifact_name", "state", "state_reason", "current_wave", "wave_started_at",
            "wave_drained_at", "eligible_count", "gate_results", "gate_overrides", "revert_of", "created_by",
            "created_at", "scheduled_at", "started_at", "finished_at",
        ]


class RolloutReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500)


class ScheduleSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    start_at = serializers.DateTimeField(required=False, allow_null=True)


class AbortSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500)
    revert = serializers.BooleanField(required=False, default=False)


class ExecutionSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", queryset=Device.objects.all())
    version = serializers.CharField(source="target_version", read_only=True)
    variant = serializers.CharField(source="variant.name", read_only=True, default=None)

    class Meta:
        model = Execution
        fields = ["id", "campaign", "device", "variant", "component", "version", "previous_version", "wave", "state",
                  "hold", "progress", "attempt", "error", "next_attempt_at", "deadline_at", "offered_at",
                  "delivered_at", "finished_at", "updated_at"]
        read_only_fields = fields
