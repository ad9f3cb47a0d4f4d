"""Security API serializers: enrollment tokens, device keys, the audit log."""

from __future__ import annotations

import base64
import binascii

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fleet.models import Device, DeviceGroup, Site
from security.models import (
    AttestationPolicy,
    AttestationResult,
    AuditEntry,
    DeviceKey,
    DeviceTrust,
    EnrollmentToken,
    TrustAnchor,
)


@extend_schema_field(OpenApiTypes.BYTE)
class Base64KeyField(serializers.Field):
    """A raw 32-byte Ed25519 public key as standard padded base64."""

    def to_internal_value(self, data: object) -> bytes:
        if not isinstance(data, str):
            raise serializers.ValidationError("expected base64 text")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise serializers.ValidationError("not valid base64 (standard alphabet, padded)") from None
        if len(raw) != 32:
            raise serializers.ValidationError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        return raw

    def to_representation(self, value: bytes) -> str:
        return base64.b64encode(bytes(value)).decode()


class EnrollmentTokenSerializer(serializers.ModelSerializer):
    site = serializers.SlugRelatedField(slug_field="slug", queryset=Site.objects.all(), required=False, allow_null=True)
    state = serializers.SerializerMethodField()
    created_by = serializers.StringRelatedField(allow_null=True)  # null for tokens made by the system or a script

    class Meta:
        model = EnrollmentToken
        fields = [
            "id",
            "name",
            "prefix",
            "state",
            "created_by",
            "created_at",
            "expires_at",
            "max_uses",
            "uses",
            "site",
            "labels",
            "auto_approve",
            "revoked_at",
        ]
        read_only_fields = fields

    def get_state(self, token: EnrollmentToken) -> str:
        from django.utils import timezone

        return token.state(timezone.now())


class EnrollmentTokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    expires_in_hours = serializers.IntegerField(min_value=1, max_value=24 * 365, default=24)
    max_uses = serializers.IntegerField(min_value=1, max_value=1_000_000, default=1)
    site = serializers.SlugRelatedField(slug_field="slug", queryset=Site.objects.all(), required=False, allow_null=True)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False, default=dict)
    auto_approve = serializers.BooleanField(default=False)


class EnrollmentTokenCreatedSerializer(EnrollmentTokenSerializer):
    secret = serializers.CharField(help_text="shown once; store it now")

    class Meta(EnrollmentTokenSerializer.Meta):
        fields = [*EnrollmentTokenSerializer.Meta.fields, "secret"]
        read_only_fields = fields


class PreauthorizeSerializer(serializers.Serializer):
    uid = serializers.CharField(max_length=64)
    public_key = Base64KeyField()
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    site = serializers.SlugRelatedField(slug_field="slug", queryset=Site.objects.all(), required=False, allow_null=True)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False, default=dict)
    approve = serializers.BooleanField(default=False, help_text="start active instead of pending")


class DeviceKeySerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", read_only=True)
    public_key = Base64KeyField(read_only=True)

    class Meta:
        model = DeviceKey
        fields = ["id", "device", "public_key", "fingerprint", "state", "source", "created_at", "revoked_at"]
        read_only_fields = fields


class RotateKeySerializer(serializers.Serializer):
    public_key = Base64KeyField()


class RevokeSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500)


class AuditEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEntry
        fields = [
            "id",
            "at",
            "actor_type",
            "actor",
            "action",
            "target_type",
            "target_id",
            "target_repr",
            "data",
            "source_ip",
            "chain_seq",
            "content_hash",
            "prev_hash",
            "hash",
        ]
        read_only_fields = fields


class AttestationResultSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", read_only=True)
    policy = serializers.StringRelatedField()
    label = serializers.SerializerMethodField(help_text='"self-reported" for evidence without a TPM')

    class Meta:
        model = AttestationResult
        fields = [
            "id",
            "device",
            "created_at",
            "format",
            "status",
            "label",
            "self_reported",
            "failed_checks",
            "warnings",
            "policy",
            "policy_version",
            "verifier_version",
            "pcrs",
            "evidence_sha256",
            "clock",
            "reboot_detected",
        ]
        read_only_fields = fields

    def get_label(self, result: AttestationResult) -> str:
        return "self-reported" if result.self_reported else "tpm"


class AttestationPolicySerializer(serializers.ModelSerializer):
    group = serializers.SlugRelatedField(
        slug_field="slug", queryset=DeviceGroup.objects.all(), required=False, allow_null=True
    )
    learn_from = serializers.SlugRelatedField(
        slug_field="uid", queryset=Device.objects.all(), required=False, allow_null=True
    )

    class Meta:
        model = AttestationPolicy
        fields = [
            "id",
            "name",
            "version",
            "state",
            "hardware_model",
            "group",
            "golden_pcrs",
            "pcr_selection",
            "learn_from",
            "allow_self_reported",
            "release_after_affirming",
            "max_age_s",
            "created_by",
            "approved_by",
            "created_at",
            "approved_at",
        ]
        read_only_fields = ["id", "version", "state", "created_by", "approved_by", "created_at", "approved_at"]
        validators = []  # the service assigns the next version; (name, version) is unique by construction


class TrustAnchorSerializer(serializers.ModelSerializer):
    class Meta:
        model = TrustAnchor
        fields = ["id", "name", "tier", "certificate_pem", "created_at"]
        read_only_fields = ["id", "created_at"]

    def validate_certificate_pem(self, value: str) -> str:
        from cryptography import x509

        try:
            x509.load_pem_x509_certificate(value.encode())
        except ValueError:
            raise serializers.ValidationError("not a PEM-encoded X.509 certificate") from None
        return value


class DeviceTrustSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="uid", read_only=True)

    class Meta:
        model = DeviceTrust
        fields = [
            "device",
            "state",
            "last_status",
            "last_attested_at",
            "last_challenge_at",
            "affirming_streak",
            "last_result",
        ]
        read_only_fields = fields
