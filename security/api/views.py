"""Security API: enrollment tokens, pre-authorisation, device keys, the audit log."""

from __future__ import annotations

import csv
from datetime import timedelta

import django_filters
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from fleet import audit
from fleet.api.serializers import DeviceSerializer
from fleet.models import Device
from security import attestation, services
from security.api import serializers as s
from security.models import (
    AttestationPolicy,
    AttestationResult,
    AuditEntry,
    DeviceKey,
    DeviceTrust,
    EnrollmentToken,
    TrustAnchor,
)


class EnrollmentTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Enrollment tokens. The secret is returned once, by `POST`; only its hash is kept."""

    queryset = EnrollmentToken.objects.select_related("site", "created_by")
    serializer_class = s.EnrollmentTokenSerializer
    search_fields = ["name", "prefix"]
    ordering_fields = ["created_at", "expires_at"]
    action_permissions = {
        "create": ["security.add_enrollmenttoken"],
        "revoke": ["security.change_enrollmenttoken"],
    }

    @extend_schema(request=s.EnrollmentTokenCreateSerializer, responses={201: s.EnrollmentTokenCreatedSerializer})
    def create(self, request: Request) -> Response:
        body = s.EnrollmentTokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        token, secret = services.enrollment_token_create(
            actor=request.user,
            name=data["name"],
            expires_in=timedelta(hours=data["expires_in_hours"]),
            max_uses=data["max_uses"],
            site=data.get("site"),
            labels=data["labels"],
            auto_approve=data["auto_approve"],
        )
        out = s.EnrollmentTokenSerializer(token).data
        return Response({**out, "secret": secret}, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=s.EnrollmentTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        token = services.enrollment_token_revoke(actor=request.user, token=self.get_object())
        return Response(s.EnrollmentTokenSerializer(token).data)


class DeviceKeyFilter(django_filters.FilterSet):
    device = django_filters.CharFilter(field_name="device__uid")

    class Meta:
        model = DeviceKey
        fields = ["device", "state"]


class DeviceKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Device public keys: pre-authorise devices, rotate keys, revoke devices (admins)."""

    queryset = DeviceKey.objects.select_related("device")
    serializer_class = s.DeviceKeySerializer
    filterset_class = DeviceKeyFilter
    ordering_fields = ["created_at"]
    action_permissions = {
        "preauthorize": ["fleet.add_device", "security.add_devicekey"],
        "rotate": ["security.manage_device_keys"],
        "revoke_device": ["security.manage_device_keys"],
    }

    @extend_schema(request=s.PreauthorizeSerializer, responses={201: DeviceSerializer})
    @action(detail=False, methods=["post"])
    def preauthorize(self, request: Request) -> Response:
        """Register a device uid and public key before the device first connects."""
        body = s.PreauthorizeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        device = services.device_preauthorize(actor=request.user, **body.validated_data)
        return Response(DeviceSerializer(device).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.RotateKeySerializer, responses=s.DeviceKeySerializer)
    @action(detail=False, methods=["post"], url_path=r"devices/(?P<uid>[^/]+)/rotate")
    def rotate(self, request: Request, uid: str) -> Response:
        body = s.RotateKeySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        device = get_object_or_404(Device, uid=uid)
        key = services.device_key_rotate(actor=request.user, device=device, public_key=body.validated_data["public_key"])
        return Response(s.DeviceKeySerializer(key).data)

    @extend_schema(request=s.RevokeSerializer, responses=DeviceSerializer)
    @action(detail=False, methods=["post"], url_path=r"devices/(?P<uid>[^/]+)/revoke")
    def revoke_device(self, request: Request, uid: str) -> Response:
        body = s.RevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        device = services.device_revoke(
            actor=request.user, device=get_object_or_404(Device, uid=uid), reason=body.validated_data["reason"]
        )
        return Response(DeviceSerializer(device).data)


class AuditFilter(django_filters.FilterSet):
    action = django_filters.CharFilter(lookup_expr="startswith", help_text="e.g. `device.` for all device actions")
    actor = django_filters.CharFilter()
    target_type = django_filters.CharFilter()
    target_id = django_filters.CharFilter()
    since = django_filters.IsoDateTimeFilter(field_name="at", lookup_expr="gte")
    until = django_filters.IsoDateTimeFilter(field_name="at", lookup_expr="lt")

    class Meta:
        model = AuditEntry
        fields = ["action", "actor", "actor_type", "target_type", "target_id"]


class _Echo:
    def write(self, value: str) -> str:
        return value


class AuditEntryViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = AuditEntry.objects.all()
    serializer_class = s.AuditEntrySerializer
    filterset_class = AuditFilter
    search_fields = ["actor", "action", "target_repr"]
    ordering_fields = ["id", "at", "chain_seq"]

    @extend_schema(responses={(200, "text/csv"): str})
    @action(detail=False, methods=["get"], url_path="export")
    def export_csv(self, request: Request) -> StreamingHttpResponse:
        """The filtered log as CSV, streamed, in chain (commit) order."""
        entries = self.filter_queryset(self.get_queryset()).order_by("chain_seq", "id")
        columns = [
            "id",
            "at",
            "actor_type",
            "actor",
            "action",
            "target_type",
            "target_id",
            "target_repr",
            "source_ip",
            "data",
            "chain_seq",
            "content_hash",
            "prev_hash",
            "hash",
        ]
        writer = csv.writer(_Echo())

        def rows():
            yield writer.writerow(columns)
            for entry in entries.iterator(chunk_size=2000):
                yield writer.writerow([getattr(entry, c) if c != "data" else entry.data for c in columns])

        response = StreamingHttpResponse(rows(), content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="audit.csv"'
        return response


class AttestationResultFilter(django_filters.FilterSet):
    device = django_filters.CharFilter(field_name="device__uid")
    failed_check = django_filters.CharFilter(
        field_name="failed_checks", lookup_expr="contains", method="filter_failed_check"
    )

    class Meta:
        model = AttestationResult
        fields = ["device", "status", "format", "self_reported"]

    def filter_failed_check(self, queryset, name, value):
        return queryset.filter(failed_checks__contains=[value])


class AttestationResultViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Attestation history, newest first; `self_reported` results come from devices without a TPM."""

    queryset = AttestationResult.objects.select_related("device", "policy")
    serializer_class = s.AttestationResultSerializer
    filterset_class = AttestationResultFilter
    ordering_fields = ["created_at", "id"]
    ordering = ["-created_at"]


class DeviceTrustViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Current trust state per device, and attestation on demand."""

    queryset = DeviceTrust.objects.select_related("device")
    serializer_class = s.DeviceTrustSerializer
    filterset_fields = ["state", "last_status"]
    ordering = ["device_id"]  # its primary key is the device: there is no `id` to page by
    lookup_field = "device__uid"
    lookup_url_kwarg = "uid"
    action_permissions = {
        "attest": ["security.request_attestation"],
        "approve_ek": ["security.approve_ek"],
    }

    @extend_schema(request=None, responses={202: None})
    @action(detail=False, methods=["post"], url_path=r"(?P<uid>[^/]+)/attest")
    def attest(self, request: Request, uid: str) -> Response:
        """Send the device an attestation challenge now (if it is connected)."""
        attestation.attestation_request(actor=request.user, device=get_object_or_404(Device, uid=uid))
        return Response(status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={200: None})
    @action(detail=False, methods=["post"], url_path=r"(?P<uid>[^/]+)/approve-ek")
    def approve_ek(self, request: Request, uid: str) -> Response:
        """Trust a TPM endorsement key that came without a valid certificate."""
        identity = attestation.tpm_ek_approve(actor=request.user, device=get_object_or_404(Device, uid=uid))
        return Response({"device": uid, "ek_sha256": identity.ek_sha256, "ek_approved": identity.ek_approved})


class AttestationPolicyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    """Versioned golden-PCR policies. `POST` writes a new version; a `learn_from` policy records a
    baseline from that device and waits for `approve`. Admins only for changes."""

    queryset = AttestationPolicy.objects.select_related("group", "learn_from")
    serializer_class = s.AttestationPolicySerializer
    filterset_fields = ["name", "state"]
    action_permissions = {"create": ["security.add_attestationpolicy"], "approve": ["security.change_attestationpolicy"]}

    def perform_create(self, serializer: s.AttestationPolicySerializer) -> None:
        serializer.instance = attestation.policy_save(actor=self.request.user, **serializer.validated_data)

    @extend_schema(request=None, responses=s.AttestationPolicySerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        policy = attestation.policy_approve(actor=request.user, policy=self.get_object())
        return Response(s.AttestationPolicySerializer(policy).data)


class TrustAnchorViewSet(viewsets.ModelViewSet):
    """Root CAs that TPM EK certificates chain to, by tier. Admins only for changes."""

    queryset = TrustAnchor.objects.all()
    serializer_class = s.TrustAnchorSerializer
    filterset_fields = ["tier"]

    def perform_create(self, serializer: s.TrustAnchorSerializer) -> None:
        super().perform_create(serializer)
        audit.record(
            actor=self.request.user,
            action="trust_anchor.add",
            target=serializer.instance,
            data={"tier": serializer.instance.tier},
        )

    def perform_update(self, serializer: s.TrustAnchorSerializer) -> None:
        super().perform_update(serializer)
        audit.record(actor=self.request.user, action="trust_anchor.change", target=serializer.instance)

    def perform_destroy(self, instance: TrustAnchor) -> None:
        audit.record(actor=self.request.user, action="trust_anchor.remove", target=instance)
        instance.delete()
