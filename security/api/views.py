"""Security API: enrollment tokens, pre-authorisation, device keys, the audit log."""

from __future__ import annotations

import csv
from datetime import timedelta

import django_filters
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from fleet.api.serializers import DeviceSerializer
from fleet.models import Device
from security import services
from security.api import serializers as s
from security.models import AuditEntry, DeviceKey, EnrollmentToken


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
            actor=request.user, name=data["name"], expires_in=timedelta(hours=data["expires_in_hours"]),
            max_uses=data["max_uses"], site=data.get("site"), labels=data["labels"], auto_approve=data["auto_approve"],
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
        device = Device.objects.get(uid=uid)
        key = services.device_key_rotate(actor=request.user, device=device, public_key=body.validated_data["public_key"])
        return Response(s.DeviceKeySerializer(key).data)

    @extend_schema(request=s.RevokeSerializer, responses=DeviceSerializer)
    @action(detail=False, methods=["post"], url_path=r"devices/(?P<uid>[^/]+)/revoke")
    def revoke_device(self, request: Request, uid: str) -> Response:
        body = s.RevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        device = services.device_revoke(actor=request.user, device=Device.objects.get(uid=uid),
                                        reason=body.validated_data["reason"])
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
    ordering_fields = ["id", "at"]

    @extend_schema(responses={(200, "text/csv"): str})
    @action(detail=False, methods=["get"], url_path="export")
    def export_csv(self, request: Request) -> StreamingHttpResponse:
        """The filtered log as CSV, streamed."""
        entries = self.filter_queryset(self.get_queryset()).order_by("id")
        columns = ["id", "at", "actor_type", "actor", "action", "target_type", "target_id", "target_repr",
                   "source_ip", "data", "hash"]
        writer = csv.writer(_Echo())

        def rows():
            yield writer.writerow(columns)
            for entry in entries.iterator(chunk_size=2000):
                yield writer.writerow([getattr(entry, c) if c != "data" else entry.data for c in columns])

        response = StreamingHttpResponse(rows(), content_type="text/csv")
        response["Content-Disposition"] = 'attachment; filename="audit.csv"'
        return response
