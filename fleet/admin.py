"""Admin for the inventory. Lifecycle changes are actions that call fleet.services."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from fleet import services
from fleet.errors import DomainError
from fleet.models import Device, DeviceCommand, DeviceGroup, PresenceEvent, Site, UplinkCursor


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "region", "timezone", "device_count"]
    list_filter = ["region"]
    search_fields = ["name", "slug", "region"]
    prepopulated_fields = {"slug": ["name"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(_devices=Count("devices"))

    @admin.display(ordering="_devices", description="devices")
    def device_count(self, obj: Site) -> int:
        return obj._devices

    def save_model(self, request, obj, form, change):
        if change:
            services.site_update(actor=request.user, site=obj, **{f: form.cleaned_data[f] for f in form.changed_data})
        else:
            form.instance = services.site_create(
                actor=request.user, name=obj.name, slug=obj.slug, region=obj.region, timezone_name=obj.timezone,
                latitude=obj.latitude, longitude=obj.longitude,
            )

    def delete_model(self, request, obj):
        services.site_delete(actor=request.user, site=obj)


def _lifecycle_action(service, verb: str, permission: str, needs_reason: bool = False):
    def run(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet) -> None:
        done, failed = 0, []
        for device in queryset:
            try:
                kwargs = {"reason": f"admin bulk action by {request.user}"} if needs_reason else {}
                service(actor=request.user, device=device, **kwargs)
                done += 1
            except DomainError as exc:
                failed.append(exc.message)
        if done:
            modeladmin.message_user(request, f"{verb}: {done} device(s).", messages.SUCCESS)
        for message in failed[:10]:
            modeladmin.message_user(request, message, messages.WARNING)

    run.__name__ = f"action_{verb.lower()}"
    return admin.action(description=f"{verb} selected devices", permissions=[permission])(run)


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["uid", "name", "status", "online", "last_seen", "tier", "site", "hardware_model", "accelerator"]
    list_filter = ["status", "online", "tier", "accelerator", "site", "hardware_model"]
    search_fields = ["uid", "name", "serial", "hardware_model"]
    list_select_related = ["site"]
    list_per_page = 100
    show_full_result_count = False  # COUNT(*) over a large fleet on every page is wasted work
    readonly_fields = ["status", "online", "last_seen", "tier", "installed_versions", "pinned_versions",
                       "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["uid", "name", "serial", "hardware_model", "site", "labels"]}),
        ("Capabilities", {"fields": ["cpu_cores", "ram_mb", "accelerator", "storage_mb", "arch", "os", "tier"]}),
        ("State", {"fields": ["status", "online", "last_seen", "installed_versions", "pinned_versions",
                              "created_at", "updated_at"]}),
    ]
    actions = [
        _lifecycle_action(services.device_approve, "Approve", "approve"),
        _lifecycle_action(services.device_quarantine, "Quarantine", "quarantine", needs_reason=True),
        _lifecycle_action(services.device_release, "Release", "quarantine"),
        _lifecycle_action(services.device_decommission, "Decommission", "decommission"),
    ]

    def has_approve_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("fleet.approve_device")

    def has_quarantine_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("fleet.quarantine_device")

    def has_decommission_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("fleet.decommission_device")

    def has_delete_permission(self, request: HttpRequest, obj: Device | None = None) -> bool:
        return False  # devices are decommissioned, never deleted: their history stays

    def save_model(self, request, obj, form, change):
        fields = ["name", "serial", "hardware_model", "site", "labels", *services.CAPABILITY_FIELDS]
        if change:
            services.device_update(actor=request.user, device=obj,
                                   **{f: form.cleaned_data[f] for f in form.changed_data if f in fields})
        else:
            form.instance = services.device_register(
                actor=request.user, uid=obj.uid, name=obj.name, serial=obj.serial,
                hardware_model=obj.hardware_model, site=obj.site, labels=obj.labels,
                capabilities={f: getattr(obj, f) for f in services.CAPABILITY_FIELDS},
            )


@admin.register(DeviceGroup)
class DeviceGroupAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "member_count"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    autocomplete_fields = ["devices"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(_members=Count("devices"))

    @admin.display(ordering="_members", description="devices")
    def member_count(self, obj: DeviceGroup) -> int:
        return obj._members

    def save_model(self, request, obj, form, change):
        if change:
            services.group_update(actor=request.user, group=obj,
                                  **{f: form.cleaned_data[f] for f in form.changed_data if f != "devices"})
        else:
            form.instance = services.group_create(actor=request.user, name=obj.name, slug=obj.slug,
                                                  description=obj.description)

    def save_related(self, request, form, formsets, change):
        group = form.instance
        wanted = set(form.cleaned_data.get("devices", []))
        current = set(group.devices.all())
        services.group_set_members(actor=request.user, group=group, add=wanted - current, remove=current - wanted)

    def delete_model(self, request, obj):
        services.group_delete(actor=request.user, group=obj)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written only by the system: browsable, never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(DeviceCommand)
class DeviceCommandAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "device", "name", "state", "created_by", "completed_at"]
    list_filter = ["state", "name"]
    search_fields = ["device__uid", "created_by"]
    list_select_related = ["device"]
    show_full_result_count = False


@admin.register(UplinkCursor)
class UplinkCursorAdmin(ReadOnlyAdmin):
    list_display = ["device", "last_acked_seq"]
    search_fields = ["device__uid"]
    list_select_related = ["device"]


@admin.register(PresenceEvent)
class PresenceEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "device", "kind", "session"]
    list_filter = ["kind"]
    search_fields = ["device__uid"]
    list_select_related = ["device"]
    date_hierarchy = "at"
    show_full_result_count = False
