"""Admin for rollouts. State changes are actions calling rollouts.services; nothing is edited in place."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from fleet.errors import DomainError
from rollouts import services
from rollouts.models import Artifact, ArtifactVariant, Campaign, Execution, SigningKey


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


def _run(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet, verb: str, call) -> None:
    done, failed = 0, []
    for obj in queryset:
        try:
            call(obj)
            done += 1
        except DomainError as exc:
            failed.append(f"{obj}: {exc.message}")
    if done:
        modeladmin.message_user(request, f"{verb}: {done}.", messages.SUCCESS)
    for message in failed[:10]:
        modeladmin.message_user(request, message, messages.WARNING)


@admin.register(SigningKey)
class SigningKeyAdmin(ReadOnlyAdmin):
    list_display = ["key_id", "active", "created_at", "retired_at", "revoked_at"]
    exclude = ["private_key_encrypted"]
    actions = ["create_key", "activate", "revoke"]

    @admin.action(description="Create a new active key (rotate)", permissions=["add"])
    def create_key(self, request, queryset):
        key = services.signing_key_create(actor=request.user, activate=True)
        self.message_user(request, f"created and activated {key.key_id}", messages.SUCCESS)

    @admin.action(description="Make the selected key the signer", permissions=["add"])
    def activate(self, request, queryset):
        _run(self, request, queryset[:1], "Activated", lambda k: services.signing_key_activate(actor=request.user, key=k))

    @admin.action(description="Revoke selected keys", permissions=["add"])
    def revoke(self, request, queryset):
        _run(self, request, queryset, "Revoked", lambda k: services.signing_key_revoke(
            actor=request.user, key=k, reason=f"admin action by {request.user}"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Used by the actions' `permissions=["add"]`; keys are still created only through the action.
        return request.user.has_perm("rollouts.add_signingkey")

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: dict | None = None):
        # has_add_permission is true for admins (the actions need it), which would also open the
        # plain add form: it saves a key row with no key pair and no audit entry, bypassing the service.
        from django.core.exceptions import PermissionDenied

        raise PermissionDenied("signing keys are created with the “Create a new active key” action")


class VariantInline(admin.TabularInline):
    model = ArtifactVariant
    fields = ["name", "tiers", "file", "size", "sha256", "key"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyAdmin):
    list_display = ["name", "kind", "version", "min_tier", "created_by", "created_at"]
    list_filter = ["kind"]
    search_fields = ["name", "version"]
    inlines = [VariantInline]


def _control(verb: str, call):
    def run(modeladmin, request, queryset):
        _run(modeladmin, request, queryset, verb, lambda c: call(c, request))

    run.__name__ = f"action_{verb.lower().replace(' ', '_')}"
    return admin.action(description=f"{verb} selected campaigns", permissions=["control"])(run)


@admin.register(Campaign)
class CampaignAdmin(ReadOnlyAdmin):
    list_display = ["name", "artifact", "state", "current_wave", "eligible_count", "created_at", "started_at"]
    list_filter = ["state", "kind"]
    search_fields = ["name", "artifact_name"]
    readonly_fields = [f.name for f in Campaign._meta.fields]
    actions = [
        _control("Start", lambda c, r: services.campaign_start(actor=r.user, campaign=c, reason="admin")),
        _control("Pause", lambda c, r: services.campaign_pause(actor=r.user, campaign=c, reason=f"admin: {r.user}")),
        _control("Resume", lambda c, r: services.campaign_resume(actor=r.user, campaign=c, reason=f"admin: {r.user}")),
        _control("Abort", lambda c, r: services.campaign_abort(actor=r.user, campaign=c, reason=f"admin: {r.user}")),
        _control("Abort and revert", lambda c, r: services.campaign_abort(
            actor=r.user, campaign=c, reason=f"admin: {r.user}", revert=True)),
    ]

    def has_control_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("rollouts.control_campaign")

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return request.user.has_perm("rollouts.view_campaign")


@admin.register(Execution)
class ExecutionAdmin(ReadOnlyAdmin):
    list_display = ["id", "campaign", "device", "wave", "state", "attempt", "progress", "updated_at"]
    list_filter = ["state", "component"]
    search_fields = ["device__uid"]
    raw_id_fields = ["campaign", "device", "variant"]
    list_select_related = ["campaign", "device"]
