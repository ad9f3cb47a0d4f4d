"""Security pages: approvals, enrollment tokens, attestation policies, quarantine, audit log."""

from __future__ import annotations

import datetime as dt
from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from fleet import services as fleet_services
from fleet.errors import DomainError
from fleet.models import Device, DeviceStatus, Site
from frontend.access import action, page
from security import attestation, services
from security.models import AttestationPolicy, AuditEntry, EnrollmentToken

SECRET_SESSION_KEY = "frontend.new_token_secret"  # noqa: S105 -- a session key name, not a secret


class TokenForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="What the token is for, e.g. “plant 7 batch 3”.")
    expires_in_hours = forms.IntegerField(min_value=1, max_value=24 * 365, initial=24, label="Expires in (hours)")
    max_uses = forms.IntegerField(min_value=1, max_value=1_000_000, initial=1, label="Maximum uses (devices)")
    site = forms.ModelChoiceField(queryset=Site.objects.order_by("slug"), required=False, to_field_name="slug",
                                  empty_label="(no site)")
    labels = forms.CharField(required=False, help_text="Labels for enrolled devices: key=value, comma-separated.")
    auto_approve = forms.BooleanField(required=False, help_text="Enrolled devices become active without approval.")

    def clean_labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.cleaned_data["labels"].split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise forms.ValidationError(f"{part.strip()!r} is not key=value")
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
        return out


@page("security.view_enrollmenttoken")
def security_home(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    pending = list(Device.objects.filter(status=DeviceStatus.PENDING).select_related("site").order_by("created_at")[:50])
    pending_total = Device.objects.filter(status=DeviceStatus.PENDING).count()
    quarantined = list(Device.objects.filter(status=DeviceStatus.QUARANTINED).select_related("site", "trust")
                       .order_by("-updated_at")[:50])
    quarantined_total = Device.objects.filter(status=DeviceStatus.QUARANTINED).count()
    tokens = list(EnrollmentToken.objects.select_related("site", "created_by")[:50])
    for t in tokens:
        t.current_state = t.state(now)
    policies = list(AttestationPolicy.objects.select_related("group", "learn_from").exclude(state="retired")[:50])
    retired = AttestationPolicy.objects.filter(state="retired").count()
    secret = request.session.pop(SECRET_SESSION_KEY, None)  # shown once
    return render(request, "frontend/security.html", {
        "nav": "security", "pending": pending, "pending_total": pending_total, "quarantined": quarantined,
        "quarantined_total": quarantined_total, "tokens": tokens, "policies": policies, "retired": retired,
        "token_form": TokenForm(), "secret": secret,
    })


@action("security.add_enrollmenttoken")
def token_create(request: HttpRequest) -> HttpResponse:
    form = TokenForm(request.POST)
    if not form.is_valid():
        errors = "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items())
        messages.error(request, f"The token was not created: {errors}")
        return redirect("security")
    data = form.cleaned_data
    try:
        token, secret = services.enrollment_token_create(
            actor=request.user, expires_in=timedelta(hours=data["expires_in_hours"]), max_uses=data["max_uses"],
            name=data["name"], site=data["site"], labels=data["labels"], auto_approve=data["auto_approve"],
        )
    except DomainError as exc:
        messages.error(request, f"The token was not created: {exc.message}")
        return redirect("security")
    request.session[SECRET_SESSION_KEY] = {"secret": secret, "name": token.name or token.prefix}
    return redirect("security")


@action("security.change_enrollmenttoken")
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(EnrollmentToken, pk=pk)
    try:
        services.enrollment_token_revoke(actor=request.user, token=token)
        messages.success(request, f"Token {token.prefix}… revoked: no device can enroll with it any more.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("security")


@action("security.change_attestationpolicy")
def policy_approve(request: HttpRequest, pk: int) -> HttpResponse:
    policy = get_object_or_404(AttestationPolicy, pk=pk)
    try:
        attestation.policy_approve(actor=request.user, policy=policy)
        messages.success(request, f"Policy {policy.name} v{policy.version} is now enforced.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("security")


@action("fleet.quarantine_device")
def release(request: HttpRequest, uid: str) -> HttpResponse:
    """Release from the security page's quarantine list (the device page has the same action)."""
    device = get_object_or_404(Device, uid=uid)
    try:
        fleet_services.device_release(actor=request.user, device=device, reason=request.POST.get("reason", "")[:500])
        messages.success(request, f"{device.uid} released.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("security")


AUDIT_PAGE = 100


def _when(value: str, end: bool = False):
    if not value:
        return None
    parsed = parse_datetime(value)
    if parsed is None:
        day = parse_date(value)
        if day is None:
            return None
        parsed = dt.datetime.combine(day, dt.time.min)
        if end:
            parsed += timedelta(days=1)
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=dt.UTC)


@page("security.view_auditentry")
def audit_log(request: HttpRequest) -> HttpResponse:
    params = {k: request.GET.get(k, "").strip()[:200] for k in ("action", "actor", "target_type", "since", "until")}
    entries = AuditEntry.objects.all()
    if params["action"]:
        entries = entries.filter(action__startswith=params["action"])
    if params["actor"]:
        entries = entries.filter(actor=params["actor"])
    if params["target_type"]:
        entries = entries.filter(target_type=params["target_type"])
    since, until = _when(params["since"]), _when(params["until"], end=True)
    bad = [k for k in ("since", "until") if params[k] and _when(params[k]) is None]
    if since:
        entries = entries.filter(at__gte=since)
    if until:
        entries = entries.filter(at__lt=until)
    before = request.GET.get("before", "")
    if before.isdigit():
        entries = entries.filter(id__lt=int(before))
    rows = list(entries.order_by("-id")[: AUDIT_PAGE + 1])
    more = len(rows) > AUDIT_PAGE
    rows = rows[:AUDIT_PAGE]
    api_filters = {"action": params["action"], "actor": params["actor"], "target_type": params["target_type"],
                   "since": since.isoformat() if since else "", "until": until.isoformat() if until else ""}
    export_qs = urlencode({k: v for k, v in api_filters.items() if v})
    page_qs = urlencode({k: v for k, v in params.items() if v})
    return render(request, "frontend/audit.html", {
        "nav": "audit", "entries": rows, "params": params, "bad_dates": bad, "export_qs": export_qs,
        "older_qs": f"{page_qs}&before={rows[-1].id}" if more and rows else None, "page_qs": page_qs,
        "newest": not before,
    })
