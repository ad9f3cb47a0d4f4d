"""Admin for telemetry: metric catalog and events (read-only), alert rules and alerts via services."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from fleet.errors import DomainError
from telemetry import services
from telemetry.models import Alert, AlertRule, AlertState, DeviceEvent, Metric


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Metric)
class MetricAdmin(ReadOnlyAdmin):
    list_display = ["id", "name", "created_at"]
    search_fields = ["name"]


@admin.register(DeviceEvent)
class DeviceEventAdmin(ReadOnlyAdmin):
    list_display = ["time", "device", "kind", "severity", "message"]
    list_filter = ["kind", "severity"]
    search_fields = ["device__uid", "message"]
    list_select_related = ["device"]
    date_hierarchy = "time"


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "metric", "comparison", "threshold", "for_duration_s", "scope", "severity",
                    "enabled", "last_evaluated_at"]
    list_filter = ["enabled", "kind", "severity", "scope"]
    search_fields = ["name", "metric"]
    raw_id_fields = ["device"]
    readonly_fields = ["created_by", "created_at", "updated_at", "last_evaluated_at"]

    def save_model(self, request, obj, form, change):
        fields = {f: form.cleaned_data[f] for f in form.changed_data if f in services.RULE_FIELDS}
        if change:
            services.alert_rule_update(actor=request.user, rule=obj, **fields)
        else:
            data = {f: form.cleaned_data[f] for f in form.cleaned_data if f in services.RULE_FIELDS}
            form.instance = services.alert_rule_create(actor=request.user, **data)

    def delete_model(self, request, obj):
        services.alert_rule_delete(actor=request.user, rule=obj)


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["id", "rule", "device", "state", "severity", "opened_at", "resolved_at", "last_value"]
    list_filter = ["state", "severity"]
    search_fields = ["device__uid", "rule__name"]
    list_select_related = ["rule", "device"]
    readonly_fields = [f.name for f in Alert._meta.fields] + ["history"]
    actions = ["acknowledge"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Acknowledge selected open alerts", permissions=["change"])
    def acknowledge(self, request: HttpRequest, queryset: QuerySet) -> None:
        done = 0
        for alert in queryset.filter(state=AlertState.OPEN):
            try:
                services.alert_acknowledge(alert=alert, actor=request.user)
                done += 1
            except DomainError as exc:
                self.message_user(request, exc.message, messages.WARNING)
        self.message_user(request, f"{done} alert(s) acknowledged")
