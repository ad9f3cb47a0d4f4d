"""Inventory API serializers: shape and validate input; services make the changes."""

from __future__ import annotations

from rest_framework import serializers

from fleet.models import Accelerator, Device, DeviceCommand, DeviceGroup, Site
from fleet.services import COMPONENTS


class SiteSerializer(serializers.ModelSerializer):
    device_count = serializers.IntegerField(read_only=True, required=False)

    class Meta:
        model = Site
        fields = ["id", "name", "slug", "region", "timezone", "latitude", "longitude", "device_count", "created_at"]
        read_only_fields = ["id", "created_at"]


class CapabilitiesSerializer(serializers.Serializer):
    cpu_cores = serializers.IntegerField(min_value=1, max_value=4096, required=False, allow_null=True)
    ram_mb = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False, allow_null=True)
    accelerator = serializers.ChoiceField(choices=Accelerator.choices, required=False)
    storage_mb = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False, allow_null=True)
    arch = serializers.CharField(max_length=32, required=False, allow_blank=True)
    os = serializers.CharField(max_length=100, required=False, allow_blank=True)


class DeviceSerializer(serializers.ModelSerializer):
    site = serializers.SlugRelatedField(slug_field="slug", queryset=Site.objects.all(), required=False, allow_null=True)
    capabilities = serializers.SerializerMethodField()
    groups = serializers.SlugRelatedField(slug_field="slug", many=True, read_only=True)

    class Meta:
        model = Device
        fields = [
            "id", "uid", "name", "serial", "hardware_model", "capabilities", "tier", "site", "labels", "status",
            "online", "last_seen", "installed_versions", "pinned_versions", "groups", "created_at", "updated_at",
        ]
        read_only_fields = fields

    def get_capabilities(self, device: Device) -> dict:
        return {
            "cpu_cores": device.cpu_cores, "ram_mb": device.ram_mb, "accelerator": device.accelerator,
            "storage_mb": device.storage_mb, "arch": device.arch, "os": device.os,
        }


class DeviceWriteSerializer(serializers.Serializer):
    """Input for registering (POST) or editing (PATCH) a device."""

    uid = serializers.CharField(max_length=64, required=False)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    serial = serializers.CharField(max_length=100, required=False, allow_blank=True)
    hardware_model = serializers.CharField(max_length=100, required=False, allow_blank=True)
    site = serializers.SlugRelatedField(slug_field="slug", queryset=Site.objects.all(), required=False, allow_null=True)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    capabilities = CapabilitiesSerializer(required=False)


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class QuarantineSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500)


class PinSerializer(serializers.Serializer):
    component = serializers.ChoiceField(choices=COMPONENTS)
    version = serializers.CharField(max_length=64, required=False)


class UnpinSerializer(serializers.Serializer):
    component = serializers.ChoiceField(choices=COMPONENTS)


class BulkLabelSerializer(serializers.Serializer):
    selector = serializers.CharField(required=False, allow_blank=True,
                                     help_text="devices to change, as a label selector")
    uids = serializers.ListField(child=serializers.CharField(max_length=64), required=False, max_length=10000)
    set = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False, default=dict)
    remove = serializers.ListField(child=serializers.CharField(max_length=253), required=False, default=list)

    def validate(self, attrs: dict) -> dict:
        if not attrs.get("selector") and not attrs.get("uids"):
            raise serializers.ValidationError("give `selector` or `uids` to choose the devices")
        return attrs


class DeviceGroupSerializer(serializers.ModelSerializer):
    device_count = serializers.IntegerField(read_only=True, required=False)

    class Meta:
        model = DeviceGroup
        fields = ["id", "name", "slug", "description", "device_count", "created_at"]
        read_only_fields = ["id", "created_at"]


class GroupMembersSerializer(serializers.Serializer):
    add = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)
    remove = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)


class DeviceCommandSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeviceCommand
        fields = ["id", "name", "args", "state", "output", "created_by", "created_at", "sent_at", "completed_at",
                  "expires_at"]
        read_only_fields = fields


class CommandIssueSerializer(serializers.Serializer):
    name = serializers.ChoiceField(choices=DeviceCommand.Name.choices)
    args = serializers.DictField(required=False, default=dict)
