"""Admin for security models. The audit log is read-only here: no add, change or delete."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from security.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["id", "at", "actor", "action", "target_type", "target_repr", "source_ip"]
    list_filter = ["action", "actor_type", "target_type"]
    search_fields = ["actor", "action", "target_repr", "target_id"]
    date_hierarchy = "at"
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEntry | None = None) -> bool:
        return False
