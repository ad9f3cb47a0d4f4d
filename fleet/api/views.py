"""Inventory API: thin views that validate input and call fleet.services."""

from __future__ import annotations

from django.db.models import Count
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from fleet import services
from fleet.api import serializers as s
from fleet.errors import InvalidInput
from fleet.filters import DeviceFilter, SiteFilter
from fleet.models import Device, DeviceGroup, Site
from fleet.selector import compile_selector


class SiteViewSet(viewsets.ModelViewSet):
    queryset = Site.objects.annotate(device_count=Count("devices"))
    serializer_class = s.SiteSerializer
    filterset_class = SiteFilter
    search_fields = ["name", "slug", "region"]
    ordering_fields = ["name", "slug", "region", "created_at"]
    lookup_field = "slug"

    def perform_create(self, serializer: s.SiteSerializer) -> None:
        data = dict(serializer.validated_data)
        data["timezone_name"] = data.pop("timezone", "UTC")
        site = services.site_create(actor=self.request.user, **data)
        serializer.instance = self.get_queryset().get(pk=site.pk)  # with its device_count

    def perform_update(self, serializer: s.SiteSerializer) -> None:
        site = services.site_update(actor=self.request.user, site=serializer.instance, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=site.pk)

    def perform_destroy(self, instance: Site) -> None:
        services.site_delete(actor=self.request.user, site=instance)


class DeviceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Devices. Lifecycle changes are actions (approve, quarantine, …), never plain edits."""

    queryset = Device.objects.select_related("site").prefetch_related("groups")
    serializer_class = s.DeviceSerializer
    filterset_class = DeviceFilter
    search_fields = ["uid", "name", "serial", "hardware_model"]
    ordering_fields = ["id", "uid", "name", "status", "tier", "last_seen", "created_at"]
    lookup_field = "uid"
    lookup_value_regex = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"
    action_permissions = {
        "create": ["fleet.add_device"],
        "partial_update": ["fleet.change_device"],
        "approve": ["fleet.approve_device"],
        "quarantine": ["fleet.quarantine_device"],
        "release": ["fleet.quarantine_device"],
        "decommission": ["fleet.decommission_device"],
        "pin": ["fleet.pin_device"],
        "unpin": ["fleet.pin_device"],
        "labels": ["fleet.change_device"],
        "commands": ["fleet.view_devicecommand"],
    }

    def _respond(self, device: Device, code: int = status.HTTP_200_OK) -> Response:
        device = self.get_queryset().get(pk=device.pk)
        return Response(s.DeviceSerializer(device).data, status=code)

    @extend_schema(request=s.DeviceWriteSerializer, responses={201: s.DeviceSerializer})
    def create(self, request: Request) -> Response:
        """Register a device ahead of its first connection."""
        data = self._validated(s.DeviceWriteSerializer, request)
        if not data.get("uid"):
            raise InvalidInput("uid is required to register a device")
        device = services.device_register(
            actor=request.user, uid=data["uid"], name=data.get("name", ""), serial=data.get("serial", ""),
            hardware_model=data.get("hardware_model", ""), site=data.get("site"), labels=data.get("labels"),
            capabilities=data.get("capabilities"),
        )
        return self._respond(device, status.HTTP_201_CREATED)

    @extend_schema(request=s.DeviceWriteSerializer, responses=s.DeviceSerializer)
    def partial_update(self, request: Request, uid: str) -> Response:
        data = self._validated(s.DeviceWriteSerializer, request, partial=True)
        if "uid" in data:
            raise InvalidInput("a device's uid cannot change")
        changes = {**data.pop("capabilities", {}), **data}
        device = services.device_update(actor=request.user, device=self.get_object(), **changes)
        return self._respond(device)

    def _validated(self, serializer_class: type, request: Request, partial: bool = False) -> dict:
        serializer = serializer_class(data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        return dict(serializer.validated_data)

    @extend_schema(request=s.ReasonSerializer, responses=s.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, uid: str) -> Response:
        data = self._validated(s.ReasonSerializer, request)
        return self._respond(services.device_approve(actor=request.user, device=self.get_object(), **data))

    @extend_schema(request=s.QuarantineSerializer, responses=s.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def quarantine(self, request: Request, uid: str) -> Response:
        data = self._validated(s.QuarantineSerializer, request)
        return self._respond(services.device_quarantine(actor=request.user, device=self.get_object(), **data))

    @extend_schema(request=s.ReasonSerializer, responses=s.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def release(self, request: Request, uid: str) -> Response:
        data = self._validated(s.ReasonSerializer, request)
        return self._respond(services.device_release(actor=request.user, device=self.get_object(), **data))

    @extend_schema(request=s.ReasonSerializer, responses=s.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def decommission(self, request: Request, uid: str) -> Response:
        data = self._validated(s.ReasonSerializer, request)
        return self._respond(services.device_decommission(actor=request.user, device=self.get_object(), **data))

    @extend_schema(request=s.PinSerializer, responses=s.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def pin(self, request: Request, uid: str) -> Response:
        data = self._validated(s.PinSerializer, request)
        return self._respond(services.device_pin(actor=request.user, device=self.get_object(), **data))

    @extend_schema(request=s.UnpinSerializer, responses=s.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def unpin(self, request: Request, uid: str) -> Response:
        data = self._validated(s.UnpinSerializer, request)
        return self._respond(services.device_unpin(actor=request.user, device=self.get_object(), **data))

    @extend_schema(methods=["GET"], responses=s.DeviceCommandSerializer(many=True))
    @extend_schema(methods=["POST"], request=s.CommandIssueSerializer, responses={201: s.DeviceCommandSerializer})
    @action(detail=True, methods=["get", "post"], pagination_class=None)  # the 100 most recent, unpaged
    def commands(self, request: Request, uid: str) -> Response:
        """Recent commands of the device; `POST` queues a new one (delivered now or on reconnect)."""
        device = self.get_object()
        if request.method == "GET":
            recent = device.commands.all()[:100]
            return Response(s.DeviceCommandSerializer(recent, many=True).data)
        if not request.user.has_perm("fleet.send_command"):
            self.permission_denied(request, message="you may not send commands to devices")
        data = self._validated(s.CommandIssueSerializer, request)
        command = services.command_issue(actor=request.user, device=device, name=data["name"], args=data["args"])
        return Response(s.DeviceCommandSerializer(command).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.BulkLabelSerializer, responses={200: {"type": "object"}})
    @action(detail=False, methods=["post"])
    def labels(self, request: Request) -> Response:
        """Set and remove labels on many devices chosen by selector or uid list."""
        data = self._validated(s.BulkLabelSerializer, request)
        devices = Device.objects.all()
        if data.get("selector"):
            devices = devices.filter(compile_selector(data["selector"]))
        if data.get("uids"):
            devices = devices.filter(uid__in=data["uids"])
        count = services.device_set_labels(
            actor=request.user, devices=devices, set_labels=data["set"], remove=data["remove"]
        )
        return Response({"updated": count})


class DeviceGroupViewSet(viewsets.ModelViewSet):
    queryset = DeviceGroup.objects.annotate(device_count=Count("devices"))
    serializer_class = s.DeviceGroupSerializer
    search_fields = ["name", "slug", "description"]
    ordering_fields = ["name", "slug", "created_at"]
    lookup_field = "slug"
    action_permissions = {"members": ["fleet.change_devicegroup"]}

    def perform_create(self, serializer: s.DeviceGroupSerializer) -> None:
        group = services.group_create(actor=self.request.user, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=group.pk)  # with its device_count

    def perform_update(self, serializer: s.DeviceGroupSerializer) -> None:
        group = services.group_update(actor=self.request.user, group=serializer.instance, **serializer.validated_data)
        serializer.instance = self.get_queryset().get(pk=group.pk)

    def perform_destroy(self, instance: DeviceGroup) -> None:
        services.group_delete(actor=self.request.user, group=instance)

    @extend_schema(request=s.GroupMembersSerializer, responses=s.DeviceGroupSerializer)
    @action(detail=True, methods=["post"])
    def members(self, request: Request, slug: str) -> Response:
        """Add and remove devices (by uid)."""
        body = s.GroupMembersSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        wanted = set(body.validated_data["add"]) | set(body.validated_data["remove"])
        found = {d.uid: d for d in Device.objects.filter(uid__in=wanted)}
        missing = sorted(wanted - set(found))
        if missing:
            raise InvalidInput(f"unknown device uids: {', '.join(missing[:20])}")
        group = services.group_set_members(
            actor=request.user, group=self.get_object(),
            add=[found[u] for u in body.validated_data["add"]],
            remove=[found[u] for u in body.validated_data["remove"]],
        )
        return Response(s.DeviceGroupSerializer(self.get_queryset().get(pk=group.pk)).data)
