"""Admin for security models. The audit log is read-only here: no add, change or delete."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils import timezone

from security import attestation, services
from security.models import (
    AttestationChallenge,
    AttestationPolicy,
    AttestationResult,
    AuditEntry,
    DeviceKey,
    DeviceTrust,
    EnrollmentToken,
    TpmIdentity,
    TrustAnchor,
)


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


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    """Tokens are created here with a one-time display of the secret (see save_model)."""

    list_display = ["__str__", "prefix", "token_state", "uses", "max_uses", "expires_at", "site", "auto_approve"]
    list_filter = ["auto_approve", "site"]
    search_fields = ["name", "prefix"]
    fields = ["name", "expires_at", "max_uses", "site", "labels", "auto_approve"]
    readonly_fields = ["prefix", "uses", "revoked_at", "created_by", "created_at"]
    actions = ["revoke"]

    @admin.display(description="state")
    def token_state(self, obj: EnrollmentToken) -> str:
        return obj.state(timezone.now())

    def get_fields(self, request: HttpRequest, obj: EnrollmentToken | None = None) -> list[str]:
        return self.fields if obj is None else ["name", "prefix", "uses", "max_uses", "expires_at", "site", "labels",
                                                "auto_approve", "revoked_at", "created_by", "created_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: EnrollmentToken | None = None) -> list[str]:
        return [] if obj is None else self.get_fields(request, obj)

    def save_model(self, request, obj, form, change):
        if change:
            return
        token, secret = services.enrollment_token_create(
            actor=request.user, name=obj.name, expires_in=obj.expires_at - timezone.now(), max_uses=obj.max_uses,
            site=obj.site, labels=obj.labels, auto_approve=obj.auto_approve,
        )
        form.instance = token
        obj.pk = token.pk
        messages.warning(request, f"Enrollment token created. Copy the secret now; it is not shown again: {secret}")

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset) -> None:
        for token in queryset.filter(revoked_at__isnull=True):
            services.enrollment_token_revoke(actor=request.user, token=token)


@admin.register(DeviceKey)
class DeviceKeyAdmin(admin.ModelAdmin):
    list_display = ["fingerprint", "device", "state", "source", "created_at", "revoked_at"]
    list_filter = ["state", "source"]
    search_fields = ["fingerprint", "device__uid"]
    list_select_related = ["device"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # keys arrive by enrollment, pre-authorisation (API) or rotation

    def has_change_permission(self, request: HttpRequest, obj: DeviceKey | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: DeviceKey | None = None) -> bool:
        return False


@admin.register(AttestationResult)
class AttestationResultAdmin(admin.ModelAdmin):
    list_display = ["created_at", "device", "status", "format", "self_reported", "failed", "policy"]
    list_filter = ["status", "format", "self_reported"]
    search_fields = ["device__uid", "evidence_sha256"]
    list_select_related = ["device", "policy"]
    show_full_result_count = False

    @admin.display(description="failed checks")
    def failed(self, obj: AttestationResult) -> str:
        return ", ".join(obj.failed_checks) or "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AttestationResult | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AttestationResult | None = None) -> bool:
        return False


@admin.register(DeviceTrust)
class DeviceTrustAdmin(admin.ModelAdmin):
    list_display = ["device", "state", "last_status", "last_attested_at", "affirming_streak"]
    list_filter = ["state", "last_status"]
    search_fields = ["device__uid"]
    list_select_related = ["device"]
    actions = ["attest_now"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DeviceTrust | None = None) -> bool:
        return False

    def has_attest_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("security.request_attestation")

    @admin.action(description="Attest selected devices now", permissions=["attest"])
    def attest_now(self, request: HttpRequest, queryset) -> None:
        for trust in queryset.select_related("device"):
            attestation.attestation_request(actor=request.user, device=trust.device)
        self.message_user(request, f"Challenges sent to {queryset.count()} device(s) (connected ones answer).")


@admin.register(TpmIdentity)
class TpmIdentityAdmin(admin.ModelAdmin):
    list_display = ["device", "ek_tier", "ek_approved", "ek_sha256", "created_at"]
    list_filter = ["ek_tier", "ek_approved"]
    search_fields = ["device__uid", "ek_sha256"]
    readonly_fields = ["device", "ek_sha256", "ek_tier", "ek_cert_failed", "ek_approved", "ek_approved_by", "ak_name",
                       "created_at"]
    exclude = ["ek_public", "ek_certificate", "ak_public"]
    actions = ["approve_ek"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_approve_ek_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("security.approve_ek")

    @admin.action(description="Approve the endorsement key (no valid certificate)", permissions=["approve_ek"])
    def approve_ek(self, request: HttpRequest, queryset) -> None:
        for identity in queryset.filter(ek_approved=False).select_related("device"):
            attestation.tpm_ek_approve(actor=request.user, device=identity.device)


@admin.register(AttestationPolicy)
class AttestationPolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "state", "hardware_model", "group", "created_by", "approved_by"]
    list_filter = ["state"]
    search_fields = ["name", "hardware_model"]
    actions = ["approve"]

    def has_change_permission(self, request: HttpRequest, obj: AttestationPolicy | None = None) -> bool:
        return False  # versions are immutable: write a new one (API) instead

    @admin.action(description="Approve learned baseline (enforce it)", permissions=["add"])
    def approve(self, request: HttpRequest, queryset) -> None:
        for policy in queryset.filter(state=AttestationPolicy.State.PENDING_APPROVAL):
            attestation.policy_approve(actor=request.user, policy=policy)


@admin.register(TrustAnchor)
class TrustAnchorAdmin(admin.ModelAdmin):
    list_display = ["name", "tier", "created_at"]
    list_filter = ["tier"]


@admin.register(AttestationChallenge)
class AttestationChallengeAdmin(admin.ModelAdmin):
    list_display = ["created_at", "device", "reason", "expires_at", "answered_at"]
    list_filter = ["reason"]
    search_fields = ["device__uid"]
    list_select_related = ["device"]
    exclude = ["nonce"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AttestationChallenge | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AttestationChallenge | None = None) -> bool:
        return False
